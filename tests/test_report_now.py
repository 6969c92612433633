"""`dbl report` tells what it shows from what the project asks for now: steps stale since the build,
steps no longer in the project, records another build made (a lockfile checked out, a build killed before
it recorded itself); and an output path it cannot write. With fake steps: milliseconds."""

from __future__ import annotations

import contextlib
import os
import re

import pytest

from runner import lockfile
from runner.cli import main
from runner.exec import lastbuild
from tests.report_page import Page


def _item(text: str, sid: str) -> str:
    """The page's block of step `sid`."""
    start = text.index(f'id="{sid}"')
    return text[start : min(text.find(end, start) % len(text) for end in ('<div class="item"', "</section>"))]


def test_what_the_project_file_changed_since_the_build_is_marked_stale_not_shown_as_current(
    proj, build, fake_steps
):
    build(proj)
    proj.edit("sks dog in a park", "sks dog in a garden")  # a prompt changed
    proj.edit("[subjects.toy]", "[subjects.teddy]")  # a subject renamed
    proj.edit("toy = 1.0", "teddy = 1.0")
    from runner import report

    text = report.render(proj.load())
    park = _item(text, "render:park")
    assert '<p class="stale">Stale: prompts[0]' in park and "sks dog in a garden" in park
    assert "render:park is no longer" not in park
    assert "train:toy is no longer in the project file (removed or renamed)" in _item(text, "train:toy")
    for fresh in ("train:dog", "render:base"):
        assert 'class="stale"' not in _item(text, fresh), fresh
    assert "upstream train:teddy stale" in _item(text, "blend:mix")
    cells = [c for c in Page(text[text.index('id="provenance"') :]).text if c.strip()]
    assert cells[cells.index("render:park") + 6] == "stale"
    assert cells[cells.index("render:base") + 6] == "up to date"
    assert cells[cells.index("train:toy") + 6] == "not in the project file"
    # mix, park, mixed; teddy; toy
    assert "3 of 7 steps stale (marked where shown), 1 not built, 1 no longer in the project file" in text

    build(proj)  # built as asked: nothing is marked
    text = report.render(proj.load())
    assert 'class="stale"' not in text and "up to date with the project file" in text


def test_scores_of_an_eval_the_project_now_sets_otherwise_are_marked_stale_with_why(proj):
    """Scores of the render's very images, under an identifier the project no longer names, are shown
    beside the grid but marked stale; those of an eval the project has no more say so too."""
    from runner.report import _Context, _render_step

    render = {"inputs": {"adapter": "none", "prompts": ["a dog"], "seeds": [0]}, "output_hash": "abc"}
    scored = {"kind": "eval", "inputs": {"render": {"_name": "base", "output": "abc"}}}
    lock = {
        "render:base": render,
        "eval:base": {**scored, "metrics": {"prompt_fidelity": 0.5}},
        "eval:old": {**scored, "metrics": {"prompt_fidelity": 0.25}},
    }
    ctx = _Context(proj.load(), lock, {}, {"eval:base": ["identifier 'sks' -> 'zwx'"]})
    ctx.current.add("eval:base")
    text = _render_step(ctx, "render:base")
    assert '<p class="stale">Stale' not in text  # the render is as asked
    marked = text.index(
        '<p class="stale">eval:base is stale: identifier &#x27;sks&#x27; -&gt; &#x27;zwx&#x27;'
    )
    assert marked < text.index("fidelity (eval:base)")
    gone = text.index('<p class="stale">eval:old is no longer in the project file')
    assert gone < text.index("fidelity (eval:old)")
    assert text.count('class="stale"') == 2


