"""`sslmed pack`: volumes → WebDataset tar shards or a Zarr v3 store, plus manifest.json and report.jsonl.

Reading and preprocessing run in worker processes; the parent writes results in input order, so the
output does not depend on `workers`. Every input gets one line in report.jsonl. The manifest is
rewritten atomically whenever written data is complete (after each shard, every few zarr arrays and
at the end), so an interrupted run leaves a valid dataset that a re-run extends.

The same entry packs over a Ray cluster (`ray`, see pack_ray.py) or one part of a split for job arrays
(`part`, see parts.py); both plan keys and tags here and write each volume with `write_volume`.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path

import numpy as np

from sslmed import __version__
from sslmed.errors import ConfigError, DataError, SslmedError, VolumeError
from sslmed.io.format import CODECS, FORMAT_VERSION, MANIFEST, REPORT, shard_name, write_json_atomic
from sslmed.io.parts import finish_part, part_dir, start_part
from sslmed.io.preprocess import CT_WINDOW, DTYPES, MR_PERCENTILES, preprocess
from sslmed.io.readers import find_inputs, read_volume, suffix_of
from sslmed.io.writers import WdsWriter, ZarrWriter
from sslmed.lock import DirectoryLock

Outcome = tuple[np.ndarray, dict] | str  # (stored array, metadata) or the reason it failed


def pack(inputs: Iterable[str | Path], out: str | Path, *, fmt: str = "wds",
         spacing: tuple[float, float, float] | None = None, modality: str = "auto", dtype: str = "int16",
         shard_size: float = 512e6, workers: int = 1, on_error: str = "skip", tags: str | Path | None = None,
         codec: str = "zstd", foreground_crop: bool = False, repair_nonfinite: bool = False,
         chunk: int = 64, ray: str | None = None, ray_cpus_per_task: float = 1.0,
         ray_memory_per_task: int | None = None, part: tuple[int, int] | None = None,
         atlas: str | Path | None = None) -> dict:
    """Pack `inputs` (files or folders) into `out`: here with `workers` processes, or over the Ray
    cluster at `ray` ("local", "auto" or host:port) with the given CPUs and memory bytes per task.
    `part` (I, N) packs only the I-th of N parts of the inputs, into out/parts/I. With `atlas` (a
    template volume) each volume is registered to it and its metadata gains atlas coordinates
    (sslmed/io/register.py).

    Returns a summary: {"ok", "skipped", "failed", "samples", "voxels", "bytes", "out", "format"}."""
    _check_options(fmt, modality, dtype, shard_size, workers, on_error, codec, chunk, spacing)
    if ray:
        from sslmed.io.pack_ray import check_ray_options

        check_ray_options(ray, workers, ray_cpus_per_task, ray_memory_per_task)
    out = Path(out) if part is None else part_dir(out, part)
    settings = _settings(spacing, modality, dtype, foreground_crop, atlas)
    options = {"spacing": spacing, "modality": modality, "dtype": dtype, "foreground_crop": foreground_crop,
               "repair_nonfinite": repair_nonfinite, "atlas": settings.get("atlas")}
    layout = {"fmt": fmt, "codec": codec, "shard_size": shard_size, "chunk": chunk}
    ray_options = {"address": ray, "cpus_per_task": ray_cpus_per_task, "memory_per_task": ray_memory_per_task}
    # One writer per directory (each part has its own): a second pack into it is refused, naming the first.
    with DirectoryLock(out, "sslmed pack"):
        ledger = Ledger(out, _start_manifest(out, fmt, codec, settings))
        paths, refused = _inputs(inputs, ledger)
        selected = start_part(ledger.manifest, out, paths, part) if part is not None else range(len(paths))
        jobs = _plan(paths, ledger, read_tags(tags) if tags else None, tags, selected)
        total = len(selected) + refused
        if ray:
            from sslmed.io.pack_ray import pack_on_ray

            stopped = pack_on_ray(jobs, ledger, options, layout, on_error=on_error, total=total,
                                  **ray_options)
        else:
            writer = open_writer(out, layout, ledger.entries, ledger.commit)
            stopped = _write_all(jobs, _outcomes([job[0] for job in jobs], options, workers), writer, ledger,
                                 on_error, total=total)
            writer.finish()
        if part is not None:
            finish_part(ledger.manifest, complete=stopped is None)
        ledger.commit()
        if stopped is not None:
            raise stopped
        return _summary(ledger, out, fmt)


def _settings(spacing: tuple[float, float, float] | None, modality: str, dtype: str, foreground_crop: bool,
              atlas: str | Path | None) -> dict:
    """The preprocessing settings a manifest records (a resumed pack must match them)."""
    settings = {"orientation": "RAS", "spacing": [float(s) for s in spacing] if spacing else None,
                "modality": modality, "dtype": dtype, "ct_window": list(CT_WINDOW),
                "mr_percentiles": list(MR_PERCENTILES), "foreground_crop": bool(foreground_crop)}
    if atlas:
        settings["atlas"] = str(Path(atlas).resolve())
    return settings


def _inputs(inputs: Iterable[str | Path], ledger: Ledger) -> tuple[list[Path], int]:
    """The input volumes, and how many paths were refused (symlink loops and cycles: reported, never
    followed)."""
    refused: list[tuple[Path, str]] = []
    paths = find_inputs(inputs, refused)
    for path, reason in refused:
        ledger.record(path, "skipped", reason, "")
        print(f"sslmed pack: skipping {path}: {reason}", file=sys.stderr)
    if not paths:
        raise VolumeError(f"no input volumes found in {', '.join(str(p) for p in inputs)}")
    return paths, len(refused)


def _summary(ledger: Ledger, out: Path, fmt: str) -> dict:
    manifest, counts = ledger.manifest, ledger.counts
    summary = {**counts, "samples": manifest["samples"], "voxels": manifest["voxels"],
               "bytes": manifest["bytes"], "out": str(out), "format": fmt}
    print(f"sslmed pack: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"{summary['samples']} samples, {_human(summary['bytes'])} in {out}")
    return summary


class Ledger:
    """The manifest and report of one output directory: report lines wait until the data they describe
    is committed, then the manifest is replaced atomically and the lines are appended."""

    def __init__(self, out: Path, manifest: dict) -> None:
        self.out, self.manifest = out, manifest
        self.entries: list[dict] = manifest["shards" if manifest["format"] == "wds" else "arrays"]
        self.counts = {"ok": 0, "skipped": 0, "failed": 0}
        self.pending: list[dict] = []

    def record(self, path: Path, status: str, reason: str, key: str) -> None:
        self.counts[status] += 1
        self.pending.append({"path": str(path), "status": status, "reason": reason, "key": key})

    def commit(self) -> None:
        write_json_atomic(self.out / MANIFEST, _finalise(self.manifest, self.entries))
        with open(self.out / REPORT, "a") as report:
            report.writelines(json.dumps(line) + "\n" for line in self.pending)
        self.pending.clear()

    def packed_sources(self) -> dict[str, str]:
        """source path → key of everything the manifest lists as complete."""
        if self.manifest["format"] == "wds":
            return {s: k for e in self.entries for s, k in zip(e["sources"], e["keys"], strict=True)}
        return {e["source"]: e["key"] for e in self.entries}


def _plan(paths: list[Path], ledger: Ledger, tag_table: dict | None, tags_path,
          selected: range) -> list[tuple]:
    """(path, key, tags) for each input of `selected` still to pack; those already packed are recorded as
    skipped. Keys are planned over all inputs, so every part of a split names its samples as one pack of
    all the inputs would."""
    packed = ledger.packed_sources()
    used_keys = set(packed.values())
    jobs, matched_tags = [], set()
    for index, path in enumerate(paths):
        source = str(path.resolve())
        if source in packed:
            if index in selected:
                ledger.record(path, "skipped", "already packed", packed[source])
            _tags_for(tag_table, path, packed[source], matched_tags)  # packed before, but not a typo
        else:
            key = unique_key(path, used_keys)
            sample_tags = _tags_for(tag_table, path, key, matched_tags)
            if index in selected:
                jobs.append((path, key, sample_tags))
    _warn_unmatched_tags(tag_table, matched_tags, tags_path)
    return jobs


def open_writer(out: Path, layout: dict, entries: list[dict], on_commit: Callable[[], None],
                names: Callable[[int], str] = shard_name) -> WdsWriter | ZarrWriter:
    """The writer of `layout["fmt"]` into `out`; `names` names tar shards by their index."""
    common = {"codec": layout["codec"], "entries": entries, "on_commit": on_commit}
    if layout["fmt"] == "wds":
        return WdsWriter(out, shard_size=layout["shard_size"], names=names, **common)
    return ZarrWriter(out, chunk=layout["chunk"], **common)


def write_volume(job: tuple, outcome: Outcome, writer: WdsWriter | ZarrWriter,
                 record: Callable[[Path, str, str, str], None]) -> str | None:
    """Write one prepared input and record its fate; returns why it failed, or None."""
    path, key, sample_tags = job
    if isinstance(outcome, str):
        record(path, "failed", outcome, key)
        return outcome
    array, meta = outcome
    meta = {"key": key, **meta, "source": str(path.resolve()), "tags": sample_tags}
    writer.add(key, meta["source"], array, meta)
    record(path, "ok", "", key)
    return None


def progress_bar(total: int, done: int, desc: str = "pack"):
    """The driver's progress: volumes done of `total`, and volumes per second (a bar on a terminal,
    plain lines in a log file)."""
    from sslmed.progress import progress

    return progress(total, initial=done, desc=desc, unit="vol")


def _write_all(jobs: list[tuple], outcomes: Iterator[Outcome], writer: WdsWriter | ZarrWriter, ledger: Ledger,
               on_error: str, total: int) -> VolumeError | None:
    """Write each prepared volume in input order. Returns the error to raise when `on_error` is 'fail'
    and an input failed (after what came before it is committed), else None."""
    progress = progress_bar(total, ledger.counts["skipped"])
    try:
        for job, outcome in zip(jobs, outcomes, strict=False):
            progress.update(1)
            failure = write_volume(job, outcome, writer, ledger.record)
            if failure is not None and on_error == "fail":
                return VolumeError(f"{failure} (stopped: --on-error fail)")
    finally:
        # on an unexpected error the open shard stays a .tmp file and is never listed: a re-run redoes it
        outcomes.close()
        progress.close()
    return None


def _check_options(fmt, modality, dtype, shard_size, workers, on_error, codec, chunk, spacing) -> None:
    checks = [
        (fmt in ("wds", "zarr"), f"format must be wds or zarr, not {fmt!r}"),
        (modality in ("ct", "mr", "auto"), f"modality must be ct, mr or auto, not {modality!r}"),
        (dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}"),
        (float(shard_size) > 0, f"shard size must be positive, not {shard_size}"),
        (int(workers) >= 1, f"workers must be >= 1, not {workers}"),
        (on_error in ("skip", "fail"), f"on_error must be skip or fail, not {on_error!r}"),
        (codec in CODECS, f"codec must be one of {', '.join(CODECS)}, not {codec!r}"),
        (int(chunk) >= 1, f"chunk must be >= 1, not {chunk}"),
        (spacing is None or (len(spacing) == 3 and all(0 < float(s) <= 20 for s in spacing)),
         f"spacing must be three values in (0, 20] mm, not {spacing}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _start_manifest(out: Path, fmt: str, codec: str, settings: dict) -> dict:
    """The existing manifest (a resumed run, checked for compatible settings) or a fresh one."""
    if (out / MANIFEST).exists():
        from sslmed.io.manifest import load_manifest

        manifest = load_manifest(out)
        previous = (manifest["format"], manifest["codec"], manifest["preprocessing"])
        if previous != (fmt, codec, settings):
            raise DataError(f"{out} already holds a dataset packed with different settings "
                            f"(format {previous[0]}, codec {previous[1]}, preprocessing {previous[2]}); "
                            "pack into a new --out directory")
        return manifest
    return new_manifest(fmt, codec, settings)


def new_manifest(fmt: str, codec: str, settings: dict) -> dict:
    """The manifest of an empty dataset (`pack`, and `derive` for derived datasets)."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"sslmed_version": __version__, "format_version": FORMAT_VERSION, "format": fmt, "codec": codec,
            "created": now, "preprocessing": settings, "samples": 0, "voxels": 0, "bytes": 0,
            "shards" if fmt == "wds" else "arrays": []}


