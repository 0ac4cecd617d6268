"""Sample writers for the two packed formats. Both keep the manifest entries of everything they have
finished writing and call `on_commit()` whenever those entries describe complete files on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sslmed.io.format import (
    META_EXTENSION,
    TARGET,
    TARGET_STORE,
    ZARR_STORE,
    content_sha256,
    encode_volume,
    file_sha256,
    shard_name,
    tree_bytes,
    tree_files,
    tree_sha256,
    zarr_compressors,
    zarr_layout,
)

TAR_OVERHEAD = 3 * 512  # two member headers + padding, for shard-size accounting
ZARR_COMMIT_EVERY = 32  # arrays between manifest checkpoints


class WdsWriter:
    """Fills tar shards in input order up to `shard_size` bytes; each shard is written under a
    temporary name and renamed when complete. `names` maps a shard's index to its file name."""

    def __init__(self, out: Path, *, codec: str, shard_size: int, entries: list[dict],
                 on_commit: Callable[[], None], names: Callable[[int], str] = shard_name) -> None:
        self.out, self.codec, self.shard_size = out, codec, int(shard_size)
        self.entries, self.on_commit, self.names = entries, on_commit, names
        self.index = len(entries)
        self.file = self.tar = self.current = None

    def add(self, key: str, source: str, array: np.ndarray, meta: dict, target: np.ndarray | None = None
            ) -> None:
        """One sample; `target` (a derived dataset's, voxel-aligned with `array`) as a member of its own."""
        extension, payload = encode_volume(array, self.codec)
        members = {"__key__": key, extension: payload}
        if target is not None:
            target_extension, target_payload = encode_volume(target, self.codec)
            members[f"{TARGET}.{target_extension}"] = target_payload
        meta_bytes = json.dumps(meta).encode()
        members[META_EXTENSION] = meta_bytes
        extra_members = len(members) - 3  # beyond the volume and its metadata: half an overhead each
        payloads = sum(len(v) for k, v in members.items() if k != "__key__")
        size = payloads + TAR_OVERHEAD * (2 + extra_members) // 2
        if self.current and self.current["bytes"] + size > self.shard_size:
            self._close()
        if self.current is None:
            self._open()
        self.tar.write(members)
        self.current["keys"].append(key)
        self.current["sources"].append(source)
        self.current["content_sha256"].append(content_sha256(array, meta, target))
        self.current["samples"] += 1
        self.current["voxels"] += int(array.size)
        self.current["bytes"] += size

    def finish(self) -> None:
        if self.current is not None:
            self._close()

    def _open(self) -> None:
        import webdataset as wds

        name = self.names(self.index)
        self.file = open(self.out / f".{name}.tmp", "wb")
        # fixed owner and mtime: the same inputs give byte-identical shards
        self.tar = wds.TarWriter(self.file, user="sslmed", group="sslmed", mtime=0.0, encoder=False)
        self.current = {"path": name, "samples": 0, "voxels": 0, "bytes": 0, "keys": [], "sources": [],
                        "content_sha256": []}

    def _close(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        final = self.out / self.current["path"]
        os.replace(self.out / f".{final.name}.tmp", final)
        entry = self.current
        entry["bytes"] = final.stat().st_size
        entry["sha256"] = file_sha256(final)
        self.entries.append(entry)
        self.index += 1
        self.file = self.tar = self.current = None
        self.on_commit()


class ZarrWriter:
    """One zarr v3 array per volume in `volumes.zarr`, chunked and sharded, metadata in attributes."""

    def __init__(self, out: Path, *, codec: str, chunk: int, entries: list[dict],
                 on_commit: Callable[[], None]) -> None:
        import zarr

        self.out, self.codec, self.chunk = out, codec, int(chunk)
        self.entries, self.on_commit = entries, on_commit
        self.group = zarr.open_group(str(out / ZARR_STORE), mode="a", zarr_format=3)
        self.targets = None  # targets.zarr, opened with the first target
        self.uncommitted = 0

    def _write(self, group, store: str, key: str, array: np.ndarray, attributes: dict) -> dict:
        """Write `array` as `<store>/<key>`; returns its manifest fields (path, shape, voxels, bytes,
        sha256, files)."""
        chunks, shards = zarr_layout(array.shape, self.chunk)
        # overwrite: an array left by an interrupted run is not in the manifest, so its key is free again
        stored = group.create_array(name=key, shape=array.shape, dtype=array.dtype, chunks=chunks,
                                    shards=shards, compressors=zarr_compressors(self.codec),
                                    fill_value=0, attributes=attributes, overwrite=True)
        stored[...] = array
        root = self.out / store / key
        files = [f.relative_to(root).as_posix() for f in tree_files(root)]
        return {"path": f"{store}/{key}", "shape": list(array.shape), "voxels": int(array.size),
                "bytes": tree_bytes(root), "sha256": tree_sha256(root), "files": files}

    def add(self, key: str, source: str, array: np.ndarray, meta: dict, target: np.ndarray | None = None
            ) -> None:
        """One array; `target` (a derived dataset's, voxel-aligned with `array`) as targets.zarr/<key>."""
        entry = {"key": key, **self._write(self.group, ZARR_STORE, key, array, {"sslmed": meta}),
                 "content_sha256": content_sha256(array, meta, target), "source": source}
        if target is not None:
            if self.targets is None:
                import zarr

                self.targets = zarr.open_group(str(self.out / TARGET_STORE), mode="a", zarr_format=3)
            entry[TARGET] = self._write(self.targets, TARGET_STORE, key, target, {})
            entry["bytes"] += entry[TARGET].pop("bytes")
        self.entries.append(entry)
        self.uncommitted += 1
        if self.uncommitted >= ZARR_COMMIT_EVERY:
            self.finish()

    def finish(self) -> None:
        if self.uncommitted:
            self.uncommitted = 0
            self.on_commit()
