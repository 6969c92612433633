"""Connecting a build to Ray: joining a cluster at its address (checked first, so that a wrong address is
a usage error at once), or starting a local instance that listens on 127.0.0.1 only, without a dashboard.
ray.init's SIGTERM handler is put back to the build's own. Ray is imported only here and in ray_backend,
and only once a step runs: it is the optional extra `dbl[ray]`."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import threading
import warnings

from runner.errors import UsageError

LOCAL = (None, "", "local")  # --ray-address values that start a local instance
CONNECT_TIMEOUT_S = 10.0  # a cluster's address that answers nothing in this time is an error
ANSWER_TIMEOUT_S = 5.0  # a service there that does not open as a gRPC server in this time is not Ray


def _words(api: bool) -> tuple[str, str, str]:
    """How a message names the Ray options: (the executor, the cluster's address, the GPUs), as the command
    line spells them (`--executor ray`) or, where `api`, as BuildOptions does (`backend="ray"`)."""
    if api:
        return 'backend="ray"', "ray_address", "gpus"
    return "--executor ray", "--ray-address", "--gpus"


def _local(api: bool) -> str:
    """The address option set to start a local instance: `--ray-address local`, `ray_address="local"`."""
    return 'ray_address="local"' if api else "--ray-address local"


def import_ray(api: bool = False):
    """Ray, or a UsageError that says how to install it. `api`: said in BuildOptions' words."""
    executor = _words(api)[0]
    if importlib.util.find_spec("ray") is None:
        raise UsageError(f"{executor} needs Ray, which is not installed: pip install 'dbl[ray]'")
    try:
        import ray
    except ImportError as exc:  # a broken install: a dependency missing, or of a version Ray cannot use
        raise UsageError(
            f"{executor} needs Ray, which is installed but does not import ({exc}): reinstall it, "
            "pip install --force-reinstall 'dbl[ray]'"
        ) from None
    return ray


def connect(
    address: str | None = None, gpus: tuple[str, ...] | None = None, api: bool = False, **init
) -> bool:
    """Connect this process to Ray, unless it is connected already; whether this call connected it.

    `address` None (or "local"): start a local instance that listens on 127.0.0.1 only, without a
    dashboard; `gpus` restricts it to these GPUs of this machine. Else join that cluster ("auto",
    "HOST:PORT", "ray://HOST:PORT"). `api`: usage errors in BuildOptions' words (`gpus`, `ray_address`),
    else in the command line's (`--gpus`, `--ray-address`). `init`: more ray.init arguments (num_cpus,
    num_gpus: tests).
    """
    if address not in LOCAL and gpus is not None:
        option = _words(api)[2]
        raise UsageError(
            f"{option} picks GPUs of this machine; the nodes of a Ray cluster offer the GPUs that "
            f"`ray start --num-gpus` gave them: leave {option} out with {_named_by(address, api)}"
        )
    ray = import_ray(api)
    if ray.is_initialized():
        return False
    common = {"log_to_driver": False, "logging_level": logging.WARNING, **init}
    _ray_output_to_stderr()
    with _keeping_sigterm():
        if address not in LOCAL:
            _check_reachable(address, api)
            try:
                with warnings.catch_warnings():  # said below, with what to do
                    warnings.filterwarnings("ignore", "Ray Client connection timed out")
                    ray.init(address=address, **common)
            except ConnectionError as exc:
                raise UsageError(_unreachable(address, str(exc), api) + _token_hint(address)) from None
        else:
            _start_local(ray, gpus, common)
    return True


def _ray_output_to_stderr() -> None:
    """Ray prints what its cluster reports to the build (a `(raylet)` paragraph when a worker dies, even
    with log_to_driver off) on standard output, among the build's own lines and where scripts read them:
    it goes to standard error, with Ray's other warnings."""
    try:
        from ray._private import worker
    except ImportError:
        return
    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "to_stderr", False):
        return

    def to_stderr(data, *args, **kwargs):
        return printer({**data, "is_err": True}, *args, **kwargs)

    to_stderr.to_stderr = True
    worker.print_to_stdstream = to_stderr


def _option(address: str, api: bool = False) -> str:
    return "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") == address else _words(api)[1]


def _named_by(address: str, api: bool = False) -> str:
    """Where the cluster's address came from, for messages: --ray-address (ray_address), or the
    environment's RAY_ADDRESS (see RayBackend)."""
    if os.environ.get("RAY_ADDRESS") == address:
        return f"RAY_ADDRESS={address} in the environment (unset it, or give {_local(api)})"
    return _words(api)[1]


def _unreachable(address: str, why: str, api: bool = False) -> str:
    local = (
        f"give {_local(api)} or unset RAY_ADDRESS"
        if os.environ.get("RAY_ADDRESS") == address
        else f"leave {_words(api)[1]} out"
    )
    return (
        f"cannot reach a Ray cluster at {address!r} ({why}); start one with `ray start --head`, or "
        f"{local} to start a local Ray instance"
    )


