"""The optimizers a train step can use, by their `optimizer` name in [train]: a registry of builders.

Each builder takes the parameter groups (one per component, each with its learning rate) and the
resolved [train] settings, and returns a torch optimizer whose `state_dict` holds everything it needs to
resume exactly (runner.training.checkpoints saves it). torch and the optional packages are imported
inside the builders.

    adamw       torch.optim.AdamW: fused on CUDA, foreach off elsewhere (the same arithmetic on every
                device count and layout)
    adamw8bit   bitsandbytes' 8-bit AdamW (CUDA); `use_8bit_adam = true` asks for it too
    prodigy     Prodigy (prodigyopt, the `dbl[prodigy]` extra): Adam that finds its own step size;
                learning_rate multiplies it (1.0 is usual), and one rate serves every group
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable

from runner.errors import StepError


def _adamw(groups, ts, device):
    import torch

    devices = [p.device.type for group in groups for p in group["params"]]
    return torch.optim.AdamW(groups, **adamw_implementation(devices), **_adam_kwargs(ts))


def adamw_implementation(devices: list[str]) -> dict:
    """AdamW's implementation for parameters on these device types: the fused CUDA kernel (one launch for
    every parameter, no host sync) when all are on CUDA; else the plain per-parameter loop (foreach off).
    Both are elementwise, so the result does not depend on how parameters are grouped or split among
    processes."""
    if devices and all(d == "cuda" for d in devices):
        return {"fused": True}
    return {"foreach": False}


def _adamw8bit(groups, ts, device):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise StepError(said(*_adamw8bit_missing(ts, lambda: device, installed=False))) from None
    return bnb.optim.AdamW8bit(groups, **_adam_kwargs(ts))


def _adamw8bit_missing(
    ts, device: Callable[[], str], installed: bool | None = None
) -> tuple[str, str] | None:
    asked = "8-bit AdamW" if asked_key(ts) == "use_8bit_adam" else '"adamw8bit"'
    if not device().startswith("cuda"):
        return f"{asked} needs a CUDA device (bitsandbytes)", "use the default adamw on this machine"
    if not (_installed("bitsandbytes") if installed is None else installed):
        return f"{asked} needs bitsandbytes", "pip install bitsandbytes"
    return None


def _prodigy(groups, ts, device):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise StepError(said(*_prodigy_missing(ts, lambda: device, installed=False))) from None
    kwargs = _adam_kwargs(ts)
    # Prodigy prints a line when weight decay is on; the build's display owns the terminal.
    with contextlib.redirect_stdout(io.StringIO()):
        return Prodigy(
            groups,
            betas=kwargs["betas"],
            beta3=ts.prodigy_beta3,
            eps=kwargs["eps"],
            weight_decay=kwargs["weight_decay"],
            decouple=True,
            use_bias_correction=ts.prodigy_use_bias_correction,
            safeguard_warmup=ts.prodigy_safeguard_warmup,
            d_coef=ts.prodigy_d_coef,
        )


def _adam_kwargs(ts) -> dict:
    return dict(betas=(ts.adam_beta1, ts.adam_beta2), weight_decay=ts.adam_weight_decay, eps=ts.adam_epsilon)


def _prodigy_missing(ts, device: Callable[[], str], installed: bool | None = None) -> tuple[str, str] | None:
    if not (_installed("prodigyopt") if installed is None else installed):
        return '"prodigy" needs the prodigyopt package', "pip install 'dbl[prodigy]'"
    return None


def said(what: str, fix: str) -> str:
    """A missing optimizer's (what, fix) as a step says it where it knows no project file."""
    return f"{what} - {fix}"


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "adamw8bit": _adamw8bit, "prodigy": _prodigy}
# missing(ts, device, installed=None): (what, fix) where the optimizer cannot run here (a package not
# installed, no CUDA device), or None; `device()` names the device, asked only by an optimizer that needs
# one; `what` names the value of the key that asked for it (asked_key). The build asks before any step
# runs, so that a train step does not fail on it after a prior step's work.
MISSING: dict[str, Callable] = {"adamw8bit": _adamw8bit_missing, "prodigy": _prodigy_missing}


def unavailable(ts, device: Callable[[], str]) -> tuple[str, str] | None:
    """(what, fix) where the optimizer [train] `ts` asks for cannot run here on the device `device()`
    names, or None."""
    missing = MISSING.get(optimizer_name(ts))
    return missing(ts, device) if missing is not None else None


def optimizer_name(ts) -> str:
    """The optimizer [train] asks for (`use_8bit_adam = true` is adamw8bit)."""
    return "adamw8bit" if ts.use_8bit_adam and ts.optimizer == "adamw" else ts.optimizer


def asked_key(ts) -> str:
    """The [train] key that asks for the optimizer: `use_8bit_adam` where it is true and the optimizer is
    adamw8bit, else `optimizer`."""
    return "use_8bit_adam" if ts.use_8bit_adam and optimizer_name(ts) == "adamw8bit" else "optimizer"


def make_optimizer(trainable: dict, components, ts, device, say: Callable[[str, str], str] = said):
    """The [train] optimizer with one parameter group per component, each at its learning rate. Where it
    cannot run here, a StepError says why: `say(what, fix)` words it (with the project file's key)."""
    if found := unavailable(ts, lambda: device):
        raise StepError(say(*found))
    groups = []
    for c in components:
        lr = getattr(ts, c.learning_rate) if c.learning_rate else None
        groups.append(
            {"params": list(trainable[c.name].values()), "lr": ts.learning_rate if lr is None else lr}
        )
    return OPTIMIZERS[optimizer_name(ts)](groups, ts, device)
