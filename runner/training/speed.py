"""How a run's step is made fast without changing what it trains: gradient checkpointing (memory), CUDA
graphs and compiling (kernel launches). Each is a [train] switch, true, false or "auto"; the choices are
made when a run starts, in that order (the graphs need to know about checkpointing, compiling about the
graphs), each said in the log, and undone when it ends, so a shared pipeline is left as it was found.
The arithmetic of each is in runner.training.memory, graphs and compiling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.training import compiling, graphs, memory, switches

if TYPE_CHECKING:
    from runner.training.loop import Run


def choose(run: Run) -> None:
    """Gradient checkpointing, CUDA graphs and compiling for this run, as set or as "auto" finds best."""
    _checkpointing(run)
    _graphs(run)
    _compile(run)


def _denoiser(run: Run):
    return next(c for c in run.components if c.denoiser)


def _checkpointing(run: Run) -> None:
    """As set, or with "auto" as the device's free memory asks."""
    ts = run.settings
    examples = ts.batch_size * (2 if run.weight is not None else 1)
    on, why = memory.choose(
        ts.gradient_checkpointing,
        run.device,
        run.pipe,
        run.modules[_denoiser(run).name],
        run.trainable,
        examples,
        ts.resolution,
        run.dtype,
    )
    run.checkpointing = on
    run.log(memory.describe(on, why))


def _graphs(run: Run) -> None:
    """As set, or with "auto" where the shapes are static and nothing else stands in the way."""
    ts = run.settings
    on, why = graphs.choose(
        ts.cuda_graphs,
        run.device,
        buckets=bool(ts.buckets),
        checkpointing=run.checkpointing,
        dropout=run.job.subject.lora.dropout,
        compile_setting=ts.compile,
    )
    run.log(graphs.describe(on, why))
    if not on:
        return
    run.graphs = [graphs.GraphedDenoiser(run.modules[_denoiser(run).name], run.log)]
    encoders = [c for c in run.components if not c.denoiser]  # the text encoders that train
    if any(c.value(run.job.subject.lora, "dropout") for c in encoders):
        run.log("cuda graphs: the text encoders run eagerly (their LoRA dropout draws random masks)")
    elif encoders:
        names = [c.name for c in encoders]
        run.prompt_graphs = graphs.GraphedPrompts(run.job.family, run.modules, names, run.log)
        run.graphs.append(run.prompt_graphs)
    for graphed in run.graphs:
        graphed.install()


def _compile(run: Run) -> None:
    """As set, or with "auto" as the device and the shapes ask."""
    ts = run.settings
    on, why = compiling.compiling(ts.compile, run.device, buckets=bool(ts.buckets), graphs=bool(run.graphs))
    run.log(compiling.describe(on, why))
    if on:
        module = run.modules[_denoiser(run).name].base_model.model  # inside the LoRA wrapper
        compiling.compile_module(module)
        run.compiled.append(module)


def forward_backward(run: Run, step):
    """`step()` (a forward and backward pass); where compiling the denoiser fails, the log says why and
    the pass runs again without it (its draws come from the step's own seeds, so the rerun is the pass an
    eager run takes)."""
    try:
        return step()
    except Exception as exc:
        if not run.compiled or not compiling.is_compile_error(exc):
            raise
        run.log(f"warning: compiling the denoiser failed ({switches.reason(exc)}); it runs without compiling")
        _uncompile(run)
        run.optimizer.zero_grad(set_to_none=True)
        return step()


def _uncompile(run: Run) -> None:
    for module in run.compiled:
        compiling.uncompile_module(module)
    run.compiled.clear()


def undo(run: Run) -> None:
    """The denoiser runs eagerly again, with its own forward."""
    _uncompile(run)
    for graphed in run.graphs:
        graphed.remove()
    run.graphs, run.prompt_graphs = [], None
