"""`dbl watch` stopped by SIGTERM or SIGHUP: run in the main thread, where signal handlers are set."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from runner.exec import lastbuild
from runner.ui.plain import PlainReporter
from runner.watch import watch
from tests.conftest import FakeBackend, Proj, use_backend
from tests.watch_fixtures import LIMIT_S, wait_for


class Killed(Exception):
    """What the signal's default action would have done: ended the watch where it stood."""


def watch_in_main_thread(proj: Proj, send, signum: int) -> tuple[int, list[str]]:
    """Run the watch here (signal handlers are the main thread's), `send` the signal from another thread
    when it returns True, and give the exit code and what the watch said."""
    messages: list[str] = []

    def kill_when_ready():
        wait_for(lambda: send(messages), f"the moment to send the signal; the watch said {messages}")
        os.kill(os.getpid(), signum)

    def killed(signum, frame):
        raise Killed

    previous = signal.signal(signum, killed)
    sender = threading.Thread(target=kill_when_ready, daemon=True)
    sender.start()
    try:
        code = watch(proj.path, reporter_factory=PlainReporter, debounce_s=0.1, echo=messages.append)
    finally:
        sender.join(LIMIT_S)
        assert signal.getsignal(signum) is killed  # the watch put the handler back
        signal.signal(signum, previous)
    return code, messages


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_or_sighup_ends_a_resting_watch_with_its_exit_code(proj, fake_steps, signum, code):
    """`docker stop`, `kill` or a closed terminal: the watch ends through its cleanup (the observer
    stopped, the workers ended) with the code `dbl build` gives."""
    watching = lambda messages: any(m.startswith("watching ") for m in messages)  # noqa: E731
    before = set(threading.enumerate())
    assert watch_in_main_thread(proj, watching, signum)[0] == code
    assert set(threading.enumerate()) <= before  # the observer's threads ended


def test_sigint_ends_a_resting_watch_that_inherited_it_ignored_with_0(proj, fake_steps):
    """`dbl watch &` in a script starts with SIGINT ignored: `kill -INT` left it watching, where it stops
    `dbl build` started so. It ends as Ctrl-C ends it, with 0, and SIGINT is ignored again after."""
    messages: list[str] = []

    def kill_when_watching():
        wait_for(
            lambda: any(m.startswith("watching ") for m in messages), f"the watch to rest; it said {messages}"
        )
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    sender = threading.Thread(target=kill_when_watching, daemon=True)
    sender.start()
    stop = threading.Event()
    timer = threading.Timer(LIMIT_S, stop.set)  # the watch would wait for ever: stopped, it returns 0 too
    timer.start()
    try:
        code = watch(
            proj.path, reporter_factory=PlainReporter, debounce_s=0.1, echo=messages.append, stop_event=stop
        )
        assert timer.is_alive()  # the signal ended it, not the timer
    finally:
        timer.cancel()
        sender.join(LIMIT_S)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the watch put it back
        signal.signal(signal.SIGINT, previous)
    assert code == 0


def test_sigterm_during_a_build_stops_its_step_and_ends_the_watch_with_143(proj, fake_steps):
    entered, release = threading.Event(), threading.Event()

    def slow_park(run):
        def slow(ctx):
            if ctx.step_id == "render:park":
                entered.set()
                release.wait(LIMIT_S)
            return run(ctx)

        return slow

    use_backend(lambda project: FakeBackend(fake_steps, slow_park))  # undone by fake_steps

    def in_render_park(messages):
        if entered.is_set():
            threading.Timer(0.3, release.set).start()
            return True
        return False

    code, messages = watch_in_main_thread(proj, in_render_park, signal.SIGTERM)
    assert code == 143
    assert not any(m.startswith("watching ") for m in messages)  # the build's end was the watch's
    assert lastbuild.read(proj.load())["exit_code"] == 143  # as dbl report says of the last build


def watch_signalled_during_cleanup(proj, monkeypatch, signum: int):
    """Run the watch here until it rests, stop it as a Ctrl-C at rest does, and send `signum` while it stops its
    observer: the exit code, the signals sent, the observers made, and whether the watch put the handler
    back."""
    from runner import watch as watch_module

    make_observer = watch_module.make_observer
    sent, observers = [], []

    def observer_stopped_with_a_signal(*args):
        observer = make_observer(*args)
        stop = observer.stop
        observers.append(observer)

        def stop_and_signal():
            sent.append(signum)
            os.kill(os.getpid(), signum)
            stop()

        observer.stop = stop_and_signal
        return observer

    monkeypatch.setattr(watch_module, "make_observer", observer_stopped_with_a_signal)
    stop = threading.Event()
    messages: list[str] = []

    def stop_when_resting():
        wait_for(lambda: any(m.startswith("watching ") for m in messages), f"the watch to rest: {messages}")
        stop.set()  # as a Ctrl-C at rest does

    threading.Thread(target=stop_when_resting, daemon=True).start()

    def killed(signum, frame):
        raise Killed  # as Python's own handler raises KeyboardInterrupt on SIGINT

    previous = signal.signal(signum, killed)
    try:
        code = watch(proj.path, reporter_factory=PlainReporter, stop_event=stop, echo=messages.append)
        kept = signal.getsignal(signum) is killed
    finally:
        signal.signal(signum, previous)
    return code, sent, observers, kept


def test_sigterm_while_the_watch_cleans_up_ends_it_with_143(proj, fake_steps, monkeypatch):
    """A Ctrl-C, then `docker stop` while the watch ends its observer and its worker processes: the
    cleanup goes on, and the exit code is SIGTERM's."""
    code, sent, _, _ = watch_signalled_during_cleanup(proj, monkeypatch, signal.SIGTERM)
    assert sent  # the signal really came during the cleanup
    assert code == 143


def test_a_second_ctrl_c_while_the_watch_cleans_up_lets_it_end_with_0(proj, fake_steps, monkeypatch):
    """A Ctrl-C at rest, then another while the watch ends its observer and its workers: it raised out of
    the cleanup, left the workers to notice, and the watch ended `dbl: interrupted` with exit code 130,
    where a watch stopped by Ctrl-C ends with 0."""
    code, sent, observers, kept = watch_signalled_during_cleanup(proj, monkeypatch, signal.SIGINT)
    assert kept  # the watch put the handler back
    assert sent  # the signal really came during the cleanup
    assert code == 0
    assert not observers[0].is_alive()  # the cleanup went on to its end
