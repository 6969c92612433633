"""Key declarations read back: a key added after the first release is left out of fingerprints and
records while at its default, so the steps of existing projects keep their fingerprints."""

from __future__ import annotations

from dataclasses import dataclass, replace

from runner.project.fields import at_default, default_of, fingerprinted_fields, keys_of, opt, record


@dataclass(frozen=True)
class Table:
    steps: int = opt(800, "steps", "int")
    targets: list[str] = opt(["a", "b"], "targets", "list[str]")
    shown: bool = opt(False, "display only", "bool", fingerprint=False)
    added: float = opt(0.0, "added later", "float", omit_default=True)
    added_list: list[str] = opt(["x"], "added later", "list[str]", omit_default=True)
    unset: float | None = opt(None, "unset", "float?")


def test_added_keys_at_their_default_are_left_out():
    table = Table()
    assert fingerprinted_fields(table) == {"steps": 800, "targets": ["a", "b"]}
    assert record(table) == {"steps": 800, "targets": ["a", "b"], "shown": False, "unset": None}


def test_added_keys_away_from_their_default_are_in():
    table = replace(Table(), added=0.5, added_list=["y"], unset=1.0, shown=True)
    assert fingerprinted_fields(table) == {
        "steps": 800,
        "targets": ["a", "b"],
        "added": 0.5,
        "added_list": ["y"],
        "unset": 1.0,
    }
    assert record(table)["added"] == 0.5 and record(table)["shown"] is True


def test_defaults_are_read_back():
    declared = {f.name: f for f in keys_of(Table)}
    assert default_of(declared["targets"]) == ["a", "b"] and default_of(declared["unset"]) is None
    assert at_default(declared["added"], 0.0) and not at_default(declared["added"], 0.1)
    assert not at_default(declared["steps"], 800)  # a first-release key is always fingerprinted
