"""Packing in parts, for job arrays without Ray: `sslmed pack … --part I/N` packs the I-th of N parts of
the inputs into DIR/parts/I; `sslmed merge DIR` joins the finished parts into one dataset in DIR.

A part is a contiguous run of the input list (in the order `find_inputs` gives), cut so that the parts
hold about equal input bytes. Every part plans keys over the whole list, so the merged dataset has the
keys, samples and sample order of one pack of all the inputs. A part's manifest records its place in
the split: `"part": {"index", "count", "inputs", "input_list_sha256", "complete"}` (the checksum covers
every input's absolute path and size, so parts cut from a different list are told apart).

Merge moves each part's shards and arrays into DIR (renames, so DIR/parts and DIR must share one file
system), then writes DIR/manifest.json and DIR/report.jsonl (one line per input) atomically. It refuses
parts of another split, parts that overlap, and missing or unfinished parts, naming them; run again
after an interruption, it finishes the job.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sslmed.errors import ConfigError, DataError
from sslmed.io.format import MANIFEST, REPORT, ZARR_STORE, write_atomic, write_json_atomic
from sslmed.lock import DirectoryLock

PARTS = "parts"


def check_part(part: tuple[int, int]) -> tuple[int, int]:
    index, count = part
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ConfigError(f"part must be I/N with 0 <= I < N, not {index}/{count}")
    return index, count


def part_dir(out: str | Path, part: tuple[int, int]) -> Path:
    index, _ = check_part(part)
    return Path(out) / PARTS / str(index)


def input_bytes(path: Path) -> int:
    """Bytes one input holds: the file, or the files of a DICOM series folder; 0 when unreadable."""
    try:
        if path.is_dir():
            return sum(child.stat().st_size for child in path.iterdir() if child.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def balanced_ranges(sizes: list[int], count: int) -> list[range]:
    """`count` contiguous ranges of the inputs, each holding about 1/count of the bytes (an input weighs
    at least one byte, so empty and missing inputs are spread too); some may be empty."""
    cumulative = np.cumsum(np.asarray(sizes, dtype=np.float64) + 1.0)
    total = cumulative[-1] if len(sizes) else 0.0
    bounds = [0, *(int(np.searchsorted(cumulative, total * k / count, side="right"))
                   for k in range(1, count)), len(sizes)]
    return [range(bounds[k], bounds[k + 1]) for k in range(count)]


def start_part(manifest: dict, out: Path, paths: list[Path], part: tuple[int, int]) -> range:
    """Record the part in its manifest (unfinished until `finish_part`) and return the indices of its
    inputs. A part directory resumed from another split or input list is refused."""
    index, count = check_part(part)
    sizes = [input_bytes(path) for path in paths]
    record = {"index": index, "count": count, "inputs": len(paths),
              "input_list_sha256": _input_list_sha256(paths, sizes), "complete": False}
    previous = manifest.get("part")
    fixed = ("index", "count", "inputs", "input_list_sha256")
    if previous is not None and any(previous.get(k) != record[k] for k in fixed):
        raise DataError(f"{out} holds part {previous.get('index')}/{previous.get('count')} of another input "
                        "list (inputs added, removed or changed since); pack the new list into a new --out")
    manifest["part"] = record
    return balanced_ranges(sizes, count)[index]


def finish_part(manifest: dict, complete: bool) -> None:
    manifest["part"]["complete"] = bool(complete)


def _input_list_sha256(paths: list[Path], sizes: list[int]) -> str:
    listing = "".join(f"{path.resolve()}\t{size}\n" for path, size in zip(paths, sizes, strict=True))
    return hashlib.sha256(listing.encode()).hexdigest()


# ---- merge ------------------------------------------------------------------------------------------


def merge(directory: str | Path) -> dict:
    """Join DIR/parts/* into the dataset DIR; returns {"parts", "samples", "ok", "skipped", "failed"}."""
    from sslmed.io.manifest import load_manifest

    directory = Path(directory)
    with DirectoryLock(directory, "sslmed merge"):  # no pack or merge writes DIR meanwhile
        if (directory / MANIFEST).is_file() and "merged_from" not in load_manifest(directory):
            raise DataError(f"{directory} already holds a packed dataset that is not a merge of parts")
        parts = _finished_parts(directory)
        _refuse_overlaps(parts)
        merged = _merged_manifest(parts)
        if merged["format"] == "zarr":
            import zarr

            zarr.open_group(str(directory / ZARR_STORE), mode="a", zarr_format=3)
        for index, manifest in parts.items():
            for entry in manifest["shards" if manifest["format"] == "wds" else "arrays"]:
                source = directory / PARTS / str(index) / entry["path"]
                _move(source, directory / _merged_path(index, entry["path"]))
        lines = _merged_report(directory, parts)
        write_json_atomic(directory / MANIFEST, merged)
        write_atomic(directory / REPORT, "".join(json.dumps(line) + "\n" for line in lines).encode())
        counts = {status: sum(line["status"] == status for line in lines)
                  for status in ("ok", "skipped", "failed")}
        print(f"sslmed merge: {len(parts)} parts, {merged['samples']} samples; {counts['ok']} ok, "
              f"{counts['skipped']} skipped, {counts['failed']} failed in {directory}")
        return {"parts": len(parts), "samples": merged["samples"], **counts}


def _finished_parts(directory: Path) -> dict[int, dict]:
    """index → manifest of every part, checked to be one complete split of one input list."""
    from sslmed.io.manifest import load_manifest

    root = directory / PARTS
    found = {int(child.name): load_manifest(child) for child in sorted(root.iterdir())
             if child.name.isdigit() and (child / MANIFEST).is_file()} if root.is_dir() else {}
    if not found:
        raise DataError(f"{directory}: no parts to merge (packed with `sslmed pack … --out {directory} "
                        "--part I/N`, each in parts/I)")
    records = {index: manifest.get("part") or {} for index, manifest in found.items()}
    strays = [index for index, record in records.items() if record.get("index") != index]
    if strays:
        raise DataError(f"{directory}: parts/{strays[0]} was not packed with --part {strays[0]}/N")
    first = min(found)
    split = (records[first]["count"], records[first]["input_list_sha256"])
    settings = _settings(found[first])
    foreign = [i for i in found if (records[i]["count"], records[i]["input_list_sha256"]) != split
               or _settings(found[i]) != settings]
    if foreign:
        raise DataError(f"{directory}: part(s) {_names(foreign)} belong to another split than part {first} "
                        "(another N, input list, format or preprocessing)")
    count = split[0]
    missing = [i for i in range(count) if i not in found]
    unfinished = [i for i in found if not records[i]["complete"]]
    if missing or unfinished:
        problems = ([f"part(s) {_names(missing)} of {count} missing"] if missing else []) + \
                   ([f"part(s) {_names(unfinished)} unfinished"] if unfinished else [])
        raise DataError(f"{directory}: cannot merge: {'; '.join(problems)}; (re)run `sslmed pack … "
                        f"--out {directory} --part I/{count}` for each")
    return dict(sorted(found.items()))


def _settings(manifest: dict) -> tuple:
    return manifest["format"], manifest["codec"], json.dumps(manifest["preprocessing"], sort_keys=True)


def _names(indices: list[int]) -> str:
    return ", ".join(map(str, indices))


def _refuse_overlaps(parts: dict[int, dict]) -> None:
    """A key or a source in two parts would make two samples of one: refuse, naming the first."""
    owner: dict[tuple[str, str], int] = {}
    for index, manifest in parts.items():
        for kind, value in _keys_and_sources(manifest):
            other = owner.setdefault((kind, value), index)
            if other != index:
                raise DataError(f"parts {other} and {index} both hold {kind} {value!r}: the parts overlap; "
                                "were they packed from different input lists?")


def _keys_and_sources(manifest: dict):
    if manifest["format"] == "wds":
        for entry in manifest["shards"]:
            yield from (("key", key) for key in entry["keys"])
            yield from (("source", source) for source in entry["sources"])
    else:
        for entry in manifest["arrays"]:
            yield "key", entry["key"]
            yield "source", entry["source"]


def _merged_path(index: int, path: str) -> str:
    """Where a part's shard or array lives in the merged dataset: arrays keep their place in
    volumes.zarr (keys are unique over all parts), shards get the part's number in their name."""
    return path if path.startswith(f"{ZARR_STORE}/") else f"p{index:05d}-{path}"


def _merged_manifest(parts: dict[int, dict]) -> dict:
    first = next(iter(parts.values()))
    kind = "shards" if first["format"] == "wds" else "arrays"
    entries = [{**entry, "path": _merged_path(index, entry["path"])}
               for index, manifest in parts.items() for entry in manifest[kind]]
    merged = {k: v for k, v in first.items() if k not in ("part", "shards", "arrays")}
    merged.update({
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "samples": sum(e.get("samples", 1) for e in entries), "voxels": sum(e["voxels"] for e in entries),
        "bytes": sum(e["bytes"] for e in entries), kind: entries,
        "merged_from": {"parts": len(parts), "input_list_sha256": first["part"]["input_list_sha256"]},
    })
    return merged


def _move(source: Path, target: Path) -> None:
    """Rename a part's shard or array into the merged dataset; already moved by an interrupted merge
    is fine, anything else missing is refused."""
    if source.exists():
        if target.exists():
            raise DataError(f"cannot merge: both {source} and {target} exist; remove the one that is not "
                            "the part's data")
        os.replace(source, target)
    elif not target.exists():
        raise DataError(f"cannot merge: {source} is missing (listed in its part's manifest)")


def _merged_report(directory: Path, parts: dict[int, dict]) -> list[dict]:
    """One line per input: its 'ok' line if any (a resumed part also logs 'already packed'), else its
    last line. Every input of the split must be accounted for."""
    final: dict[str, dict] = {}
    for index in parts:
        report = directory / PARTS / str(index) / REPORT
        try:
            lines = [json.loads(text) for text in report.read_text().splitlines() if text.strip()]
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot merge: {report} is unreadable ({exc})") from exc
        for line in lines:
            if final.get(line["path"], {}).get("status") != "ok":
                final[line["path"]] = line
    expected = next(iter(parts.values()))["part"]["inputs"]
    if len(final) != expected:
        raise DataError(f"cannot merge: the parts' reports account for {len(final)} of {expected} inputs")
    return list(final.values())
