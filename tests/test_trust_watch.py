"""`dbl watch` and a manual build: a change made while the other build holds the lock is built after it."""

from __future__ import annotations

import ast
import inspect
import time

import pytest

from runner import watch as watch_module
from runner import watch_builds, watch_changes
from runner.store import BuildLock
from tests import watch_fixtures
from tests.watch_fixtures import LIMIT_S, Watcher, save, wait_for

watcher = watch_fixtures.watcher  # the fixture


def test_a_change_while_another_build_holds_the_lock_is_built_when_it_ends(proj, fake_steps, watcher):
    w = watcher()
    fake_steps.ran.clear()
    with BuildLock(proj.load()):  # a manual `dbl build` of the same project
        save(proj.path, proj.path.read_text().replace("sks dog in a park", "sks dog in a forest"))
        wait_for(
            lambda: any("another build of this project is running" in m for m in w.messages),
            f"the watch to find the lock held; it said {w.messages}",
        )
        time.sleep(0.5)
        assert fake_steps.ran == []  # it did not build past the lock
        assert "building when it ends" in w.messages
    wait_for(lambda: fake_steps.ran == ["render:park"], "the change to be built once the lock is free")
    assert w.close() == 0


def test_a_watch_stopped_while_waiting_for_the_lock_ends(proj, fake_steps, watcher):
    with BuildLock(proj.load()):
        w = watch_module_watcher(proj)
        wait_for(lambda: "building when it ends" in w.messages, f"the watch to wait; it said {w.messages}")
        started = time.monotonic()
        assert w.close() == 0
        assert time.monotonic() - started < LIMIT_S
    assert fake_steps.ran == []


def watch_module_watcher(proj):
    return Watcher(proj.path)


@pytest.mark.parametrize("module", [watch_module, watch_builds, watch_changes], ids=lambda m: m.__name__)
def test_watch_matches_errors_by_type_and_uses_the_exit_code_constants(module):
    tree = ast.parse(inspect.getsource(module))
    numbers = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and type(n.value) is int}
    assert 130 not in numbers
    by_name = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare) and isinstance(n.left, ast.Attribute) and n.left.attr == "__name__"
    ]
    assert not by_name, "errors matched by class name"
