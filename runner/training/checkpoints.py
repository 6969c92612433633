"""Resumable checkpoints of a training run, in the step's work folder as `checkpoint-<step>/`.

A checkpoint holds `lora.safetensors` (the trainable weights), `training_state.pt` (optimizer, LR
schedule, loss scaler, torch RNG) and `state.json` (step, settings fingerprint, loss history, Python and
NumPy RNG, and the sha256 of the two other files). It is written into a temp folder and renamed, and
state.json is written last, so a folder without it is incomplete.

A checkpoint that does not read back (a truncated file, a digest that does not match, a bad state.json)
is reported once with its path, and the run falls back to an older checkpoint or starts over: a damaged
file must not fail every build. A full disk while writing is a StepError that says so.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

from runner import tempnames
from runner.errors import StepError

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_FORMAT = 1
WEIGHTS = "lora.safetensors"
TRAINING_STATE = "training_state.pt"
STATE = "state.json"


def checkpoint_dirs(work: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints in `work`, oldest first."""
    found = []
    if work.is_dir():
        for child in work.iterdir():
            name = child.name
            if (
                child.is_dir()
                and name.startswith(CHECKPOINT_PREFIX)
                and name[len(CHECKPOINT_PREFIX) :].isdigit()
            ):
                found.append((int(name[len(CHECKPOINT_PREFIX) :]), child))
    return sorted(found)


def save(job, step: int, trainable, optimizer, lr_scheduler, scaler, history, world: int, rank: int) -> None:
    """Write checkpoint-<step>/ atomically (temp folder + rename), then drop older checkpoints."""
    import numpy as np
    import torch

    from runner.safetensors_io import safetensors_bytes

    if rank == 0:
        final = job.work / f"{CHECKPOINT_PREFIX}{step}"
        tmp = job.work / f".{final.name}.tmp-{tempnames.suffix()}"
        try:
            job.work.mkdir(parents=True, exist_ok=True)
            # a checkpoint a run killed while writing it left (nothing else removes it while the step is unfinished)
            tempnames.drop_left_folders(job.work, f".{CHECKPOINT_PREFIX}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            weights = {f"{c}/{n}": p.detach() for c, group in trainable.items() for n, p in group.items()}
            buffer = io.BytesIO()
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                buffer,
            )
            files = {WEIGHTS: safetensors_bytes(weights), TRAINING_STATE: buffer.getvalue()}
            for name, data in files.items():
                _write(tmp / name, data)
            np_state = np.random.get_state()
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "fingerprint": job.fingerprint,
                "num_processes": world,
                "history": history,
                "python_rng": _jsonable_rng(random.getstate()),
                "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
            }
            _write(tmp / STATE, json.dumps(state, sort_keys=True).encode())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise StepError(
                    f"{job.step_id}: no space left on device while writing checkpoint {final.name} "
                    f"in {job.work}; free some space and build again (it resumes from the last checkpoint)"
                ) from exc
            raise
        for old_step, folder in checkpoint_dirs(job.work):
            if old_step != step:
                shutil.rmtree(folder, ignore_errors=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _write(path: Path, data: bytes) -> None:
    # os.write, not a buffered file: a full disk raises here with ENOSPC, not later on close.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _jsonable_rng(state):
    return [state[0], list(state[1]), state[2]]


def resume(work: Path, fingerprint: str, log, trainable, optimizer, lr_scheduler, scaler, rank: int = 0):
    """Load the newest usable checkpoint into the run; returns (step, history, folder), or None to start over.

    Every file is read and checked before anything is changed, so a damaged checkpoint leaves the run as
    it was and an older one (or a fresh start) takes its place. Process 0 deletes a damaged checkpoint
    after reporting it, so that it is reported once.
    """

    def damaged(folder: Path, problem) -> None:
        log(f"damaged checkpoint {folder}: {problem}; skipping it")
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)

    if rank == 0:
        # A checkpoint a run killed while writing it left: gone as the step starts, rather than at its next
        # checkpoint, which a step may never save (one scan of the work folder, as checkpoint_dirs makes).
        tempnames.drop_left_folders(work, f".{CHECKPOINT_PREFIX}")
    for step, folder in reversed(checkpoint_dirs(work)):
        try:
            state = json.loads((folder / STATE).read_text())
            if not isinstance(state, dict):
                raise ValueError("state.json is not an object")
        except FileNotFoundError:
            continue  # not complete: the run was killed while writing it
        except (OSError, ValueError) as exc:
            damaged(folder, exc)
            continue
        if state.get("format") != CHECKPOINT_FORMAT:
            if not isinstance(state.get("format"), int):
                damaged(folder, "state.json has no format")
            continue  # written by another version of dbl
        if fingerprint and state.get("fingerprint") and state["fingerprint"] != fingerprint:
            log(f"ignoring {folder.name}: it belongs to other settings")
            continue
        try:
            loaded = _read(folder, step, state, trainable)
        except Exception as exc:  # any way a damaged file fails to load
            damaged(folder, exc)
            continue
        _apply(loaded, state, trainable, optimizer, lr_scheduler, scaler)
        return state["step"], state["history"], folder
    return None


def _read(folder: Path, step: int, state: dict, trainable) -> tuple[dict, dict]:
    import torch
    from safetensors.torch import load as load_safetensors

    for key in ("step", "history", "python_rng", "numpy_rng"):
        if key not in state:
            raise ValueError(f"state.json has no {key!r}")
    if state["step"] != step:
        raise ValueError(f"state.json says step {state['step']}")
    blobs = {name: (folder / name).read_bytes() for name in (WEIGHTS, TRAINING_STATE)}
    for name, expected in (state.get("sha256") or {}).items():
        if name in blobs and hashlib.sha256(blobs[name]).hexdigest() != expected:
            raise ValueError(f"{name} does not match its sha256 in state.json (truncated or altered)")
    weights = load_safetensors(blobs[WEIGHTS])
    for component, group in trainable.items():
        for name, param in group.items():
            value = weights.get(f"{component}/{name}")
            if value is None or value.shape != param.shape:
                raise ValueError("its weights do not match the adapter's shape")
    if len(weights) != sum(len(group) for group in trainable.values()):
        raise ValueError("its weights do not match the adapter's shape")
    saved = torch.load(io.BytesIO(blobs[TRAINING_STATE]), map_location="cpu", weights_only=True)
    return weights, saved


def _apply(loaded, state: dict, trainable, optimizer, lr_scheduler, scaler) -> None:
    import numpy as np
    import torch

    weights, saved = loaded
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if scaler is not None and saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    with torch.no_grad():
        for component, group in trainable.items():
            for name, param in group.items():
                param.copy_(weights[f"{component}/{name}"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
