"""The plots of `dbl report`, drawn by matplotlib (imported inside functions) as SVG bytes: the same
build gives the same bytes."""

from __future__ import annotations

import io
import json
import math

from runner.errors import DblError

INSTALL = "pip install 'dbl[report]'"
# Colours of the outcomes in the timeline, shared by the chart and the table.
OUTCOME_COLOURS = {
    "ran": "#1f77b4",
    "restored": "#2ca02c",
    "failed": "#d62728",
    "interrupted": "#ff7f0e",
    "fresh": "#7f7f7f",
    "skipped": "#bcbcbc",
}


def require_matplotlib():
    """matplotlib and its Figure class, or a DblError that says how to install them."""
    try:
        import matplotlib as mpl
        from matplotlib.figure import Figure
    except ImportError:
        raise DblError(
            f"dbl report draws its plots with matplotlib, which is not installed: {INSTALL}"
        ) from None
    return mpl, Figure


def _svg(fig) -> bytes:
    mpl, _ = require_matplotlib()
    from matplotlib.backends.backend_svg import RendererSVG

    buf = io.BytesIO()
    # A fixed salt and no date: the same build gives the same page.
    with mpl.rc_context({"svg.hashsalt": "dbl", "svg.fonttype": "path"}):
        # Cropped to what is drawn, as bbox_inches="tight" does; but that draws the figure twice, once
        # to measure it. Measured here with the SVG renderer at its 72 dpi, the crop is the same.
        fig.dpi = 72
        width, height = fig.get_size_inches() * 72
        drawn = fig.get_tightbbox(RendererSVG(width, height, io.StringIO()))
        crop = drawn.padded(mpl.rcParams["savefig.pad_inches"])
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches=crop)
    return buf.getvalue()


def _smooth(values: list[float]) -> list[float]:
    """The mean of each value and those before it, over about a tenth of the run. A running sum: summing
    each window anew grows with the square of the run (4 s a curve at 100,000 steps)."""
    window = max(1, len(values) // 10)
    smooth, total, odd = [], 0.0, 0  # the sum of the window's finite values; how many are not finite
    for i, value in enumerate(values):
        if math.isfinite(value):
            total += value
        else:
            odd += 1
        if i >= window:
            if math.isfinite(gone := values[i - window]):
                total -= gone
            else:
                odd -= 1
        n = min(i + 1, window)
        if odd or not math.isfinite(total):  # a nan or inf, or a sum past the float range: as sum() has it
            smooth.append(sum(values[i + 1 - n : i + 1]) / n)
            total = sum(v for v in values[i + 1 - n : i + 1] if math.isfinite(v))
        else:
            smooth.append(total / n)
    return smooth


def unreadable(log: dict) -> str:
    """What in a dbl.json's per-step log is not a loss ('instance_loss[3] = null, not a number'), or ''.
    A log written or edited by hand may hold anything; the page then says so rather than fail."""
    for key in ("instance_loss", "prior_loss"):
        values = log.get(key)
        if not values:
            continue
        if not isinstance(values, list):
            return f"{key} = {json.dumps(values)[:40]}, not a list of numbers"
        for i, value in enumerate(values):
            try:
                float(value)
            except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
                return f"{key}[{i}] = {json.dumps(value)[:40]}, not a number"
    return ""


def loss_svg(name: str, log: dict, snapshots: list[int]) -> bytes:
    _, Figure = require_matplotlib()
    fig = Figure(figsize=(6.4, 2.8))
    ax = fig.add_subplot()
    for key, label, colour in (("instance_loss", "instance loss", "C0"), ("prior_loss", "prior loss", "C1")):
        values = [float(v) for v in log.get(key) or []]
        if not values:
            continue
        steps = range(1, len(values) + 1)
        ax.plot(
            steps, values, color=colour, alpha=0.3, linewidth=0.8, marker="o" if len(values) < 3 else None
        )
        ax.plot(steps, _smooth(values), color=colour, linewidth=1.6, label=label)
    for step in snapshots:
        ax.axvline(step, color="0.5", linestyle=":", linewidth=1)
        ax.text(
            step, 0.98, f" @{step}", transform=ax.get_xaxis_transform(), fontsize=7, color="0.4", va="top"
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: loss per step (thin) and its moving mean", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _svg(fig)


def timeline_svg(rows: list[dict]) -> bytes:
    _, Figure = require_matplotlib()
    fig = Figure(figsize=(7.5, 0.6 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    total = max((r["offset_s"] + r.get("seconds", 0) for r in rows), default=1) or 1
    for y, r in enumerate(rows):
        width = max(r.get("seconds", 0), total / 400)  # a restore of a few ms still shows
        ax.barh(y, width, left=r["offset_s"], color=OUTCOME_COLOURS.get(r["outcome"], "0.5"), height=0.6)
    ax.set_yticks(range(len(rows)), [r["id"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the build started")
    ax.grid(axis="x", alpha=0.3)
    seen = sorted({r["outcome"] for r in rows})
    handles = [ax.barh([], [], color=OUTCOME_COLOURS.get(o, "0.5"), label=o) for o in seen]
    ax.legend(
        handles=handles, fontsize=8, loc="lower left", bbox_to_anchor=(0, 1), ncol=len(seen), frameon=False
    )
    return _svg(fig)
