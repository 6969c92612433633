"""A build's Workspace: where one project's lockfile, .dbl/ state, run-cache, work folders and outputs
are, the plan against them, and the stat of what a step reads."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from runner import lockfile, lockmemo, planner, steps, store
from runner.errors import DblError
from runner.fingerprint import FileHasher
from runner.project.schema import Project
from runner.store import DiskFacts, RunCache


class Workspace:
    """The paths and stores of one project: lockfile, .dbl/ state, run-cache, outputs."""

    def __init__(self, project: Project):
        check_state_dir(project)
        self.project = project
        self.lock_path = lockfile.lock_path(project.path)
        self.state = project.state_dir
        self.hasher = FileHasher(self.state / "state")
        self.cache = RunCache(self.state / "cache")
        self.facts = DiskFacts(project, self.hasher, self.cache)

    @property
    def work_root(self) -> Path:
        return store.work_root(self.project)

    def tmp(self, step: planner.Step) -> Path:
        return store.work_folder(self.project, step.kind, step.name)

    def output_dir(self, step: planner.Step | str) -> Path:
        """The committed output folder of a step (or step id)."""
        if isinstance(step, str):
            return self.project.out / steps.output_dir(step)
        return self.project.out / step.output_dir

    def rel(self, path: Path) -> str:
        return planner.relative(self.project, path)

    def plan(
        self, force: set[str] | None = None, num_processes: int | None = None
    ) -> tuple[dict, list[planner.PlannedStep]]:
        lock = lockfile.read(self.lock_path, memo=lockmemo.memo_path(self.state, self.lock_path))
        if not lock and not self.lock_path.exists():
            for other in sorted(self.project.dir.glob("*.lock")):
                # a project file renamed without its lockfile? (uv.lock, poetry.lock: another tool's)
                if not other.with_suffix(".toml").exists() and not lockfile.foreign(other):
                    warnings.warn(
                        f"{other.name} lies beside {self.project.path.name}, and no {other.stem}.toml: if "
                        f"this project file was renamed from it, rename the lockfile too (git mv {other.name} "
                        f"{self.lock_path.name})",
                        stacklevel=2,
                    )
        planned = planner.plan(self.project, lock, self.facts, force, num_processes)
        self.hasher.save()
        store.keep_out_of_git(self.state)
        return lock, planned

    def snapshot(self, step: planner.Step) -> store.Snapshot:
        """The stat of what a step reads: the visible files of its input folders (no step reads a hidden
        one, and a Finder's .DS_Store or an editor's swap file written meanwhile must not fail it), every
        file of its upstream steps' outputs and of a local base model."""
        folders = [Path(folder) for folder in steps.get(step.kind).folders(step.spec)]
        snap = store.stat_snapshot(folders, hidden=False)
        snap.update(
            store.stat_snapshot([self.output_dir(d) for d in step.deps] + self.facts.base_model_paths())
        )
        return snap


def check_state_dir(project: Project) -> None:
    """Raise DblError where `.dbl/`, or a folder dbl keeps in it, is a file (or another non-folder): every
    write there failed with a bare "[Errno 17] File exists" that named no fix."""
    kept = (
        (project.state_dir, "its run-cache and build state"),
        (project.state_dir / "cache", "its run-cache"),
        (project.state_dir / "tmp", "the work folders of steps"),
        (store.work_root(project), f"the work folders of {project.path.name}'s steps"),
    )
    for path, what in kept:
        if path.exists() and not path.is_dir():
            raise DblError(
                f"{path} is a file, where dbl keeps {what} in a folder: move or delete it, and dbl makes "
                "the folder again"
            )
        if path.is_symlink() and not path.exists():  # mkdir says "File exists" of a dangling link too
            raise DblError(
                f"{path} is a link to {os.readlink(path)}, which does not exist, where dbl keeps {what}: "
                "make that folder, or delete the link and dbl makes the folder again"
            )
