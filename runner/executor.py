"""Build a project: the entry point that the command line, `dbl watch` and scripts call.

The work is done in `runner.exec`: the scheduler decides and records, a backend runs each step.
"""

from runner import events
from runner.errors import UsageError
from runner.exec import scheduler
from runner.exec.devices import gpus_refused
from runner.exec.scheduler import (  # noqa: F401 - the public names
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    BuildOptions,
    BuildResult,
    describe_error,
)
from runner.exec.workspace import Workspace  # noqa: F401 - a public name
from runner.planner import check_step_ids  # noqa: F401 - a public name
from runner.project.schema import Project


def build(project: Project, options: BuildOptions, reporter: events.Reporter) -> BuildResult:
    """Build what is stale. Raises UsageError for options no build can use, as `dbl build` refuses them
    (the GPUs given included: checked against this machine unless a `backend_factory` or a Ray cluster
    places the steps), and LockHeld, LockfileError; step failures are results."""
    if options.gpus is not None:
        problem = gpus_refused(
            options.gpus, options.backend, options.ray_address, options.backend_factory is None
        )
        if problem is not None:
            raise UsageError(problem)
    return scheduler.build(project, options, reporter)
