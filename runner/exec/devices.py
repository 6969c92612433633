"""Which devices a step may use when several run at once. Pure: no torch, no CUDA calls."""

from __future__ import annotations

import os


class DevicePool:
    """GPUs shared by running steps: each GPU takes at most `per_gpu` steps at once, and a step that
    needs `n` GPUs (a train step with num_processes = n) gets n different ones. No GPUs: every step
    gets none (they share the CPU cores)."""

    def __init__(self, devices: list[str] | tuple[str, ...], per_gpu: int = 1):
        if per_gpu < 1:
            raise ValueError("per_gpu must be at least 1")
        self.devices = list(dict.fromkeys(devices))
        self.per_gpu = per_gpu
        self.used = {d: 0 for d in self.devices}

    def fits(self, n: int) -> bool:
        """Could a step that needs n GPUs ever run here?"""
        return not self.devices or n <= len(self.devices)

    def acquire(self, n: int = 1) -> tuple[str, ...] | None:
        """n GPUs for one step (the least used first), or None when not enough are free now."""
        if not self.devices:
            return ()
        free = sorted((d for d in self.devices if self.used[d] < self.per_gpu), key=lambda d: self.used[d])
        if len(free) < n:
            return None
        taken = tuple(free[:n])
        for d in taken:
            self.used[d] += 1
        return taken

    def release(self, taken: tuple[str, ...]) -> None:
        for d in taken:
            self.used[d] -= 1


