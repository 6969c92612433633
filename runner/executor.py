"""Build a project: the entry point that the command line, `dbl watch` and scripts call.

The work is done in `runner.exec`: the scheduler decides and records, a backend runs each step.
"""

from runner.errors import UsageError  # noqa: F401
from runner.exec.scheduler import (  # noqa: F401 - the public names
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    BuildOptions,
    BuildResult,
    build,
    describe_error,
)
from runner.exec.workspace import Workspace  # noqa: F401 - a public name
from runner.planner import check_step_ids  # noqa: F401 - a public name
