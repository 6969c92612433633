"""`dbl report`: the page of a built tiny-sd project (loss plots, grids, blends, the last build's
timeline, provenance), self-contained; and the record of the last build that the timeline reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner import executor, lockfile
from runner.cli import main
from runner.exec import lastbuild
from runner.project import load_project
from tests.conftest import ROOT, Recorder, write_image
from tests.report_page import Page, record_as_built

PROJECT = """
[project]
base_model = "tiny-sd"

[train]
resolution = 64
steps = 4
checkpoint_every = 0

[lora]
rank = 2
alpha = 4
text_encoder_rank = 2
text_encoder_alpha = 4

[priors.dog]
class_prompt = "a photo of dog"
num_images = 1
steps = 2

[subjects.dog]
images = "dog"
instance_prompt = "a photo of sks dog"
prior = "dog"
[subjects.dog.train]
save_steps = [2]

[subjects.toy]
images = "toy"
instance_prompt = "a toy in the style of <1>"
[subjects.toy.train]
steps = 2
train_text_encoder = false

[blends.mix]
adapters = { toy = 1.0, dog = 1.05 }

[renders.park]
adapter = "dog"
prompts = ["sks dog in a park"]
seeds = [0, 1]
steps = 2

[renders.compare]
adapters = ["dog@2", "mix", "none"]
prompts = ["a sks dog toy"]
steps = 2
"""


def write_project(folder: Path) -> Path:
    for i in range(2):
        write_image(folder / "dog" / f"{i}.png", seed=i, size=64)
        write_image(folder / "toy" / f"{i}.png", seed=10 + i, size=64)
    path = folder / "p.toml"
    path.write_text(textwrap.dedent(PROJECT))
    return path


def build(path: Path, **options):
    result = executor.build(load_project(path), executor.BuildOptions(**options), Recorder())
    assert result.ok, [(e.id, e.status, e.error) for e in result.steps]
    return {e.id: e.status for e in result.steps}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny project, built once: (project file, the report page's text)."""
    home = os.environ.get("DBL_TEST_HOME") or str(tmp_path_factory.getbasetemp() / "dbl-home")
    with pytest.MonkeyPatch.context() as mp:  # built-in models where the other tests keep theirs
        mp.setenv("DBL_TEST_HOME", home)
        mp.setenv("DBL_HOME", home)
        path = write_project(tmp_path_factory.mktemp("report"))
        build(path)
    assert main(["report", str(path)]) == 0
    page = load_project(path).out / "report.html"
    return path, page.read_text(encoding="utf-8")


@pytest.mark.torch
def test_the_page_parses_and_holds_a_loss_plot_per_subject(built):
    _, text = built
    page = Page(text)
    for subject in ("dog", "toy"):
        start = text.index(f'id="train:{subject}"')
        block = text[start : text.index("</div>", start)]
        assert '<img class="plot"' in block and "data:image/svg+xml;base64," in block, subject
    plots = page.images("plot")
    assert len(plots) >= 3  # two subjects and the timeline
    assert all(p["src"].startswith("data:image/svg+xml;base64,") for p in plots)
    assert "snapshot:dog@2" in text  # dog's snapshot, listed under it


@pytest.mark.torch
def test_every_render_grid_is_in_the_page_with_its_rows_and_columns(built):
    path, text = built
    page = Page(text)
    grids = page.images("grid")
    assert len(grids) == 2
    lock = lockfile.read(lockfile.lock_path(path))
    import base64

    for sid, grid in zip(("render:park", "render:compare"), grids, strict=True):
        assert grid["src"].startswith("data:image/png;base64,")
        on_disk = (path.parent / next(o for o in lock[sid]["outputs"] if o.endswith("grid.png"))).read_bytes()
        assert base64.b64decode(grid["src"].split(",", 1)[1]) == on_disk
    words = " ".join(page.text)
    assert "columns, left to right: seed 0, seed 1" in words
    assert "columns, left to right: dog@2, mix, none" in words
    assert "prompt 1, seed 0: a sks dog toy" in words
    assert "images" in words  # the render's numeric metrics


