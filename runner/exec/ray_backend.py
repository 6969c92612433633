"""The `ray` backend: each step in a Ray worker, on a node of a Ray cluster or of a local Ray instance.

`dbl build --executor ray` starts a local Ray instance (listening on 127.0.0.1 only, no dashboard);
`--ray-address auto` joins the cluster this machine belongs to, `--ray-address HOST:PORT` another one;
without --ray-address, the environment's RAY_ADDRESS names the cluster, as it does for ray.init.
Ray is imported only here and in ray_connect (which connects), and only once a step runs: it is the
optional extra `dbl[ray]`.

- A step runs in a Ray actor, a worker process that reserves GPUs (`num_gpus`: 1/--per-gpu for a step,
  P for a train step of num_processes = P; none on a CPU project) and a CPU, so Ray picks its node and
  GPUs and sets its CUDA_VISIBLE_DEVICES. A worker runs one step at a time and is kept for the build's
  next steps that ask for what it holds, with its base model loaded (as `-j` keeps its processes): a
  step takes an idle worker of its kind, or starts one, and idle workers of another kind make way for a
  new one (they hold the GPUs it may need). A worker whose step did not end well is not kept; the
  build's end ends them all (a watch's end, for `dbl watch`: next_build, build_ended).
- Progress and log lines go to a small mailbox actor, which the build's process polls; the outcome is
  what the worker's call returns. Only the build's process stores outputs, writes the lockfile and draws.
- Paths are the same everywhere: the project folder, its images, a local base model and `.dbl/` must be
  on a file system every node mounts at the same path (the step writes its outputs into its work folder
  under `.dbl/tmp/`, and the build's process moves them into the run-cache).
- The first Ctrl-C touches the step's stop file (a train step saves a checkpoint and stops) and ends
  the workers of the steps that have not begun; the second ends every worker (`ray.kill`).
- A worker that dies (killed, out of memory, its node lost) fails its step with a message that names the
  step and the node. A train step that left a checkpoint runs once more, and resumes from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import socket
import threading
import time

from runner.errors import StepError, StepInterrupted
from runner.events import WARNING
from runner.exec.backends import LazyModels, quiet_openmp, register, release_cached_gpu_memory
from runner.exec.job import Hooks, Job, Outcome, quiet_library_notices, reported_outcome, run_reported
from runner.exec.ray_connect import LOCAL, connect, import_ray  # noqa: F401 - connect: tests, scripts

POLL_S = 0.2  # how often the build's process asks for a running step's events
PROGRESS_EVERY_S = 0.25  # a worker sends progress at most this often (and always the last one)
WAITING_NOTE_S = 30.0  # a step Ray has not placed yet is mentioned this often
# How often a build with running steps asks the cluster's head (its GCS) if it is there; after how long
# without an answer the head is lost (Ray itself ends the build's process at 60 s); and how long the
# running steps then have to stop at a safe point (a train step saves a checkpoint).
HEAD_ASKED_EVERY_S = 2.0
HEAD_LOST_S = 15.0
HEAD_LOST_STOP_S = 25.0


class Mailbox:
    """The running steps' progress and log events, kept until the build's process takes them (a Ray
    actor: workers on any node put, the build's process takes)."""

    def __init__(self):
        self._events: dict[str, list] = {}

    def put(self, step_id: str, event: tuple) -> None:
        self._events.setdefault(step_id, []).append(event)

    def take(self, step_id: str) -> list:
        return self._events.pop(step_id, [])


class _WorkerLost(Exception):
    """The step's worker died (killed, out of memory, its node lost); `began`: after it began the step."""

    def __init__(self, message: str, began: bool = True):
        super().__init__(message)
        self.began = began


class _IdleWorkerLost(Exception):
    """A kept worker was found dead as it was given a step (killed, or its node lost, while idle)."""


@dataclasses.dataclass(eq=False)
class _Worker:
    """A Ray actor that runs steps, and what it holds: `key` = (GPUs reserved, thread count). `ready`: the
    answer to its first call, there once Ray has placed it and it has started."""

    actor: object
    key: tuple
    ready: object
    placed: bool = False


def _lost(exceptions) -> tuple:
    """Ray's errors for a step whose worker or node went away (those this Ray version has)."""
    names = (
        "RayActorError",
        "WorkerCrashedError",
        "NodeDiedError",
        "LocalRayletDiedError",
        "OutOfMemoryError",
        "ObjectLostError",
    )
    return tuple(getattr(exceptions, n) for n in names if hasattr(exceptions, n))


def _root_cause(exc: BaseException) -> str:
    """What went wrong under Ray's wrappers of it (a task error holds a system error that holds the
    error), in one line: their texts carry Ray's own tracebacks and terminal colours."""
    from ray.exceptions import RayActorError, RayError

    if isinstance(exc, RayActorError) and getattr(exc, "actor_init_failed", False):
        # The worker did not start: the error its start raised is the last one in Ray's text of it.
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.findall(r"^(\w+(?:Error|Exception): .*)$", plain, re.M)
        text = found[-1] if found else plain.strip().splitlines()[0]
    else:
        for _ in range(10):
            inner = getattr(exc, "cause", None) or getattr(exc, "client_exc", None)
            if inner is None or inner is exc:
                break
            exc = inner
        if isinstance(exc, BaseException) and not isinstance(exc, RayError):
            text = f"{type(exc).__name__}: {exc}"
        else:
            lines = str(exc).strip().splitlines()
            text = lines[0] if lines else type(exc).__name__
    if "No module named" in text:
        text += " (dbl, the same version, must be installed on every node of the cluster)"
    return text


class RayBackend:
    """Each step in a Ray actor: Ray places it on a node with the GPUs it asks for; the build keeps it for
    its next steps."""

    name = "ray"
    places_steps = True  # Ray chooses nodes and GPUs: the scheduler shares out none itself
    keeps_workers = True  # a watch keeps it from build to build (runner.watch_builds)

    def __init__(self, project, options=None):
        # a script's options are named as BuildOptions names them (gpus=), the command line's as it does
        self._api = not getattr(options, "command_line", False)
        if importlib.util.find_spec("ray") is None:
            import_ray(self._api)  # raises the UsageError that says how to install it
        self._device = project.settings.device
        # Without --ray-address, RAY_ADDRESS names the cluster, as it does for ray.init (`ray job submit`
        # sets it for its command): a local instance there would share the cluster's GPUs unseen.
        self._address = getattr(options, "ray_address", None) or os.environ.get("RAY_ADDRESS") or None
        self._gpus = getattr(options, "gpus", None)
        self._per_gpu = getattr(options, "per_gpu", 1) or 1
        self._ray = None
        self._connected_here = False  # this backend connected the process to Ray (started a local instance)
        self._lock = threading.Lock()
        self._mailbox = None
        self._worker_class = None
        self._workers = threading.Lock()  # guards the three below
        self._idle: list[_Worker] = []  # kept workers between steps, the oldest first
        self._busy: dict[str, _Worker] = {}  # step id -> the worker given it, until it ends
        self._ended: set[str] = set()  # steps whose worker the build ended (Ctrl-C): interrupted, not lost
        self._where: dict[str, str] = {}  # step id -> "node cuda:0", once placed
        self._asking = threading.Lock()
        self._asked = 0.0  # when the cluster's head was last asked
        self._silent_since: float | None = None  # when it first did not answer, since it last did
        self._lost = ""  # what to say once the head is lost
        # The cluster's GPUs as a build's start found them: a step asks no more (the call has no timeout,
        # and with the head lost between two steps it would wait until Ray ends the process).
        self._cluster_gpus: float | None = None

    # --- the cluster ----------------------------------------------------------------------------------

    def _connect(self):
        with self._lock:
            if self._ray is None:
                self._connected_here = connect(self._address, self._gpus, self._api)
                import ray

                # Started again if its process dies (killed, its node lost): the events it held are lost,
                # but the steps after them are seen; a call sent while it died is sent again once it is
                # back (max_task_retries), rather than failing unseen.
                self._mailbox = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Mailbox).remote()
                # No restarts, no retries: a lost worker is handled below, where it is said.
                self._worker_class = ray.remote(max_restarts=0, max_task_retries=0)(StepWorker)
                self._ray = ray
            return self._ray

    def _head_lost(self, ray) -> str:
        """What to say once the cluster's head (its GCS) has not answered for HEAD_LOST_S, else "". Ray ends
        the build's process itself a minute after, from its C++ code: without the build's summary, and
        while a train step could still have saved a checkpoint."""
        now = time.monotonic()
        if self._lost or now - self._asked < HEAD_ASKED_EVERY_S or not self._asking.acquire(blocking=False):
            return self._lost
        try:
            self._asked = now
            client = ray._private.worker.global_worker.gcs_client
            client.internal_kv_exists(b"dbl", b"dbl", timeout=HEAD_ASKED_EVERY_S)
            self._silent_since = None
        except AttributeError:  # another Ray version: Ray's own minute stays
            self._asked = math.inf
        except (ray.exceptions.RpcError, TimeoutError):
            self._silent_since = self._silent_since or now
            if time.monotonic() - self._silent_since >= HEAD_LOST_S:
                self._lost = (
                    f"the Ray cluster's head is lost (its GCS at {client.address} has not answered for "
                    f"{HEAD_LOST_S:g}s); rerun the build once it is back"
                )
        finally:
            self._asking.release()
        return self._lost

    def _gpus_in_cluster(self) -> float:
        if self._cluster_gpus is None:
            self._cluster_gpus = self._connect().cluster_resources().get("GPU", 0)
        return self._cluster_gpus

    def _uses_gpus(self) -> bool:
        if self._device.startswith(("cpu", "mps")):
            return False
        return self._device != "auto" or self._gpus_in_cluster() > 0

    def gpus_for(self, job: Job) -> float:
        """What the step's task reserves: P GPUs for a train step of P processes, else 1/--per-gpu."""
        if not self._uses_gpus():
            return 0
        need = job.num_processes if job.kind == "train" else 1
        return need if need > 1 else math.floor(10_000 / self._per_gpu) / 10_000

    def default_jobs(self) -> int:
        """Steps at once without -j: each GPU of the cluster × --per-gpu, or one step per node on CPUs."""
        ray = self._connect()
        gpus = self._gpus_in_cluster()
        if gpus and self._uses_gpus():
            return max(1, int(gpus * self._per_gpu))
        return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))

    def start(self) -> None:
        """Connect before the first step (a cluster that cannot be reached is a usage error, not a
        failure of each step), and see what GPUs the cluster has."""
        self._connect()
        self._cluster_gpus = None
        self._gpus_in_cluster()

    # --- one step -------------------------------------------------------------------------------------

    def run(self, job: Job, hooks: Hooks) -> Outcome:
        from runner.training.checkpoints import checkpoint_dirs

        if self._lost:  # Ray would wait for the head to place it
            raise StepError(f"{job.step_id}: not started: {self._lost}")
        gpus = self.gpus_for(job)
        self._check_placeable(job, gpus)
        retried = False
        while True:
            try:
                return self._run_once(job, hooks, gpus)
            except _IdleWorkerLost:
                continue  # another worker, or a new one
            except _WorkerLost as lost:
                if self._lost:
                    raise StepError(f"{job.step_id}: {self._lost}") from None
                checkpoints = checkpoint_dirs(job.work) if job.kind == "train" else []
                if retried or not checkpoints or hooks.should_stop():
                    raise StepError(str(lost)) from None
                retried = True
                # a warning: said without -v, as the lost worker is (Ray's own lines say it too)
                hooks.log(f"{WARNING}{lost}; running it once more, from {checkpoints[-1][1].name}")

    def _check_placeable(self, job: Job, gpus: float) -> None:
        """A local instance has no autoscaler: a step that needs more GPUs than it has would wait forever."""
        if self._address not in LOCAL or not gpus:
            return
        most = max(
            (n["Resources"].get("GPU", 0) for n in self._connect().nodes() if n.get("Alive")), default=0
        )
        if gpus > most:
            raise StepError(
                f"{job.step_id}: needs {gpus:g} GPU(s) on one node, and the local Ray instance has "
                f'{most:g}; on a machine without GPUs, set device = "cpu" in [project]'
            )

    def _run_once(self, job: Job, hooks: Hooks, gpus: float) -> Outcome:
        ray = self._connect()
        sid = job.step_id
        worker, kept = self._take(job, gpus)
        # A local instance's workers run on this machine: they take the thread count this process's
        # environment gives (OMP_NUM_THREADS), as the steps of an inline build do.
        omp = os.environ.get("OMP_NUM_THREADS") if self._address in LOCAL else None
        ref = worker.actor.run.options(name=f"dbl {sid}").remote(job, self._mailbox, omp)
        self._where.pop(sid, None)
        result = None
        try:
            result = self._wait(ray, ref, job, hooks, gpus)
        except _WorkerLost as lost:
            if kept and not lost.began:
                raise _IdleWorkerLost() from None
            raise
        except (KeyboardInterrupt, SystemExit):
            self._end(sid)  # a second Ctrl-C in a build of one step at a time
            raise
        finally:
            self._give_back(sid, reusable=result is not None and result[0] == "done")
            if job.stop_file is not None:
                begun_file(job.stop_file).unlink(missing_ok=True)
        if self._lost and result[0] != "done":  # stopped at a safe point, or failed, as the head was lost
            raise StepError(f"{sid}: {self._lost}")
        return reported_outcome(*result)

    def _take(self, job: Job, gpus: float) -> tuple[_Worker, bool]:
        """A worker for the step: an idle one that holds what it asks for (and True), or a new one. Idle
        workers of another kind end first: they hold GPUs (and a CPU) the new one may need."""
        key = (gpus, job.threads)
        with self._workers:
            worker = next((w for w in self._idle if w.key == key), None)
            kept = worker is not None
            if kept:
                self._idle.remove(worker)
            else:
                for other in self._idle:
                    self._kill(other)
                self._idle.clear()
                options = {"num_gpus": gpus, "num_cpus": 1}
                if not gpus:
                    options["scheduling_strategy"] = "SPREAD"  # CPU steps use every core of their node
                actor = self._worker_class.options(**options).remote()
                worker = _Worker(actor, key, actor.ready.remote())
            self._busy[job.step_id] = worker
            self._ended.discard(job.step_id)
        return worker, kept

    def _give_back(self, sid: str, reusable: bool) -> None:
        """Keep the step's worker for the next steps if it ended well and no new worker waits for Ray to
        place it (an idle one would keep it waiting for what it holds), else end it."""
        with self._workers:
            worker = self._busy.pop(sid, None)
            if worker is None:
                return
            if reusable and sid not in self._ended and all(self._placed(w) for w in self._busy.values()):
                self._idle.append(worker)
                return
        self._kill(worker)

    def _placed(self, worker: _Worker) -> bool:
        """Whether Ray has placed the worker and it has started (asked without waiting)."""
        if not worker.placed:
            done, _ = self._ray.wait([worker.ready], timeout=0)
            worker.placed = bool(done)
        return worker.placed

    def _end(self, sid: str) -> None:
        """End the worker of a step now, wherever it is in its work (or before it began): the step is
        interrupted, not lost."""
        with self._workers:
            worker = self._busy.get(sid)
            if worker is None:
                return
            self._ended.add(sid)
        self._kill(worker)

    def _kill(self, worker: _Worker) -> None:
        """End the worker's process, wherever it is (ending a dead one is nothing)."""
        with contextlib.suppress(Exception):  # the connection gone with the cluster's head
            self._ray.kill(worker.actor, no_restart=True)

    def _wait(self, ray, ref, job: Job, hooks: Hooks, gpus: float) -> tuple:
        from ray import exceptions

        sid = job.step_id
        submitted = noted = time.monotonic()
        stopping = False
        lost_at = None
        while True:
            if hooks.should_stop() and not stopping:
                stopping = True
                self._ask_to_stop(job)
                if not self._begun(job):
                    self._end(sid)  # not begun yet: it never will
            if self._head_lost(ray):  # asked to stop at a safe point, until Ray ends this process
                if lost_at is None:
                    lost_at = time.monotonic()
                    self._ask_to_stop(job)
                if sid not in self._where or time.monotonic() - lost_at > HEAD_LOST_STOP_S:
                    raise StepError(f"{sid}: {self._lost}")
            ready, _ = ray.wait([ref], timeout=POLL_S)
            self._deliver(ray, sid, hooks)
            if ready:
                break
            if sid not in self._where and time.monotonic() - noted > WAITING_NOTE_S:
                noted = time.monotonic()
                needs = f"{gpus:g} GPU" if gpus else "1 CPU"
                hooks.log(f"waiting {noted - submitted:.0f}s for Ray to place it (it needs {needs})")
        where = self._where.get(sid, "")
        try:
            result = ray.get(ref)
        except _lost(exceptions) as exc:
            if sid in self._ended:  # its worker ended by the build (Ctrl-C): Ray says it died
                raise StepInterrupted(
                    f"{sid} cancelled" if where else f"{sid} stopped before it started"
                ) from None
            if getattr(exc, "actor_init_failed", False):  # its worker could not start (dbl not on its node)
                raise StepError(f"{sid}: Ray could not run it: {_root_cause(exc)}") from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not where:  # lost before its worker said where it runs (its node, or the worker starting)
                raise _WorkerLost(
                    f"{sid}: Ray lost it before it started ({first})", began=self._begun(job)
                ) from None
            raise _WorkerLost(f"{sid}: its Ray worker on node {where.split()[0]} died ({first})") from None
        except exceptions.RayError as exc:
            raise StepError(f"{sid}: Ray could not run it: {_root_cause(exc)}") from None
        self._deliver(ray, sid, hooks)  # the worker's last events arrived before it returned
        return result

    def _begun(self, job: Job) -> bool:
        """Whether the step's worker has begun it; asked once its stop file is there. The worker leaves
        its begun file before it looks for the stop file: one that has not will see it, and not begin.
        What its worker said arrives a poll late: a step begun meanwhile was cancelled, anywhere in its work."""
        if job.stop_file is None:
            return job.step_id in self._where
        return begun_file(job.stop_file).exists()

    @staticmethod
    def _ask_to_stop(job: Job) -> None:
        if job.stop_file is not None:
            job.stop_file.parent.mkdir(parents=True, exist_ok=True)
            job.stop_file.touch()

    def _deliver(self, ray, sid: str, hooks: Hooks) -> None:
        """Hand the step's waiting events to its hooks."""
        try:
            events = ray.get(self._mailbox.take.remote(sid), timeout=30)
        except Exception:  # the mailbox's node is gone: the steps go on, unseen until they end
            return
        for kind, payload in events:
            if kind == "progress":
                done, total, metrics = payload
                hooks.progress(done, total, **metrics)
            elif kind == "log":
                hooks.log(payload)
            elif kind == "where":
                self._where[sid] = payload
                hooks.where(payload)
            # "end": the worker's last event, which it waits for

    # --- the builds of a watch ------------------------------------------------------------------------

    def next_build(self, project) -> None:
        """A watch's next build, of `project` as it is now: the workers kept by the builds before serve it."""
        self._device = project.settings.device
        self._cluster_gpus = None  # nodes may have come or gone since: start() looks again
        self._where.clear()
        self._ended.clear()

    def build_ended(self) -> None:
        """A watch's build ended: its workers are kept for the next, unless the cluster's head was lost
        (the next build connects afresh)."""
        if self._lost:
            self.close()
            self._lost, self._silent_since, self._asked = "", None, 0.0

    def kept(self) -> int:
        """How many workers are kept, idle, for the next steps."""
        with self._workers:
            return len(self._idle)

    def leave(self) -> str:
        """End the workers and, where this backend connected the process to Ray, the connection: a local
        instance it started stops (its processes hold some 650 MB). A watch with nothing to build for a
        while holds nothing; its next build connects afresh. What else ended, for the watch to say: "the
        local Ray instance", or ""."""
        ray = self._ray
        self.close()
        if ray is None or not self._connected_here:
            return ""
        ray.shutdown()
        return "the local Ray instance" if self._address in LOCAL else ""

    def cancel(self) -> None:
        """End every running step's worker at once (the second Ctrl-C)."""
        if self._ray is None:
            return
        for sid in list(self._busy):
            self._end(sid)

    def close(self) -> None:
        """End the workers and drop the mailbox. The Ray connection stays for this process's next build
        (`dbl watch`); Ray ends a local instance when the process exits."""
        if self._ray is None:
            return
        with self._workers:
            workers = [*self._idle, *self._busy.values()]
            self._idle.clear()
        if self._lost:  # nothing to end without the head; the next build connects afresh
            self._ray.shutdown()
        else:
            for worker in workers:
                self._kill(worker)
            self._ray.kill(self._mailbox)
        self._ray, self._cluster_gpus = None, None


