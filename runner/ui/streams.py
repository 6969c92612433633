"""Standard output and error that may be closed (`dbl build >&-`) or break (`dbl plan | head -1`).

Neither is a reason to stop a build that may have hours of training left: a stream that is closed or
whose reader went away becomes a sink, and the build goes on and records its results as usual.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import sys

# Errors that mean "nobody reads this stream any more", as opposed to a real I/O problem.
GONE = (errno.EPIPE, errno.EBADF, errno.EIO, errno.ENXIO)


class SurvivableStream(io.TextIOBase):
    """A text stream that forwards to `stream` until writing to it fails as gone, then discards."""

    def __init__(self, stream, fd: int | None = None):
        super().__init__()
        self._stream = stream
        self._fd = fd
        self.gone = stream is None

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                try:
                    self._stream.write(text)
                except UnicodeEncodeError:  # a path that is not UTF-8, a terminal that is not UTF-8
                    self._stream.write(text.encode(self.encoding, "backslashreplace").decode(self.encoding))
            except (OSError, ValueError) as exc:  # ValueError: the file object was closed
                self._went(exc)
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self._went(exc)

    def isatty(self) -> bool:
        if self.gone:
            return False
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if self.gone:
            raise io.UnsupportedOperation("the stream is closed")
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:
        return getattr(self._stream, "errors", None) or "strict"

    def _went(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and exc.errno not in GONE:
            raise exc
        self.gone = True
        # What the old stream still buffers would fail again when it is flushed at exit, with an
        # "Exception ignored" message; point its descriptor at /dev/null so that the flush succeeds.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self._fd)
                os.close(null)


def _occupy_if_closed(fd: int) -> None:
    """Put /dev/null on a closed standard descriptor, so that no file dbl opens later gets its number
    (and with it whatever a library prints)."""
    try:
        os.fstat(fd)
    except OSError:
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def survivable_std_streams():
    """Wrap sys.stdout and sys.stderr in SurvivableStream for the duration of the block."""
    for fd in (1, 2):
        _occupy_if_closed(fd)
    saved = sys.stdout, sys.stderr
    out_fd, err_fd = _fd_of(sys.stdout), _fd_of(sys.stderr)
    # Only the process's own descriptors 1 and 2 are redirected when gone: a test's capture is not.
    sys.stdout = SurvivableStream(sys.stdout, out_fd if out_fd == 1 else None)
    sys.stderr = SurvivableStream(sys.stderr, err_fd if err_fd == 2 else None)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        sys.stdout, sys.stderr = saved
