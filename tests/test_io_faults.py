"""Bad inputs beside good ones: every input reported with a reason, good ones packed, fail mode stops."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sslmed.cli import main
from sslmed.errors import VolumeError
from sslmed.io.manifest import iter_shard, load_manifest, verify
from sslmed.io.pack import pack
from sslmed.io.readers import read_volume

# file name → a word the failure reason must contain
BAD = {
    "corrupt.nii.gz": "cannot read",
    "truncated.nii.gz": "cannot read",
    "text.nii.gz": "cannot read",
    "flat.nii.gz": "2-D",
    "series.nii.gz": "4-D",
    "holes.nii.gz": "non-finite",
    "empty.nii.gz": "empty file",
}


def save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture()
def messy_folder(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("good_a", "good_b", "good_c"):
        save(folder / f"{name}.nii.gz", rng.uniform(0, 100, (12, 10, 8)))
    save(folder / "good_singleton4d.nii.gz", rng.uniform(0, 100, (12, 10, 8, 1)))  # squeezed, accepted
    intact = (folder / "good_a.nii.gz").read_bytes()
    corrupt = bytearray(intact)
    middle = len(corrupt) // 2
    corrupt[middle:middle + 64] = bytes(64)  # a zeroed run inside the deflate stream
    (folder / "corrupt.nii.gz").write_bytes(bytes(corrupt))
    (folder / "truncated.nii.gz").write_bytes(intact[: len(intact) // 2])
    (folder / "text.nii.gz").write_text("this is not an image\n")
    save(folder / "flat.nii.gz", rng.uniform(0, 1, (16, 16)))
    save(folder / "series.nii.gz", rng.uniform(0, 1, (8, 8, 8, 3)))
    holes = rng.uniform(0, 1, (8, 8, 8))
    holes[2, 3, 4], holes[5, 5, 5] = np.nan, np.inf
    save(folder / "holes.nii.gz", holes)
    (folder / "empty.nii.gz").write_bytes(b"")
    save(folder / "blank.nii.gz", np.zeros((8, 8, 8)))
    return folder


def test_read_volume_raises_only_volume_errors(messy_folder):
    for name, word in BAD.items():
        with pytest.raises(VolumeError, match=word) as caught:
            read_volume(messy_folder / name)
        assert name in str(caught.value)
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(messy_folder / "missing.nii.gz")


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_every_input_is_reported_and_good_ones_are_packed(tmp_path, messy_folder, fmt):
    out = tmp_path / "out"
    summary = pack([messy_folder, messy_folder / "missing.nii"], out, fmt=fmt)
    report = {Path(line["path"]).name: line for line in map(json.loads, (out / "report.jsonl").open())}
    assert len(report) == 4 + len(BAD) + 2
    for name, word in {**BAD, "missing.nii": "no such file", "blank.nii.gz": "constant intensity"}.items():
        assert report[name]["status"] == "failed" and word in report[name]["reason"], report[name]
    good = sorted(n for n in report if n.startswith("good"))
    assert [report[n]["status"] for n in good] == ["ok"] * 4
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (4, len(BAD) + 2, 0)
    manifest = load_manifest(out)
    assert manifest["samples"] == 4 and verify(out) == []


def test_repair_nonfinite_packs_the_volume_and_counts_the_repairs(tmp_path, messy_folder):
    out = tmp_path / "out"
    pack([messy_folder / "holes.nii.gz"], out, repair_nonfinite=True, modality="mr")
    (entry,) = load_manifest(out)["shards"]
    ((key, array, meta, _),) = list(iter_shard(out / entry["path"]))
    assert meta["nonfinite_repaired"] == 2 and array.shape == (8, 8, 8)


def test_cli_on_error_fail_exits_nonzero_naming_the_file(tmp_path, messy_folder, capsys):
    code = main(["pack", str(messy_folder / "good_a.nii.gz"), str(messy_folder / "truncated.nii.gz"),
                 str(messy_folder / "good_b.nii.gz"), "--out", str(tmp_path / "out"), "--on-error", "fail"])
    err = capsys.readouterr().err
    assert code != 0
    assert "truncated.nii.gz" in err and "Traceback" not in err
    lines = [json.loads(line) for line in (tmp_path / "out" / "report.jsonl").open()]
    # stopped at the bad file: the good one before it is packed, the one after is never read
    assert [(Path(line["path"]).name, line["status"]) for line in lines] == [
        ("good_a.nii.gz", "ok"), ("truncated.nii.gz", "failed")]
    assert verify(tmp_path / "out") == []


def test_cli_refuses_an_empty_input_folder(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert main(["pack", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "no input volumes" in capsys.readouterr().err
