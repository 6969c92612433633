"""What an installed dbl holds: every package of runner/, the built-in weights and the templates."""

from __future__ import annotations

from pathlib import Path

from runner import templates
from runner.lockfile import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_of_runner_is_installed():
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "runner").rglob("__init__.py")}
    listed = set(_setuptools()["packages"])
    assert listed - {f"runner.{templates.INSTALLED}"} == found


def test_the_templates_are_installed_where_dbl_init_looks_for_them():
    """templates/ at the top of a checkout is the package runner.<templates.INSTALLED> of an installed
    dbl: without it, `dbl init` found no template after a plain `pip install`."""
    config, package = _setuptools(), f"runner.{templates.INSTALLED}"
    assert package in config["packages"]
    assert config["package-dir"][package] == "templates"
    assert config["package-data"][package] == ["*.toml"]
    assert sorted(p.stem for p in (ROOT / "templates").glob("*.toml")) == sorted(templates.available())
