"""The speed switches of [train] (gradient_checkpointing, compile, cuda_graphs): each is true, false or
"auto", changes no result beyond floating-point rounding, and the train step's log says which way each
went and why."""

from __future__ import annotations


def check(setting, key: str) -> None:
    """Raise ValueError unless `setting` is true, false or "auto"."""
    if setting is not True and setting is not False and setting != "auto":
        raise ValueError(f"{key} must be true, false or 'auto', not {setting!r}")


def reason(exc: BaseException) -> str:
    """Why a speed-up failed, in one line, for the log's warning: the underlying exception where there is
    one (torch.compile wraps its compiler's)."""
    cause = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    text = str(cause).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(cause).__name__}: {first}"[:200] if first else type(cause).__name__


def describe(label: str, on: bool, why: str) -> str:
    """The log line of a choice, e.g. `cuda graphs: on (auto: on cuda, static shapes)`."""
    return f"{label}: {'on' if on else 'off'} ({why})"
