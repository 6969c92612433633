"""Every error dbl raises on purpose, in one module that imports nothing of dbl.

A user error (`DblError` and below) is shown as its message alone; anything else is a bug and shows its
type (and, with --debug, its traceback).
"""

from __future__ import annotations


class DblError(Exception):
    """A problem the user can act on; the message says what and how."""


class StepError(DblError):
    """A step failed for a reason the user can act on; the message says which and how."""


class StepInterrupted(Exception):
    """A step stopped early because the build was interrupted; its work folder lets it resume."""


class ImageError(StepError):
    """An image file that cannot be used; the message names the file. `each`: what is wrong with each
    file, where the message names several (the message alone where it names one)."""

    def __init__(self, message: str, each: list[str] | None = None):
        super().__init__(message)
        self.each = list(each) if each else [message]


class AdapterError(StepError):
    """An adapter folder or file that cannot be read, or that does not fit the model."""


class ModelError(DblError):
    """A base model that cannot be loaded; the message says why and what to do."""


class UsageError(DblError):
    """Bad command-line input (an unknown step id ...)."""


def os_words(exc: OSError) -> str:
    """An OSError as `path: reason` (`a -> b: reason` for a rename), or its reason alone where it names no
    file, without the `[Errno N]` that says nothing to a user; else its own words."""
    if not exc.strerror:
        return str(exc)
    if exc.filename is None:
        return exc.strerror
    names = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{names}: {exc.strerror}"
