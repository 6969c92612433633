"""The `dbl` command line: its commands, their options and the help that says what each does."""

from __future__ import annotations

import argparse

from runner import __version__


class _ForceSteps(argparse.Action):
    """--force STEP...: a repeated --force adds its steps to the earlier ones (argparse would keep the last
    only); --force alone, anywhere, stands for every step ([])."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest)
        every = earlier == [] or not values
        setattr(namespace, self.dest, [] if every else [*(earlier or []), *values])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbl",
        description="Declarative, incremental DreamBooth LoRA builds for Stable Diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"dbl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def project_arg(p):
        p.add_argument(
            "project",
            nargs="?",
            metavar="PROJECT",
            help="project file (default: the only *.toml here, or dbl.toml)",
        )
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    def num_processes_arg(p, help):
        p.add_argument("--num-processes", type=int, metavar="N", help=help)

    def parallel_args(p):
        p.add_argument(
            "--executor",
            metavar="NAME",
            help="where steps run: inline (in this process, the default), process (in worker processes, "
            "each kept for the steps after its own) or ray (Ray workers, kept likewise, on a local Ray instance or a cluster; pip install 'dbl[ray]')",
        )
        p.add_argument(
            "--ray-address",
            metavar="ADDR",
            help="with --executor ray: the cluster to join, 'auto' (the one this machine belongs to), "
            "HOST:PORT or ray://HOST:PORT (Ray Client, from outside the cluster), or 'local' to start a "
            "local Ray instance (default: RAY_ADDRESS if set, else local)",
        )
        p.add_argument(
            "-j",
            "--jobs",
            type=int,
            default=None,
            metavar="N",
            help="run up to N independent steps at once, each in a worker process (default 1; with "
            "--executor ray, as many as the cluster's GPUs x --per-gpu, or one per node on CPUs)",
        )
        p.add_argument(
            "--gpus",
            metavar="LIST",
            help="GPUs the steps run on, e.g. 0,1,3, shared out among -j steps; without -j, one step at a "
            "time in a worker process (default: every visible CUDA device)",
        )
        p.add_argument(
            "--per-gpu", type=int, default=1, metavar="K", help="how many steps may share one GPU (default 1)"
        )

    p = sub.add_parser("build", help="run the stale steps")
    project_arg(p)
    p.add_argument("--dry-run", action="store_true", help="show what would run, run nothing")
    p.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="STEP",
        default=[],
        help="build these steps (and the stale steps they need)",
    )
    p.add_argument(
        "--force",
        nargs="*",
        action=_ForceSteps,
        metavar="STEP",
        default=None,
        help="rerun these steps (no STEP: all), ignoring the run-cache",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="after a failure, go on with the steps that do not depend on it",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live display")
    num_processes_arg(p, "run train steps as N data-parallel processes")
    parallel_args(p)
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="only failures and the final line")
    loudness.add_argument("-v", "--verbose", action="store_true", help="also the steps' log messages")

    p = sub.add_parser("plan", help="list the stale steps and why")
    project_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    num_processes_arg(
        p, "plan for train steps run as N data-parallel processes, as dbl build --num-processes N"
    )

    p = sub.add_parser("watch", help="rebuild what goes stale as files change")
    project_arg(p)
    p.add_argument("--polling", action="store_true", help="poll the file system (network file systems)")
    p.add_argument(
        "--poll-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between polls (implies --polling; default: 2)",
    )
    p.add_argument(
        "--keep-loaded",
        type=float,
        default=10.0,
        metavar="MINUTES",
        help="minutes without a change after which the loaded base model and the idle workers are let go "
        "(default: 10; 0: after each build; inf: never)",
    )
    num_processes_arg(p, "run train steps as N data-parallel processes")
    parallel_args(p)
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live display")

    p = sub.add_parser("init", help="start a project from a template")
    p.add_argument("dir", nargs="?", metavar="DIR", help="folder for the new project (default: here)")
    p.add_argument(
        "--template", default="subject", metavar="NAME", help="template name (default: subject; see --list)"
    )
    p.add_argument("--list", action="store_true", help="list the templates")

    p = sub.add_parser("ls", help="list every step: its status, output folder and loss")
    project_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    num_processes_arg(p, "the status of a build with dbl build --num-processes N")

    p = sub.add_parser(
        "gc", help="drop run-cache entries no lockfile refers to, and work folders no step can resume"
    )
    project_arg(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be dropped")

    p = sub.add_parser("check", help="re-read every recorded input, output and cache entry")
    project_arg(p)

    p = sub.add_parser(
        "report",
        help="write an HTML page of the build: loss curves, render grids, blends, the last build's timeline",
        description="Write one self-contained HTML page of what the lockfile says was built: each "
        "subject's loss curves, settings, training time and snapshots; each render's grid; each blend's "
        "recorded errors; the timeline of the last build; provenance; and what `dbl plan` calls stale "
        "since. Needs matplotlib: pip install 'dbl[report]'.",
    )
    project_arg(p)
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="where to write the page: a file, a folder to put report.html in, or - for standard output "
        "(default: report.html in the project's build folder, <out>/report.html)",
    )

    p = sub.add_parser("merge-lockfile", help="git merge driver for lockfiles (see the README)")
    p.add_argument("base", metavar="BASE", help="the common ancestor's lockfile (git's %%O)")
    p.add_argument("ours", metavar="OURS", help="our lockfile, replaced by the merge (git's %%A)")
    p.add_argument("theirs", metavar="THEIRS", help="their lockfile (git's %%B)")
    return parser


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each command (`build`, `plan` ...) within `make_parser()`'s."""
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of `command` within `make_parser()`'s; the top level's for None."""
    return commands(parser).get(command, parser)
