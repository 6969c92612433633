"""A plan and a build driven through a display, as the executor drives it, for the display tests."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from runner.events import CACHED, DONE, FAILED, FRESH, PENDING, RUNNING, SKIPPED, StepEvent


def plan_steps() -> list[StepEvent]:
    return [
        StepEvent("prior:dog", "prior", "dog", FRESH),
        StepEvent("train:dog", "train", "dog", PENDING, ["lora.rank 16 -> 8"]),
        StepEvent("blend:mix", "blend", "mix", PENDING, ["upstream train:dog stale"]),
        StepEvent("render:park", "render", "park", PENDING, ["renders.park.prompts changed"]),
    ]


def run_build(reporter, *, fail: bool = False, progress_hook=None) -> list[StepEvent]:
    """Drive a reporter the way the executor does: plan, then each step, then finish."""
    steps = plan_steps()
    reporter.plan("pets", steps)
    train = steps[1]
    train.status = RUNNING
    reporter.step_start(train)
    for done in range(0, 801, 20):
        train.done, train.total = done, 800
        train.metrics["loss"] = 0.25 - done / 10_000
        reporter.step_progress(train)
        if progress_hook and done == 400:
            progress_hook()
    reporter.log(train, "saved checkpoint-800")
    reporter.log(train, "warning: caption 01.txt is empty; the instance prompt is used")
    if fail:
        train.status, train.duration_s = FAILED, 12.0
        train.error = "CUDA out of memory\nlower train.batch_size or turn on gradient_checkpointing"
        reporter.step_end(train)
        for s in steps[2:]:
            s.status, s.error = SKIPPED, "upstream train:dog failed"
            reporter.step_end(s)
    else:
        train.status, train.duration_s, train.outputs = DONE, 301.0, Path("build/pets/adapters/dog")
        reporter.step_end(train)
        blend = steps[2]
        blend.status = RUNNING
        reporter.step_start(blend)
        blend.status, blend.outputs = CACHED, Path("build/pets/blends/mix")
        reporter.step_end(blend)
        render = steps[3]
        render.status = RUNNING
        reporter.step_start(render)
        render.done, render.total = 3, 4
        reporter.step_progress(render)
        render.status, render.duration_s, render.outputs = DONE, 3.5, Path("build/pets/renders/park")
        reporter.step_end(render)
    reporter.finish(steps, 320.0)
    reporter.close()
    return steps


def all_fresh() -> list[StepEvent]:
    return [
        StepEvent(i, i.split(":")[0], i.split(":")[1], FRESH)
        for i in ("prior:dog", "train:dog", "render:park")
    ]


def recording_console() -> Console:
    return Console(record=True, width=100, force_terminal=True)


def text_of(renderable) -> str:
    console = Console(record=True, width=100, force_terminal=True)
    console.print(renderable)
    return console.export_text()
