"""The `dbl` command: argument parsing and exit codes; the work is done elsewhere."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from runner import __version__
from runner.executor import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbl",
        description="Declarative, incremental DreamBooth LoRA builds for Stable Diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"dbl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def project_arg(p):
        p.add_argument("project", nargs="?", help="project file (default: the only *.toml here, or dbl.toml)")
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("build", help="run the stale steps")
    project_arg(p)
    p.add_argument("--dry-run", action="store_true", help="show what would run, run nothing")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="STEP",
        default=(),
        help="build these steps (and the stale steps they need)",
    )
    p.add_argument(
        "--force",
        nargs="*",
        metavar="STEP",
        default=None,
        help="rerun these steps (no STEP: all), ignoring the run-cache",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="after a failure, go on with the steps that do not depend on it",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live display")
    p.add_argument(
        "--num-processes", type=int, metavar="N", help="run train steps as N data-parallel processes"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only failures and the final line")
    p.add_argument("-v", "--verbose", action="store_true", help="also the steps' log messages")

    p = sub.add_parser("plan", help="list the stale steps and why")
    project_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("watch", help="rebuild what goes stale as files change")
    project_arg(p)
    p.add_argument("--polling", action="store_true", help="poll the file system (network file systems)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live display")

    p = sub.add_parser("init", help="start a project from a template")
    p.add_argument("dir", nargs="?", default=".", help="folder for the new project (default: here)")
    p.add_argument("--template", default="subject", help="template name (see --list)")
    p.add_argument("--list", action="store_true", help="list the templates")

    p = sub.add_parser("ls", help="list built artifacts and their paths")
    project_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("gc", help="drop run-cache entries that no lockfile refers to")
    project_arg(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be dropped")
    return parser


def find_project(arg: str | None) -> Path:
    """The project file named, or the only project file in the current folder."""
    if arg:
        return Path(arg)
    here = sorted(p for p in Path.cwd().glob("*.toml") if p.name != "pyproject.toml")
    if len(here) == 1:
        return here[0]
    if Path("dbl.toml").is_file():
        return Path("dbl.toml")
    raise SystemExit(
        _usage(
            "no project file given, and no single *.toml here: name one, e.g. `dbl build projects/demo.toml`"
        )
    )


def _usage(message: str) -> int:
    print(f"dbl: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help()
        return EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The libraries' notices of their own future changes mean nothing to someone running a build.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return COMMANDS[args.command](args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("dbl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # an unreadable input, a full disk outside any step
        if getattr(args, "debug", False):
            raise
        print(f"dbl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        print(
            f"dbl: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _load(args):
    from runner.project import ProjectError, load_project

    try:
        return load_project(find_project(args.project))
    except ProjectError as exc:
        print(exc.report(), file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_build(args) -> int:
    from runner import executor
    from runner.interrupt import StopOnInterrupt
    from runner.lockfile import LockfileError
    from runner.store import LockHeld
    from runner.ui import make_reporter

    project = _load(args)
    verbosity = -1 if args.quiet else 1 if args.verbose else 0
    reporter = make_reporter("plain" if args.no_progress else "auto", verbosity)
    if args.num_processes is not None and args.num_processes < 1:
        return _usage("--num-processes must be at least 1")
    try:
        with StopOnInterrupt() as stop:
            options = executor.BuildOptions(
                dry_run=args.dry_run,
                only=tuple(args.only),
                force=tuple(args.force) if args.force is not None else None,
                keep_going=args.keep_going,
                num_processes=args.num_processes,
                should_stop=stop.requested,
                debug=args.debug,
            )
            result = executor.build(project, options, reporter)
        return result.exit_code
    except LockHeld as exc:
        print(f"dbl: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (LockfileError, executor.UsageError) as exc:
        print(f"dbl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        reporter.close()


def cmd_plan(args) -> int:
    from runner import executor, planner
    from runner.lockfile import LockfileError

    project = _load(args)
    try:
        _, planned = executor.Workspace(project).plan()
    except LockfileError as exc:
        print(f"dbl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(planner.to_json(planned), indent=2))
        return EXIT_OK
    stale = [p for p in planned if p.stale]
    if not stale:
        print(f"all {len(planned)} steps are up to date")
        return EXIT_OK
    width = max(len(p.id) for p in stale)
    print(f"{len(stale)} of {len(planned)} steps stale:")
    for p in stale:
        print(f"  {p.id:<{width}}  {'; '.join(p.reasons)}")
    return EXIT_OK


def cmd_watch(args) -> int:
    from runner.ui import make_reporter
    from runner.watch import watch

    path = find_project(args.project)
    mode = "plain" if args.no_progress else "auto"
    return watch(path, polling=args.polling, reporter_factory=lambda: make_reporter(mode, 0))


def templates_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "templates", here / "templates"):
        if candidate.is_dir():
            return candidate
    raise SystemExit(_usage("the templates folder is missing from this installation"))


def cmd_init(args) -> int:
    folder = templates_dir()
    names = sorted(p.stem for p in folder.glob("*.toml"))
    if args.list:
        for name in names:
            first = (folder / f"{name}.toml").read_text().splitlines()
            about = next((line.lstrip("# ") for line in first[1:] if line.startswith("# ")), "")
            print(f"{name:<16} {about}")
        return EXIT_OK
    if args.template not in names:
        return _usage(f"no template '{args.template}'; templates: {', '.join(names)}")
    target_dir = Path(args.dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{args.template}.toml"
    if target.exists():
        return _usage(f"{target} exists already; choose another folder")
    text = (folder / f"{args.template}.toml").read_text()
    target.write_text(text.replace(f"projects/{args.template}.toml", str(target)))
    from runner.project.load import tomllib

    data = tomllib.loads(text)
    made = []
    for group in ("subjects", "priors"):
        for table in data.get(group, {}).values():
            images = table.get("images")
            if images:
                (target_dir / images).mkdir(parents=True, exist_ok=True)
                made.append(images)
    ignore = target_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text(".dbl/\nbuild/\n")
    print(f"created {target}")
    for images in made:
        print(f"  put your photos in {target_dir / images}/")
    print(f"then: dbl build {target}")
    return EXIT_OK


def cmd_ls(args) -> int:
    from runner import executor
    from runner.lockfile import LockfileError

    project = _load(args)
    ws = executor.Workspace(project)
    try:
        lock, planned = ws.plan()
    except LockfileError as exc:
        print(f"dbl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rows = []
    for p in planned:
        record = lock.get(p.id)
        rows.append(
            {
                "id": p.id,
                "kind": p.step.kind,
                "status": "stale" if p.stale else "fresh",
                "path": ws.rel(ws.output_dir(p.step)) if record else None,
                "files": sorted(record["outputs"]) if record else [],
                "built": record.get("built") if record else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max((len(r["id"]) for r in rows), default=0)
    for r in rows:
        where = r["path"] or "(not built)"
        print(f"{r['id']:<{width}}  {r['status']:<5}  {where}")
    return EXIT_OK


def cmd_gc(args) -> int:
    from runner import lockfile
    from runner.store import RunCache

    project = _load(args)
    cache = RunCache(project.state_dir / "cache")
    keep: set[str] = set()
    # Every lockfile beside this project shares the .dbl/ folder: keep what any of them refers to.
    for lock_path in sorted(project.dir.glob("*.lock")):
        try:
            keep |= {r["fingerprint"] for r in lockfile.read(lock_path).values()}
        except lockfile.LockfileError:
            continue
    dropped, freed = 0, 0
    for fp in cache.entries():
        if fp in keep:
            continue
        size = sum(f.stat().st_size for f in cache.entry(fp).rglob("*") if f.is_file())
        if not args.dry_run:
            cache.drop(fp)
        dropped += 1
        freed += size
    leftovers = cache.leftovers()
    if not args.dry_run:
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
    verb = "would drop" if args.dry_run else "dropped"
    print(
        f"{verb} {dropped} cache entr{'y' if dropped == 1 else 'ies'}, {freed / 1e6:.1f} MB; kept {len(keep & set(cache.entries()))}"
    )
    if leftovers:
        print(f"{verb} {len(leftovers)} folder(s) left by builds that were killed while writing the cache")
    return EXIT_OK


COMMANDS = {
    "build": cmd_build,
    "plan": cmd_plan,
    "watch": cmd_watch,
    "init": cmd_init,
    "ls": cmd_ls,
    "gc": cmd_gc,
}
