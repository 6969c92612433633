"""`dbl report`: one self-contained HTML page of what a project's lockfile says was built.

The page holds, from the lockfile, the adapters' `dbl.json` and the record of the last build
(`.dbl/last-build-<stem>.json`, see runner/exec/lastbuild.py):

- per subject: its loss curves (instance and prior loss per step), its settings, how long it took, and
  its snapshots (`snapshot:<subject>@<step>`);
- per render: its grid, what each row and column is, its numeric metrics and the fidelity scores of
  the eval steps that score it;
- per blend: its parents and weights, its method and the errors it recorded;
- the timeline of the last build (ran, restored, failed, skipped; when, how long, on which device);
- provenance: the base model, the dbl version, every step's fingerprint and build time;

and, where the project file has changed since, which of what it shows is stale (as `dbl plan` says), or
no longer in the project.

Nothing is fetched when the page is opened: plots (drawn by matplotlib, as SVG) and images are data
URIs in the page, and the styles are in it. Only files are read, and hashed where the plan must (as
`dbl plan`): no model loading.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from runner import __version__, htmlpage, listing, lockfile, lockmemo, planner, plots, reportnow
from runner.errors import DblError
from runner.exec import lastbuild
from runner.fingerprint import FileHasher
from runner.ui.plain import fmt_duration, fmt_path


def write(project, output: Path | str | None = None) -> Path:
    """Write the report of `project` to `output` (a file, or a folder to put report.html in; default
    `<out>/report.html`) and return its path. Raises DblError when nothing is built or matplotlib is
    missing, LockfileError when the lockfile cannot be read."""
    target = project.out / "report.html" if output is None else Path(output)
    if target.is_dir() or str(output).endswith(("/", os.sep)):
        target = target / "report.html"
    # Asked through the link: /dev/stdout's target, /proc/self/fd/1, resolves to "pipe:[...]", no path.
    written_through = target.exists() and not target.is_file()  # /dev/stdout, a pipe, /dev/null
    if not written_through:
        if target.is_symlink():
            target = target.resolve()  # the file it points to is the report, not the link
        _refuse_what_the_build_reads(project, target)  # before the page is made, which takes a while
    page = render(project)
    if written_through:
        try:
            with open(target, "w", encoding="utf-8") as out:  # never renamed over
                out.write(page)
        except BrokenPipeError:  # the reader had read what it wanted (`| head`): not a failure
            pass
        except OSError as exc:  # /dev/full
            raise DblError(
                f"cannot write the report to {target}: {exc.strerror or exc}; give -o a path you can write"
            ) from None
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # said of the page asked for, not of the temporary file beside it or a folder on the way
        blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking else exc.strerror or str(exc)
        raise DblError(f"cannot write the report to {target}: {why}; give -o a path you can write") from None
    return target


# A report's page starts with its doctype and title: the bytes read to know one (a long project name aside).
REPORT_HEAD_BYTES = 1024


def _refuse_what_the_build_reads(project, target: Path) -> None:
    """Raise DblError where writing the page to `target` would overwrite what the project reads or made:
    the project file, its lockfile, dbl's state folder, an input folder's file, a local base model's, a
    step's output, or any other file that is not a report page. A mistyped `-o pets.toml` must not replace
    the project with HTML, nor `-o ../cats/cats.lock` another project's lockfile."""
    from runner.watch_targets import norm, targets_of, within

    path = norm(target)
    watched = targets_of(project.path, project)
    what = None
    if path == watched.project_file:
        what = "the project file"
    elif path == watched.lockfile:
        what = "the project's lockfile"
    elif within(path, norm(project.state_dir)):
        what = f"in dbl's state folder {fmt_path(project.state_dir)}"
    elif path in watched.linked or any(within(path, f) for f in watched.folders):
        what = "in a folder the project reads its images from"
    elif any(within(path, m) for m in watched.models):
        what = "part of the base model"
    elif any(within(path, o) for o in watched.outputs):
        what = "in a step's output folder"
    elif target.is_file() and not _is_a_report(target):
        what = "a file that is not a page `dbl report` wrote (another project's file, say)"
    if what:
        raise DblError(
            f"cannot write the report to {fmt_path(target)}: it is {what}; give -o another path"
            f" (the default is {fmt_path(project.out / 'report.html')})"
        )