@pytest.mark.torch
def test_a_large_grid_is_a_jpeg_preview_that_names_the_file(built, monkeypatch):
    """Every grid went into the page as its PNG: a 4 x 4 grid of 512 px images is several MB, and a page
    of a dozen renders weighed as much as their grids together."""
    import base64
    import io

    from PIL import Image

    from runner import report

    path, _ = built
    monkeypatch.setattr(report, "EMBED_WHOLE_BYTES", 0)  # the tiny grids count as large
    monkeypatch.setattr(report, "PREVIEW_SIDE", 40)
    text = report.render(load_project(path))
    grids = Page(text).images("grid")
    assert len(grids) == 2
    lock = lockfile.read(lockfile.lock_path(path))
    sizes = {}
    for sid, grid in zip(("render:park", "render:compare"), grids, strict=True):
        assert grid["src"].startswith("data:image/jpeg;base64,")
        rel = next(o for o in lock[sid]["outputs"] if o.endswith("grid.png"))
        with Image.open(path.parent / rel) as whole:
            full = sizes[sid] = whole.size
        with Image.open(io.BytesIO(base64.b64decode(grid["src"].split(",", 1)[1]))) as preview:
            assert preview.format == "JPEG" and max(preview.size) == 40
            assert abs(preview.size[0] / preview.size[1] - full[0] / full[1]) < 0.1
            shown = preview.size
        folder = rel.rsplit("/", 1)[0]
        assert f"A {shown[0]}×{shown[1]} JPEG preview of grid.png ({full[0]}×{full[1]}, " in text
        assert f"which is in {folder}." in text
    monkeypatch.setattr(report, "PREVIEW_SIDE", 10_000)  # never made larger than the grid
    grids = Page(report.render(load_project(path))).images("grid")
    with Image.open(io.BytesIO(base64.b64decode(grids[0]["src"].split(",", 1)[1]))) as preview:
        assert preview.size == sizes["render:park"]


@pytest.mark.torch
def test_blends_show_their_recorded_errors(built):
    path, text = built
    errors = lockfile.read(lockfile.lock_path(path))["blend:mix"]["metrics"]["relative_error"]
    start = text.index('id="blend:mix"')
    block = text[start : text.index("</div>", start)]
    assert "relative error" in block and "toy × 1.0, dog × 1.05" in block
    for component in errors:
        assert f"<td>{component}</td>" in block


@pytest.mark.torch
def test_the_timeline_and_provenance(built):
    path, text = built
    page = Page(text)
    rows = [a for t, a in page.tags if t == "span" and "outcome" in a.get("class", "")]
    outcomes = [a["class"].split()[1] for a in rows]
    # Every step ran, but the snapshot, which its subject's train step handed to the run-cache.
    assert outcomes.count("ran") == 6 and outcomes.count("restored") == 1, outcomes
    lock = lockfile.read(lockfile.lock_path(path))
    for sid, record in lock.items():
        assert record["fingerprint"][:12] in text, sid
    assert "builtin=tiny-sd" in text


@pytest.mark.torch
def test_the_page_fetches_nothing(built):
    _, text = built
    refs = [v for _, attrs in Page(text).tags for k, v in attrs.items() if k in ("src", "href") and v]
    assert refs and all(v.startswith("data:") for v in refs)
    assert "<script" not in text and "@import" not in text and "url(http" not in text


def test_the_page_of_a_fresh_clone_does_not_blame_an_older_dbl_for_the_missing_timeline(proj):
    from runner.report import _Context, _timeline

    text = _timeline(_Context(proj.load(), {}, {}), None)
    assert "none ran here yet (a fresh clone), or only an older dbl&#x27;s" in text, text


def test_provenance_tells_a_step_the_lockfile_has_no_record_of_from_one_never_built(proj, build):
    from runner.report import _Context, _provenance

    build(proj)
    project = proj.load()
    (project.out / "renders" / "base").rename(project.out / "renders" / "new")  # a merge left it out
    text = _provenance(_Context(project, {}, {}), [], ["render:new", "render:other"])
    assert "<td>not in the lockfile (files in build/pets/renders/new)</td>" in text
    assert "<td>not built</td>" in text


