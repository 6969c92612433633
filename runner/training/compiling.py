"""Whether the denoiser is compiled for training (`[train] compile`), and compiling it. torch is imported
inside functions.

torch.compile turns the denoiser's forward and backward into a few fused kernels, so a step launches far
fewer of them: on a big GPU, where a small batch leaves the device waiting on launches rather than on
arithmetic, that is most of a step's time. The latents are cached and every step has the same shapes, so
the denoiser is compiled once (dynamic=False); with buckets the shapes change with the bucket, and each
bucket would compile anew.

"auto" leaves it off: compiling costs more than it saves in the runs DreamBooth makes. On an H200 at SD
1.5 shapes, batch 1, the UNet compiled for 126 s and 169 s (two fresh machines, an empty cache) and then
stepped 10-27% faster than eager (6.5-7.5 against 5.9 steps/s): the minutes come back only after a few
thousand steps, where a run has hundreds to a couple of thousand. On CUDA the denoiser's passes replay as
CUDA graphs instead (runner.training.graphs), which cut the launches for two passes' capture; where they
cannot (gradient checkpointing, buckets, LoRA dropout), the run goes eagerly unless `compile = true`. The
compiled kernels are kept in DBL_HOME/torch-compile (unless TORCHINDUCTOR_CACHE_DIR says otherwise), so a
later build of the same model and shapes loads them instead of compiling again: `compile = true` pays off
for long runs, and for builds repeated with the same shapes.

Where compiling fails (an operator the compiler does not know, a missing C compiler), the run says why
in its log and goes on without it, from the same step.

The result is the same as without compiling to floating-point rounding (fused kernels add in another
order), so the setting is not part of the fingerprint, as gradient checkpointing is not.
"""

from __future__ import annotations

import os

from runner.training import switches

CACHE_FOLDER = "torch-compile"


def compiling(setting, device: str, buckets: bool = False, graphs: bool = False) -> tuple[bool, str]:
    """(on, why) for a `compile` setting: true, false or "auto"; `graphs`: whether the denoiser's passes
    replay as CUDA graphs (runner.training.graphs), which take the place of compiling under "auto"."""
    switches.check(setting, "compile")
    if setting != "auto":
        return setting, "set in [train]"
    kind = device.split(":")[0]
    if kind != "cuda":
        return False, f"auto: off on {kind}, where compiling takes longer than it saves"
    if buckets:
        return False, "auto: off with buckets, whose shapes would each compile anew"
    if graphs:
        return False, "auto: off, the denoiser replays CUDA graphs"
    return False, "auto: off, compiling takes minutes that a run of a few thousand steps does not earn back"


def describe(on: bool, why: str) -> str:
    """The log line of the choice."""
    return switches.describe("compile", on, why)


def compile_module(module) -> None:
    """Compile `module` in place (its __call__ runs the compiled graph; its parameters and state dict are
    untouched), with the compiled kernels cached under dbl's home folder."""
    from runner.models import dbl_home

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(dbl_home() / CACHE_FOLDER))
    module.compile(dynamic=False)


def uncompile_module(module) -> None:
    """Undo compile_module: the module runs eagerly again (a shared pipeline is left as it was found)."""
    module._compiled_call_impl = None


def is_compile_error(exc: BaseException) -> bool:
    """Whether `exc` is torch.compile failing (tracing, or the backend's compiler), not the model."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(exc, TorchDynamoException)


def is_compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None
