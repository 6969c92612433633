"""`dbl report`: one self-contained HTML page of what a project's lockfile says was built.

The page holds, from the lockfile, the adapters' `dbl.json` and the record of the last build
(`.dbl/last-build-<stem>.json`, see runner/exec/lastbuild.py):

- per subject: its loss curves (instance and prior loss per step), its settings, how long it took, and
  its snapshots (`snapshot:<subject>@<step>`);
- per render: its grid, what each row and column is, its numeric metrics and the fidelity scores of
  the eval steps that score it;
- per blend: its parents and weights, its method and the errors it recorded;
- the timeline of the last build (ran, restored, failed, skipped; when, how long, on which device);
- provenance: the base model, the dbl version, every step's fingerprint and build time.

Nothing is fetched when the page is opened: plots (drawn by matplotlib, as SVG) and images are data
URIs in the page, and the styles are in it. Only files are read: no hashing, no model loading.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from runner import __version__, listing, lockfile, lockmemo, planner, plots
from runner.errors import DblError
from runner.exec import lastbuild
from runner.ui.plain import fmt_duration


def write(project, output: Path | str | None = None) -> Path:
    """Write the report of `project` to `output` (a file, or a folder to put report.html in; default
    `<out>/report.html`) and return its path. Raises DblError when nothing is built or matplotlib is
    missing, LockfileError when the lockfile cannot be read."""
    target = project.out / "report.html" if output is None else Path(output)
    if target.is_dir() or str(output).endswith(("/", os.sep)):
        target = target / "report.html"
    page = render(project)
    # Asked through the link: /dev/stdout's target, /proc/self/fd/1, resolves to "pipe:[...]", no path.
    if target.exists() and not target.is_file():  # /dev/stdout, a pipe, /dev/null: written through,
        try:
            with open(target, "w", encoding="utf-8") as out:  # never renamed over
                out.write(page)
        except BrokenPipeError:  # the reader had read what it wanted (`| head`): not a failure
            pass
        return target
    if target.is_symlink():
        target = target.resolve()  # the file it points to is the report, not the link
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target


def render(project) -> str:
    """The report page of `project` as HTML text."""
    lock_path = lockfile.lock_path(project.path)
    lock = lockfile.read(lock_path, memo=lockmemo.memo_path(project.state_dir, lock_path))
    if not lock:
        raise DblError(
            f"{project.path}: nothing is built yet (no step in {lock_path.name}): "
            f"run `dbl build {project.path}` first, then `dbl report`"
        )
    plots.require_matplotlib()  # fail before any work when it is missing
    last = lastbuild.read(project)
    outcomes = {row["id"]: row for row in (last or {}).get("steps", [])}
    order = [s.id for s in planner.graph(project)]
    ids = [sid for sid in order if sid in lock] + sorted(set(lock) - set(order))
    ctx = _Context(project, lock, outcomes)

    def of(kind: str, show) -> list[str]:
        return [show(ctx, sid) for sid in ids if _kind(lock, sid) == kind]

    sections = [
        _header(ctx, last),
        _section("Subjects", of("train", _subject)),
        _section("Renders", of("render", _render_step)),
        _section("Blends", of("blend", _blend)),
        _timeline(ctx, last),
        _provenance(ctx, ids, [sid for sid in order if sid not in lock]),
    ]
    title = escape(f"dbl report: {project.name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


class _Context:
    def __init__(self, project, lock: dict, outcomes: dict):
        self.project, self.lock, self.outcomes = project, lock, outcomes

    def output(self, sid: str, name: str) -> Path | None:
        """The recorded output of step `sid` whose path ends in `name` (None when there is none)."""
        for rel in sorted(self.lock[sid].get("outputs", {}), key=len):
            if rel == name or rel.endswith("/" + name):
                return self.project.dir / rel
        return None

    def info(self, sid: str) -> dict:
        """The step's dbl.json, or {} when it has none or it does not read."""
        path = self.output(sid, "dbl.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8")) if path else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _mapping(value) -> dict:
    """A table of dbl.json, or {} where a hand-edited (or foreign) file has something else there."""
    return value if isinstance(value, dict) else {}


