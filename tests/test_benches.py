"""Every CPU benchmark in bench/ runs to the end at its smallest size and prints its figures: a
benchmark that no test runs breaks unseen when the steps it drives change (a prior step that came to
need its model cache's family stopped bench/prior_bench.py with an AttributeError)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SMALLEST = {
    "commit_bench": ["--files", "2", "--size", "10", "--repeat", "1", "--json"],
    "prior_bench": ["--images", "1", "--steps", "1", "--repeat", "1", "--json"],
    "render_bench": ["--prompts", "1", "--seeds", "1", "--steps", "1", "--repeat", "1", "--json"],
    "edit_bench": ["--prompts", "2", "--seeds", "1", "--steps", "1", "--json"],
    "edit_bench --edit adapters": [
        "--prompts",
        "1",
        "--seeds",
        "1",
        "--steps",
        "1",
        "--edit",
        "adapters",
        "--json",
    ],
    "train_bench": ["--steps", "1", "--warmup", "1", "--resolution", "32", "--json", "{out}"],
    "plan_bench": ["--subjects", "2", "--images", "2", "--json"],
    "live_bench": ["--seconds", "1", "--json"],
    "parallel_bench": ["--subjects", "2", "--steps", "1", "--json", "{out}"],
    "parallel_bench --ray": ["--subjects", "1", "--steps", "1", "--ray", "--json", "{out}"],
    "startup_profile": ["--resolution", "32", "--json", "{out}"],
    "startup_profile --build": ["--build", "--resolution", "32", "--class-images", "1", "--prior-steps", "1"]
    + ["--json", "{out}"],
    "startup_profile --compare-load": ["--compare-load", "1", "--json", "{out}"],
}


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_a_benchmark_runs_and_prints_its_figures(tmp_path, name):
    out = tmp_path / "figures.json"
    args = [a.format(out=out) for a in SMALLEST[name]]
    if "--ray" in args:
        pytest.importorskip("ray")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name.split()[0]}.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if "{out}" in SMALLEST[name]:
        figures = json.loads(out.read_text())
    else:
        figures = json.loads(done.stdout[done.stdout.index("{") :])
    assert figures, f"{name} printed no figures"
    if "--ray" in args:
        assert any("--executor ray" in row["flags"] for row in figures["results"]), figures
