"""`sslmed pack … --ray ADDRESS`: the same packing, fanned out over a Ray cluster.

The driver (the `pack` process) plans the inputs exactly as a single-machine pack does (keys, tags,
inputs already packed), then cuts them into tasks of up to TASK_VOLUMES inputs and TASK_BYTES input
bytes, smaller when the inputs are few, so that every worker gets several. A task reads, preprocesses
and writes its inputs with pack's own per-volume path into a staging folder `DIR/.task-<id>.tmp/` on
the shared output storage; when all are written it renames its shards (tar) or arrays (Zarr) into DIR
and returns their manifest entries and the fate of each input. The driver lists finished tasks' output
in manifest.json (atomically) and report.jsonl as they return (at most every COMMIT_EVERY_S seconds),
so an interrupted run leaves a valid dataset and a re-run packs only what is missing. Output of a
failed attempt is never listed.

Ray does placement and recovery: a task whose worker dies or that raises is retried up to
TASK_RETRIES times, then every input of the task is reported failed with the error. A bad volume is
not a task failure: it is a report line and the task goes on.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from hashlib import sha256
from pathlib import Path

import ray

from sslmed.errors import ConfigError, DataError, VolumeError
from sslmed.io.format import ZARR_STORE
from sslmed.io.pack import Ledger, open_writer, prepare, progress_bar, write_volume
from sslmed.io.parts import input_bytes

TASK_VOLUMES = 256  # inputs per task at most: minutes of work, a small loss when a task is retried
TASK_BYTES = 16e9  # input bytes per task at most
TASKS_PER_SLOT = 4  # with few inputs, cut tasks small enough that every worker gets this many
TASK_RETRIES = 3  # Ray retries a task this often (worker lost, or an exception) before giving up
COMMIT_EVERY_S = 30.0  # manifest rewrites at most this often (it grows to megabytes at 10⁵ volumes)
OBJECT_STORE_BYTES = 128 * 2**20  # tasks exchange only paths and manifest entries
CONNECT_TIMEOUT_S = 10.0


def check_ray_options(address: str, workers: int, cpus_per_task: float, memory_per_task: int | None) -> None:
    if address not in ("local", "auto"):
        _host_and_port(address)
    if int(workers) != 1:
        raise ConfigError("--workers sets processes on this machine; with --ray use --ray-cpus-per-task")
    if not float(cpus_per_task) > 0:
        raise ConfigError(f"CPUs per Ray task must be positive, not {cpus_per_task}")
    if memory_per_task is not None and not int(memory_per_task) > 0:
        raise ConfigError(f"memory per Ray task must be positive, not {memory_per_task}")


def pack_on_ray(jobs: list[tuple], ledger: Ledger, options: dict, layout: dict, *, address: str,
                cpus_per_task: float, memory_per_task: int | None, on_error: str,
                total: int) -> VolumeError | None:
    """Pack `jobs` (path, key, tags) on the cluster at `address`, committing each finished task to
    `ledger`. Returns the error to raise when `on_error` is 'fail' and an input failed, else None."""
    out = ledger.out.resolve()
    if not jobs:
        return None
    with ray_session(address):
        for stale in out.glob(".task-*.tmp"):  # a crashed run's staging; one driver per DIR (pack's lock)
            shutil.rmtree(stale, ignore_errors=True)
        if layout["fmt"] == "zarr":
            import zarr

            zarr.open_group(str(out / ZARR_STORE), mode="a", zarr_format=3)  # before tasks add arrays
        _check_feasible(cpus_per_task, memory_per_task)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
        spans = plan_tasks([input_bytes(job[0]) for job in jobs], slots)
        tasks = [jobs[span.start:span.stop] for span in spans]
        resources = {"num_cpus": cpus_per_task}
        if memory_per_task:
            resources["memory"] = int(memory_per_task)
        try:
            return _run_tasks(tasks, ledger, out, options, layout, resources, on_error, total)
        except ray.exceptions.RayError as exc:  # the cluster itself failed; finished tasks are committed
            raise DataError(f"the Ray cluster at {address} failed: {_last_line(exc)}; run the same "
                            "command again to resume") from None


def _check_feasible(cpus_per_task: float, memory_per_task: int | None) -> None:
    """A task that no node can hold would wait forever: refuse it, naming what the largest node has."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    memory = max((node.get("memory", 0) for node in nodes), default=0)
    if cpus_per_task > cpus:
        raise ConfigError(f"--ray-cpus-per-task {cpus_per_task:g}: no node of the Ray cluster has that "
                          f"many CPUs (the largest has {cpus:g})")
    if memory_per_task and memory_per_task > memory:
        raise ConfigError(f"--ray-memory-per-task {memory_per_task / 1e9:.1f} GB: no node of the Ray cluster "
                          f"has that much memory for tasks (the largest has {memory / 1e9:.1f} GB)")