def _kind(lock: dict, sid: str) -> str:
    return lock[sid].get("kind") or sid.split(":", 1)[0]


# --- sections --------------------------------------------------------------------------------------------


def _header(ctx: _Context, last: dict | None) -> str:
    project, records = ctx.project, ctx.lock.values()
    bases = sorted(
        {_plain(r["inputs"]["base_model"]) for r in records if "base_model" in r.get("inputs", {})}
    )
    rows = [
        ("project file", str(project.path)),
        ("lockfile", f"{lockfile.lock_path(project.path).name} (schema version {lockfile.LOCK_VERSION})"),
        ("base model", "; ".join(bases) or "(no step records one)"),
        ("outputs", str(project.out)),
    ]
    if last:
        rows.append(
            ("last build", f"dbl {last.get('dbl')} on {last.get('host')}, {_when(last.get('started'))}")
        )
    rows.append(("this page", f"dbl {__version__}, {_when(datetime.now(timezone.utc).isoformat())}"))
    return _section("Project", [_table(["", ""], rows, header=False)])


def _timeline(ctx: _Context, last: dict | None) -> str:
    if not last:
        note = (
            f"No record of the last build in {lastbuild.path(ctx.project)}: none ran here yet (a fresh "
            "clone), or only an older dbl's"
        )
        return _section(
            "Last build", [f"<p>{escape(note)}; the provenance table says when each step was built.</p>"]
        )
    steps, backend = last["steps"], str(last.get("backend"))
    summary = ", ".join(f"{n} {outcome}" for outcome, n in Counter(r["outcome"] for r in steps).items())
    where = backend + (f", -j {last['jobs']}" if last.get("jobs", 1) != 1 else "")
    lead = (
        f"<p>{_when(last.get('started'))}, {fmt_duration(last.get('seconds', 0))}, exit code "
        f"{last.get('exit_code')}, executor {escape(where)}: {escape(summary)}.</p>"
    )
    timed = [r for r in steps if "offset_s" in r]
    chart = _img(plots.timeline_svg(timed), "timeline of the last build") if timed else ""
    worker = "build process" if backend == "inline" else f"{backend} worker"
    rows = [
        (
            r["id"],
            f'<span class="outcome {escape(r["outcome"])}">{escape(r["outcome"])}</span>',
            _when(r.get("started")),
            fmt_duration(r["seconds"]) if "seconds" in r else "",
            r.get("on") or (worker if r["outcome"] in ("ran", "failed", "interrupted") else ""),
            r.get("error") or "; ".join(r.get("reasons", [])),
        )
        for r in steps
    ]
    table = _table(
        ["step", "outcome", "started", "took", "on", "why / error"], rows, raw=(1,), css="timeline"
    )
    return _section("Last build", [lead, chart, table])


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
    elif isinstance(log.get("instance_loss"), list) and log["instance_loss"]:
        plot = _img(plots.loss_svg(name, log, sorted(snapshots)), f"loss curves of {name}")
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
    facts_table = _table(["", ""], [(k, v) for k, v in facts if v not in (None, "")], header=False)
    parts = [
        f"<h3>{escape(name)}</h3>",
        f"<p>{_built(ctx, sid, record, 'trained')}</p>",
        f'<div class="row">{plot}{facts_table}</div>',
    ]
    for table in ("train", "lora"):
        rows = [(k, _plain(v)) for k, v in sorted(_mapping(info.get(table)).items()) if v is not None]
        if rows:
            parts.append(
                f"<details><summary>[{table}] settings</summary>{_table(['key', 'value'], rows)}</details>"
            )
    if snapshots:
        rows = [
            (s, _when(ctx.lock[s].get("built")), _loss_text(ctx.lock[s].get("metrics", {})), _folder(ctx, s))
            for _, s in sorted(snapshots.items())
        ]
        parts.append("<h4>Snapshots</h4>" + _table(["snapshot", "built", "loss", "folder"], rows))
    return f'<div class="item" id="{escape(sid)}">' + "\n".join(parts) + "</div>"


