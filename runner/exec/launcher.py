"""The multi-process train launcher: one training run on N worker processes, DDP-style.

The parent pickles the job into the work folder and starts N fresh interpreters
(`python -m runner.exec.launcher JOB RANK WORLD RENDEZVOUS STOPFILE`); they meet through a file
rendezvous, average gradients every step, and report progress, log lines and their result as marked
JSON lines on stdout. Only rank 0 writes checkpoints and the adapter; the parent relays what the
workers say to the step's hooks and raises what they raise.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

from runner import tempnames
from runner.errors import StepError, StepInterrupted

MESSAGE_MARK = "\x1edbl-train "


def run_processes(job, world: int, hooks) -> dict:
    """Train with `world` worker processes (DDP-style gradient averaging; gloo on a CPU, nccl on CUDA).

    Workers are fresh interpreters (`python -m runner.exec.launcher JOB RANK WORLD ...`), so this works from
    any caller, scripts and notebooks included. They report progress, logs and their result as marked
    lines on stdout; a stop request reaches them as a file in the work folder, which they agree on at
    the next step boundary.
    """
    import pickle
    import queue as queue_module
    import subprocess
    import sys
    import threading

    if job.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < world:
            raise StepError(
                f"num_processes = {world} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
    job.work.mkdir(parents=True, exist_ok=True)
    tag = tempnames.suffix()
    job_file = job.work / f".job-{tag}.pkl"
    job_file.write_bytes(pickle.dumps(job))
    stop_file = job.work / f".stop-{tag}"
    rendezvous = job.work / f".rendezvous-{tag}"
    messages: queue_module.Queue = queue_module.Queue()

    def read(rank: int, stream) -> None:
        for line in stream:
            if line.startswith(MESSAGE_MARK):
                messages.put((rank, json.loads(line[len(MESSAGE_MARK) :])))
        messages.put((rank, {"kind": "eof"}))

    processes, logs = [], []
    try:
        for rank in range(world):
            log_file = open(job.work / f".worker-{rank}.log", "w+")  # noqa: SIM115 - closed below
            logs.append(log_file)
            cmd = [
                sys.executable,
                "-m",
                "runner.exec.launcher",
                str(job_file),
                str(rank),
                str(world),
                str(rendezvous),
                str(stop_file),
                str(os.getpid()),
            ]
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
            processes.append(process)
            threading.Thread(target=read, args=(rank, process.stdout), daemon=True).start()
        results: dict[int, dict] = {}
        ended = 0
        while ended < world:
            if hooks.should_stop() and not stop_file.exists():
                stop_file.touch()
            try:
                rank, message = messages.get(timeout=0.2)
            except queue_module.Empty:
                continue
            kind = message["kind"]
            if kind == "progress":
                hooks.progress(message["done"], message["total"], **message["metrics"])
            elif kind == "log":
                hooks.log(message["message"])
            elif kind == "eof":
                ended += 1
                if rank not in results:
                    # Died without a word (killed, out of memory): stop the others, they would wait forever.
                    stop_file.touch()
                    processes[rank].wait()
                    for other in processes:
                        if other.poll() is None:
                            other.terminate()
                    logs[rank].seek(0)
                    tail = "".join(logs[rank].readlines()[-15:])
                    raise StepError(
                        f"{job.step_id}: training process {rank} exited with code "
                        f"{processes[rank].returncode}\n{tail}"
                    )
            else:
                results[rank] = message
                if kind != "done":
                    stop_file.touch()
        for process in processes:
            process.wait()
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait()
        for log_file in logs:
            log_file.close()
        for path in (job_file, stop_file, rendezvous):
            path.unlink(missing_ok=True)
    outcomes = [results[rank] for rank in range(world)]
    for outcome in outcomes:
        if outcome["kind"] == "error":
            raise StepError(outcome["message"])
    for outcome in outcomes:
        if outcome["kind"] == "interrupted":
            raise StepInterrupted(outcome["message"])
    return outcomes[0]["result"]


def _worker(job_file: str, rank: int, world: int, rendezvous: str, stop_file: str, parent: int) -> None:
    """Entry point of one training process."""
    import pickle
    import signal
    import sys

    from runner.exec.job import quiet_library_notices
    from runner.interrupt import die_with_parent

    quiet_library_notices()
    # Ctrl-C and a closed terminal reach the launching process, which asks every worker to stop at the
    # same step boundary through the stop file; a worker outlives neither a SIGTERM nor its launcher.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent(parent)

    import torch
    import torch.distributed as dist

    def send(**message) -> None:
        sys.stdout.write(MESSAGE_MARK + json.dumps(message) + "\n")
        sys.stdout.flush()

    from runner.training import Hooks, train

    try:
        job = pickle.loads(Path(job_file).read_bytes())
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        backend = "nccl" if job.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
        hooks = Hooks(
            progress=lambda done, total, **metrics: send(
                kind="progress", done=done, total=total, metrics=metrics
            ),
            log=lambda message: send(kind="log", message=message),
            should_stop=lambda: os.path.exists(stop_file),
        )
        send(kind="done", result=train(job, hooks, models=None, rank=rank, world=world))
    except StepInterrupted as exc:
        send(kind="interrupted", message=str(exc))
    except StepError as exc:
        send(kind="error", message=str(exc))
    except BaseException as exc:  # reported to the parent, which raises it as a StepError
        send(kind="error", message=f"training process {rank} failed: {exc!r}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))