def _token_hint(address: str) -> str:
    """Ray sends its token to a cluster it finds itself ("auto") but not to one named by its address, and
    says nothing of it when that cluster turns it away: `ray start` turns token authentication on where
    ~/.ray/auth_token exists."""
    if address == "auto" or os.environ.get("RAY_AUTH_MODE"):
        return ""
    return (
        "; if the cluster asks for a token (`ray start` asks for one where ~/.ray/auth_token exists), set "
        "RAY_AUTH_MODE=token, with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
    )


def _check_reachable(address: str, api: bool = False) -> None:
    """A UsageError at once where nothing answers at the cluster's address: ray.init would retry it for
    minutes, printing Ray's own warnings, before it gave up. "auto" is looked up as Ray looks it up
    (RAY_ADDRESS, else the cluster `ray start` last started here)."""
    if address.startswith("ray://"):
        target = address.removeprefix("ray://").partition("/")[0]
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # another Ray version: ray.init says what it finds
            return
        try:
            target = canonicalize_bootstrap_address(address)
        except ConnectionError as exc:  # "auto", and no cluster found
            raise UsageError(_unreachable(address, str(exc), api)) from None
        except ValueError:
            raise UsageError(
                f"{_option(address, api)} {address!r} is not a Ray cluster's address: give HOST:PORT (the head "
                "node's, port 6379 unless `ray start --port` said otherwise), ray://HOST:PORT or auto"
            ) from None
        if target is None:  # "auto" found none: ray.init says so
            return
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        raise UsageError(
            f"{_option(address, api)} {address!r}: the port is missing (HOST:PORT, 6379 by default)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S) as conn:
            other = _not_grpc(conn)
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise UsageError(_unreachable(address, f"{target}: {why}", api)) from None
    if other:
        raise UsageError(
            f"{_option(address, api)} {address!r} is not a Ray cluster's address ({target}: {other}); check its "
            "host and port: the head node's port, 6379 unless `ray start --port` said otherwise (with "
            "ray://, the Ray Client server's, 10001 by default)"
        )


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(3) + b"\x04" + bytes(5)  # and empty SETTINGS


def _not_grpc(conn: socket.socket) -> str:
    """What the service on `conn` says, where it is not a gRPC server (as the head node's GCS and the Ray
    Client server are), else "": ray.init retries one for minutes, printing Ray's own warnings. A gRPC
    server opens with a SETTINGS frame; with RAY_USE_TLS it opens TLS first, and is not asked."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return ""
    conn.settimeout(ANSWER_TIMEOUT_S)
    said = b""
    try:
        conn.sendall(HTTP2_PREFACE)
        while len(said) < 9 and (more := conn.recv(9 - len(said))):
            said += more
    except TimeoutError:
        if not said:
            return f"it said nothing in {ANSWER_TIMEOUT_S:g}s"
    except OSError as exc:  # reset: it turned the preface away
        if not said:
            return f"it closed the connection ({exc.strerror or exc})"
    if len(said) == 9 and said[3] == 4:  # an HTTP/2 frame header, of type SETTINGS
        return ""
    if not said:
        return "it closed the connection"
    with contextlib.suppress(OSError):  # the rest of its first line
        conn.settimeout(0.5)
        said += conn.recv(200)
    first = said.decode("latin-1").splitlines()[0] if said.strip() else repr(said)
    return f"it answered {first.strip()[:60]!r}"


@contextlib.contextmanager
def _keeping_sigterm():
    """ray.init replaces this process's SIGTERM handler (its own exits with code 1, after Ray's C++ code
    has printed a stack dump): the build's handler is put back, so that SIGTERM (`timeout`, Slurm,
    `docker stop`) stops a Ray build at its steps' safe points and exits 143, as it does any build."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def _start_local(ray, gpus: tuple[str, ...] | None, common: dict) -> None:
    # On Linux Ray advertises and listens on the machine's network address; in its single-machine mode
    # (the one it uses on macOS and Windows) every part of it listens on 127.0.0.1 only.
    from ray._private import ray_constants

    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "CUDA_VISIBLE_DEVICES")}
    cluster_mode = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    if cluster_mode is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which has read it already
    if gpus is not None:  # Ray offers the GPUs it is shown
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        common.setdefault("num_gpus", len(gpus))
    notices = logging.getLogger(TOKEN_NOTICES)
    notices.addFilter(_token_enabled_notice)
    try:
        ray.init(address="local", include_dashboard=False, **common)
    finally:
        notices.removeFilter(_token_enabled_notice)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if cluster_mode is not None:
            ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


TOKEN_NOTICES = "ray._private.authentication.authentication_token_setup"


def _token_enabled_notice(record: logging.LogRecord) -> bool:
    """False for Ray's warning that it turned token authentication on, which a local instance said on
    every build (and with -q): there is nothing to do about it. Its warning that authentication is off
    stays."""
    return not record.getMessage().startswith("Token authentication is enabled")