def _blend(ctx: _Context, sid: str) -> str:
    record = ctx.lock[sid]
    inputs, metrics = record.get("inputs", {}), record.get("metrics", {})
    name = sid.split(":", 1)[1]
    parents = ", ".join(f"{a.get('_name', '?')} × {a.get('weight')}" for a in inputs.get("adapters", []))
    parts = [
        f"<h3>{escape(name)}</h3>",
        f"<p>{_built(ctx, sid, record, 'blended')}</p>",
        f"<p>{escape(parents)}, method <code>{escape(str(inputs.get('method', '?')))}</code></p>",
    ]
    per_component = {k: v for k, v in metrics.items() if isinstance(v, dict)}
    components = sorted({c for v in per_component.values() for c in v})
    if components:
        keys = sorted(per_component)
        rows = [(c, *(_number(per_component[k].get(c)) for k in keys)) for c in components]
        parts.append(_table(["component", *(k.replace("_", " ") for k in keys)], rows, css="blend-errors"))
    flat = {k: v for k, v in _numbers(metrics).items() if "." not in k}
    if flat:
        parts.append(_table(["metric", "value"], [(k, _number(v)) for k, v in flat.items()]))
    return f'<div class="item" id="{escape(sid)}">' + "\n".join(parts) + "</div>"


def _render_step(ctx: _Context, sid: str) -> str:
    record = ctx.lock[sid]
    inputs, metrics = record.get("inputs", {}), record.get("metrics", {})
    name = sid.split(":", 1)[1]
    grid = ctx.output(sid, "grid.png")
    if grid is not None and grid.is_file():
        image = _img(grid.read_bytes(), f"grid of {name}", mime="image/png", css="grid")
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
    tables = _table(["", ""], [(k, v) for k, v in settings if v not in (None, "")], header=False)
    if numbers := _numbers(metrics):  # what the step recorded
        tables += _table(["metric", "value"], [(k, _number(v)) for k, v in numbers.items()], css="metrics")
    for eval_id, scores, current in _scores_of(ctx, sid):  # fidelity scores of eval steps of this render
        if not current:  # its scores are of images this render no longer holds
            tables += (
                f"<p>{escape(eval_id)} scored an earlier build of this render: run <code>dbl build</code> "
                "to score this one.</p>"
            )
            continue
        tables += _fidelity_table(eval_id, scores, inputs)
    caption = _grid_caption(inputs, list(inputs.get("prompts", [])), list(inputs.get("seeds", [])))
    about = [caption, f'<div class="row">{tables}</div>']
    parts = [
        f"<h3>{escape(name)}</h3>",
        f"<p>{_built(ctx, sid, record, 'rendered')}</p>",
        f'<div class="row">{image}<div>{"".join(about)}</div></div>',
    ]
    return f'<div class="item" id="{escape(sid)}">' + "\n".join(parts) + "</div>"


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
        per_adapter = {a: _numbers(_mapping(scores.get(a))) for a in names}
    else:
        per_adapter = {_adapter_names(inputs) or "?": _numbers(scores)}
    found = {k for v in per_adapter.values() for k in v}
    columns = [k for k in SCORES if k in found] + sorted(found - set(SCORES))
    if not columns:
        return f"<p>{escape(eval_id)}: nothing to score (no prompt of the render names what it measures).</p>"
    rows = [(a, *(_number(v.get(k)) for k in columns)) for a, v in per_adapter.items()]
    headers = [f"fidelity ({eval_id})", *(k.replace("_", " ") for k in columns)]
    return _table(headers, rows, css="metrics")


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
            r.get("inputs", {}).get("version", ""),
        )
        + (_when(r.get("built")), fmt_duration(r.get("duration_s", 0)))
        for sid, r in ((sid, ctx.lock[sid]) for sid in ids)
    ]
    rows += [(sid, "", "", "", _unrecorded(ctx, sid), "") for sid in unbuilt]
    lead = (
        "<p>From the lockfile: each step's fingerprint (the hash of its inputs) and output hash, the "
        "version of its step kind, and when it was built and how long that took.</p>"
    )
    headers = ["step", "fingerprint", "output hash", "step version", "built", "took"]
    return _section("Provenance", [lead, _table(headers, rows, css="provenance")])


