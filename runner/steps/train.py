"""train:<subject> - DreamBooth with LoRA on the base model's components, with prior preservation.

The recipe lives in runner.training (the loop in runner/training/loop.py); several processes are
started by runner.exec.launcher.
"""

from __future__ import annotations


def run(ctx) -> dict:
    """Train one subject's LoRA adapter into ctx.out."""
    from runner.training import Hooks, job_from_context, train

    job = job_from_context(ctx)
    hooks = Hooks(progress=ctx.progress, log=ctx.log, should_stop=ctx.should_stop)
    if ctx.num_processes > 1:
        from runner.exec.launcher import run_processes

        return run_processes(job, ctx.num_processes, hooks)
    return train(job, hooks, models=ctx.models)
