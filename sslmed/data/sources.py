"""Packed datasets (shards/README.md): random access and per-unit sample streams, for both formats.

A *unit* is what the streaming pipeline splits across ranks and workers: a tar shard (format "wds")
or one Zarr array (format "zarr"). A streamed `Sample` carries its metadata and a `load()` thunk, so
the pipeline can walk past samples (to resume at a position) without decompressing them.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numcodecs
import numpy as np
import webdataset as wds
import zarr
import zarr.storage

from sslmed.errors import DataError

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = ("vol.npy", "vol.blosc")
BLOSC_HEADER_BYTES = 16


@dataclass
class Volume:
    """A stored array (numpy, or a lazy zarr.Array) and the map back to normalised float32 intensity."""

    array: Any  # anything sliceable like an ndarray: np.ndarray or zarr.Array (slicing reads only its chunks)
    scale: float
    offset: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    def read(self) -> np.ndarray:
        return self.normalise(np.asarray(self.array[...]))

    def read_crop(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """The crop [start, start + size), zero outside the volume; slices only the overlap."""
        out = np.zeros(tuple(int(s) for s in size), dtype=np.float32)
        src, dst = [], []
        for lo, n, dim in zip(start, size, self.shape, strict=True):
            a, b = max(int(lo), 0), min(int(lo) + int(n), dim)
            if a >= b:
                return out
            src.append(slice(a, b))
            dst.append(slice(a - int(lo), b - int(lo)))
        out[tuple(dst)] = self.normalise(np.asarray(self.array[tuple(src)]))
        return out

    def normalise(self, stored: np.ndarray) -> np.ndarray:
        return stored.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)


@dataclass
class Sample:
    key: str
    meta: dict
    load: Callable[[], Volume]  # decodes (tar) or opens lazily (zarr) on demand


@dataclass
class SkipCounter:
    """Corrupt shards and samples met while streaming; raises instead when `strict`."""

    strict: bool = False
    shards: int = 0
    samples: int = 0

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

    def as_dict(self) -> dict[str, int]:
        return {"shards": self.shards, "samples": self.samples}


def load_manifest(path: str | Path) -> dict:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"packed dataset {root}: no such directory")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"packed dataset {root}: no manifest.json (not packed, or packing did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if manifest.get("format") not in ("wds", "zarr"):
        raise DataError(f"{manifest_path}: unknown format {manifest.get('format')!r} (expected wds or zarr)")
    return manifest


class PackedDataset(Protocol):
    """What `open_dataset` returns, for either format (docs/architecture.md)."""

    keys: list[str]
    units: list[str]

    def meta(self, key: str) -> dict: ...
    def read(self, key: str) -> np.ndarray: ...
    def read_crop(self, key: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray: ...
    def volume(self, key: str) -> Volume: ...
    def unit_size(self, unit: str) -> int | None: ...
    def samples(self, unit: str, skips: SkipCounter) -> Iterator[Sample]: ...


def open_dataset(path: str | Path) -> PackedDataset:
    """Random access (and per-unit streams) over a packed directory of either format."""
    manifest = load_manifest(path)
    dataset = (TarDataset if manifest["format"] == "wds" else ZarrDataset)(Path(path), manifest)
    if not dataset.keys:
        raise DataError(f"packed dataset {path}: manifest lists no samples")
    return dataset


# ---- payload decoding ----------------------------------------------------------------------------


def npy_layout(data: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, header bytes) of `.npy` bytes, read from the header alone."""
    stream = io.BytesIO(data)  # shares the bytes (copy-on-write): nothing is copied here
    version = np.lib.format.read_magic(stream)
    npy = np.lib.format
    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)  # parses a literal dict: no pickle involved
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return shape, dtype, fortran, stream.tell()


def check_payload(suffix: str, data: bytes) -> None:
    """Cheap structural check (headers and lengths, no decompression) so truncation is caught early."""
    if suffix == "vol.blosc":
        cbytes = int.from_bytes(data[12:16], "little") if len(data) >= BLOSC_HEADER_BYTES else -1
        if cbytes != len(data):
            raise ValueError(f"blosc buffer of {len(data)} bytes, header says {cbytes}")
        return
    shape, dtype, _, header = npy_layout(data)
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f".npy payload of {len(data)} bytes, header implies {expected}")


def decode_payload(suffix: str, data: bytes, codec: str) -> np.ndarray:
    """The stored array, as a read-only view of the (decompressed) `.npy` bytes: no extra copy."""
    if suffix == "vol.blosc":
        data = numcodecs.Blosc(cname=codec).decode(data)  # the cname is in the blosc header; any decodes
    shape, dtype, fortran, header = npy_layout(data)
    count = int(np.prod(shape))
    if len(data) < header + count * dtype.itemsize:
        raise ValueError(f".npy payload of {len(data)} bytes is too short for {shape} {dtype}")
    if len(shape) != 3:
        raise ValueError(f"array has {len(shape)} dimensions, expected 3")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return flat.reshape(shape, order="F" if fortran else "C")


def volume_from_meta(array: Any, meta: dict) -> Volume:
    return Volume(array, float(meta.get("scale", 1.0)), float(meta.get("offset", 0.0)))


