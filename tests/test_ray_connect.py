"""`--executor ray`, connecting: what a build says where Ray is missing or broken, where a cluster's
address is wrong, or where the cluster turns it away; SIGTERM and Ray's notices of a local instance.
ray.init is faked: these tests start no Ray instance."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time

import pytest

from runner import executor
from runner.errors import UsageError
from tests.conftest import Recorder
from tests.ray_fixtures import no_ray_init

pytestmark = pytest.mark.ray


def test_without_ray_installed_the_error_says_how_to_install_it(proj, monkeypatch, capsys):
    import importlib.util

    from runner.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(UsageError, match=r"pip install 'dbl\[ray\]'"):
        executor.build(proj.load(), executor.BuildOptions(backend="ray"), Recorder())
    assert main(["build", str(proj.path), "--executor", "ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'dbl[ray]'" in err and "Traceback" not in err


def test_a_ray_that_does_not_import_is_a_usage_error_naming_the_fix(proj, monkeypatch, tmp_path, capsys):
    """A broken install (here a ray package whose import fails) is said with its fix, not as an
    unexpected ImportError (exit 1)."""
    import sys

    from runner.cli import main

    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("libray.so: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(shim.parent))
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert main(["build", str(proj.path), "--executor", "ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Ray, which is installed but does not import (libray.so: cannot open shared object" in err, err
    assert "pip install --force-reinstall 'dbl[ray]'" in err and "Traceback" not in err


def test_ray_options_that_cannot_go_together_are_usage_errors(proj, capsys):
    from runner.cli import main

    assert main(["build", str(proj.path), "--ray-address", "auto"]) == 2
    assert "--ray-address is for --executor ray" in capsys.readouterr().err
    from runner.exec.ray_connect import connect

    with pytest.raises(UsageError, match="leave --gpus out with --ray-address"):
        connect("auto", gpus=("0",))


def test_connecting_keeps_the_builds_sigterm_handler(monkeypatch):
    """ray.init puts in a SIGTERM handler of its own (exit 1, after a C++ stack dump): the build's stop
    request is put back, so that SIGTERM stops a Ray build at a safe point with exit 143."""
    from types import SimpleNamespace

    from runner.exec import ray_connect

    def init(**_):
        signal.signal(signal.SIGTERM, lambda *a: None)

    fake = SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setattr(ray_connect, "import_ray", lambda api=False: fake)
    mine = lambda *a: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        ray_connect.connect("10.0.0.5:6379")
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_cluster_address_where_nothing_listens_is_a_usage_error_at_once(proj, monkeypatch, capsys):
    """ray.init retries an address that refuses connections for minutes, printing Ray's warnings."""
    from runner.cli import main
    from runner.exec import ray_connect

    pytest.importorskip("ray")
    monkeypatch.setattr(ray_connect, "import_ray", no_ray_init)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        begun = time.monotonic()
        assert main(["build", str(proj.path), "--executor", "ray", "--ray-address", address]) == 2
        assert time.monotonic() - begun < 60  # not the minutes of retries
        err = capsys.readouterr().err
        assert f"cannot reach a Ray cluster at '{address}'" in err and "Connection refused" in err, err
        assert "Traceback" not in err


@contextlib.contextmanager
def serving(answer: bytes | None):
    """A port (on every address: Ray asks at the machine's) whose server sends `answer` to each connection
    and closes it; None: it accepts and says nothing. Yields 127.0.0.1:PORT."""
    server = socket.socket()
    server.bind(("", 0))
    server.listen()
    held = []

    def serve():
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                if answer is None:
                    held.append(conn)
                    continue
                with conn:
                    conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


HTTP2_SETTINGS = bytes(3) + b"\x04" + bytes(5)  # the empty SETTINGS frame a gRPC server opens with


def test_an_address_where_something_else_answers_is_a_usage_error_within_seconds(proj, monkeypatch, capsys):
    """ray.init retried a web server's port (or one that says nothing) for minutes, printing Ray's
    warnings about a GCS it could not reach."""
    from runner.cli import main
    from runner.exec import ray_connect

    pytest.importorskip("ray")
    monkeypatch.setattr(ray_connect, "import_ray", no_ray_init)
    for answer, why in (
        (b"HTTP/1.0 400 Bad request\r\n\r\n", "it answered 'HTTP/1.0 400 Bad request'"),
        (None, "it said nothing in 5s"),
    ):
        with serving(answer) as address:
            begun = time.monotonic()
            assert main(["build", str(proj.path), "--executor", "ray", "--ray-address", address]) == 2
            assert (
                time.monotonic() - begun < 30
            )  # not the minutes of retries (5 s of them, on a loaded machine)
        err = capsys.readouterr().err
        assert f"--ray-address {address!r} is not a Ray cluster's address (" in err, err
        assert why in err and "the head node's port, 6379 unless `ray start --port`" in err, err
        assert "Traceback" not in err