def _is_a_report(path: Path) -> bool:
    """Whether the file at `path` is a page `dbl report` wrote (which another report may replace)."""
    try:
        with open(path, "rb") as f:
            head = f.read(REPORT_HEAD_BYTES)
    except OSError:
        return False  # not readable: writing over it would fail too, and say why
    return head.startswith(b"<!DOCTYPE html>") and b"<title>dbl report: " in head


def render(project) -> str:
    """The report page of `project` as HTML text."""
    lock_path = lockfile.lock_path(project.path)
    lock = lockfile.read(lock_path, memo=lockmemo.memo_path(project.state_dir, lock_path))
    last = lastbuild.read(project)
    if not lock and not (last or {}).get("steps"):  # a first build that failed has a timeline to show
        shown = fmt_path(project.path)  # as the user would type it here
        raise DblError(
            f"{shown}: nothing is built yet (no step in {lock_path.name}): run `dbl build {shown}` first, then "
            "`dbl report`"
        )
    plots.require_matplotlib()  # fail before any work when it is missing
    outcomes = {row["id"]: row for row in (last or {}).get("steps", [])}
    order = [s.id for s in planner.graph(project)]
    ids = [sid for sid in order if sid in lock] + sorted(set(lock) - set(order))
    ctx = _Context(project, lock, outcomes, reportnow.stale(project))
    ctx.after = reportnow.built_after(lock, last)

    def of(kind: str, show) -> list[str]:
        return [show(ctx, sid) for sid in ids if _kind(lock, sid) == kind]

    sections = [
        _header(ctx, last),
        htmlpage.section("Subjects", of("train", _subject)),
        htmlpage.section("Renders", of("render", _render_step)),
        htmlpage.section("Blends", of("blend", _blend)),
        _timeline(ctx, last),
        _provenance(ctx, ids, [sid for sid in order if sid not in lock]),
    ]
    title = escape(f"dbl report: {project.name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{htmlpage.CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


class _Context:
    def __init__(self, project, lock: dict, outcomes: dict, stale: dict[str, list[str]] | str | None = None):
        self.project, self.lock, self.outcomes = project, lock, outcomes
        self.after: set[str] = set()  # steps built since the last recorded build, by one unrecorded
        # {step id: why} of the steps the project file now asks otherwise of, or why that is not known
        self.stale = stale if stale is not None else {}
        self.current = {step.id for step in planner.graph(project)}
        self.hasher = FileHasher(project.state_dir / "state")  # the build's hashes: a stat a file
        self.lock_name = lockfile.lock_path(project.path).name

    def output(self, sid: str, name: str) -> Path | None:
        """The recorded output of step `sid` whose path ends in `name` (None when there is none)."""
        for rel in sorted(self.lock[sid].get("outputs", {}), key=len):
            if rel == name or rel.endswith("/" + name):
                return self.project.dir / rel
        return None

    def as_recorded(self, sid: str, path: Path) -> bool:
        """Whether the file at `path`, an output of `sid`, holds the bytes the lockfile records (not those
        of another build: a lockfile checked out from another commit, say)."""
        entry = self.lock[sid].get("outputs", {}).get(path.relative_to(self.project.dir).as_posix())
        if not isinstance(entry, dict):
            return False
        try:
            return self.hasher.matches(path, entry)
        except OSError:
            return False

    def info(self, sid: str) -> dict:
        """The step's dbl.json, or {} when it has none, it does not read, or it is another build's."""
        path = self.output(sid, "dbl.json")
        if path is not None and not self.as_recorded(sid, path):
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _mapping(value) -> dict:
    """A table of dbl.json, or {} where a hand-edited (or foreign) file has something else there."""
    return value if isinstance(value, dict) else {}


def _kind(lock: dict, sid: str) -> str:
    return lockfile.record_kind(sid, lock[sid])


# --- sections --------------------------------------------------------------------------------------------


def _header(ctx: _Context, last: dict | None) -> str:
    project, records = ctx.project, ctx.lock.values()
    bases = sorted(
        {htmlpage.plain(r["inputs"]["base_model"]) for r in records if "base_model" in r.get("inputs", {})}
    )
    rows = [
        ("project file", str(project.path)),
        ("lockfile", _lockfile_line(ctx)),
        ("base model", "; ".join(bases) or "(no step records one)"),
        ("outputs", str(project.out)),
        ("now", reportnow.summary(ctx)),
    ]
    if last:
        rows.append(
            (
                "last build",
                f"dbl {last.get('dbl')} on {last.get('host')}, {htmlpage.when(last.get('started'))}",
            )
        )
    rows.append(("this page", f"dbl {__version__}, {htmlpage.when(datetime.now(timezone.utc).isoformat())}"))
    return htmlpage.section("Project", [htmlpage.table(["", ""], rows, header=False)])


def _timeline(ctx: _Context, last: dict | None) -> str:
    if not last:
        note = (
            f"No record of the last build in {lastbuild.path(ctx.project)}: none ran here yet (a fresh "
            "clone), or only an older dbl's"
        )
        return htmlpage.section(
            "Last build", [f"<p>{escape(note)}; the provenance table says when each step was built.</p>"]
        )
    steps, backend = last["steps"], str(last.get("backend"))
    summary = ", ".join(f"{n} {outcome}" for outcome, n in Counter(r["outcome"] for r in steps).items())
    where = backend + (f", -j {last['jobs']}" if last.get("jobs", 1) != 1 else "")
    lead = (
        f"<p>{htmlpage.when(last.get('started'))}, {fmt_duration(last.get('seconds', 0))}, exit code "
        f"{last.get('exit_code')}, executor {escape(where)}: {escape(summary)}.</p>"
    )
    if ctx.after:
        lead += (
            f'<p class="stale">{len(ctx.after)} of the steps in the lockfile were built after this build, by '
            "one that left no record of itself (still running, or killed before it ended).</p>"
        )
    timed = [r for r in steps if "offset_s" in r]
    chart = htmlpage.img(plots.timeline_svg(timed), "timeline of the last build") if timed else ""
    worker = "build process" if backend == "inline" else f"{backend} worker"
    rows = [
        (
            r["id"],
            f'<span class="outcome {escape(r["outcome"])}">{escape(r["outcome"])}</span>',
            htmlpage.when(r.get("started")),
            fmt_duration(r["seconds"]) if "seconds" in r else "",
            r.get("on") or (worker if r["outcome"] in ("ran", "failed", "interrupted") else ""),
            r.get("error") or "; ".join(r.get("reasons", [])),
        )
        for r in steps
    ]
    table = htmlpage.table(
        ["step", "outcome", "started", "took", "on", "why / error"], rows, raw=(1,), css="timeline"
    )
    return htmlpage.section("Last build", [lead, chart, table])


def _subject(ctx: _Context, sid: str) -> str:
    record, info = ctx.lock[sid], ctx.info(sid)
    name = sid.split(":", 1)[1]
    snapshots = {}  # training step -> snapshot step id
    for other in ctx.lock:
        subject, _, step = other.split(":", 1)[1].rpartition("@")
        if _kind(ctx.lock, other) == "snapshot" and subject == name and step.isdigit():
            snapshots[int(step)] = other
    log, prior = _mapping(info.get("log")), _mapping(info.get("prior"))
    recorded = ctx.output(sid, "dbl.json")
    if recorded is None or not recorded.is_file():
        plot = f"<p>dbl.json is missing from {escape(_folder(ctx, sid))}: run <code>dbl build</code>.</p>"
    elif not ctx.as_recorded(sid, recorded):
        plot = f"<p>{_not_recorded('dbl.json', ctx, sid)}</p>"
    elif isinstance(log.get("instance_loss"), list) and log["instance_loss"]:
        if odd := plots.unreadable(log):
            plot = f"<p>No loss plot: its dbl.json holds {escape(odd)}.</p>"
        else:
            plot = htmlpage.img(plots.loss_svg(name, log, sorted(snapshots)), f"loss curves of {name}")
    else:
        plot = "<p>No per-step log in its dbl.json.</p>"
    class_prompt = prior.get("class_prompt")
    if isinstance(class_prompt, list):  # several, in turn
        class_prompt = " | ".join(class_prompt)
    facts = [
        ("instance prompt", info.get("instance_prompt")),
        ("instance images", info.get("instance_images")),
        ("class prompt", class_prompt),
        ("class images", prior.get("class_images")),
        ("prior loss weight", prior.get("loss_weight")),
        ("steps", info.get("steps")),
        (
            "loss (first tenth -> last tenth)",
            _loss_text(_mapping(info.get("loss")) or record.get("metrics", {})),
        ),
        ("mixed precision", info.get("mixed_precision")),
        ("seed", info.get("seed")),
        ("processes", info.get("num_processes")),
    ]
    facts_table = htmlpage.table(["", ""], [(k, v) for k, v in facts if v not in (None, "")], header=False)
    parts = [
        f"<h3>{escape(name)}</h3>",
        f"<p>{_built(ctx, sid, record, 'trained')}</p>{reportnow.line(ctx, sid)}",
        f'<div class="row">{plot}{facts_table}</div>',
    ]
    for table in ("train", "lora"):
        rows = [(k, htmlpage.plain(v)) for k, v in sorted(_mapping(info.get(table)).items()) if v is not None]
        if rows:
            parts.append(
                f"<details><summary>[{table}] settings</summary>{htmlpage.table(['key', 'value'], rows)}</details>"
            )
    if snapshots:
        rows = [
            (
                s,
                htmlpage.when(ctx.lock[s].get("built")),
                _loss_text(ctx.lock[s].get("metrics", {})),
                _folder(ctx, s),
                reportnow.state(ctx, s),
            )
            for _, s in sorted(snapshots.items())
        ]
        headers = ["snapshot", "built", "loss", "folder", "now"]
        parts.append("<h4>Snapshots</h4>" + htmlpage.table(headers, rows))
    return f'<div class="item" id="{escape(sid)}">' + "\n".join(parts) + "</div>"


def _blend(ctx: _Context, sid: str) -> str:
    record = ctx.lock[sid]
    inputs, metrics = record.get("inputs", {}), record.get("metrics", {})
    name = sid.split(":", 1)[1]
    parents = ", ".join(f"{a.get('_name', '?')} × {a.get('weight')}" for a in inputs.get("adapters", []))
    parts = [
        f"<h3>{escape(name)}</h3>",
        f"<p>{_built(ctx, sid, record, 'blended')}</p>{reportnow.line(ctx, sid)}",
        f"<p>{escape(parents)}, method <code>{escape(str(inputs.get('method', '?')))}</code></p>",
    ]
    per_component = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    components = sorted({c for v in per_component.values() for c in v})
    if components:
        keys = sorted(per_component)
        rows = [(c, *(htmlpage.number(per_component[k].get(c)) for k in keys)) for c in components]
        parts.append(
            htmlpage.table(["component", *(k.replace("_", " ") for k in keys)], rows, css="blend-errors")
        )
    flat = {k: v for k, v in htmlpage.numbers(metrics).items() if "." not in k}
    if flat:
        parts.append(htmlpage.table(["metric", "value"], [(k, htmlpage.number(v)) for k, v in flat.items()]))
    return f'<div class="item" id="{escape(sid)}">' + "\n".join(parts) + "</div>"


def _render_step(ctx: _Context, sid: str) -> str:
    record = ctx.lock[sid]
    inputs, metrics = record.get("inputs", {}), record.get("metrics", {})
    name = sid.split(":", 1)[1]
    grid = ctx.output(sid, "grid.png")
    if grid is not None and grid.is_file() and ctx.as_recorded(sid, grid):
        image = _grid_image(grid.read_bytes(), f"grid of {name}", _folder(ctx, sid))
    elif grid is not None and grid.is_file():
        image = f"<p>{_not_recorded('grid.png', ctx, sid)}</p>"
    else:
        image = f"<p>grid.png is missing from {escape(_folder(ctx, sid))}: run <code>dbl build</code>.</p>"
    settings = [
        ("adapter", _adapter_names(inputs)),
        ("negative prompt", inputs.get("negative_prompt")),
        ("sampler", metrics.get("sampler")),
        ("steps", inputs.get("steps")),
        ("guidance scale", inputs.get("guidance_scale")),
        ("lora scale", inputs.get("lora_scale")),
    ]
    tables = htmlpage.table(["", ""], [(k, v) for k, v in settings if v not in (None, "")], header=False)
    if numbers := htmlpage.numbers(metrics):  # what the step recorded
        tables += htmlpage.table(
            ["metric", "value"], [(k, htmlpage.number(v)) for k, v in numbers.items()], css="metrics"
        )
    for eval_id, scores, current in _scores_of(ctx, sid):  # fidelity scores of eval steps of this render
        if not current and eval_id not in ctx.current:  # the next build removes it: nothing to score
            tables += reportnow.line(ctx, eval_id)
            continue
        if not current:  # its scores are of images this render no longer holds
            tables += (
                f"<p>{escape(eval_id)} scored an earlier build of this render: run <code>dbl build</code> "
                "to score this one.</p>"
            )
            continue
        tables += reportnow.line(ctx, eval_id).replace("Stale:", f"{escape(eval_id)} is stale:", 1)
        tables += _fidelity_table(eval_id, scores, inputs)
    caption = _grid_caption(inputs, list(inputs.get("prompts", [])), list(inputs.get("seeds", [])))
    about = [caption, f'<div class="row">{tables}</div>']
    parts = [
        f"<h3>{escape(name)}</h3>",
        f"<p>{_built(ctx, sid, record, 'rendered')}</p>{reportnow.line(ctx, sid)}",
        f'<div class="row">{image}<div>{"".join(about)}</div></div>',
    ]
    return f'<div class="item" id="{escape(sid)}">' + "\n".join(parts) + "</div>"


# A grid.png up to this size is in the page as it is; a larger one as a JPEG preview at most PREVIEW_SIDE
# pixels on its longest side (a 4 x 4 grid of 512 px images is a PNG of several MB, and a page of ten of
# them would take a while to open or attach), the page naming the file for the full size.
EMBED_WHOLE_BYTES = 1_000_000
PREVIEW_SIDE = 1600
PREVIEW_QUALITY = 90


def _grid_image(data: bytes, alt: str, folder: str) -> str:
    """The grid's <img>: the PNG itself where it is small enough, else a JPEG preview and a line that says
    so and where the full grid is."""
    if len(data) <= EMBED_WHOLE_BYTES:
        return htmlpage.img(data, alt, mime="image/png", css="grid")
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as grid:
            width, height = grid.size
            scale = min(1.0, PREVIEW_SIDE / max(width, height))
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            preview = grid.convert("RGB")
            if size != preview.size:
                preview = preview.resize(size, Image.Resampling.LANCZOS)
            out = io.BytesIO()
            preview.save(out, format="JPEG", quality=PREVIEW_QUALITY)
    except (OSError, ValueError, Image.DecompressionBombError):  # not a picture PIL reads: shown as it is
        return htmlpage.img(data, alt, mime="image/png", css="grid")
    note = (
        f"A {size[0]}×{size[1]} JPEG preview of grid.png ({width}×{height}, "
        f"{len(data) / 1e6:.1f} MB), which is in {folder}."
    )
    return (
        f"<div>{htmlpage.img(out.getvalue(), alt, mime='image/jpeg', css='grid')}<p>{escape(note)}</p></div>"
    )


def _scores_of(ctx: _Context, render_id: str) -> list[tuple[str, dict, bool]]:
    """(eval step id, its recorded scores, whether it scored the render's recorded output) of every built
    eval step of the render `render_id`. An eval that failed, or did not run, after the render was
    rebuilt keeps the scores of the render's earlier images."""
    name, output = render_id.split(":", 1)[1], ctx.lock[render_id].get("output_hash")
    found = []
    for sid, record in ctx.lock.items():
        target = record.get("inputs", {}).get("render")
        if _kind(ctx.lock, sid) == "eval" and isinstance(target, dict) and target.get("_name") == name:
            found.append((sid, record.get("metrics", {}), target.get("output") == output))
    return found


SCORES = ("subject_fidelity", "class_drift", "prompt_fidelity")  # as the README's tables order them


def _fidelity_table(eval_id: str, scores: dict, inputs: dict) -> str:
    """An eval's scores, one row per adapter in the grid's column order (a render of several adapters
    is scored per adapter), one column per score."""
    if isinstance(inputs.get("adapters"), list):
        names = [str(a.get("_name", "?")) if isinstance(a, dict) else str(a) for a in inputs["adapters"]]
        per_adapter = {a: htmlpage.numbers(_mapping(scores.get(a))) for a in names}
    else:
        per_adapter = {_adapter_names(inputs) or "?": htmlpage.numbers(scores)}
    found = {k for v in per_adapter.values() for k in v}
    columns = [k for k in SCORES if k in found] + sorted(found - set(SCORES))
    if not columns:
        return f"<p>{escape(eval_id)}: nothing to score (no prompt of the render names what it measures).</p>"
    rows = [(a, *(htmlpage.number(v.get(k)) for k in columns)) for a, v in per_adapter.items()]
    headers = [f"fidelity ({eval_id})", *(k.replace("_", " ") for k in columns)]
    return htmlpage.table(headers, rows, css="metrics")


def _grid_caption(inputs: dict, prompts: list, seeds: list) -> str:
    """What each row and column of grid.png is (as the render step lays it out)."""
    if not prompts or not seeds:
        return ""
    if isinstance(inputs.get("adapters"), list):  # a column per adapter, a row per prompt and seed
        columns = [str(a.get("_name", "none") if isinstance(a, dict) else a) for a in inputs["adapters"]]
        rows = [f"prompt {i + 1}, seed {s}: {p}" for i, p in enumerate(prompts) for s in seeds]
    else:  # a row per prompt, a column per seed
        columns = [f"seed {s}" for s in seeds]
        rows = [f"prompt {i + 1}: {p}" for i, p in enumerate(prompts)]
    items = "".join(f"<li>{escape(r)}</li>" for r in rows)
    return (
        f'<div class="caption"><p>columns, left to right: {escape(", ".join(columns))}; rows, top to '
        f"bottom:</p><ol>{items}</ol></div>"
    )


def _adapter_names(inputs: dict) -> str:
    if isinstance(inputs.get("adapters"), list):
        return ", ".join(str(a.get("_name", "?")) for a in inputs["adapters"] if isinstance(a, dict))
    adapter = inputs.get("adapter")
    return adapter.get("_name", "?") if isinstance(adapter, dict) else str(adapter or "")


def _provenance(ctx: _Context, ids: list[str], unbuilt: list[str]) -> str:
    rows = [
        (
            sid,
            r.get("fingerprint", "")[:12],
            r.get("output_hash", "")[:12],
            _version(r.get("inputs", {}).get("version", "")),
        )
        + (htmlpage.when(r.get("built")), _took(r.get("duration_s", 0)), reportnow.state(ctx, sid))
        for sid, r in ((sid, ctx.lock[sid]) for sid in ids)
    ]
    rows += [(sid, "", "", "", _unrecorded(ctx, sid), "", "") for sid in unbuilt]
    lead = (
        "<p>From the lockfile: each step's fingerprint (the hash of its inputs) and output hash, the "
        "version of its step kind, when it was built and how long that took, and whether the project file "
        "still asks for it (`dbl plan` says why a step is stale).</p>"
    )
    headers = ["step", "fingerprint", "output hash", "step version", "built", "took", "now"]
    return htmlpage.section("Provenance", [lead, htmlpage.table(headers, rows, css="provenance")])


def _version(version) -> str:
    """A step kind's version as the provenance table shows it; an eval records its kind's and that of its
    measures ([1, 1]): '1 (measures 1)'."""
    if isinstance(version, list) and len(version) == 2:
        return f"{version[0]} (measures {version[1]})"
    return str(version)


def _unrecorded(ctx: _Context, sid: str) -> str:
    folder = listing.unrecorded_outputs(ctx.project, sid)
    return f"not in the lockfile (files in {folder})" if folder else "not built"


def _built(ctx: _Context, sid: str, record: dict, verb: str) -> str:
    """'Built <when> in 4m40s', and what the last build did with the step."""
    text = f"built {htmlpage.when(record.get('built'))} in {_took(record.get('duration_s', 0))}"
    row = ctx.outcomes.get(sid, {})
    outcome = row.get("outcome")
    # a lockfile checked out since records other outputs than the last build did (an older dbl's record
    # of the build does not say which it recorded: it is taken at its word)
    other = "output_hash" in row and row["output_hash"] != record.get("output_hash")
    if sid in ctx.after:
        text += " (by a build after the last recorded one, which left no record: still running, or killed)"
    elif outcome in ("ran", "restored") and other:
        text += f" (by an earlier build; the last build {verb if outcome == 'ran' else outcome} it too)"
    elif outcome == "restored":
        text += " (restored from the run-cache by the last build)"
    elif outcome == "ran":
        if row.get("remade"):  # a rerun to the recorded bytes keeps the record of the build that made them
            text += f" ({verb} again by the last build, to the same outputs)"
        elif htmlpage.when(row.get("started")) == htmlpage.when(record.get("built")):
            text += f" ({verb} by the last build)"
        else:  # a lockfile checked out since (or an older dbl's record of a rerun): not its outputs
            text += f" (by an earlier build; the last build {verb} it too)"
    return escape(text[0].upper() + text[1:])


def _took(seconds) -> str:
    """A record's duration as the page shows it; one that is not a number (a hand-edited record of a
    lockfile without digests, read as it is) as written."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return str(seconds)
    return fmt_duration(seconds)


def _lockfile_line(ctx: _Context) -> str:
    if not ctx.lock:  # a first build that failed: it recorded nothing
        return f"{ctx.lock_name} (no step recorded yet)"
    return f"{ctx.lock_name} (schema version {lockfile.LOCK_VERSION})"


def _not_recorded(name: str, ctx: _Context, sid: str) -> str:
    return (
        f"The {escape(name)} in {escape(_folder(ctx, sid))} is not the one {escape(ctx.lock_name)} records "
        "(another build wrote it, or it was edited): run <code>dbl build</code> to make the recorded one, or "
        "<code>dbl check</code> to see what differs."
    )


def _folder(ctx: _Context, sid: str) -> str:
    outputs = sorted(ctx.lock[sid].get("outputs", {}))
    common = os.path.commonpath(outputs) if outputs else ""
    return Path(common).parent.as_posix() if len(outputs) == 1 else common


def _loss_text(metrics: dict) -> str:
    if "loss_last" not in metrics:
        return ""
    first = (
        f"{listing.loss_number(metrics['loss_first'])} -> " if metrics.get("loss_first") is not None else ""
    )
    return first + listing.loss_number(metrics["loss_last"])