# ---- WebDataset tar shards --------------------------------------------------------------------------


class TarDataset:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.codec = manifest.get("codec", "none")
        self.shards = manifest.get("shards", [])
        self.units = [shard["path"] for shard in self.shards]
        self._entry = {shard["path"]: shard for shard in self.shards}
        self._shard_of = {key: shard["path"] for shard in self.shards for key in shard.get("keys", [])}
        self.keys = list(self._shard_of)
        self._last: tuple[str, Volume] | None = None

    # random access
    def meta(self, key: str) -> dict:
        return json.loads(self._member(key, ("meta.json",))[1])

    def read(self, key: str) -> np.ndarray:
        return self.volume(key).read()

    def read_crop(self, key: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        return self.volume(key).read_crop(start, size)

    def volume(self, key: str) -> Volume:
        """The decoded volume; the last one is kept, so many crops of one volume decode it once."""
        if self._last is None or self._last[0] != key:
            self._last = (key, self._decode(key))
        return self._last[1]

    def _decode(self, key: str) -> Volume:
        suffix, data = self._member(key, VOLUME_SUFFIXES)
        try:
            return volume_from_meta(decode_payload(suffix, data, self.codec), self.meta(key))
        except ValueError as exc:
            raise DataError(f"{self.root}: sample {key}: cannot decode ({exc})") from None

    def _member(self, key: str, suffixes: Sequence[str]) -> tuple[str, bytes]:
        import tarfile

        if key not in self._shard_of:
            raise DataError(f"{self.root}: no sample with key {key!r}")
        path = self.root / self._shard_of[key]
        try:
            with tarfile.open(path) as tar:
                names = set(tar.getnames())
                for suffix in suffixes:
                    if f"{key}.{suffix}" in names:
                        return suffix, tar.extractfile(f"{key}.{suffix}").read()
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"{path}: unreadable shard ({exc})") from None
        raise DataError(f"{path}: sample {key} has no {' or '.join(suffixes)} member")

    # streaming
    def unit_size(self, unit: str) -> int | None:
        """Samples in a unit per the manifest, when the file on disk is intact in size (else unknown)."""
        entry = self._entry[unit]
        path = self.root / unit
        intact = path.is_file() and ("bytes" not in entry or path.stat().st_size == entry["bytes"])
        return int(entry["samples"]) if intact and "samples" in entry else None

    def samples(self, unit: str, skips: SkipCounter) -> Iterator[Sample]:
        errors: list[Exception] = []

        def note_error(exc: Exception) -> bool:  # webdataset handler: remember, keep going with the shard
            errors.append(exc)
            if skips.strict:
                raise DataError(f"corrupt shard {self.root / unit}: {exc} (data.strict=true)") from exc
            return True

        for raw in wds.tarfile_samples([{"url": str(self.root / unit)}], handler=note_error):
            sample = self._parse(unit, raw, skips)
            if sample is not None:
                yield sample
        if errors:
            skips.shard(str(self.root / unit), f"{type(errors[0]).__name__}: {errors[0]}")

    def _parse(self, unit: str, raw: dict, skips: SkipCounter) -> Sample | None:
        key = raw.get("__key__", "?")
        suffix = next((s for s in VOLUME_SUFFIXES if s in raw), None)
        try:
            if suffix is None or "meta.json" not in raw:
                raise ValueError(f"incomplete sample (members: {sorted(k for k in raw if '__' not in k)})")
            meta = json.loads(raw["meta.json"])
            check_payload(suffix, raw[suffix])
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            skips.sample(f"{self.root / unit}:{key}", str(exc))
            return None
        data, codec = raw[suffix], self.codec
        return Sample(key, meta, lambda: volume_from_meta(decode_payload(suffix, data, codec), meta))


# ---- Zarr v3 store ----------------------------------------------------------------------------------


def open_store(path: Path) -> zarr.storage.StoreLike:
    """The store under volumes.zarr (a function of its own so tests can wrap it to count reads)."""
    return zarr.storage.LocalStore(path, read_only=True)


class ZarrDataset:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.keys = [entry["key"] for entry in manifest.get("arrays", [])]
        self.units = list(self.keys)
        self._group = None

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

    def volume(self, key: str) -> Volume:
        array = self._array(key)
        return volume_from_meta(array, dict(array.attrs.get("sslmed", {})))

    def read(self, key: str) -> np.ndarray:
        return self.volume(key).read()

    def read_crop(self, key: str, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        return self.volume(key).read_crop(start, size)

    def unit_size(self, unit: str) -> int | None:
        return 1

    def samples(self, unit: str, skips: SkipCounter) -> Iterator[Sample]:
        try:
            array = self._array(unit)
            meta = dict(array.attrs.get("sslmed", {}))
        except (DataError, ValueError, OSError) as exc:
            skips.sample(f"{self.root}/volumes.zarr/{unit}", str(exc))
            return
        volume = volume_from_meta(array, meta)  # a lazy handle: crops slice it, reading only their chunks
        yield Sample(unit, meta, lambda: volume)