def test_auto_without_a_cluster_is_a_usage_error_that_says_how_to_start_one(proj, monkeypatch, capsys):
    from runner.cli import main
    from runner.exec import ray_connect

    pytest.importorskip("ray")
    from ray._private import services

    def none_found(address, *_):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", none_found)  # whatever runs here
    monkeypatch.setattr(ray_connect, "import_ray", no_ray_init)
    assert main(["build", str(proj.path), "--executor", "ray", "--ray-address", "auto"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach a Ray cluster at 'auto' (Could not find any running Ray instance.); start one" in err


def test_a_cluster_that_turns_the_build_away_is_said_to_maybe_ask_for_a_token(monkeypatch):
    """Ray sends no token to a cluster named by its address, unless RAY_AUTH_MODE=token, and a cluster that
    asks for one only says that it could not connect."""
    from types import SimpleNamespace

    from runner.exec import ray_connect

    pytest.importorskip("ray")

    def init(**_):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(
        ray_connect, "import_ray", lambda api=False: SimpleNamespace(is_initialized=lambda: False, init=init)
    )
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    # A port that answers as a gRPC server does, and ray.init is turned away there.
    with serving(HTTP2_SETTINGS) as address:
        with pytest.raises(UsageError, match="set RAY_AUTH_MODE=token, with its token in ~/.ray/auth_token"):
            ray_connect.connect(address)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")  # set: the token was sent, and that is not it
        with pytest.raises(UsageError) as info:
            ray_connect.connect(address)
    assert "Failed to connect to Ray cluster" in str(info.value) and "RAY_AUTH_MODE" not in str(info.value)


def test_a_cluster_address_that_is_not_one_is_a_usage_error(proj, monkeypatch, capsys):
    from runner.cli import main
    from runner.exec import ray_connect

    pytest.importorskip("ray")
    monkeypatch.setattr(ray_connect, "import_ray", no_ray_init)
    for address in ("head-node", "10.0.0.5"):
        assert main(["build", str(proj.path), "--executor", "ray", "--ray-address", address]) == 2
        err = capsys.readouterr().err
        assert f"--ray-address {address!r} is not a Ray cluster's address: give HOST:PORT" in err, err


def test_ray_address_in_the_environment_names_the_cluster(proj, monkeypatch, capsys):
    """As it does for ray.init (`ray job submit` sets it for its command): a build there started a local
    instance of its own, beside the cluster and sharing its GPUs; --ray-address local still starts one."""
    from types import SimpleNamespace

    from runner.cli import main
    from runner.exec import ray_backend, ray_connect

    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.setattr(ray_connect, "import_ray", no_ray_init)
    assert main(["build", str(proj.path), "--executor", "ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach a Ray cluster at '{address}'" in err and "Connection refused" in err, err
    assert "give --ray-address local or unset RAY_ADDRESS to start a local Ray instance" in err, err
    assert main(["build", str(proj.path), "--executor", "ray", "--gpus", "0", "--no-progress"]) == 2
    assert f"leave --gpus out with RAY_ADDRESS={address} in the environment" in capsys.readouterr().err

    started = []

    def init(**options):
        started.append(options["address"])
        raise RuntimeError("started")

    monkeypatch.setattr(
        ray_connect, "import_ray", lambda api=False: SimpleNamespace(is_initialized=lambda: False, init=init)
    )
    with pytest.raises(RuntimeError, match="started"):
        ray_backend.RayBackend(proj.load(), executor.BuildOptions(ray_address="local")).start()
    assert started == ["local"]


def test_a_local_instance_does_not_say_that_ray_turned_token_authentication_on(monkeypatch, capsys):
    """Ray said so on every build, -q or not; that it is off is still said."""
    import logging
    from types import SimpleNamespace

    from runner.exec import ray_connect

    pytest.importorskip("ray")
    said = logging.getLogger("ray._private.authentication.authentication_token_setup")
    handler = logging.StreamHandler()  # as Ray's own handler writes to standard error
    said.addHandler(handler)

    def init(**_):
        said.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
        said.warning("Token authentication is disabled for this Ray cluster. Anyone with network access")

    try:
        ray_connect._start_local(SimpleNamespace(init=init), None, {})
    finally:
        said.removeHandler(handler)
    err = capsys.readouterr().err
    assert "is disabled" in err and "is enabled" not in err, err
    assert said.filters == []
