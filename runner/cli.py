"""The `dbl` command: runs the commands runner.arguments parses and gives their exit codes; the work is
done elsewhere."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

from runner.arguments import command_parser, make_parser
from runner.errors import DblError, UsageError, os_words
from runner.exec.job import quiet_library_notices
from runner.executor import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_LOCKED, EXIT_OK, EXIT_USAGE
from runner.fingerprint import StateCacheWarning
from runner.lockfile import LockfileWarning
from runner.store import LockHeld
from runner.ui.plain import fmt_path, fmt_paths_in
from runner.ui.streams import survivable_std_streams


def find_project(arg: str | None, command: str = "build") -> Path:
    """The project file named, or the only project file of the folder named (default: the current one)."""
    folder = Path(arg) if arg else Path.cwd()
    if arg and not folder.is_dir():
        return folder
    here = sorted(p for p in folder.glob("*.toml") if p.name != "pyproject.toml")
    if len(here) == 1:
        return here[0]
    if (folder / "dbl.toml").is_file():
        return folder / "dbl.toml"
    if arg:
        return folder  # none or several: loading it says which
    if here:
        names = ", ".join(p.name for p in here)
        raise SystemExit(
            _usage(f"several project files here ({names}): name one, e.g. `dbl {command} {here[0].name}`")
        )
    raise SystemExit(
        _usage(
            f"no project file given, and no *.toml here: name one, e.g. `dbl {command} projects/demo.toml`, "
            "or start one with `dbl init`"
        )
    )


def _usage(message: str) -> int:
    print(f"dbl: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    # A closed or broken standard output (`dbl build >&-`, `dbl plan | head -1`) must not end a build.
    with survivable_std_streams(), warnings.catch_warnings():
        return _main(argv)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """dbl's own warnings (those of its classes, and any raised in its code) as one line each, without
    the source line a library's warning comes with (printed once: see the filters in _main)."""
    if issubclass(category, (LockfileWarning, StateCacheWarning)) or _in_package(filename):
        print(f"dbl: warning: {message}", file=sys.stderr, flush=True)
    else:
        _show_library_warning(message, category, filename, lineno, file, line)


_show_library_warning = warnings.showwarning
_PACKAGE = Path(__file__).resolve().parent


