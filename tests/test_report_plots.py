"""The plots of `dbl report`: the loss curve's moving mean, and what drawing a plot costs. No build:
milliseconds."""

from __future__ import annotations

import io
import json
import math
import random

import pytest

from runner import plots
from tests.report_page import record_as_built


def _windows(values: list[float]) -> list[float]:
    """The moving mean as its definition says: each window summed anew."""
    window = max(1, len(values) // 10)
    return [sum(values[max(0, i + 1 - window) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def _same(got: list[float], want: list[float], scale: float) -> bool:
    """Equal within float rounding of the plot's scale; nan where nan, inf where inf."""
    return len(got) == len(want) and all(
        g == w or (math.isnan(g) and math.isnan(w)) or abs(g - w) <= 1e-12 * scale
        for g, w in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("n", [0, 1, 2, 9, 10, 11, 21, 999, 5003])
def test_the_moving_mean_is_each_windows_mean(n):
    rng = random.Random(n)
    values = [rng.uniform(0.01, 2.0) for _ in range(n)]
    assert _same(plots._smooth(values), _windows(values), 2.0)


@pytest.mark.parametrize(
    "odd",
    [{5: math.nan}, {0: -math.inf}, {5: math.inf, 7: -math.inf}, {99: math.nan}, {50: 1e308, 51: 1e308}],
)
def test_a_nan_inf_or_overflow_spoils_only_the_windows_that_hold_it(odd):
    rng = random.Random(0)
    values = [rng.uniform(0.01, 2.0) for _ in range(100)]
    for i, value in odd.items():
        values[i] = value
    got, want = plots._smooth(values), _windows(values)
    assert any(not math.isfinite(w) for w in want)  # the odd values did reach the mean
    assert _same(got, want, max(abs(v) for v in values if math.isfinite(v)))


class _CountedReads(list):
    """A list that counts the values read from it by index or slice (iterating reads none)."""

    reads = 0

    def __getitem__(self, key):
        got = super().__getitem__(key)
        self.reads += len(got) if isinstance(key, slice) else 1
        return got


def test_the_moving_mean_of_a_long_run_reads_each_value_a_few_times_not_once_per_window():
    """Summed window by window, a curve of 100,000 steps took 4 s: each value was read once for each of
    the 10,000 windows that hold it. Counted, not timed: the count does not depend on the machine."""
    values = _CountedReads(random.Random(0).uniform(0, 1) for _ in range(100_000))
    smooth = plots._smooth(values)
    assert len(smooth) == len(values) and values.reads <= 2 * len(values), values.reads


def _header(svg: bytes) -> bytes:
    """The <svg> element's opening tag: the plot's size and view box."""
    start = svg.index(b"<svg ")
    return svg[start : svg.index(b">", start)]


@pytest.mark.parametrize(
    "draw",
    [
        lambda: plots.loss_svg("dog", {"instance_loss": [0.3, 0.2, 0.25, 0.1], "prior_loss": [0.2] * 4}, [2]),
        lambda: plots.timeline_svg([{"id": "train:dog", "outcome": "ran", "offset_s": 0, "seconds": 3}]),
    ],
    ids=["loss", "timeline"],
)
def test_a_plot_is_drawn_once_and_cropped_as_tight_crops_it(draw, monkeypatch):
    mpl = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures, draws, svg_of = [], [], plots._svg
    monkeypatch.setattr(plots, "_svg", lambda fig: figures.append(fig) or svg_of(fig))
    drawn = Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda fig, renderer: draws.append(fig) or drawn(fig, renderer))
    svg = draw()
    assert len(figures) == 1 and len(draws) == 1  # measuring it for the crop drew it once more
    tight = io.BytesIO()
    with mpl.rc_context({"svg.hashsalt": "dbl", "svg.fonttype": "path"}):
        figures[0].savefig(tight, format="svg", metadata={"Date": None}, bbox_inches="tight")
    assert b'width="' in _header(svg) and _header(svg) == _header(tight.getvalue())


def test_a_loss_log_that_holds_something_else_than_numbers_is_said_and_the_page_written(
    proj, build, fake_steps, capsys
):
    from runner.cli import main

    build(proj)
    out = proj.load().out
    log = {"instance_loss": [0.3, None, 0.2], "prior_loss": [0.1, 0.2, 0.1]}
    (out / "adapters" / "dog" / "dbl.json").write_text(json.dumps({"log": log}))
    log = {"instance_loss": [0.3, 0.25, 0.2], "prior_loss": 4}
    (out / "adapters" / "toy" / "dbl.json").write_text(json.dumps({"log": log}))
    infos = [out / "adapters" / name / "dbl.json" for name in ("dog", "toy")]
    record_as_built(proj.lock, proj.root, *infos)  # as a build (of another tool, say) wrote them
    assert main(["report", str(proj.path)]) == 0
    assert "Error" not in capsys.readouterr().err
    text = (out / "report.html").read_text(encoding="utf-8")
    dog = text[text.index('id="train:dog"') :]
    assert "its dbl.json holds instance_loss[1] = null, not a number" in dog[: dog.index("</div>")]
    toy = text[text.index('id="train:toy"') :]
    assert "its dbl.json holds prior_loss = 4, not a list of numbers" in toy[: toy.index("</div>")]
