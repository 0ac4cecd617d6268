"""`sslmed pack`: volumes → WebDataset tar shards or a Zarr v3 store, plus manifest.json and report.jsonl.

Reading and preprocessing run in worker processes; the parent writes results in input order, so the
output does not depend on `workers`. Every input gets one line in report.jsonl. The manifest is
rewritten atomically whenever written data is complete (after each shard, every few zarr arrays and
at the end), so an interrupted run leaves a valid dataset that a re-run extends.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path

import numpy as np

from sslmed import __version__
from sslmed.errors import ConfigError, DataError, SslmedError, VolumeError
from sslmed.io.format import CODECS, FORMAT_VERSION, MANIFEST, REPORT, write_json_atomic
from sslmed.io.preprocess import CT_WINDOW, DTYPES, MR_PERCENTILES, preprocess
from sslmed.io.readers import find_inputs, read_volume, suffix_of
from sslmed.io.writers import WdsWriter, ZarrWriter

Outcome = tuple[np.ndarray, dict] | str  # (stored array, metadata) or the reason it failed


def pack(inputs: Iterable[str | Path], out: str | Path, *, fmt: str = "wds",
         spacing: tuple[float, float, float] | None = None, modality: str = "auto", dtype: str = "int16",
         shard_size: float = 512e6, workers: int = 1, on_error: str = "skip", tags: str | Path | None = None,
         codec: str = "zstd", foreground_crop: bool = False, repair_nonfinite: bool = False,
         chunk: int = 64, atlas: str | Path | None = None) -> dict:
    """Pack `inputs` (files or folders) into `out`; with `atlas` (a template volume) each volume is
    registered to it and its metadata gains atlas coordinates (sslmed/io/register.py).

    Returns a summary: {"ok", "skipped", "failed", "samples", "voxels", "bytes", "out", "format"}."""
    _check_options(fmt, modality, dtype, shard_size, workers, on_error, codec, chunk, spacing)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output directory {out} ({exc.strerror or exc})") from exc
    settings = {"orientation": "RAS", "spacing": [float(s) for s in spacing] if spacing else None,
                "modality": modality, "dtype": dtype, "ct_window": list(CT_WINDOW),
                "mr_percentiles": list(MR_PERCENTILES), "foreground_crop": bool(foreground_crop)}
    if atlas:
        settings["atlas"] = str(Path(atlas).resolve())
    ledger = Ledger(out, _start_manifest(out, fmt, codec, settings))
    paths = find_inputs(inputs)
    if not paths:
        raise VolumeError(f"no input volumes found in {', '.join(str(p) for p in inputs)}")
    jobs = _plan(paths, ledger, read_tags(tags) if tags else None, tags)
    options = {"spacing": spacing, "modality": modality, "dtype": dtype, "foreground_crop": foreground_crop,
               "repair_nonfinite": repair_nonfinite, "atlas": settings.get("atlas")}
    common = {"codec": codec, "entries": ledger.entries, "on_commit": ledger.commit}
    if fmt == "wds":
        writer: WdsWriter | ZarrWriter = WdsWriter(out, shard_size=shard_size, **common)
    else:
        writer = ZarrWriter(out, chunk=chunk, **common)
    stopped = _write_all(jobs, _outcomes([job[0] for job in jobs], options, workers), writer, ledger,
                         on_error, total=len(paths))
    writer.finish()
    ledger.commit()
    if stopped is not None:
        raise stopped
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


def _plan(paths: list[Path], ledger: Ledger, tag_table: dict | None, tags_path) -> list[tuple]:
    """(path, key, tags) for each input still to pack; inputs already packed are recorded as skipped."""
    packed = ledger.packed_sources()
    used_keys = set(packed.values())
    jobs, matched_tags = [], set()
    for path in paths:
        source = str(path.resolve())
        if source in packed:
            ledger.record(path, "skipped", "already packed", packed[source])
            _tags_for(tag_table, path, packed[source], matched_tags)  # packed before, but not a typo
        else:
            key = unique_key(path, used_keys)
            jobs.append((path, key, _tags_for(tag_table, path, key, matched_tags)))
    _warn_unmatched_tags(tag_table, matched_tags, tags_path)
    return jobs


def _write_all(jobs: list[tuple], outcomes: Iterator[Outcome], writer: WdsWriter | ZarrWriter, ledger: Ledger,
               on_error: str, total: int) -> VolumeError | None:
    """Write each prepared volume in input order. Returns the error to raise when `on_error` is 'fail'
    and an input failed (after what came before it is committed), else None."""
    from tqdm import tqdm

    progress = tqdm(total=total, initial=ledger.counts["skipped"], desc="pack", unit="vol", file=sys.stderr)
    try:
        for (path, key, sample_tags), outcome in zip(jobs, outcomes, strict=False):
            progress.update(1)
            if isinstance(outcome, str):
                ledger.record(path, "failed", outcome, key)
                if on_error == "fail":
                    return VolumeError(f"{outcome} (stopped: --on-error fail)")
                continue
            array, meta = outcome
            meta = {"key": key, **meta, "source": str(path.resolve()), "tags": sample_tags}
            writer.add(key, meta["source"], array, meta)
            ledger.record(path, "ok", "", key)
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
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)
    queue = iter(paths)
    in_flight = deque((path, pool.submit(prepare, path, options)) for path in islice(queue, 2 * workers))
    try:
        while in_flight:
            path, future = in_flight.popleft()
            try:
                outcome = future.result()
            except BrokenProcessPool as exc:
                raise SslmedError(f"a worker process died while reading {path} (out of memory?); "
                                  "try fewer --workers") from exc
            following = next(queue, None)
            if following is not None:
                in_flight.append((following, pool.submit(prepare, following, options)))
            yield outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already; more threads only contend


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
