"""Random access to packed datasets, Zarr chunk-exact crop reads, corrupt-shard handling."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage
from zarr.abc.store import RangeByteRequest

from sslmed.config import Config
from sslmed.data import sources
from sslmed.data.pipeline import build_loader
from sslmed.data.sources import SkipCounter, open_dataset
from sslmed.errors import ConfigError, DataError
from sslmed.io import format as layout
from sslmed.io.pack import pack
from sslmed.io.synthetic import write_phantoms


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    return write_phantoms(tmp_path_factory.mktemp("in"), 4, shape=(32, 32, 32), seed=3)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, phantoms) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed")
    pack(phantoms, root / "wds", fmt="wds", shard_size=1)  # one volume per shard
    pack(phantoms, root / "zarr", fmt="zarr", chunk=8)  # 4×4×4 chunks of 8³ in one zarr shard
    pack(phantoms, root / "npy", fmt="wds", codec="none")  # plain .vol.npy members
    return {"wds": root / "wds", "zarr": root / "zarr", "npy": root / "npy"}


def test_formats_agree_and_read_is_stored_times_scale_plus_offset(packed):
    tar, arrays = open_dataset(packed["wds"]), open_dataset(packed["zarr"])
    assert tar.keys == arrays.keys and len(tar.keys) == 4
    key = tar.keys[1]
    meta = arrays.meta(key)
    stored = zarr.open_array(str(packed["zarr"] / "volumes.zarr" / key), mode="r")[...]
    expected = stored.astype(np.float32) * np.float32(meta["scale"]) + np.float32(meta["offset"])
    np.testing.assert_array_equal(arrays.read(key), expected)
    np.testing.assert_array_equal(tar.read(key), expected)
    np.testing.assert_array_equal(open_dataset(packed["npy"]).read(key), expected)
    assert tar.meta(key) == meta and list(expected.shape) == meta["shape"]


@pytest.mark.parametrize("fmt", ["wds", "zarr", "npy"])
def test_read_crop_is_zero_padded_slice(packed, fmt):
    dataset = open_dataset(packed[fmt])
    key = dataset.keys[2]
    whole = np.pad(dataset.read(key), 16)  # reference: pad by 16 on every side, then slice
    for start in [(-5, 3, 20), (0, 0, 0), (28, -10, 30), (33, 0, 0)]:
        crop = dataset.read_crop(key, start, (12, 8, 6))
        s = np.array(start) + 16
        np.testing.assert_array_equal(crop, whole[s[0]:s[0] + 12, s[1]:s[1] + 8, s[2]:s[2] + 6])


class CountingStore(zarr.storage.WrapperStore):
    """Counts chunk reads: ranged reads inside a zarr shard file, and whole-object reads of it."""

    reads: list[tuple[str, object]] = []

    async def get(self, key, prototype, byte_range=None):
        if not key.endswith("zarr.json"):
            CountingStore.reads.append((key, byte_range))
        return await super().get(key, prototype, byte_range)


def stored_chunks_touched(stored: np.ndarray, start, size, chunk: int) -> int:
    """Independent count: chunks the crop overlaps that hold data (all-fill chunks are never written)."""
    ranges = [range(max(a, 0) // chunk, (min(a + n, d) - 1) // chunk + 1)
              for a, n, d in zip(start, size, stored.shape, strict=True)]
    blocks = (tuple(slice(c * chunk, (c + 1) * chunk) for c in (i, j, k))
              for i in ranges[0] for j in ranges[1] for k in ranges[2])
    return sum(bool(stored[block].any()) for block in blocks)


@pytest.mark.parametrize("start, size, expected", [
    ((12, 12, 12), (12, 12, 12), 8),  # chunks 1..2 on each axis, all inside the phantom's body
    ((17, 17, 17), (4, 4, 4), 1),  # inside one chunk
    ((-6, 12, 17), (8, 8, 8), None),  # partly outside the volume
    ((0, 12, 12), (32, 4, 4), None),  # a row of chunks along x
])
def test_zarr_crop_reads_only_the_chunks_it_touches(packed, monkeypatch, start, size, expected):
    monkeypatch.setattr(sources, "open_store", lambda path: CountingStore(zarr.storage.LocalStore(path)))
    dataset = open_dataset(packed["zarr"])
    key = dataset.keys[0]
    stored = zarr.open_array(str(packed["zarr"] / "volumes.zarr" / key), mode="r")[...]
    reference = stored_chunks_touched(stored, start, size, chunk=8)
    assert expected is None or reference == expected
    dataset.meta(key)  # open the group and array first: count only the crop's reads
    CountingStore.reads.clear()
    dataset.read_crop(key, start, size)
    chunk_reads = [r for r in CountingStore.reads if isinstance(r[1], RangeByteRequest)]
    assert len(chunk_reads) == reference > 0
    assert len({r[1] for r in chunk_reads}) == reference, "each chunk read once"
    assert all(r[1] is not None for r in CountingStore.reads), "no whole-shard read"


def test_missing_directory_manifest_or_samples_raise_data_error(tmp_path, phantoms):
    with pytest.raises(DataError, match="no such directory"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no manifest.json"):
        open_dataset(tmp_path)
    pack(phantoms[:1], tmp_path / "one", fmt="wds")
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "samples": 0}))
    with pytest.raises(DataError, match="no samples"):
        open_dataset(tmp_path)
    cfg = Config()
    cfg.data.path = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no such directory"):
        build_loader(cfg, 0, 1)


@pytest.fixture
def damaged(packed, tmp_path) -> Path:
    """A copy of the wds set with shard 1 truncated mid-payload and shard 2 replaced by garbage."""
    out = tmp_path / "damaged"
    shutil.copytree(packed["wds"], out)
    truncated = out / "shard-000001.tar"
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size // 2)
    (out / "shard-000002.tar").write_bytes(os.urandom(4096))
    return out


def test_corrupt_shards_are_counted_and_skipped(damaged, packed):
    dataset, skips = open_dataset(damaged), SkipCounter()
    seen = [s.key for unit in dataset.units for s in dataset.samples(unit, skips)]
    keys = open_dataset(packed["wds"]).keys
    assert seen == [keys[0], keys[3]]
    assert skips.shards == 2
    assert [s.load().shape for unit in dataset.units[:1] for s in dataset.samples(unit, skips)]


def test_undecodable_payload_is_counted_as_a_skipped_sample(packed, tmp_path):
    out = tmp_path / "scrambled"
    shutil.copytree(packed["wds"], out)
    shard = out / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:  # same sizes and headers, compressed bytes scrambled
        for member, data in members:
            if member.name.endswith(".vol.blosc"):
                middle = len(data) // 2
                data = data[:64] + bytes(reversed(data[64:middle])) + data[middle:]
            tar.addfile(member, io.BytesIO(data))
    cfg = Config()
    cfg.data.path, cfg.data.crop_size, cfg.data.workers = str(out), 16, 0
    cfg.data.crops_per_volume, cfg.train.micro_batch, cfg.data.augment = 1, 1, False
    cfg.data.shuffle_buffer = 1
    loader = build_loader(cfg, 0, 1)
    keys = {next(loader)["key"][0] for _ in range(4)}  # 4 batches: all of epoch 0 has been read
    assert keys == set(open_dataset(packed["wds"]).keys[1:])
    assert loader.skipped["shards"] == 0 and loader.skipped["samples"] in (1, 2)
    cfg.data.strict = True
    strict = build_loader(cfg, 0, 1)
    with pytest.raises(DataError, match="corrupt sample .*cannot decode"):
        for _ in range(4):
            next(strict)


def test_loader_skips_corrupt_shards_unless_strict(damaged):
    cfg = Config()
    cfg.data.path, cfg.data.crop_size, cfg.data.workers = str(damaged), 16, 0
    cfg.data.crops_per_volume, cfg.train.micro_batch, cfg.data.augment = 1, 1, False
    loader = build_loader(cfg, 0, 1)
    keys = {next(loader)["key"][0] for _ in range(4)}  # two good volumes, two epochs
    assert len(keys) == 2 and loader.skipped["shards"] >= 2
    cfg.data.strict = True
    strict = build_loader(cfg, 0, 1)
    with pytest.raises(DataError, match="corrupt shard .*shard-00000[12].tar"):
        for _ in range(4):
            next(strict)


@pytest.mark.parametrize("fmt", ["wds", "npy"])
def test_tar_spans_hold_the_member_bytes_tarfile_reads(packed, fmt):
    shard = packed[fmt] / "shard-000000.tar"
    with tarfile.open(shard) as tar:  # independent reference: the standard library's own extraction
        expected = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    found = {f"{key}.{ext}": span for key, spans in layout.tar_samples(shard) for ext, span in spans.items()}
    assert set(found) == set(expected)
    for name, span in found.items():
        assert layout.read_span(shard, span).tobytes() == expected[name]
        assert layout.map_span(shard, span).tobytes() == expected[name]


def test_tar_spans_past_the_end_of_a_truncated_shard_raise(packed, tmp_path):
    shard = tmp_path / "cut.tar"
    shard.write_bytes((packed["npy"] / "shard-000000.tar").read_bytes()[:5000])
    with pytest.raises(tarfile.TarError):
        list(layout.tar_samples(shard))
    with pytest.raises(OSError, match="truncated"):
        layout.map_span(shard, (4096, 2000))


# ---- shards streamed from WebDataset URLs -----------------------------------------------------------


def manifest_only(packed_dir: Path, out: Path) -> Path:
    """What a node holds when its shards live in an object store: the manifest alone."""
    out.mkdir()
    shutil.copy(packed_dir / "manifest.json", out / "manifest.json")
    return out


def stream_config(path: Path, shard_url: str = "") -> Config:
    cfg = Config()
    cfg.data.path, cfg.data.shard_url, cfg.data.crop_size, cfg.data.workers = str(path), shard_url, 8, 0
    cfg.data.crops_per_volume, cfg.data.shuffle_buffer, cfg.train.micro_batch = 2, 3, 2
    return cfg


@pytest.mark.parametrize("fmt", ["wds", "npy"])  # blosc-compressed and raw .npy payloads
def test_shards_streamed_from_a_url_give_the_same_batches_and_resume(packed, fmt, tmp_path):
    url = f"pipe:cat {packed[fmt]}/{{shard}}"
    remote = stream_config(manifest_only(packed[fmt], tmp_path / "node"), url)
    local = [next(loader) for loader in [build_loader(stream_config(packed[fmt]), 0, 1)] for _ in range(8)]
    first = build_loader(remote, 0, 1)
    head = [next(first) for _ in range(5)]
    resumed = build_loader(remote, 0, 1)
    resumed.load_state_dict(first.state_dict())
    streamed = head + [next(resumed) for _ in range(3)]
    for a, b in zip(local, streamed, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["start"], b["start"])
    assert first.skipped == resumed.skipped == {"shards": 0, "samples": 0, "grid_points": 0}


def test_streamed_shards_that_fail_are_counted_and_skipped(damaged, packed, tmp_path):
    node = manifest_only(damaged, tmp_path / "node")
    dataset, skips = open_dataset(node, f"pipe:cat {damaged}/{{shard}}"), SkipCounter()
    seen = [s.key for unit in dataset.units for s in dataset.samples(unit, skips)]
    keys = open_dataset(packed["wds"]).keys
    assert seen == [keys[0], keys[3]] and skips.shards == 2  # truncated and garbage shards
    unreachable = open_dataset(node, f"pipe:cat {tmp_path}/nowhere/{{shard}}")
    assert list(unreachable.samples(unreachable.units[0], skips)) == [] and skips.shards == 3
    with pytest.raises(DataError, match="no random access"):
        unreachable.meta(keys[0])


def test_shard_url_must_name_the_shard_and_the_format_must_be_wds(packed, tmp_path):
    with pytest.raises(ConfigError, match=r"name the shard as \{shard\}"):
        build_loader(stream_config(packed["wds"], "pipe:cat shards.tar"), 0, 1)
    with pytest.raises(DataError, match="streams WebDataset tar shards"):
        open_dataset(packed["zarr"], "pipe:cat {shard}")