def begun_file(stop_file):
    """The file a step's worker leaves as it begins the step, beside the step's stop file."""
    return stop_file.with_name(stop_file.name.replace(".stop-", ".begun-", 1))


class StepWorker:
    """A build's Ray worker (an actor): runs the steps it is given one after another, its base model kept
    loaded from one to the next, as a `-j` worker process does."""

    def ready(self) -> int:
        return os.getpid()

    def run(self, job: Job, mailbox, omp: str | None = None) -> tuple:
        try:
            return _run_in_worker(job, mailbox, omp)
        finally:
            release_cached_gpu_memory()  # a worker between steps keeps its model, not torch's cache


def _run_in_worker(job: Job, mailbox, omp: str | None = None) -> tuple:
    """Run the job in this worker process, its events to the mailbox. Returns ("done", Outcome),
    ("interrupted", message) or ("error", exception). `omp`: the build's own OMP_NUM_THREADS, for a
    worker of a local instance (the same for every step of a worker: torch reads it when it starts)."""
    import ray

    if job.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(job.threads)
    elif omp is not None:
        # Ray leaves a value the worker inherited, but it cannot be told from one Ray set: the build's.
        os.environ["OMP_NUM_THREADS"] = omp
    else:
        # Ray sets OMP_NUM_THREADS to the CPUs a task reserved (1); steps keep torch's own thread count
        # as they do in a build's own process, since the thread count changes the bytes they write.
        os.environ.pop("OMP_NUM_THREADS", None)
    quiet_openmp()
    quiet_library_notices()
    gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())  # Ray set CUDA_VISIBLE_DEVICES to these
    job = dataclasses.replace(job, devices=gpu_ids)
    node = socket.gethostname()
    where = f"{node} cuda:{','.join(gpu_ids)}" if gpu_ids else f"{node} cpu"
    sid = job.step_id

    def send(kind: str, payload) -> None:
        mailbox.put.remote(sid, (kind, payload))

    last = [0.0]

    def progress(done: int, total: int, **metrics) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            send("progress", (done, total, metrics))

    if job.stop_file is not None:  # see RayBackend._begun; no ray.get here: it would lend out the CPU
        job.stop_file.parent.mkdir(parents=True, exist_ok=True)
        begun_file(job.stop_file).touch()
        if job.stop_file.exists():
            return ("interrupted", f"{sid} stopped before it started")
    send("where", where)
    gpus = f", GPUs {','.join(gpu_ids)}" if gpu_ids else ""
    send("log", f"running on node {node} (worker pid {os.getpid()}{gpus})")
    hooks = Hooks(progress=progress, log=lambda message: send("log", message))
    result = run_reported(job, hooks, LazyModels(job.project))
    # The mailbox handles one caller's calls in order: once this one is done, every event is there.
    with contextlib.suppress(Exception):
        ray.get(mailbox.put.remote(sid, ("end", None)), timeout=60)
    return result


register("ray", RayBackend)
