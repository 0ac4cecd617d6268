"""verify / inspect / resume / tags / keys / parallel determinism of packed datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sslmed.cli import main
from sslmed.errors import DataError
from sslmed.io.format import file_sha256, tree_files
from sslmed.io.manifest import inspect, iter_metadata, load_manifest, verify
from sslmed.io.pack import pack


def flip_byte(path: Path, position: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    index = int(len(data) * position)
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def report_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "report.jsonl").open()]


def test_verify_passes_on_an_intact_dataset_and_the_cli_agrees(packed_wds, capsys):
    assert verify(packed_wds) == []
    assert main(["verify", str(packed_wds)]) == 0
    assert main(["inspect", str(packed_wds)]) == 0
    assert "volumes     3 in" in capsys.readouterr().out


def test_verify_names_a_shard_with_one_flipped_byte(tmp_path, packed_wds, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(packed_wds, copy)
    shards = load_manifest(copy)["shards"]
    assert len(shards) >= 2
    victim = shards[-1]["path"]
    flip_byte(copy / victim, 0.6)
    problems = verify(copy)
    assert problems and all(p.startswith(victim) for p in problems)
    assert any("checksum mismatch" in p for p in problems)
    assert main(["verify", str(copy)]) == 1
    assert f"BAD {victim}" in capsys.readouterr().out


def test_verify_names_a_missing_shard(tmp_path, packed_wds):
    copy = tmp_path / "copy"
    shutil.copytree(packed_wds, copy)
    victim = load_manifest(copy)["shards"][0]["path"]
    (copy / victim).unlink()
    assert verify(copy) == [f"{victim}: missing file"]


def test_verify_names_a_zarr_array_with_one_flipped_chunk_byte(tmp_path, phantom_files):
    out = tmp_path / "zarr"
    pack(phantom_files, out, fmt="zarr", chunk=8)
    assert verify(out) == []
    entry = load_manifest(out)["arrays"][1]
    chunk_files = [p for p in tree_files(out / entry["path"]) if p.name != "zarr.json"]
    flip_byte(chunk_files[0], 0.5)
    problems = verify(out)
    assert problems and all(p.startswith(entry["path"]) for p in problems), problems


def test_load_manifest_refuses_missing_and_invalid_manifests(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "wds"}))
    with pytest.raises(DataError, match="not a valid manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_resume_appends_new_inputs_and_skips_packed_ones(tmp_path, phantom_files, fmt):
    out = tmp_path / "out"
    first = pack(phantom_files[:2], out, fmt=fmt, shard_size=1e9)
    before = load_manifest(out)
    entries = before["shards" if fmt == "wds" else "arrays"]
    digests = [e["sha256"] for e in entries]
    second = pack(phantom_files, out, fmt=fmt, shard_size=1e9)
    assert (first["ok"], second["ok"], second["skipped"]) == (2, 1, 2)
    after = load_manifest(out)
    assert after["samples"] == 3 and after["created"] == before["created"]
    assert [e["sha256"] for e in after["shards" if fmt == "wds" else "arrays"][:len(digests)]] == digests
    lines = report_lines(out)
    assert [line["status"] for line in lines] == ["ok", "ok", "skipped", "skipped", "ok"]
    assert all(line["reason"] == "already packed" for line in lines[2:4])
    assert [line["key"] for line in lines[2:4]] == [line["key"] for line in lines[:2]]
    assert verify(out) == []
    assert len({m["key"] for m in iter_metadata(out)}) == 3


def test_resume_refuses_different_settings(tmp_path, phantom_files):
    pack(phantom_files[:1], tmp_path / "out")
    with pytest.raises(DataError, match="different settings"):
        pack(phantom_files[:1], tmp_path / "out", dtype="uint8")


def test_keys_are_unique_and_tags_are_attached(tmp_path, phantom_files, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(phantom_files[0], tmp_path / folder / "scan 01.nii.gz")
    tags = tmp_path / "tags.csv"
    tags.write_text(f"path,status,subject\n{tmp_path / 'b' / 'scan 01.nii.gz'},abnormal,s2\n"
                    f"{phantom_files[1].name},normal,s1\ntypo.nii.gz,normal,s3\n")
    pack([tmp_path / "a", tmp_path / "b", phantom_files[1]], tmp_path / "out", tags=tags)
    assert "1 row(s) of" in capsys.readouterr().err  # the typo is reported, not dropped silently
    metas = {m["key"]: m for m in iter_metadata(tmp_path / "out")}
    assert set(metas) == {"scan-01", "scan-01_1", phantom_files[1].name.removesuffix(".nii.gz")}
    assert metas["scan-01"]["tags"] == {}
    assert metas["scan-01_1"]["tags"] == {"status": "abnormal", "subject": "s2"}
    assert metas[phantom_files[1].name.removesuffix(".nii.gz")]["tags"] == {"status": "normal",
                                                                           "subject": "s1"}
    assert "tag status  -: 1, abnormal: 1, normal: 1" in inspect(tmp_path / "out")  # "-": untagged


def test_parallel_workers_write_the_same_shards_as_one_process(tmp_path, phantom_files, packed_wds):
    pack(phantom_files, tmp_path / "parallel", workers=2, shard_size=16e3)
    serial, parallel = load_manifest(packed_wds)["shards"], load_manifest(tmp_path / "parallel")["shards"]
    assert [s["keys"] for s in parallel] == [s["keys"] for s in serial]
    assert [file_sha256(tmp_path / "parallel" / s["path"]) for s in parallel] == [s["sha256"] for s in serial]


def test_an_interrupted_run_leaves_a_valid_dataset_a_rerun_completes(tmp_path, phantom_files, monkeypatch):
    import sslmed.io.pack as packing

    out, real_prepare, calls = tmp_path / "out", packing.prepare, []

    def interrupted_on_third(path, options):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_prepare(path, options)

    monkeypatch.setattr(packing, "prepare", interrupted_on_third)
    with pytest.raises(KeyboardInterrupt):
        pack(phantom_files, out, shard_size=1)  # one volume per shard
    # the first shard was complete and is listed; the second was still open and is not
    assert load_manifest(out)["samples"] == 1 and verify(out) == []
    assert [line["status"] for line in report_lines(out)] == ["ok"]
    monkeypatch.setattr(packing, "prepare", real_prepare)
    summary = pack(phantom_files, out, shard_size=1)
    assert (summary["skipped"], summary["ok"], summary["samples"]) == (1, 2, 3)
    assert verify(out) == [] and not list(out.glob(".*.tmp"))


def test_encoding_is_byte_identical_across_runs():
    import numpy as np

    from sslmed.io.format import decode_volume, encode_volume

    array = np.random.default_rng(0).integers(0, 32767, (64, 64, 64)).astype(np.int16)
    payloads = {encode_volume(array, "zstd")[1] for _ in range(8)}
    assert len(payloads) == 1  # several Blosc blocks, always laid out in the same order
    np.testing.assert_array_equal(decode_volume("vol.blosc", payloads.pop()), array)


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path, phantom_files):
    (tmp_path / "in").mkdir()
    for path in phantom_files[:2]:
        shutil.copy(path, tmp_path / "in")
    first = pack([tmp_path / "in"], tmp_path / "in" / "packed", fmt="zarr")
    second = pack([tmp_path / "in"], tmp_path / "in" / "packed", fmt="zarr")
    assert (first["ok"], second["ok"], second["skipped"], second["failed"]) == (2, 0, 2, 0)