def parse_gpus(text: str | None) -> list[str]:
    """`--gpus 0,1,3` -> ['0', '1', '3']; None: the CUDA devices this machine shows (none on a CPU)."""
    if text is not None:
        return [g.strip() for g in text.split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    # Without importing torch: the driver's device nodes, one a GPU. CUDA numbers the GPUs it is shown
    # 0, 1, ...; a container given the host's GPU 3 has /dev/nvidia3, which is its CUDA GPU 0.
    return [str(i) for i in range(len(_device_nodes() or ()))]


def _words(api: bool) -> tuple[str, str, str]:
    """How a message names the GPU options: (the option, how to share a GPU, an example), as the command
    line spells them (`--gpus`) or, where `api`, as BuildOptions does (`gpus=`)."""
    if api:
        return "gpus", "per_gpu=K", 'e.g. gpus=("0", "1", "3")'
    return "--gpus", "--per-gpu K", "comma-separated, e.g. --gpus 0,1,3"


def _given(gpus: list[str], api: bool) -> str:
    """The GPUs as they were given: `--gpus 0,1`, or `gpus=('0', '1')` to the Python API."""
    return f"gpus={tuple(gpus)!r}" if api else f"--gpus {','.join(gpus)}"


def gpus_problem(gpus: list[str], api: bool = False) -> str | None:
    """Why `--gpus` names something CUDA_VISIBLE_DEVICES would not take, or None. CUDA takes indices
    and UUIDs (`nvidia-smi -L`: GPU-..., MIG-...); it stops at the first entry it cannot read, and a
    step given no GPU would run on the CPU without a word. `api`: said in BuildOptions' words."""
    option, share, example = _words(api)
    if not gpus:  # its steps would be given no GPU, see every one, and be shown on the CPU
        return (
            f"{'gpus=()' if api else option} names no GPU; leave it out to share out every visible GPU, or set "
            'device = "cpu" in [project] to use none'
        )
    for g in gpus:
        if not (g.isdigit() or g.startswith(("GPU-", "MIG-"))):
            return f"{option}: {g!r} is not a GPU; give indices or UUIDs (nvidia-smi -L), {example}"
    twice = sorted({g for g in gpus if gpus.count(g) > 1})
    if twice:  # a local Ray instance would count each entry as a GPU of its own
        return (
            f"{option}: {', '.join(twice)} named twice; name each GPU once ({share} lets K steps share one)"
        )
    return None


def counts_problem(jobs, per_gpu, api: bool = False) -> str | None:
    """Why `-j` (BuildOptions.jobs) or `--per-gpu` (per_gpu) is no count of steps, or None. `api`: said in
    BuildOptions' words (`jobs=`), for a script; else in the command line's (`-j`), which takes numbers only."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        if not api:
            return "-j must be at least 1"
        return f"jobs={jobs!r}: give the number of steps to run at once, at least 1 (None: one, or as many as Ray has room for)"
    if isinstance(per_gpu, bool) or not isinstance(per_gpu, int) or per_gpu < 1:
        if not api:
            return "--per-gpu must be at least 1"
        return f"per_gpu={per_gpu!r}: give the number of steps that may share one GPU, at least 1"
    return None


def needs_workers(jobs, gpus) -> bool:
    """Whether steps need worker processes: several at once (-j above 1; BuildOptions.jobs), or given GPUs
    (--gpus; gpus), which only a process started for them sees alone."""
    return (jobs or 1) > 1 or gpus is not None


def inline_problem(backend, jobs, gpus, api: bool = False) -> str | None:
    """Why the inline backend, named (`--executor inline`; backend="inline"), cannot run these options, or
    None: it runs the steps in the build's own process, one at a time. `api`: said in BuildOptions' words,
    for a script; else in the command line's (`gpus` as typed)."""
    if backend != "inline" or not needs_workers(jobs, gpus):
        return None
    several = (jobs or 1) > 1
    if api:
        given = f"jobs={jobs}" if several else f"gpus={gpus!r}"
        return (
            f'backend="inline" runs the steps in this process, one at a time, and {given} needs worker '
            'processes: give backend="process", or leave backend out (inline without jobs and gpus)'
        )
    given = f"-j {jobs}" if several else f"--gpus {gpus}"
    return (
        f"--executor inline runs the steps in this process, one at a time, and {given} needs worker "
        "processes: give --executor process, or leave out --executor (inline is the default without "
        "-j and --gpus)"
    )


def _device_nodes() -> list[str] | None:
    """The driver's /dev/nvidiaN nodes, one a GPU; None where they cannot tell (WSL has none: /dev/dxg)."""
    try:
        names = os.listdir("/dev")
    except OSError:
        return None
    if "dxg" in names:
        return None
    return [n for n in names if n.startswith("nvidia") and n[len("nvidia") :].isdigit()]


def gpus_missing(gpus: list[str], api: bool = False) -> str | None:
    """Why this machine cannot show the steps the GPUs `--gpus` names, or None (also where it cannot
    tell). A worker given a GPU that is not there sees no CUDA device: with device = "auto" its steps
    ran on the CPU and were shown `on cuda:0`. `api`: said in BuildOptions' words."""
    if not gpus:
        return None
    given, option = _given(gpus, api), _words(api)[0]
    fix = f"leave {option} out to run on the CPU"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # the environment's choice of GPUs stands: --gpus picks among them
        shown = parse_gpus(None)
        if not shown:
            return f"{given}: CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this build; {fix}"
        if all(g.isdigit() for g in shown):
            outside = [g for g in gpus if g.isdigit() and g not in shown]
            if outside:
                return (
                    f"{given}: GPU {outside[0]} is not among those CUDA_VISIBLE_DEVICES={visible} "
                    f"shows this build ({', '.join(shown)}); name those, or leave {option} out to use them all"
                )
        return None
    nodes = _device_nodes()
    if nodes is None:
        return None
    if not nodes:
        return f"{given}: this machine has no CUDA GPU {gpus[0]} (it shows none); {fix}"
    beyond = [g for g in gpus if g.isdigit() and int(g) >= len(nodes)]
    if beyond:
        return (
            f"{given}: this machine has no CUDA GPU {beyond[0]} (it has {len(nodes)}: "
            f"{', '.join(str(i) for i in range(len(nodes)))}); leave {option} out to use them all"
        )
    return None


def gpus_refused(
    gpus, backend: str | None = None, ray_address: str | None = None, machine: bool = True, api: bool = False
) -> str | None:
    """Why a build cannot be given these GPUs (`--gpus`, BuildOptions.gpus), or None: not a list of GPU
    names (gpus_problem), or, where `machine`, one this machine does not show (gpus_missing). A Ray
    cluster's GPUs are its nodes' (connecting says --gpus has no place there), not this machine's.
    `api`: said in BuildOptions' words (`gpus=`), for a script; else in the command line's (`--gpus`)."""
    if isinstance(gpus, str) or not all(isinstance(g, str) for g in gpus):
        return f'gpus={gpus!r}: give each GPU as a string, e.g. gpus=("0", "1")'
    gpus = list(gpus)
    cluster = backend == "ray" and (ray_address or os.environ.get("RAY_ADDRESS") or "local") != "local"
    return gpus_problem(gpus, api) or (None if cluster or not machine else gpus_missing(gpus, api))


def gpus_for_device(gpus: tuple[str, ...] | None, device: str, api: bool = False) -> str | None:
    """Why `--gpus` means nothing for a project's `device`, or None: a CPU or MPS project uses no GPU.
    `api`: said in BuildOptions' words."""
    if not gpus or not device.startswith(("cpu", "mps")):
        return None
    return (
        f'{_given(list(gpus), api)}: device = "{device}" in [project] uses no CUDA GPU; leave '
        f'{_words(api)[0]} out, or set device = "auto" or "cuda" to run on the GPUs'
    )


def shown(device: str, gpus: tuple[str, ...]) -> str:
    """How a step's device is shown ("on cuda:1,3"): `device` as torch resolved it (cuda, mps, cpu) in a
    process given `gpus` (CUDA_VISIBLE_DEVICES: shown by their numbers on this machine, not torch's)."""
    if not device.startswith("cuda"):
        return device
    return f"cuda:{','.join(gpus)}" if gpus else device
