"""The plots of `dbl report`: the loss curve's moving mean, and what drawing a plot costs. No build:
milliseconds."""

from __future__ import annotations

import math
import random
import time

import pytest

from runner import plots


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


def test_the_moving_mean_of_a_long_run_takes_no_time():
    values = [random.Random(0).uniform(0, 1) for _ in range(100_000)]
    start = time.process_time()
    plots._smooth(values)
    assert time.process_time() - start < 1.0  # summed window by window: 4 s