def test_provenance_shows_an_evals_version_and_that_of_its_measures_in_words(proj):
    from runner.report import _Context, _provenance

    lock = {
        "eval:base": {
            "kind": "eval",
            "fingerprint": "f" * 64,
            "output_hash": "a" * 64,
            "inputs": {"version": [1, 2]},
        },
        "render:base": {
            "kind": "render",
            "fingerprint": "e" * 64,
            "output_hash": "b" * 64,
            "inputs": {"version": 3},
        },
    }
    cells = Page(_provenance(_Context(proj.load(), lock, {}), list(lock), [])).text
    assert cells[cells.index("eval:base") + 3] == "1 (measures 2)"
    assert cells[cells.index("render:base") + 3] == "3"


def _without_park(built, tmp_path: Path) -> Path:
    """A copy of the built project whose render:park outputs are gone; its project file."""
    path, _ = built
    shutil.copytree(path.parent, tmp_path / "copy", symlinks=True)
    copied = tmp_path / "copy" / path.name
    shutil.rmtree(load_project(copied).out / "renders" / "park")
    return copied


def _page(path: Path, tmp_path: Path) -> str:
    """The report of the project file at `path`, written to a folder of its own."""
    out = tmp_path / "pages"
    out.mkdir()
    assert main(["report", str(path), "-o", str(out)]) == 0
    return (out / "report.html").read_text()


@pytest.mark.torch
def test_a_build_that_restores_shows_restored(built, tmp_path):
    copied = _without_park(built, tmp_path)
    assert build(copied)["render:park"] == "cached"
    record = lastbuild.read(load_project(copied))
    outcome = {row["id"]: row["outcome"] for row in record["steps"]}
    assert outcome["render:park"] == "restored" and outcome["train:dog"] == "fresh"
    text = _page(copied, tmp_path)
    assert '<span class="outcome restored">restored</span>' in text
    assert "restored from the run-cache by the last build" in text


@pytest.mark.torch
def test_a_build_that_reruns_to_the_recorded_outputs_says_so(built, tmp_path):
    copied = _without_park(built, tmp_path)
    shutil.rmtree(copied.parent / ".dbl" / "cache")  # a fresh clone's: nothing to restore from
    recorded = lockfile.read(copied.with_suffix(".lock"))["render:park"]
    assert build(copied)["render:park"] == "done"
    assert lockfile.read(copied.with_suffix(".lock"))["render:park"] == recorded
    # said by the build itself: the times alone cannot tell a rerun within the second of the first run
    rows = {row["id"]: row for row in lastbuild.read(load_project(copied))["steps"]}
    assert rows["render:park"]["remade"] is True and "remade" not in rows["train:dog"]
    text = _page(copied, tmp_path)
    assert "rendered again by the last build, to the same outputs" in text


@pytest.mark.browser
@pytest.mark.torch
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium")
def test_chromium_opens_the_page_without_errors(built, tmp_path):
    path, _ = built
    page = load_project(path).out / "report.html"
    shot = tmp_path / "report.png"
    check = [
        sys.executable,
        str(ROOT / "bench" / "report_check.py"),
        "--page",
        str(page),
        "--screenshot",
        str(shot),
    ]
    run = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert shot.stat().st_size > 10_000


# --- without torch: errors, and the record of the last build (fake steps) -------------------------------


