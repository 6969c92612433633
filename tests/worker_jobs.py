"""A job as the executor sends one to a worker, made by hand, for the tests of the workers themselves.

Import by name (`from tests.worker_jobs import render_job`)."""

from __future__ import annotations

from pathlib import Path

from runner.exec.job import Job


def render_job(tmp_path: Path, name: str, run: str, devices: tuple[str, ...] = ()) -> Job:
    """A render step that runs `run` (`module:function`), with nothing upstream."""
    return Job(
        step_id=f"render:{name}",
        kind="render",
        name=name,
        spec=None,
        project=None,
        fingerprint=name,
        run=run,
        inputs={},
        work=tmp_path / name,
        devices=devices,
    )
