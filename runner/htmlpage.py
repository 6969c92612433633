"""The HTML pieces of `dbl report`'s page: sections, tables, images as data URIs, and its styles. Every
text is escaped here; nothing on the page is fetched when it is opened."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from html import escape

from runner import plots


def section(title: str, parts: list[str]) -> str:
    body = "\n".join(p for p in parts if p) or "<p>None in the lockfile.</p>"
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{anchor}">\n<h2>{escape(title)}</h2>\n{body}\n</section>'


def img(data: bytes, alt: str, mime: str = "image/svg+xml", css: str = "plot") -> str:
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img class="{css}" alt="{escape(alt)}" src="{uri}">'


def table(
    headers: list[str], rows: list[tuple], raw: tuple[int, ...] = (), css: str = "", header: bool = True
) -> str:
    """A table of `rows`; the cells whose index is in `raw` are HTML already, every other is escaped."""
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw else escape(str(c))}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table class="{css}">{head}{body}</table>'


def when(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        when = parse_time(iso).astimezone(timezone.utc)
    except ValueError:
        return str(iso)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def parse_time(iso) -> datetime:
    """A time as the lockfile and the last-build record write it ("2026-12-02T15:11:21Z"). Raises
    ValueError."""
    return datetime.fromisoformat(str(iso).replace("Z", "+00:00"))


def plain(value) -> str:
    """A recorded value as short text: dicts as 'key=value, ...', lists comma-separated."""
    if isinstance(value, dict):
        return ", ".join(f"{k.lstrip('_')}={plain(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value)
    return str(value)


def numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every number in `metrics` (nested tables as dotted keys), as recorded: none is made up here."""
    found: dict[str, float] = {}
    for key, value in sorted(metrics.items()):
        if isinstance(value, dict):
            found.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[prefix + key] = value
    return found


def number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3e}"


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
.stale { color: #a33; font-weight: 600; }
""" + "".join(f".outcome.{o} {{ background: {c}; }}\n" for o, c in plots.OUTCOME_COLOURS.items())
