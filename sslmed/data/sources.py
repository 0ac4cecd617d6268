"""Packed datasets (shards/README.md): random access and per-unit sample streams, for both formats.

A *unit* is what the streaming pipeline splits across ranks and workers: a tar shard (format "wds")
or one Zarr array (format "zarr"). A streamed `Sample` carries its metadata and a `load()` thunk, so
the pipeline can walk past samples (to resume at a position) without decompressing them.
"""

from __future__ import annotations

import json
import logging
import shlex
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zarr
import zarr.storage

from sslmed.errors import DataError
from sslmed.io.format import (
    META_EXTENSION,
    NPY_HEADER_LIMIT,
    TARGET,
    TARGET_STORE,
    VOLUME_EXTENSIONS,
    Span,
    check_meta,
    check_payload,
    decode_volume,
    is_shard_name,
    map_span,
    missing_files,
    read_span,
    tar_sample,
    tar_samples,
    target_encoding,
    target_member,
    target_meta,
    to_float,
    volume_member,
)
from sslmed.io.manifest import decode_target, load_manifest

log = logging.getLogger(__name__)



@dataclass
class StoredVolume:
    """A packed volume as stored (numpy, or a lazy zarr.Array) with its scale and offset back to
    normalised float32 intensity — unlike `sslmed.io.readers.Volume`, an input file's raw array."""

    array: Any  # anything sliceable like an ndarray: np.ndarray or zarr.Array (slicing reads only its chunks)
    scale: float
    offset: float
    target: Any = None  # a derived dataset's target, voxel-aligned with `array` (float16/32), sliceable alike

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    def read(self) -> np.ndarray:
        return to_float(np.asarray(self.array[...]), self.scale, self.offset)

    def read_crop(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """The crop [start, start + size), zero outside the volume; reads and converts only the overlap."""
        src, dst = overlap(start, size, self.shape)
        inside = all(s.stop - s.start == int(n) for s, n in zip(src, size, strict=True))
        out = (np.empty if inside else np.zeros)(tuple(int(s) for s in size), dtype=np.float32)
        region = out[tuple(dst)]
        if region.size:
            to_float(self.array[tuple(src)], self.scale, self.offset, out=region)
        return out

    def read_stored_crop(self, start: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The crop as stored (int16 / uint8 / float16, zero outside the volume) and the box (3, 2) of
        its voxels that lie inside the volume: `to_float` of the crop, zeroed outside the box, is
        `read_crop`. The conversion is left to the training device (fewer bytes on the way there)."""
        return stored_crop(self.array, start, size, self.shape)

    def read_target_crop(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """The target's crop [start, start + size) as stored, zero outside the volume (as its image crop)."""
        return stored_crop(self.target, start, size, self.shape)[0]


def stored_crop(array: Any, start: Sequence[int], size: Sequence[int], shape: Sequence[int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The crop [start, start + size) of `array` as stored, zero outside, and the (3, 2) box of its voxels
    that lie inside the volume."""
    src, dst = overlap(start, size, shape)
    box = np.array([(d.start, d.stop) for d in dst], dtype=np.int64)
    stored = np.asarray(array[tuple(src)])
    if stored.shape == tuple(int(s) for s in size):  # inside: the view is copied once, into the batch
        return stored, box
    out = np.zeros(tuple(int(s) for s in size), dtype=stored.dtype)
    out[tuple(dst)] = stored
    return out, box


def overlap(start: Sequence[int], size: Sequence[int], shape: Sequence[int]
            ) -> tuple[list[slice], list[slice]]:
    """The slices of a volume of `shape` that the crop [start, start + size) covers, and where they land
    in the crop."""
    src, dst = [], []
    for lo, n, dim in zip(start, size, shape, strict=True):
        a, b = max(int(lo), 0), min(int(lo) + int(n), dim)
        src.append(slice(a, b))
        dst.append(slice(a - int(lo), max(b, a) - int(lo)))
    return src, dst


@dataclass
class Sample:
    key: str
    meta: dict
    load: Callable[[], StoredVolume]  # decodes (tar) or opens lazily (zarr) on demand


@dataclass
class SkipCounter:
    """Corrupt shards and samples met while streaming; raises instead when `strict`."""

    strict: bool = False
    shards: int = 0
    samples: int = 0
    grid_points: int = 0  # atlas-grid crops not cut: the grid point lies outside the subject's volume

    def shard(self, unit: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"corrupt shard {unit}: {reason} (data.strict=true)")
        self.shards += 1
        log.warning("skipping corrupt shard %s: %s (%d shard(s) skipped so far)", unit, reason, self.shards)

    def sample(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"corrupt sample {where}: {reason} (data.strict=true)")
        self.samples += 1
        log.warning("skipping corrupt sample %s: %s (%d sample(s) skipped so far)",
                    where, reason, self.samples)

    def shortfall(self, where: str, read: int, listed: int | None, note: str = "") -> None:
        """A unit that ended after fewer samples than the manifest lists: the missing ones are counted."""
        if listed is None or read >= listed:
            return
        reason = f"ends after {read} of the {listed} samples the manifest lists (cut short?{note})"
        if self.strict:
            raise DataError(f"corrupt shard {where}: {reason} (data.strict=true)")
        self.samples += listed - read
        log.warning("shard %s %s: %d sample(s) missing (%d sample(s) skipped so far)",
                    where, reason, listed - read, self.samples)

    def outside(self, key: str, points: int) -> None:
        """Grid points that fall outside a subject's volume (not corruption: counted, also when strict)."""
        if points:
            self.grid_points += points
            log.info("%d atlas grid point(s) outside volume %s (%d so far)", points, key, self.grid_points)

    def as_dict(self) -> dict[str, int]:
        return {"shards": self.shards, "samples": self.samples, "grid_points": self.grid_points}


class PackedDataset(Protocol):
    """What `open_dataset` returns, for either format (docs/architecture.md)."""

    keys: list[str]
    units: list[str]

    def meta(self, key: str) -> dict: ...
    def read(self, key: str) -> np.ndarray: ...
    def read_crop(self, key: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray: ...
    def volume(self, key: str) -> StoredVolume: ...
    def unit_size(self, unit: str) -> int | None: ...
    def samples(self, unit: str, skips: SkipCounter) -> Iterator[Sample]: ...


def open_dataset(path: str | Path, shard_url: str = "") -> PackedDataset:
    """Random access (and per-unit streams) over a packed directory of either format. With `shard_url`
    (a WebDataset URL template naming `{shard}`) the directory needs only its manifest.json: tar
    shards are streamed from the URL, and only streaming is offered."""
    manifest = load_manifest(path)
    if shard_url:
        if manifest["format"] != "wds":
            raise DataError(f"{path}: data.shard_url streams WebDataset tar shards; a {manifest['format']} "
                            "store is read in place (mount it where every rank can read it)")
        dataset = StreamedTarDataset(Path(path), manifest, shard_url)
    else:
        dataset = (TarDataset if manifest["format"] == "wds" else ZarrDataset)(Path(path), manifest)
    if not dataset.keys:
        raise DataError(f"packed dataset {path}: manifest lists no samples")
    return dataset


# ---- payload decoding (the format's own decoder, shared with `verify`) --------------------------


def volume_from_meta(array: Any, meta: dict, target: Any = None) -> StoredVolume:
    return StoredVolume(array, float(meta.get("scale", 1.0)), float(meta.get("offset", 0.0)), target)


# ---- WebDataset tar shards --------------------------------------------------------------------------


class TarDataset:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.shards = manifest.get("shards", [])
        self.units = [shard["path"] for shard in self.shards]
        self._entry = {shard["path"]: shard for shard in self.shards}
        self._shard_of = {key: shard["path"] for shard in self.shards for key in shard.get("keys", [])}
        self.keys = list(self._shard_of)
        self._spans: dict[str, dict[str, dict[str, Span]]] = {}  # shard → key → member spans
        self.targets = TARGET in manifest  # a derived dataset: every sample must carry its target
        self._last: tuple[str, StoredVolume] | None = None

    # random access
    def meta(self, key: str) -> dict:
        path, spans = self._sample_spans(key)
        try:
            return json.loads(read_span(path, spans[META_EXTENSION]).tobytes())
        except KeyError:
            raise DataError(f"{path}: sample {key} has no meta.json member") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: sample {key}: unreadable metadata ({exc})") from None

    def read(self, key: str) -> np.ndarray:
        return self.volume(key).read()

    def read_crop(self, key: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        return self.volume(key).read_crop(start, size)

    def volume(self, key: str) -> StoredVolume:
        """The decoded volume; the last one is kept, so many crops of one volume decode it once."""
        if self._last is None or self._last[0] != key:
            self._last = (key, self._decode(key))
        return self._last[1]

    def _decode(self, key: str) -> StoredVolume:
        path, spans = self._sample_spans(key)
        suffix = next((s for s in VOLUME_EXTENSIONS if s in spans), None)
        if suffix is None:
            raise DataError(f"{path}: sample {key} has no {' or '.join(VOLUME_EXTENSIONS)} member")
        meta = self.meta(key)
        try:
            target = decode_target(path, spans, meta)
            return volume_from_meta(decode_volume(suffix, map_span(path, spans[suffix])), meta, target)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(f"{path}: sample {key}: cannot decode ({exc})") from None

    def _sample_spans(self, key: str) -> tuple[Path, dict[str, Span]]:
        """The shard holding `key` and its members' spans; each shard's headers are read once."""
        if key not in self._shard_of:
            raise DataError(f"{self.root}: no sample with key {key!r}")
        unit = self._shard_of[key]
        path = self.root / unit
        if unit not in self._spans:
            try:
                self._spans[unit] = dict(tar_samples(path))
            except (OSError, tarfile.TarError) as exc:
                raise DataError(f"{path}: unreadable shard ({exc})") from None
        if key not in self._spans[unit]:
            raise DataError(f"{path}: no sample {key} in the shard")
        return path, self._spans[unit][key]

    # streaming
    def unit_size(self, unit: str) -> int | None:
        """Samples in a unit per the manifest, when the file on disk is intact in size (else unknown)."""
        entry = self._entry[unit]
        path = self.root / unit
        intact = path.is_file() and ("bytes" not in entry or path.stat().st_size == entry["bytes"])
        return int(entry["samples"]) if intact and "samples" in entry else None

    def samples(self, unit: str, skips: SkipCounter) -> Iterator[Sample]:
        """The shard's samples from its member headers; a payload is read only when a sample is loaded."""
        path, read = self.root / unit, 0
        try:
            for key, spans in tar_samples(path):
                read += 1
                sample = self._parse(path, key, spans, skips)
                if sample is not None:
                    yield sample
        except (OSError, tarfile.TarError) as exc:
            skips.shard(str(path), f"{type(exc).__name__}: {exc}")
            return
        # a shard cut at a member boundary reads as a shorter, valid tar: only the manifest can tell
        skips.shortfall(str(path), read, self._entry[unit].get("samples"), self._size_note(unit))

    def _size_note(self, unit: str) -> str:
        listed, path = self._entry[unit].get("bytes"), self.root / unit
        size = path.stat().st_size if path.is_file() else None
        return f"; the file is {size} bytes, the manifest says {listed}" if size != listed else ""

    def require_target(self, member: str | None) -> str | None:
        """A sample's target member, or None; a ValueError (a corrupt sample) when the manifest describes
        a dataset of targets and the sample has none."""
        if member is None and self.targets:
            raise ValueError("no target member, though the manifest describes a dataset of targets")
        return member

    def _parse(self, path: Path, key: str, spans: dict[str, Span], skips: SkipCounter) -> Sample | None:
        try:
            meta, suffix, span = tar_sample(path, spans)
            if self.require_target(target_member(spans)):
                target_meta(meta)  # a bad target_dtype is a corrupt sample, met before any decoding
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            skips.sample(f"{path}:{key}", str(exc))
            return None

        def load() -> StoredVolume:
            target = decode_target(path, spans, meta)
            return volume_from_meta(decode_volume(suffix, map_span(path, span)), meta, target)

        return Sample(key, meta, load)


class StreamedTarDataset(TarDataset):
    """Tar shards read front to back from a WebDataset URL (`pipe:aws s3 cp s3://b/{shard} -`,
    `https://host/{shard}`, a path) through `webdataset.gopen`, a sample's members in memory at a time.
    The manifest comes from the local directory; random access needs the shards on a filesystem."""

    def __init__(self, root: Path, manifest: dict, shard_url: str):
        super().__init__(root, manifest)
        self.shard_url = shard_url

    def url(self, unit: str) -> str:
        return self.shard_url.replace("{shard}", unit)

    def open(self, unit: str) -> Any:
        return open_shard_url(self.shard_url, unit)

    def unit_size(self, unit: str) -> int | None:
        entry = self._entry[unit]
        return int(entry["samples"]) if "samples" in entry else None

    def samples(self, unit: str, skips: SkipCounter) -> Iterator[Sample]:
        from webdataset.tariterators import group_by_keys, tar_file_expander

        url, read = self.url(unit), 0
        try:
            with self.open(unit) as stream:
                for members in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    read += 1
                    sample = self._parse_members(url, members, skips)
                    if sample is not None:
                        yield sample
        except (OSError, EOFError, tarfile.TarError, ValueError) as exc:  # unreachable, truncated, corrupt
            reason = exc.args[0] if exc.args else exc  # webdataset appends the stream and URL to the args
            skips.shard(url, f"{type(exc).__name__}: {reason}")
            return
        skips.shortfall(url, read, self._entry[unit].get("samples"))

    def _parse_members(self, url: str, members: dict, skips: SkipCounter) -> Sample | None:
        key = members["__key__"]
        try:
            suffix = volume_member(members)
            meta = check_meta(json.loads(members[META_EXTENSION]))
            payload = members[suffix]
            check_payload(suffix, payload[:NPY_HEADER_LIMIT], len(payload), meta)
            member = self.require_target(target_member(members))
            target_payload = members[member] if member else None
            if member:
                check_payload(target_encoding(member), target_payload[:NPY_HEADER_LIMIT], len(target_payload),
                              target_meta(meta))
        except ValueError as exc:
            skips.sample(f"{url}:{key}", str(exc))
            return None

        def load() -> StoredVolume:
            target = decode_volume(target_encoding(member), target_payload) if member else None
            return volume_from_meta(decode_volume(suffix, payload), meta, target)

        return Sample(key, meta, load)

    def _sample_spans(self, key: str) -> tuple[Path, dict[str, Span]]:
        raise DataError(f"{self.root}: shards streamed from data.shard_url={self.shard_url!r} offer no "
                        "random access (sample metadata, whole volumes); mount or copy the shards")


# A `pipe:` template containing any of these needs a shell (pipelines, redirections, expansions).
SHELL_SYNTAX = set("|&;<>()$`\\*?[]~#!")


def open_shard_url(template: str, shard: str) -> Any:
    """A binary stream of `shard` from a WebDataset URL template. `pipe:` templates run as an argument
    list (no shell) unless they use shell syntax; then the name goes in shell-quoted. The name must
    also be one `pack` writes, so nothing a manifest says can reach a shell."""
    import webdataset

    if not is_shard_name(shard):
        raise DataError(f"refusing to open shard {shard!r}: not a shard name (shard-NNNNNN.tar)")
    if not template.startswith("pipe:"):
        return webdataset.gopen(template.replace("{shard}", shard))
    from webdataset.gopen import Pipe

    command = template[len("pipe:"):]
    if SHELL_SYNTAX.isdisjoint(command):
        argv = [word.replace("{shard}", shard) for word in shlex.split(command)]
        return Pipe(argv, mode="rb", shell=False, bufsize=8192, ignore_status=[141])
    return Pipe(command.replace("{shard}", shlex.quote(shard)), mode="rb", shell=True, bufsize=8192,
                ignore_status=[141])


# ---- Zarr v3 store ----------------------------------------------------------------------------------


def open_store(path: Path) -> zarr.storage.StoreLike:
    """The store under volumes.zarr (a function of its own so tests can wrap it to count reads)."""
    return zarr.storage.LocalStore(path, read_only=True)


class ZarrDataset:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.keys = [entry["key"] for entry in manifest.get("arrays", [])]
        self.units = list(self.keys)
        self._entry = {entry["key"]: entry for entry in manifest.get("arrays", [])}
        self.targets = TARGET in manifest  # a derived dataset: every sample must carry its target
        self._group = self._targets = None
        self._last: tuple[str, StoredVolume] | None = None

    def _target(self, key: str) -> zarr.Array | None:
        """The lazy target array of `key` (targets.zarr) when the manifest lists one, else None."""
        if TARGET not in self._entry[key]:
            return None
        if self._targets is None:
            try:
                self._targets = zarr.open_group(store=open_store(self.root / TARGET_STORE), mode="r")
            except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
                raise DataError(f"{self.root}: no readable {TARGET_STORE} group ({exc})") from None
        try:
            return self._targets[key]
        except KeyError:
            raise DataError(f"{self.root}: no target array for key {key!r} in {TARGET_STORE}") from None

    @property
    def group(self) -> zarr.Group:
        if self._group is None:  # opened on first use, so it is created after a DataLoader worker forks
            try:
                self._group = zarr.open_group(store=open_store(self.root / "volumes.zarr"), mode="r")
            except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
                raise DataError(f"{self.root}: no readable volumes.zarr group ({exc})") from None
        return self._group

    def _array(self, key: str) -> zarr.Array:
        try:
            return self.group[key]
        except KeyError:
            raise DataError(f"{self.root}: no array for key {key!r} in volumes.zarr") from None

    def meta(self, key: str) -> dict:
        return dict(self._array(key).attrs.get("sslmed", {}))

    def volume(self, key: str) -> StoredVolume:
        """A lazy handle on the array; the last one is kept, so many crops of one volume open it once."""
        if self._last is None or self._last[0] != key:
            array = self._array(key)
            meta = dict(array.attrs.get("sslmed", {}))
            self._last = (key, volume_from_meta(array, meta, self._target(key)))
        return self._last[1]

    def read(self, key: str) -> np.ndarray:
        return self.volume(key).read()

    def read_crop(self, key: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        return self.volume(key).read_crop(start, size)

    def unit_size(self, unit: str) -> int | None:
        return 1

    def samples(self, unit: str, skips: SkipCounter) -> Iterator[Sample]:
        try:
            array = self._array(unit)
            meta = check_meta(dict(array.attrs.get("sslmed", {})))
            target = self._target(unit)
            if self.targets and target is None:
                raise ValueError("no target, though the manifest describes a dataset of targets")
            entries = [self._entry[unit], *([self._entry[unit][TARGET]] if target is not None else [])]
            for entry in entries:
                missing = missing_files(self.root / entry["path"], entry.get("files", []))
                if missing:
                    raise ValueError(f"{len(missing)} file(s) the manifest lists are missing ({missing[0]}, "
                                     "…): they would read as zeros")
        except (DataError, ValueError, OSError) as exc:
            skips.sample(f"{self.root}/volumes.zarr/{unit}", str(exc))
            return
        # a lazy handle: crops slice it, reading only their chunks
        volume = volume_from_meta(array, meta, target)
        yield Sample(unit, meta, lambda: volume)
