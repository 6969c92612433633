"""Lockfiles as a team's repository holds them: a project built in a git repository of its own (and on a
second branch), git's conflict markers, and other tools' lockfiles beside the project file, for the lockfile
and gc tests.

Import by name (`from tests.lockfile_fixtures import built_on_main, git, git_env`)."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import ROOT

CONFLICT = '<<<<<<< HEAD\n[steps."render:x"]\n=======\n[steps."render:y"]\n>>>>>>> theirs\n'

# Other tools' lockfiles, which lie beside a project file in a Python or Rust repository.
OTHER_TOOLS = {
    "poetry.lock": '[[package]]\nname = "numpy"\n\n[metadata]\nlock-version = "2.0"\n',
    "Cargo.lock": 'version = 4\n\n[[package]]\nname = "serde"\n',
    "uv.lock": 'version = 1\nrequires-python = ">=3.11"\n',
    "yarn.lock": '# yarn lockfile v1\n\nleft-pad@^1.3.0:\n  version "1.3.0"\n',
}


def git(repo, *args, env=None):
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


def built_on_main(proj, build, env) -> None:
    """`proj` built, in a git repository of its own whose branch main holds its project file and lockfile
    (outputs and .dbl/ ignored)."""
    git(proj.root, "init", "-q", "-b", "main", env=env)
    (proj.root / ".gitignore").write_text(".dbl/\nbuild/\n")
    build(proj)
    git(proj.root, "add", "-A", env=env)
    git(proj.root, "commit", "-qm", "base", env=env)


def git_env() -> dict:
    """An environment where git commits without a user's configuration, and runs this checkout's dbl."""
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
    )


def snow_branch(proj, build) -> dict:
    """`proj` built on main (built_on_main), then on a branch snow where one render's prompt is changed,
    built and committed; snow stays checked out. The environment git runs with (git_env)."""
    env = git_env()
    built_on_main(proj, build, env)
    git(proj.root, "checkout", "-qb", "snow", env=env)
    proj.edit("sks dog on a beach", "sks dog in the snow")
    build(proj)
    git(proj.root, "commit", "-qam", "snow", env=env)
    return env