def _in_package(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


def _project_among_step_ids(args) -> str | None:
    """`dbl build --force p.toml`: the step lists take every word after them, so a project file named
    after --only or --force lands among the step ids. No step id ends in .toml: it is the project.
    Returns a usage problem where none is left for --only, which needs one."""
    if getattr(args, "project", "") is not None:
        return None
    for option in ("force", "only"):
        ids = getattr(args, option, None)
        if ids and ids[-1].endswith(".toml"):
            args.project = ids[-1]
            setattr(args, option, ids[:-1])  # --force alone: every step
            if option == "only" and not args.only:
                return f"--only needs a step id: dbl build {args.project} --only STEP..."
            return None
    return None


def _parse(argv: list[str] | None):
    """The command line's arguments; words no option takes are refused with the usage of the command
    they were given to (`dbl plan --dry-run`: `dbl plan`'s), not the top level's list of commands."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _main(argv: list[str] | None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if (problem := _project_among_step_ids(args)) is not None:
        return _usage(problem)
    if getattr(args, "num_processes", None) is not None and args.num_processes < 1:  # build, plan, watch, ls
        return _usage("--num-processes must be at least 1")
    if not args.command:
        make_parser().print_help()
        return EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_notices()
    warnings.filterwarnings("once", category=LockfileWarning)
    warnings.filterwarnings("once", category=StateCacheWarning)
    warnings.showwarning = _show_warning
    try:
        return COMMANDS[args.command](args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("dbl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LockHeld as exc:
        print(f"dbl: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except DblError as exc:  # an input the user must fix (a project or lockfile), found before any step ran
        if getattr(args, "debug", False):
            raise
        print(f"dbl: {fmt_paths_in(str(exc))}", file=sys.stderr)  # files named as the user would type them
        return EXIT_USAGE
    except OSError as exc:  # an unreadable input, a full disk outside any step
        if getattr(args, "debug", False):
            raise
        print(f"dbl: {os_words(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        print(
            f"dbl: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


def _load(args):
    from runner.exec.workspace import check_state_dir
    from runner.project import ProjectError, load_project

    try:
        project = load_project(find_project(args.project, args.command))
    except ProjectError as exc:
        print(exc.report(), file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    check_state_dir(project)  # before any command reads or writes there
    return project


def cmd_build(args) -> int:
    from runner import executor
    from runner.interrupt import StopOnInterrupt, exit_code_for
    from runner.ui import make_reporter

    if (problem := _parallel_problem(args)) is not None:
        return _usage(problem)
    project = _load(args)
    if (problem := _device_problem(args, project)) is not None:
        return _usage(problem)
    verbosity = -1 if args.quiet else 1 if args.verbose else 0
    reporter = make_reporter("plain" if args.no_progress else "auto", verbosity)
    stop = StopOnInterrupt()
    try:
        with stop:
            options = executor.BuildOptions(
                dry_run=args.dry_run,
                only=tuple(args.only),
                force=tuple(args.force) if args.force is not None else None,
                keep_going=args.keep_going,
                num_processes=args.num_processes,
                should_stop=stop.requested,
                stop_signal=lambda: stop.signum,
                debug=args.debug,
                **_parallel_options(args),
            )
            result = executor.build(project, options, reporter)
        if stop.signum is not None and result.exit_code in (EXIT_OK, EXIT_INTERRUPTED):
            return exit_code_for(stop.signum)  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        return result.exit_code
    except KeyboardInterrupt:  # a second signal: stopped at once
        print("dbl: interrupted", file=sys.stderr)
        return exit_code_for(stop.signum or signal.SIGINT)
    finally:
        reporter.close()


def cmd_plan(args) -> int:
    from runner import executor, planner
    from runner.exec.scheduler import removed_steps

    project = _load(args)
    ws = executor.Workspace(project)
    lock, planned = ws.plan(num_processes=args.num_processes)
    removed = removed_steps(ws, lock, {p.id for p in planned})
    if args.json:  # paths relative to the project file, as the lockfile records them
        data = planner.to_json(planned)
        data["removed"] = [{"id": sid, "outputs": folder and ws.rel(folder)} for sid, folder in removed]
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from runner.ui.plain import fmt_path, reason_text, up_to_date_text

    stale = [p for p in planned if p.stale]
    if not stale:
        print(up_to_date_text(planned))  # the words of `dbl build`
    else:
        width = max(len(p.id) for p in stale)
        print(f"{len(stale)} of {len(planned)} steps stale:")
        for p in stale:
            print(f"  {p.id:<{width}}  {reason_text(p)}")
    if removed:
        width = max(len(sid) for sid, _ in removed)
        print(f"{len(removed)} {'step' if len(removed) == 1 else 'steps'} no longer in the project:")
        for sid, folder in removed:
            what = (
                f"the next build removes {fmt_path(folder)}" if folder else "the next build drops its record"
            )
            print(f"  {sid:<{width}}  {what}")
    return EXIT_OK


def cmd_watch(args) -> int:
    from runner.ui import make_reporter
    from runner.watch import POLL_INTERVAL_S, watch

    path = find_project(args.project, args.command)
    mode = "plain" if args.no_progress else "auto"
    if (problem := _parallel_problem(args)) is not None:
        return _usage(problem)
    interval = args.poll_interval
    if interval is not None and not 0 < interval < float("inf"):  # nan too
        return _usage("--poll-interval must be a number of seconds above 0")
    if not args.keep_loaded >= 0:  # nan too
        return _usage("--keep-loaded must be a number of minutes, 0 or more (inf: never let go)")
    return watch(
        path,
        polling=args.polling or interval is not None,
        poll_interval=interval or POLL_INTERVAL_S,
        reporter_factory=lambda: make_reporter(mode, 0),
        build_options={**_parallel_options(args), "num_processes": args.num_processes, "debug": args.debug},
        keep_loaded_s=args.keep_loaded * 60,
    )


def _parallel_problem(args) -> str | None:
    """Why the parallel options cannot build, known before the project is read: said at once, whether or
    not anything is stale (a watch's first build may have nothing to run)."""
    import importlib.util

    from runner.exec import backends
    from runner.exec.devices import counts_problem, inline_problem

    if (problem := counts_problem(args.jobs, args.per_gpu)) is not None:
        return problem
    executor = _executor(args)
    try:
        backends.factory(executor)
        if executor == "ray" and importlib.util.find_spec("ray") is None:
            from runner.exec.ray_connect import import_ray

            import_ray()  # says how to install it
    except UsageError as exc:
        return str(exc)
    if args.ray_address is not None and executor != "ray":
        return f"--ray-address is for --executor ray (this build's executor: {executor})"
    if (problem := inline_problem(args.executor, args.jobs, args.gpus)) is not None:
        return problem
    if args.gpus is not None:
        from runner.exec.devices import gpus_refused, parse_gpus

        return gpus_refused(parse_gpus(args.gpus), executor, args.ray_address)
    return None


def _executor(args) -> str:
    """The executor backend the command line names: inline where --executor is not given (which -j above 1
    and --gpus make `process`); one given is taken as said."""
    return args.executor or "inline"


def _device_problem(args, project) -> str | None:
    """Why the project's `device` takes no --gpus, in the command line's words (a build refuses it too, in
    the Python API's)."""
    from runner.exec.devices import gpus_for_device

    problem = gpus_for_device(_parallel_options(args)["gpus"], project.settings.device)
    return f"{project.path.name}: {problem}" if problem is not None else None


def _parallel_options(args) -> dict:
    from runner.exec.devices import parse_gpus

    gpus = tuple(parse_gpus(args.gpus)) if args.gpus is not None else None
    return {
        "command_line": True,  # a build's messages name -j, --gpus, ... rather than BuildOptions' fields
        "backend": args.executor,  # None: inline, or process with -j above 1 or --gpus
        "ray_address": args.ray_address,
        "jobs": args.jobs,
        "gpus": gpus,
        "per_gpu": args.per_gpu,
    }


def cmd_init(args) -> int:
    from runner import templates

    if args.list:
        if args.dir is not None:
            raise UsageError(
                f"dbl init --list lists the templates and makes no project: leave out {args.dir}"
            )
        listed = templates.available()
        width = max(map(len, listed), default=0)
        for name, about in listed.items():
            print(f"{name:<{width}}  {about}")
        return EXIT_OK
    folder = Path(args.dir or ".")
    target, made = templates.create(args.template, folder)
    print(f"created {target}")
    for images in made:
        print(f"  put your photos in {folder / images}/")
    print(f"then: dbl build {shlex.quote(str(target))}")
    return EXIT_OK


def cmd_ls(args) -> int:
    from runner import listing

    project = _load(args)
    rows = listing.rows(project, args.num_processes)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for line in listing.table(rows, project):
            print(line)
    return EXIT_OK


def cmd_gc(args) -> int:
    from runner.gc import collect
    from runner.store import maker

    done = collect(_load(args), dry_run=args.dry_run)
    verb = "would drop" if args.dry_run else "dropped"
    entries = f"{done.dropped} cache entr{'y' if done.dropped == 1 else 'ies'}"
    print(f"{verb} {entries}, {done.freed / 1e6:.1f} MB; kept {done.kept}")
    for fp, entry in done.distrusted.items():
        print(
            f"{verb} the entry of {entry.step} ({fp[:12]}, {maker(entry.made_by)}): this dbl restores no "
            f"entry of it made before epoch {entry.since}, which may hold wrong outputs, {_megabytes(entry.size)}"
        )
    if done.leftovers:
        size = _megabytes(sum(done.sizes[path] for path in done.leftovers))
        print(
            f"{verb} {len(done.leftovers)} folder(s) left by builds that were killed while writing the cache "
            f"or committing outputs, {size}"
        )
    if done.signals:
        print(f"{verb} {len(done.signals)} stop or begun file(s) of steps, left by builds that were killed")
    for path in done.orphans:
        print(
            f"{verb} {path.name}: the work folder of a step no longer in the project, {_megabytes(done.sizes[path])}"
        )
    for path in done.abandoned:
        print(
            f"{verb} {path.name}: a work folder made for inputs its step no longer has (no build resumes it), "
            f"{_megabytes(done.sizes[path])}"
        )
    if done.sizes:
        print(
            f"{'would free' if args.dry_run else 'freed'} {_megabytes(done.freed + done.folders_freed)} in all"
        )
    return EXIT_OK


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def cmd_check(args) -> int:
    from runner.check import check

    project = _load(args)
    report = check(project)
    if not report.mismatches and not report.files:
        print("nothing to check: the lockfile records no built step yet (`dbl build` builds them)")
        return EXIT_OK
    if not report.mismatches:
        print(f"all {report.files} files match the lockfile")
        _say_distrusted(report.distrusted)
        return EXIT_OK
    n = sum(m.files for m in report.mismatches)
    print(
        f"{n} file{'s' if n != 1 else ''} of {report.files} differ{'s' if n == 1 else ''} from the lockfile:"
    )
    for mismatch in report.mismatches:
        print(f"  {mismatch}")
    print("the file-hash cache now knows; `dbl plan` shows what to rebuild")
    _say_distrusted(report.distrusted)
    return EXIT_FAILED


def _say_distrusted(distrusted: list[tuple[str, dict | None]]) -> None:
    """The run-cache entries `dbl check` found that no build restores (runner.check.Report.distrusted)."""
    from runner.store import maker

    if not distrusted:
        return
    n = len(distrusted)
    print(
        f"{n} run-cache entr{'y' if n == 1 else 'ies'} the lockfile refers to {'is' if n == 1 else 'are'} "
        f"of an epoch this dbl no longer restores (a fix found such entries may hold wrong outputs): "
        f"the steps run again when their outputs are needed, and `dbl gc` drops {'it' if n == 1 else 'them'}:"
    )
    for sid, made_by in distrusted:
        print(f"  {sid}: {maker(made_by)}")


def cmd_report(args) -> int:
    from runner import report

    project = _load(args)
    if args.output == "-":  # standard output, as for most tools; ./- names a file of that name
        page = report.render(project)
        try:
            sys.stdout.write(page)
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader had read what it wanted
            pass
        return EXIT_OK
    path = report.write(project, args.output)
    # Written through to a pipe or device (-o /dev/stdout), stdout may be the page itself.
    print(f"wrote {fmt_path(path)}", file=sys.stdout if path.is_file() else sys.stderr)
    return EXIT_OK


def cmd_merge_lockfile(args) -> int:
    from runner.lockfile import LockfileError, foreign
    from runner.merge import merge_files, merge_lines

    missing = [name for name in (args.base, args.ours, args.theirs) if not Path(name).is_file()]
    if missing:
        print(
            f"dbl merge-lockfile: no such file: {', '.join(missing)} (git passes three: %O %A %B)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    sides = [Path(args.base), Path(args.ours), Path(args.theirs)]
    if any(map(foreign, sides)):
        if merge_lines(*sides) == 0:
            return EXIT_OK
        print(
            "dbl merge-lockfile: not a dbl lockfile (another tool's, which `*.lock merge=dbl` matches too): "
            "merged line by line, as git does without the driver; resolve its conflicts as usual",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        conflicts, notes = merge_files(Path(args.base), Path(args.ours), Path(args.theirs))
    except LockfileError as exc:
        print(f"dbl merge-lockfile: {exc}", file=sys.stderr)
        return EXIT_FAILED  # git reports a conflict and leaves our side as it was
    for note in notes:
        print(f"dbl merge-lockfile: {note}", file=sys.stderr)
    if conflicts:
        print(
            f"dbl merge-lockfile: {', '.join(conflicts)} changed differently on both sides: left out; "
            f"`dbl build` restores or reruns {'it' if len(conflicts) == 1 else 'them'} for the merged project file",
            file=sys.stderr,
        )
    return EXIT_OK


COMMANDS = {
    "build": cmd_build,
    "plan": cmd_plan,
    "watch": cmd_watch,
    "init": cmd_init,
    "ls": cmd_ls,
    "gc": cmd_gc,
    "check": cmd_check,
    "report": cmd_report,
    "merge-lockfile": cmd_merge_lockfile,
}