def plan_tasks(sizes: list[int], slots: int) -> list[range]:
    """Contiguous runs of the inputs, each closed at TASK_VOLUMES inputs and TASK_BYTES bytes, or
    sooner when the inputs are few: then at 1/(TASKS_PER_SLOT × slots) of their count or bytes, so that
    each of `slots` workers gets about TASKS_PER_SLOT tasks."""
    spread = TASKS_PER_SLOT * slots
    max_bytes = min(TASK_BYTES, sum(sizes) / spread)
    max_volumes = min(TASK_VOLUMES, -(-len(sizes) // spread))
    tasks, start, held = [], 0, 0
    for index, size in enumerate(sizes):
        held += size
        if held >= max_bytes or index + 1 - start >= max_volumes:
            tasks.append(range(start, index + 1))
            start, held = index + 1, 0
    if start < len(sizes):
        tasks.append(range(start, len(sizes)))
    return tasks


def task_name(jobs: list[tuple]) -> str:
    """A task's name from its keys: keys are unique in a dataset, so no other task (of this run or a
    later one) shares its staging folder or shard names, and a re-run of the same task replaces them."""
    return "task-" + sha256("\n".join(job[1] for job in jobs).encode()).hexdigest()[:16]


def _run_tasks(tasks: list[list[tuple]], ledger: Ledger, out: Path, options: dict, layout: dict,
               resources: dict, on_error: str, total: int) -> VolumeError | None:
    remote = pack_task.options(**resources)
    pending = {remote.remote(task_name(task), str(out), [_absolute(job) for job in task], options, layout): i
               for i, task in enumerate(tasks)}
    first_new, finished = len(ledger.entries), {}
    progress = progress_bar(total, ledger.counts["skipped"])
    committed = -COMMIT_EVERY_S
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ref)
            entries, outcomes = _result(ref, tasks[index], out)
            finished[index] = entries
            # entries in task order, whatever order tasks finish in: the same run gives the same manifest
            ledger.entries[first_new:] = [e for i in sorted(finished) for e in finished[i]]
            for (path, key, _), (status, reason) in zip(tasks[index], outcomes, strict=True):
                ledger.record(path, status, reason, key)
            if time.monotonic() - committed >= COMMIT_EVERY_S:
                ledger.commit()
                committed = time.monotonic()
            progress.update(len(tasks[index]))
            failure = next((reason for status, reason in outcomes if status == "failed"), None)
            if failure is not None and on_error == "fail":
                return VolumeError(f"{failure} (stopped: --on-error fail)")
    finally:
        progress.close()
        _cancel(pending, tasks, out)
        ledger.commit()  # whatever finished, also when the driver is interrupted
    return None


def _result(ref, task: list[tuple], out: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """(manifest entries, (status, reason) per input) of a finished task; a task that failed for good
    reports each of its inputs as failed with the task's error."""
    try:
        result = ray.get(ref)
        return result["entries"], result["outcomes"]
    except ray.exceptions.RayError as exc:
        shutil.rmtree(out / f".{task_name(task)}.tmp", ignore_errors=True)
        reason = f"pack task failed after {TASK_RETRIES + 1} attempts: {_last_line(exc)}"
        return [], [("failed", f"{path}: {reason}") for path, _, _ in task]


def _cancel(pending: dict, tasks: list[list[tuple]], out: Path) -> None:
    """Stop tasks still running (on --on-error fail or an interrupted driver) and drop their staging."""
    if not pending:
        return
    for ref in pending:
        ray.cancel(ref, force=True)
    ray.wait(list(pending), num_returns=len(pending), timeout=60)
    for index in pending.values():
        shutil.rmtree(out / f".{task_name(tasks[index])}.tmp", ignore_errors=True)


def _absolute(job: tuple) -> tuple:
    """Workers may run elsewhere and in another working directory: give them absolute paths."""
    path, key, tags = job
    return Path(path).absolute(), key, tags


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---- the task (runs on a worker) ---------------------------------------------------------------


@ray.remote(max_retries=TASK_RETRIES, retry_exceptions=True)
def pack_task(name: str, out: str, jobs: list[tuple], options: dict, layout: dict) -> dict:
    """Read, preprocess and write `jobs` into staging, then rename the output into `out`.

    Returns {"entries": manifest entries, "outcomes": [(status, reason) per job]}."""
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    out_dir = Path(out)
    staging = out_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # what a failed attempt of this task left
    staging.mkdir()
    entries: list[dict] = []
    outcomes: list[tuple[str, str]] = []

    def record(path: Path, status: str, reason: str, key: str) -> None:
        outcomes.append((status, reason))

    writer = open_writer(staging, layout, entries, on_commit=lambda: None, names=partial(_shard_name, name))
    for job in jobs:
        write_volume(job, prepare(job[0], options), writer, record)
    writer.finish()
    for entry in entries:
        _publish(staging / entry["path"], out_dir / entry["path"])
    shutil.rmtree(staging)
    return {"entries": entries, "outcomes": outcomes}


def _shard_name(task: str, index: int) -> str:
    return f"shard-{task.removeprefix('task-')}-{index:04d}.tar"


def _publish(staged: Path, final: Path) -> None:
    """Rename a finished shard or array into the dataset. Whatever sits at `final` is unlisted output of
    an earlier attempt at the same keys (keys are unique), so it is replaced."""
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(staged, final)


# ---- the Ray session ---------------------------------------------------------------------------


@contextmanager
def ray_session(address: str):
    """Use the caller's Ray session, join `address` ('auto' or host:port), or start a local one
    ('local': this machine's cores, a private temp dir) for the duration."""
    if ray.is_initialized():
        yield
        return
    temp_dir = None
    if address == "local":
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Unix socket paths live under it
        ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, _temp_dir=temp_dir, log_to_driver=False,
                 configure_logging=False)
    else:
        _join(address)
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _join(address: str) -> None:
    """Connect to a running cluster. An unreachable host:port is refused at once: Ray itself would retry
    for minutes."""
    if address != "auto":
        host, port = _host_and_port(address)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise DataError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it "
                            "with `ray start --head`, or pack on this machine with --ray local") from None
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DataError(f"cannot join the Ray cluster at {address}: {_last_line(exc)}") from None


def _host_and_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray must be local, auto or HOST:PORT of a Ray head, not {address!r}")
    return host, int(port)