def test_an_unbuilt_project_says_so(proj, capsys, monkeypatch):
    assert main(["report", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "nothing is built yet" in err and f"dbl build {proj.path}" in err and "Traceback" not in err
    monkeypatch.chdir(proj.root)  # the project file as it would be typed there
    assert main(["report", proj.path.name]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"dbl: {proj.path.name}: nothing is built yet (no step in {proj.lock.name}): run `dbl build {proj.path.name}` first, then `dbl report`\n"
    )


def test_a_first_build_that_failed_has_a_page_of_its_timeline(proj, build, fake_steps, capsys):
    """No step recorded, but the last build's record says what ran and why it failed: the page shows it
    (and that nothing is built), rather than refusing as for a project never built."""
    from runner import planner

    fake_steps.fail.update(step.id for step in planner.graph(proj.load()))  # every step that runs fails
    result, _ = build(proj, keep_going=True)
    assert not result.ok and not lockfile.read(proj.lock)  # the build recorded no step
    assert main(["report", str(proj.path)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    page = Page((proj.load().out / "report.html").read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert "prior:dog failed on purpose" in text  # the timeline's error
    assert f"{proj.lock.name} (no step recorded yet)" in text
    assert "None in the lockfile." in text


def test_without_matplotlib_it_says_what_to_install(proj, build, monkeypatch, capsys):
    build(proj)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert main(["report", str(proj.path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'dbl[report]'" in err and "Traceback" not in err


def test_fidelity_scores_of_several_adapters_are_one_row_each_in_the_grids_column_order():
    from runner import report

    inputs = {"adapters": [{"_name": "dog@200"}, {"_name": "dog@1000"}, {"_name": "none"}]}
    scores = {
        "none": {"class_drift": 0.0, "prompt_fidelity": 0.5, "subject_fidelity": 0.0},
        "dog@1000": {"class_drift": 0.25, "prompt_fidelity": 0.75, "subject_fidelity": 1.0},
        "dog@200": {"class_drift": 0.0, "prompt_fidelity": 0.5},
    }
    page = Page(report._fidelity_table("eval:dog", scores, inputs))
    cells = [text for text in page.text if text.strip()]
    assert cells == [
        *("fidelity (eval:dog)", "subject fidelity", "class drift", "prompt fidelity"),
        *("dog@200", "0", "0.5"),  # not scored: an empty cell
        *("dog@1000", "1", "0.25", "0.75"),
        *("none", "0", "0", "0.5"),
    ]
    assert "<td></td>" in report._fidelity_table("eval:dog", scores, inputs)


def test_help_names_the_options(capsys):
    assert main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--output" in out and "report.html" in out


def test_a_build_records_what_each_step_did_outside_the_lockfile(proj, build, fake_steps):
    result, _ = build(proj)
    record = lastbuild.read(proj.load())
    assert record is not None and record["exit_code"] == 0 and record["backend"] == "fake"
    rows = {row["id"]: row for row in record["steps"]}
    assert {row["outcome"] for row in rows.values()} == {"ran"}
    assert all(row["seconds"] >= 0 and row["started"].endswith("Z") for row in rows.values())
    assert rows["train:dog"]["reasons"]
    assert "last-build" not in proj.lock.read_text()
    assert lastbuild.path(proj.load()).parent == proj.root / ".dbl"

    # A build with nothing to do leaves the record as it was, and the record makes nothing stale.
    before = lastbuild.path(proj.load()).read_text()
    result, rec = build(proj)
    assert fake_steps.ran == [] and lastbuild.path(proj.load()).read_text() == before

    # A failure, and what it held back.
    proj.edit("rank = 4", "rank = 8")
    fake_steps.fail.add("train:dog")
    result, _ = build(proj, keep_going=True)
    rows = {row["id"]: row for row in lastbuild.read(proj.load())["steps"]}
    assert rows["train:dog"]["outcome"] == "failed" and "on purpose" in rows["train:dog"]["error"]
    assert rows["render:park"]["outcome"] == "skipped" and rows["prior:dog"]["outcome"] == "fresh"
    assert rows["train:toy"]["outcome"] == "ran"


def test_an_unwritable_record_costs_a_line_not_the_build(proj, build, fake_steps):
    (proj.root / ".dbl").mkdir()
    lastbuild.path(proj.load()).mkdir()  # a folder where the file goes: os.replace fails
    result, rec = build(proj)
    assert result.ok
    assert any("cannot write the record of this build" in e[2] for e in rec.events if e[0] == "log")


def test_a_missing_or_odd_dbl_json_is_said_not_raised(proj, build, fake_steps, capsys):
    build(proj)
    out = proj.load().out
    (out / "adapters" / "dog" / "dbl.json").unlink()
    (out / "adapters" / "toy" / "dbl.json").write_text('{"log": 5, "prior": "x", "train": [1], "loss": 2}')
    record_as_built(proj.lock, proj.root, out / "adapters" / "toy" / "dbl.json")  # written so by a build
    assert main(["report", str(proj.path)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    text = (out / "report.html").read_text(encoding="utf-8")
    dog = text[text.index('id="train:dog"') :]
    assert "dbl.json is missing from build/pets/adapters/dog" in dog[: dog.index("</div>")]
    toy = text[text.index('id="train:toy"') :]
    assert "No per-step log in its dbl.json." in toy[: toy.index("</div>")]


def test_a_pipe_or_device_given_as_output_is_written_through_not_replaced(proj, build, fake_steps):
    """`-o /dev/stdout` (a link to a pipe), `-o /dev/null`: renaming a temporary file over them would
    replace the device or the link (as root, /dev/null itself) with a regular file."""
    import stat
    import threading

    build(proj)
    fifo = proj.root / "pipe"
    os.mkfifo(fifo)
    link = proj.root / "stdout"
    link.symlink_to(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text(encoding="utf-8")), daemon=True)
    reader.start()
    assert main(["report", str(proj.path), "-o", str(link)]) == 0
    reader.join(10)
    assert got and got[0].startswith("<!DOCTYPE html>")
    assert link.is_symlink() and stat.S_ISFIFO(fifo.stat().st_mode)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_reader_that_goes_away_is_not_an_error(proj, build, fake_steps, capsys):
    """`dbl report -o /dev/stdout | head -1`: the reader closes the pipe with most of the page unread,
    which is what the reader wanted, not a failure of dbl (`dbl ls | head` says nothing either)."""
    import fcntl
    import termios
    import threading

    build(proj)
    fifo = proj.root / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that dbl's open does not wait
    fcntl.fcntl(reader, 1031, 4096)  # F_SETPIPE_SZ: the page cannot fit, so dbl's write blocks
    codes = []
    writer = threading.Thread(target=lambda: codes.append(main(["report", str(proj.path), "-o", str(fifo)])))
    writer.start()
    pending = bytearray(4)
    for _ in range(1000):  # until dbl has filled the pipe and waits on it
        fcntl.ioctl(reader, termios.FIONREAD, pending)
        if int.from_bytes(pending, sys.byteorder) >= 4096:
            break
        writer.join(0.01)
    assert int.from_bytes(pending, sys.byteorder) >= 4096, "the page went through: nothing was cut off"
    os.close(reader)  # the reader goes away
    writer.join(10)
    assert codes == [0]
    assert "Broken pipe" not in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_dev_stdout_on_a_pipe_gets_the_page_and_nothing_else(proj, build, fake_steps, capsys):
    """`dbl report -o /dev/stdout | ...`: the link /proc/self/fd/1 names an anonymous pipe, which
    resolves to no path; the page goes down the pipe, and where it went is said on stderr."""
    import threading

    build(proj)
    read_end, write_end = os.pipe()
    got = []
    reader = threading.Thread(
        target=lambda: got.append(os.fdopen(read_end, encoding="utf-8").read()), daemon=True
    )
    reader.start()
    try:
        assert main(["report", str(proj.path), "-o", f"/proc/self/fd/{write_end}"]) == 0
    finally:
        os.close(write_end)
    reader.join(10)
    assert got and got[0].startswith("<!DOCTYPE html>") and got[0].rstrip().endswith("</html>")
    captured = capsys.readouterr()
    assert captured.out == "" and "wrote" in captured.err


def test_a_dash_as_output_writes_the_page_to_standard_output(proj, build, fake_steps, capsys, monkeypatch):
    """`dbl report -o - > page.html` wrote a file named `-` in the current folder; `-` is standard output,
    as for most tools, and `./-` still names a file of that name."""
    build(proj)
    monkeypatch.chdir(proj.root)
    assert main(["report", str(proj.path), "-o", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("<!DOCTYPE html>") and captured.out.rstrip().endswith("</html>")
    assert not (proj.root / "-").exists() and "wrote" not in captured.out
    assert main(["report", str(proj.path), "-o", "./-"]) == 0
    assert (proj.root / "-").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
