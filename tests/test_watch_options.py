"""`dbl watch` with options: those no build can use end it at its start; --debug reaches its builds; its
observer ends without a word."""

from __future__ import annotations

import shutil
import threading

import pytest

from runner.ui.plain import PlainReporter
from runner.watch import watch

from .conftest import FakeBackend, use_backend
from .watch_fixtures import save


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (
            {"gpus": ("0",)},
            'pets.toml: --gpus 0: device = "cpu" in [project] uses no CUDA GPU; leave --gpus out',
        ),
        ({"backend": "inlin"}, "no executor backend 'inlin'; backends: inline, process"),
        ({"gpus": ("0", "0")}, "--gpus: 0 named twice"),
        ({"gpus": ("1",)}, "--gpus 1: this machine has no CUDA GPU 1 (it has 1: 0)"),
    ],
)
def test_options_no_build_can_use_end_the_watch_with_exit_2(proj, fake_steps, monkeypatch, options, said):
    """`dbl watch --gpus 0` on a CPU project said why its build was refused, then watched on: every
    rebuild was refused the same way, for an option no edit of the project's inputs could change."""
    from runner.exec import devices

    monkeypatch.setattr(devices, "_device_nodes", lambda: ["nvidia0"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    save(
        proj.path,
        proj.path.read_text().replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cpu"'),
    )
    messages, stop = [], threading.Event()
    timer = threading.Timer(5, stop.set)  # the watch would wait for ever: stopped, it returns 0
    timer.start()
    code = watch(
        proj.path,
        reporter_factory=PlainReporter,
        stop_event=stop,
        echo=messages.append,
        build_options=options,
    )
    timer.cancel()
    assert (code, len(messages)) == (2, 1) and said in messages[0], messages
    assert not fake_steps.ran and not (proj.root / "pets.lock").exists()


def test_watch_debug_shows_a_failing_steps_traceback(proj, monkeypatch):
    """A step that failed in a watch said `(run with --debug for the traceback)`, and `dbl watch --debug`
    took the option and showed none."""
    from runner import watch as watch_module
    from runner.cli import main

    from .conftest import FakeSteps

    def broken(run):
        def step(ctx):
            if ctx.step_id == "render:park":
                raise RuntimeError("the render broke")
            return run(ctx)

        return step

    undo = use_backend(lambda project: FakeBackend(FakeSteps(), broken))
    lines: list[str] = []
    real_watch = watch_module.watch

    def once(path, **kw):  # the watch as `dbl watch` starts it, stopped after its first build
        stop = threading.Event()

        def reporter():
            shown = PlainReporter(write=lines.append)
            shown.close = stop.set  # the build's end
            return shown

        kw["reporter_factory"] = reporter
        return real_watch(path, **kw, stop_event=stop, echo=lines.append)

    monkeypatch.setattr(watch_module, "watch", once)
    try:
        assert main(["watch", str(proj.path), "--no-progress"]) == 0
        assert any("(run with --debug for the traceback)" in line for line in lines), lines
        lines.clear()
        assert main(["watch", str(proj.path), "--no-progress", "--debug"]) == 0
    finally:
        undo()
    said = "\n".join(lines)
    assert "Traceback (most recent call last)" in said and "RuntimeError: the render broke" in said


def test_a_crashed_build_of_the_watch_says_how_to_see_its_traceback(proj, monkeypatch):
    from runner import executor
    from runner.watch_builds import build_once

    def crash(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(executor, "build", crash)
    said: list[str] = []
    for debug in (False, True):
        assert build_once(proj.load(), PlainReporter, threading.Event(), said.append, {"debug": debug}) == 1
    assert said[0] == "build crashed: RuntimeError: a bug (run with --debug for the traceback)"
    assert (
        said[1].startswith("build crashed: Traceback (most recent call last)")
        and "RuntimeError: a bug" in said[1]
    )


def test_an_os_error_of_a_watched_build_is_said_as_build_says_it(proj, monkeypatch):
    import errno

    from runner import executor
    from runner.watch_builds import build_once

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(proj.lock))

    monkeypatch.setattr(executor, "build", full)
    said: list[str] = []
    assert build_once(proj.load(), PlainReporter, threading.Event(), said.append) == 1
    assert said == [f"{proj.lock}: No space left on device"]


def test_an_emitter_stopped_with_the_watch_says_nothing(tmp_path, caplog):
    """A watch ended by Ctrl-C printed `InotifyEmitter.queue_events() called when the thread is inactive`:
    the events that removing its watches sends woke an emitter already stopped (watchdog logs it as an
    error; nothing is lost, the watch is ending)."""
    pytest.importorskip("watchdog.observers.inotify")
    from watchdog.observers.api import EventQueue, ObservedWatch
    from watchdog.observers.inotify import InotifyEmitter

    from runner.watch_changes import make_observer

    make_observer(False, 2.0)  # as the watch makes its observer
    emitter = InotifyEmitter(EventQueue(), ObservedWatch(str(tmp_path), recursive=False))
    emitter.on_thread_start()
    emitter.on_thread_stop()  # the observer stopped: what read_event returns now finds no watch group
    caplog.set_level("DEBUG")
    emitter.queue_events(0)
    assert "called when the thread is inactive" not in caplog.text


def test_what_ends_the_watch_at_its_start_is_said_on_standard_error_as_build_says_it(proj, capsys):
    """Were printed on standard output without `dbl:`, where `dbl build` prints them on standard error."""
    from runner.cli import main

    shutil.copytree(proj.root / "data", proj.root / "state" / "data")
    (proj.root / "state" / "pets.toml").write_text(proj.path.read_text())
    (proj.root / "state" / ".dbl").write_text("")  # a file where the state folder goes
    for args in (
        [str(proj.root / "nowhere" / "pets.toml")],  # no such folder
        [str(proj.path.with_name("pest.toml"))],  # a misspelt project file
        [str(proj.path), "--executor", "inlin"],
        [str(proj.root / "state" / "pets.toml")],
    ):
        built = main(["build", *args, "--no-progress"]), capsys.readouterr()
        watched = main(["watch", *args, "--no-progress"]), capsys.readouterr()
        assert built[0] == watched[0] == 2, args
        assert watched[1].out == "" and watched[1].err == built[1].err, args
        assert built[1].err.startswith(("dbl: ", "nowhere", "pest.toml", str(proj.root))), built[1].err


def test_a_project_file_s_problems_are_said_on_standard_error_and_the_watch_goes_on(proj, capsys):
    from runner.cli import main

    proj.edit("rank = 4", "rnak = 4")
    stop = threading.Event()
    timer = threading.Timer(2, stop.set)  # the watch waits for a fix: stopped, it returns 0
    timer.start()
    code = watch(proj.path, reporter_factory=PlainReporter, stop_event=stop)
    timer.cancel()
    watched = capsys.readouterr()
    assert code == 0 and "watching " in watched.out
    assert main(["build", str(proj.path)]) == 2
    report = capsys.readouterr().err
    assert "unknown key 'rnak'" in report and watched.err == report, watched


def test_a_project_edited_to_use_no_gpu_is_refused_in_the_command_line_s_words(proj, fake_steps, monkeypatch):
    """A build given its GPUs by the watch (`dbl watch --gpus 0`) says them as the command line does."""
    from runner.exec import devices
    from runner.watch_builds import build_once

    monkeypatch.setattr(devices, "_device_nodes", lambda: ["nvidia0"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proj.edit('base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cpu"')
    said: list[str] = []
    assert build_once(proj.load(), PlainReporter, threading.Event(), said.append, {"gpus": ("0",)}) == 2
    assert said == [
        'pets.toml: --gpus 0: device = "cpu" in [project] uses no CUDA GPU; leave --gpus out, or set '
        'device = "auto" or "cuda" to run on the GPUs'
    ]
    assert not fake_steps.ran


def test_a_build_s_errors_are_said_on_standard_error_as_build_says_them(proj, capsys):
    """A watched build's error (here a lockfile that does not read) was printed on standard output
    without `dbl:`, where `dbl build` prints it on standard error."""
    from runner.cli import main

    proj.path.with_suffix(".lock").write_text("schema = [\n")
    built = main(["build", str(proj.path), "--no-progress"]), capsys.readouterr()
    assert built[0] == 2 and built[1].err.startswith("dbl: "), built
    stop = threading.Event()
    timer = threading.Timer(2, stop.set)  # the watch waits for a fix: stopped, it returns 0
    timer.start()
    watch(proj.path, reporter_factory=PlainReporter, stop_event=stop)
    timer.cancel()
    watched = capsys.readouterr()
    assert built[1].err in watched.err and built[1].err.strip() not in watched.out, watched


def test_a_dbl_that_became_a_file_while_watched_is_said_as_build_says_it(proj, fake_steps, capsys):
    """The next build's refusal went to standard output without `dbl:`; `dbl build` and the watch's start
    say it on standard error, with `dbl:`."""
    import time

    from runner.cli import main

    from .test_watch import wait_for

    stop = threading.Event()
    watching = threading.Thread(
        target=lambda: watch(proj.path, reporter_factory=PlainReporter, stop_event=stop, debounce_s=0.1),
        daemon=True,
    )
    watching.start()
    said = []
    wait_for(lambda: said.append(capsys.readouterr()) or "watching " in said[-1].out, "the first build")
    shutil.rmtree(proj.root / ".dbl")
    (proj.root / ".dbl").write_text("")  # a file where the state folder goes
    proj.edit("rank = 4", "rank = 8")
    wait_for(lambda: said.append(capsys.readouterr()) or ".dbl" in said[-1].err, "the refused build")
    time.sleep(0.2)
    stop.set()
    watching.join(20)
    err = "".join(s.err for s in said) + capsys.readouterr().err
    out = "".join(s.out for s in said)
    assert main(["build", str(proj.path), "--no-progress"]) == 2
    built = capsys.readouterr().err
    assert built.startswith("dbl: ") and built in err and built.strip() not in out, (built, err, out)