def _finalise(manifest: dict, entries: list[dict]) -> dict:
    manifest["samples"] = sum(e.get("samples", 1) for e in entries)
    manifest["voxels"] = sum(e["voxels"] for e in entries)
    manifest["bytes"] = sum(e["bytes"] for e in entries)
    manifest["sslmed_version"] = __version__
    return manifest


def _outcomes(paths: list[Path], options: dict, workers: int) -> Iterator[Outcome]:
    """Read + preprocess each path, yielding outcomes in input order (at most 2×workers in flight)."""
    if workers <= 1:
        yield from (prepare(path, options) for path in paths)
        return
    import multiprocessing

    # forkserver: a fresh single-threaded process imports torch/MONAI once and forks the workers from
    # it; forking this process could copy threads (zarr's event loop, OpenMP) in a locked state
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sslmed.io.pack", "torch", "monai.transforms", "monai.data"])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(os.getpid(),))
    queue = iter(paths)
    in_flight: deque = deque()
    path = None
    try:
        # a dead worker breaks the pool: result() and any later submit() raise BrokenProcessPool
        in_flight.extend((p, pool.submit(prepare, p, options)) for p in islice(queue, 2 * workers))
        while in_flight:
            path, future = in_flight.popleft()
            outcome = future.result()
            following = next(queue, None)
            if following is not None:
                in_flight.append((following, pool.submit(prepare, following, options)))
            yield outcome
    except BrokenProcessPool:
        raise SslmedError(f"a worker process died while reading {path} (out of memory?); "
                          "try fewer --workers") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(pack_pid: int) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already; more threads only contend
    exit_with(pack_pid)


