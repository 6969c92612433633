"""Open `dbl report`'s page in headless Chromium: no console error, no request leaves the page, and a
screenshot to look at.

    python bench/report_check.py                       # build a copy of projects/demo.toml, report, check
    python bench/report_check.py --workdir /tmp/demo   # the same, keeping the copy (a rerun builds nothing)
    python bench/report_check.py --page build/demo/report.html --screenshot shot.png   # check a page

Needs Chromium (`apt-get install chromium`; --chromium names another binary) and matplotlib. Exit 0 when
the page is clean, 1 with the problems listed otherwise. The test `tests/test_report.py -m browser`
runs the page check on a tiny project.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing resolves: a remote reference cannot load
]


def check_page(
    page: Path, screenshot: Path, chromium: str = "chromium", size: str = "1280,2400"
) -> list[str]:
    """Open `page` in headless Chromium and save a screenshot; returns the problems found: console
    messages of the page (it has no scripts, so any is one), and requests it made over the network."""
    page, screenshot = page.resolve(), screenshot.resolve()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="dbl-chromium-") as tmp:
        netlog = Path(tmp) / "net.json"
        cmd = [
            chromium,
            *FLAGS,
            f"--user-data-dir={Path(tmp) / 'profile'}",
            f"--log-net-log={netlog}",
            f"--screenshot={screenshot}",
            f"--window-size={size}",
            page.as_uri(),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        problems = [f"console: {line.strip()}" for line in run.stderr.splitlines() if ":CONSOLE" in line]
        problems += [f"network request: {url}" for url in _page_requests(netlog)]
    if run.returncode != 0:
        problems.append(f"chromium exited with {run.returncode}: {run.stderr[-2000:]}")
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        problems.append(f"no screenshot at {screenshot}")
    return problems


def _page_requests(netlog: Path) -> list[str]:
    """URLs of the network requests the file:// page made (Chromium's own, to its servers, are not)."""
    try:
        events = json.loads(netlog.read_text()).get("events", [])
    except (OSError, ValueError):
        # A netlog cut short (Chromium ends it on exit) lacks its closing brackets.
        try:
            events = json.loads(netlog.read_text().rstrip().rstrip(",") + "]}").get("events", [])
        except (OSError, ValueError):
            return [f"(unreadable net log {netlog})"]
    urls = set()
    for event in events:
        params = event.get("params") or {}
        url = str(params.get("url", ""))
        if url.startswith(("http:", "https:", "ws:", "wss:")) and str(
            params.get("network_isolation_key", "")
        ).startswith("file://"):
            urls.add(url)
    return sorted(urls)


def build_demo(workdir: Path) -> Path:
    """A copy of the demo project in `workdir`, built and reported; returns the page."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "demo.toml").exists():
        shutil.copy2(ROOT / "projects" / "demo.toml", workdir / "demo.toml")
        shutil.copytree(ROOT / "projects" / "shapes", workdir / "shapes", dirs_exist_ok=True)
    dbl = [sys.executable, "-m", "runner"]
    env_cwd = {"cwd": ROOT}  # this checkout's runner, whatever is installed
    subprocess.run([*dbl, "build", str(workdir / "demo.toml"), "--no-progress", "-q"], check=True, **env_cwd)
    page = workdir / "report.html"
    subprocess.run([*dbl, "report", str(workdir / "demo.toml"), "-o", str(page)], check=True, **env_cwd)
    return page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", type=Path, help="check this page (default: build the demo and report it)")
    parser.add_argument(
        "--workdir", type=Path, help="where to copy and build the demo (default: a temp folder)"
    )
    parser.add_argument("--screenshot", type=Path, default=Path("report.png"), help="PNG to write")
    parser.add_argument(
        "--chromium", default=shutil.which("chromium") or "chromium", help="the browser binary"
    )
    parser.add_argument("--window-size", default="1280,2400", help="WIDTH,HEIGHT of the screenshot")
    args = parser.parse_args()
    if not shutil.which(args.chromium):
        print(f"no browser at {args.chromium!r}: apt-get install chromium, or name one with --chromium")
        return 2
    with tempfile.TemporaryDirectory(prefix="dbl-report-") as tmp:
        page = args.page or build_demo(args.workdir or Path(tmp))
        problems = check_page(page, args.screenshot, args.chromium, args.window_size)
    for problem in problems:
        print(problem)
    print(f"{page}: {len(problems)} problem(s); screenshot {args.screenshot}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