def test_an_output_path_that_cannot_be_written_is_said_of_that_path(proj, build, fake_steps, capsys):
    build(proj)
    (proj.root / "notes").write_text("a file, not a folder")
    target = proj.root / "notes" / "review" / "pets.html"
    assert main(["report", str(proj.path), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the report to {target}: {proj.root / 'notes'} is a file, not a folder" in err
    assert "Errno" not in err and ".tmp" not in err
    assert (proj.root / "notes").read_text() == "a file, not a folder"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_device_that_cannot_take_the_page_is_said_of_that_device(proj, build, fake_steps, capsys):
    """`-o /dev/full`: `dbl: No space left on device`, exit 1, named no path."""
    build(proj)
    assert main(["report", str(proj.path), "-o", "/dev/full"]) == 2
    err = capsys.readouterr().err
    assert (
        "cannot write the report to /dev/full: No space left on device; give -o a path you can write" in err
    )


def test_an_output_path_on_what_the_build_reads_or_made_is_refused_and_left_as_it_was(
    proj, build, fake_steps, capsys
):
    """A mistyped `-o pets.toml` would replace the project file with HTML."""
    build(proj)
    out = proj.root / "build" / "pets"
    said = {
        proj.path: "it is the project file",
        proj.lock: "it is the project's lockfile",
        proj.root / "data" / "dog" / "00.png": "it is in a folder the project reads its images from",
        proj.root / "data" / "dog" / "notes.html": "it is in a folder the project reads its images from",
        proj.root / ".dbl" / "page.html": "it is in dbl's state folder",
        next((out / "renders" / "park").iterdir()): "it is in a step's output folder",
    }
    for target, why in said.items():
        before = target.read_bytes() if target.exists() else None
        assert main(["report", str(proj.path), "-o", str(target)]) == 2, target
        err = capsys.readouterr().err
        assert f"cannot write the report to {target}: {why}" in err, err
        assert "give -o another path (the default is" in err
        assert (target.read_bytes() if target.exists() else None) == before, target
    assert lockfile.read(proj.lock)  # still the lockfile
    for fine in (proj.root / "pets.html", out / "report.html", out):
        assert main(["report", str(proj.path), "-o", str(fine)]) == 0, fine
    with contextlib.chdir(proj.root):  # the page written is named as the user would type it here
        assert main(["report", str(proj.path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "wrote build/pets/report.html"
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_an_output_path_on_another_projects_file_or_any_file_not_a_report_is_refused(
    proj, build, fake_steps, capsys
):
    """`-o ../cats/cats.lock` would replace a sibling project's lockfile: any existing file that is not a
    page `dbl report` wrote is left as it was; an earlier report is replaced."""
    build(proj)
    sibling = proj.root.parent / "cats"
    sibling.mkdir()
    files = {
        sibling / "cats.toml": '[project]\nbase_model = "tiny-sd"\n',
        sibling / "cats.lock": '{"version": 1}\n',
        proj.root / "notes.html": "<!DOCTYPE html>\n<title>my notes</title>\n",
        proj.root / "empty.html": "",
    }
    for target, text in files.items():
        target.write_text(text)
        assert main(["report", str(proj.path), "-o", str(target)]) == 2, target
        err = capsys.readouterr().err
        assert (
            f"cannot write the report to {target}: it is a file that is not a page `dbl report` wrote" in err
        )
        assert target.read_text() == text, target
    page = proj.root / "pets.html"
    assert main(["report", str(proj.path), "-o", str(page)]) == 0  # a new file
    first = page.read_text(encoding="utf-8")
    page.write_text(first.replace("</body>", "<p>an edit</p></body>"), encoding="utf-8")
    assert main(["report", str(proj.path), "-o", str(page)]) == 0  # a report: replaced
    again = page.read_text(encoding="utf-8")
    assert "<p>an edit</p>" not in again
    # The same page but for the time it was made (the second may have turned between the two).
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")
    assert stamp.sub("", again) == stamp.sub("", first)


def test_a_snapshot_the_project_no_longer_asks_for_says_so_under_its_subject(proj, build, fake_steps):
    from runner.report import _Context, _subject

    build(proj)
    lock = lockfile.read(proj.lock)  # dog@2 was built when save_steps had 2; it has [3] now
    lock["snapshot:dog@2"] = {"kind": "snapshot", "metrics": {"loss_last": 0.5}, "outputs": {}}
    text = _subject(_Context(proj.load(), lock, {}, {}), "train:dog")
    cells = [c for c in Page(text[text.index("<h4>Snapshots") :]).text if c.strip()]
    assert cells[cells.index("now") + 1 :] == ["snapshot:dog@2", "0.5000", "not in the project file"]


def test_a_record_of_an_earlier_build_is_not_called_the_last_builds(proj, build, fake_steps):
    """A lockfile checked out after the build (another branch's, or an earlier commit's) records other
    builds of the steps the last build ran: they are not said to be its outputs, or the same as its."""
    from runner import report

    build(proj)
    lock = lockfile.read(proj.lock)
    lock["train:dog"]["built"] = "2026-01-02T03:04:05Z"  # as an earlier commit's lockfile has it
    lockfile.write(proj.lock, lock)
    text = _item(report.render(proj.load()), "train:dog")
    assert "Built 2026-01-02 03:04:05 UTC in " in text
    assert "(by an earlier build; the last build trained it too)" in text
    assert "again by the last build" not in text
    assert "(trained by the last build)" in _item(report.render(proj.load()), "train:toy")


def test_steps_built_after_the_last_recorded_build_are_not_called_its_own(proj, build, fake_steps):
    """A build killed (or still running) has written its steps' records but not its own: the record of the
    build before it is no account of those steps."""
    from runner import report

    build(proj)
    last = lastbuild.read(proj.load())
    lock = lockfile.read(proj.lock)
    lock["train:dog"]["built"] = "2099-01-01T00:00:00Z"  # committed by a later build, then killed
    lockfile.write(proj.lock, lock)
    text = report.render(proj.load())
    dog = _item(text, "train:dog")
    assert "(by a build after the last recorded one, which left no record: still running, or killed)" in dog
    assert "by the last build" not in dog and "by an earlier build" not in dog
    assert "(trained by the last build)" in _item(text, "train:toy")
    timeline = text[text.index('id="last-build"') :]
    assert "1 of the steps in the lockfile were built after this build" in timeline
    assert last["steps"]  # the record the page read is the build before


def test_an_eval_no_longer_in_the_project_is_not_said_to_score_the_next_build(proj):
    from runner.report import _Context, _render_step

    render = {"inputs": {"adapter": "none", "prompts": ["a dog"], "seeds": [0]}, "output_hash": "new"}
    scored = {"kind": "eval", "inputs": {"render": {"_name": "base", "output": "old"}}, "metrics": {}}
    text = _render_step(
        _Context(proj.load(), {"render:base": render, "eval:old": scored}, {}, {}), "render:base"
    )
    assert "eval:old is no longer in the project file" in text
    assert "run <code>dbl build</code> to score this one" not in text


def test_a_step_the_last_build_restored_is_not_credited_with_a_checked_out_record(proj, build, fake_steps):
    """The last build restored train:dog from the run-cache; a lockfile checked out since records other
    outputs of it, which that build did not put there."""
    from runner import report

    build(proj)  # rank 4: the lockfile to be checked out later
    checked_in = proj.lock.read_bytes()
    proj.edit("rank = 4", "rank = 8")
    build(proj)
    proj.edit("rank = 8", "rank = 4")
    build(proj)
    proj.edit("rank = 4", "rank = 8")
    build(proj)  # restores rank 8 from the run-cache
    row = {r["id"]: r for r in lastbuild.read(proj.load())["steps"]}["train:dog"]
    assert row["outcome"] == "restored"
    assert "(restored from the run-cache by the last build)" in _item(report.render(proj.load()), "train:dog")

    proj.lock.write_bytes(checked_in)  # rank 4's outputs, as the checked-out commit records them
    dog = _item(report.render(proj.load()), "train:dog")
    assert "by the last build" not in dog
    assert "(by an earlier build; the last build restored it too)" in dog
    assert row["output_hash"] != lockfile.read(proj.lock)["train:dog"]["output_hash"]

    # A record written before the output hashes were kept is taken at its word, as it was.
    last = lastbuild.read(proj.load())
    for r in last["steps"]:
        r.pop("output_hash", None)
    lastbuild.write(proj.load(), last)
    assert "(restored from the run-cache by the last build)" in _item(report.render(proj.load()), "train:dog")


def test_the_top_of_the_page_counts_records_a_merge_left_out_apart_from_steps_never_built(
    proj, build, fake_steps
):
    """After a merge whose driver left two records out, their outputs are still there: the top of the page
    says they are not in the lockfile, as the provenance table does, not that they were never built."""
    from runner import report

    build(proj)
    lock = lockfile.read(proj.lock)
    del lock["render:park"], lock["render:base"]  # changed differently on both sides of a merge
    lockfile.write(proj.lock, lock)
    proj.edit("[renders.base]", "[renders.fresh]")  # and one step that no build has made
    text = report.render(proj.load())
    top = text[: text.index('id="subjects"')]
    assert "1 not in the lockfile (its outputs are there: a merge left its record out)" in top, top
    assert "1 not built" in top
    assert "<td>not in the lockfile (files in build/pets/renders/park)</td>" in text


def test_a_hand_edited_record_of_an_older_lockfile_is_shown_as_written(proj, build, fake_steps):
    """A record without a digest (a lockfile an earlier dbl wrote) is read as it is, even hand-edited:
    a duration that is not a number is shown as written, not a crash of the page."""
    from runner import report

    build(proj)
    text = proj.lock.read_text()
    start = text.index('[steps."train:dog"]')
    record = text[start : text.index("\n[steps.", start + 1)]
    edited = re.sub(r'digest = "[0-9a-f]+"\n', "", record)
    edited = re.sub(r"duration_s = [0-9.e-]+", 'duration_s = "about an hour"', edited)
    assert edited != record and "digest" not in edited
    proj.lock.write_text(text.replace(record, edited))
    assert "train:dog" in lockfile.read(proj.lock)  # read as it is: no digest to check
    text = report.render(proj.load())
    assert "in about an hour" in _item(text, "train:dog")


def test_an_output_on_disk_that_another_build_wrote_is_not_shown_as_the_recorded_one(proj, build, fake_steps):
    """The lockfile checked out from another commit, the outputs on disk left by this one: the page shows
    no grid, loss plot or facts of bytes the lockfile does not record, and says why."""
    import hashlib

    from runner.report import _Context, _render_step, _subject

    build(proj)
    lock = lockfile.read(proj.lock)
    grid = proj.root / "build" / "pets" / "renders" / "park" / "grid.png"
    grid.write_bytes(b"\x89PNG the recorded grid")
    rel = grid.relative_to(proj.root).as_posix()
    lock["render:park"]["outputs"][rel] = {
        "sha256": hashlib.sha256(grid.read_bytes()).hexdigest(),
        "size": grid.stat().st_size,
    }
    info = proj.root / "build" / "pets" / "adapters" / "dog" / "dbl.json"
    info.write_text('{"instance_prompt": "a prompt of another build", "steps": 123}')  # not as recorded
    ctx = _Context(proj.load(), lock, {}, {})
    assert "data:image/png;base64," in _render_step(ctx, "render:park")  # the recorded bytes: shown

    grid.write_bytes(b"\x89PNG another build's grid")
    ctx = _Context(proj.load(), lock, {}, {})
    text = _render_step(ctx, "render:park")
    assert "data:image/png;base64," not in text
    assert "The grid.png in build/pets/renders/park is not the one pets.lock records" in text
    text = _subject(ctx, "train:dog")
    assert "The dbl.json in build/pets/adapters/dog is not the one pets.lock records" in text
    assert "a prompt of another build" not in text and "123" not in text
