"""The README's command reference and `dbl COMMAND --help` name the same options, arguments and metavars."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from runner.arguments import commands, make_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def synopsis() -> dict[str, str]:
    """Each command's synopsis in the README's "Command line" section, its continuation lines joined."""
    text = README.read_text().split("## Command line", 1)[1]
    block = text.split("\n\n", 2)[1]
    found: dict[str, str] = {}
    command = None
    for line in block.splitlines():
        words = line.split()
        if words[0] == "dbl":
            command = words[1]
            found[command] = " ".join(words[2:])
        else:
            found[command] += " " + " ".join(words)
    return found


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return commands(make_parser())


def test_every_command_is_in_the_readme():
    assert sorted(synopsis()) == sorted(subcommands())


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_the_readme_and_the_help_name_the_same_options(command):
    """`--debug` is said once for every command that takes a PROJECT, below the synopsis."""
    parser, line = subcommands()[command], synopsis()[command]
    takes_project = any(a.dest == "project" for a in parser._actions)
    helped, said = set(), set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or (action.dest == "debug" and takes_project):
            continue
        if not action.option_strings:
            helped.add(action.metavar or action.dest)
            continue
        named = [
            o for o in action.option_strings if re.search(rf"\[{re.escape(o)}[\] ]|\| {re.escape(o)}\]", line)
        ]
        assert named, f"dbl {command} {action.option_strings[-1]} is not in the README's synopsis: {line}"
        helped.add(f"{named[0]} {action.metavar}" if action.metavar else named[0])
    for option in re.findall(r"(--?[a-z][-a-z]*)(?: \[?([A-Z]+))?", line):
        said.add(" ".join(filter(None, option)))
    said.discard("--debug" if takes_project else "")
    said |= set(re.findall(r"\b([A-Z]+)\b", re.sub(r"--?[a-z][-a-z]* \[?[A-Z]+", "", line)))
    assert helped == said, f"dbl {command}: --help {sorted(helped)}, README {sorted(said)}"