def _unrecorded(ctx: _Context, sid: str) -> str:
    folder = listing.unrecorded_outputs(ctx.project, sid)
    return f"not in the lockfile (files in {folder})" if folder else "not built"


# --- HTML pieces -----------------------------------------------------------------------------------------


def _section(title: str, parts: list[str]) -> str:
    body = "\n".join(p for p in parts if p) or "<p>None in the lockfile.</p>"
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}">\n<h2>{escape(title)}</h2>\n{body}\n</section>'


def _img(data: bytes, alt: str, mime: str = "image/svg+xml", css: str = "plot") -> str:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img class="{css}" alt="{escape(alt)}" src="{uri}">'


def _table(
    headers: list[str], rows: list[tuple], raw: tuple[int, ...] = (), css: str = "", header: bool = True
) -> str:
    """A table of `rows`; the cells whose index is in `raw` are HTML already, every other is escaped."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw else escape(str(c))}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table class="{css}">{head}{body}</table>'


def _built(ctx: _Context, sid: str, record: dict, verb: str) -> str:
    """'Built <when> in 4m40s', and what the last build did with the step."""
    text = f"built {_when(record.get('built'))} in {fmt_duration(record.get('duration_s', 0))}"
    outcome = ctx.outcomes.get(sid, {}).get("outcome")
    if outcome == "restored":
        text += " (restored from the run-cache by the last build)"
    elif outcome == "ran":
        # a rerun that made the recorded bytes again keeps the record of the build that first made them
        # (a last-build file of an older dbl does not say so: the times tell, to the second)
        row = ctx.outcomes[sid]
        made_then = (
            not row["remade"] if "remade" in row else _when(row.get("started")) == _when(record.get("built"))
        )
        text += (
            f" ({verb} by the last build)"
            if made_then
            else f" ({verb} again by the last build, to the same outputs)"
        )
    return escape(text[0].upper() + text[1:])


def _folder(ctx: _Context, sid: str) -> str:
    outputs = sorted(ctx.lock[sid].get("outputs", {}))
    common = os.path.commonpath(outputs) if outputs else ""
    return Path(common).parent.as_posix() if len(outputs) == 1 else common


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        when = datetime.fromisoformat(str(iso).replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return str(iso)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _plain(value) -> str:
    """A recorded value as short text: dicts as 'key=value, ...', lists comma-separated."""
    if isinstance(value, dict):
        return ", ".join(f"{k.lstrip('_')}={_plain(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def _numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every number in `metrics` (nested tables as dotted keys), as recorded: none is made up here."""
    found: dict[str, float] = {}
    for key, value in sorted(metrics.items()):
        if isinstance(value, dict):
            found.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[prefix + key] = value
    return found


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3e}"


def _loss_text(metrics: dict) -> str:
    if "loss_last" not in metrics:
        return ""
    first = f"{_number(metrics['loss_first'])} -> " if metrics.get("loss_first") is not None else ""
    return first + _number(metrics["loss_last"])


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
h3 { margin-bottom: 4px; } code { background: #f3f3f3; padding: 0 3px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ddd; padding: 2px 8px;
       text-align: left; vertical-align: top; } th { background: #f6f6f6; }
.item { margin-bottom: 28px; } img.plot { max-width: 100%; display: block; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
img.grid { max-width: 100%; image-rendering: pixelated; min-width: 256px; border: 1px solid #ccc; }
.caption { font-size: 13px; color: #444; } .caption ol { margin: 2px 0; }
.outcome { padding: 0 6px; border-radius: 3px; color: #fff; }
""" + "".join(f".outcome.{o} {{ background: {c}; }}\n" for o, c in plots.OUTCOME_COLOURS.items())