def exit_with(pid: int) -> None:
    """End this worker the moment process `pid` (the pack that started it) is gone, even by kill -9.
    A worker's parent is the forkserver, which itself waits for its workers, and a busy worker only
    notices its closed task pipe after the volume at hand: without this it keeps running (and its
    gigabytes) for as long as that volume takes."""
    import os
    import select
    import threading
    import time

    def watch() -> None:
        try:
            select.select([os.pidfd_open(pid)], [], [])  # readable when the process exits (Linux >= 5.3)
        except (AttributeError, OSError):
            while _running(pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-pack", daemon=True).start()


def _running(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(path: Path, options: dict) -> Outcome:
    """Read and preprocess one input; a failure comes back as its reason, never as an exception."""
    try:
        volume = read_volume(path, repair_nonfinite=options["repair_nonfinite"])
        array, meta = preprocess(volume, spacing=options["spacing"], modality=options["modality"],
                                 dtype=options["dtype"], foreground_crop=options["foreground_crop"])
        if options["atlas"]:
            from sslmed.io.register import register_to_atlas

            meta.update(register_to_atlas(array, meta, options["atlas"]))
    except SslmedError as exc:
        return str(exc) if str(path) in str(exc) else f"{path}: {exc}"
    except Exception as exc:  # an unexpected failure on one input must not lose the others
        return f"{path}: unexpected error in preprocessing ({type(exc).__name__}: {exc})"
    extra = {k: volume.meta[k] for k in ("format", "nonfinite_repaired") if k in volume.meta}
    return array, {**meta, **extra}


def unique_key(path: Path, used: set[str]) -> str:
    """A key from the file (or DICOM folder) name: [A-Za-z0-9_-] only, `_1`, `_2`… on clashes."""
    name = path.name
    suffix = suffix_of(path)
    if not path.is_dir() and suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "volume"
    key, n = stem, 0
    while key in used:
        n += 1
        key = f"{stem}_{n}"
    used.add(key)
    return key


def read_tags(csv_path: str | Path) -> dict[str, dict[str, dict[str, str]]]:
    """Tags CSV → {"path": {path or file name: tags}, "key": {key: tags}}."""
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read tags CSV ({exc})") from exc
    columns = set(rows[0]) if rows else set()
    if not columns & {"path", "key"}:
        raise DataError(f"{csv_path}: tags CSV needs a 'path' or 'key' column (found {sorted(columns)})")
    table: dict[str, dict[str, dict[str, str]]] = {"path": {}, "key": {}}
    for row in rows:
        tags = {k: str(v) for k, v in row.items() if k not in ("path", "key") and k and v not in (None, "")}
        for column in ("path", "key"):
            if row.get(column):
                table[column].setdefault(row[column].strip(), {}).update(tags)
    return table


def _tags_for(table: dict | None, path: Path, key: str, matched: set[tuple[str, str]]) -> dict[str, str]:
    """The tags of one input (by file name, path as given, absolute path, then key); notes what matched."""
    if not table:
        return {}
    tags: dict[str, str] = {}
    for column, candidate in (("path", path.name), ("path", str(path)), ("path", str(path.resolve())),
                              ("key", key)):
        if candidate in table[column]:
            tags.update(table[column][candidate])
            matched.add((column, candidate))
    return tags


def _warn_unmatched_tags(table: dict | None, matched: set[tuple[str, str]], csv_path) -> None:
    """A tag row that names no input is most likely a typo: say so rather than drop it silently."""
    if not table:
        return
    unmatched = [value for column in ("path", "key") for value in table[column]
                 if (column, value) not in matched]
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" …" if len(unmatched) > 5 else "")
        print(f"sslmed pack: warning: {len(unmatched)} row(s) of {csv_path} match no input: {shown}",
              file=sys.stderr)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
