"""`sslmed pack | verify | inspect` through the CLI entry point, every pack option wired through."""

from __future__ import annotations

import json

import numpy as np

from sslmed.cli import main
from sslmed.io.manifest import iter_metadata, load_manifest
from sslmed.io.preprocess import cast_tolerance


def test_pack_cli_options_reach_the_dataset(tmp_path, phantom_files, capsys):
    tags = tmp_path / "tags.csv"
    tags.write_text("path,status\n" + "".join(f"{p.name},normal\n" for p in phantom_files))
    out = tmp_path / "out"
    code = main(["pack", *map(str, phantom_files), "--out", str(out), "--format", "zarr", "--dtype", "uint8",
                 "--spacing", "2", "2", "2", "--modality", "mr", "--codec", "lz4", "--chunk", "8",
                 "--foreground-crop", "--tags", str(tags), "--workers", "1"])
    assert code == 0
    assert "3 ok, 0 skipped, 0 failed" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert (manifest["format"], manifest["codec"], manifest["samples"]) == ("zarr", "lz4", 3)
    assert manifest["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]
    assert manifest["preprocessing"]["foreground_crop"] is True
    for meta in iter_metadata(out):
        assert meta["dtype"] == "uint8" and meta["scale"] == 1 / 255
        np.testing.assert_allclose(meta["spacing"], [2.0, 2.0, 2.0], atol=1e-6)
        assert meta["modality"] == "mr" and meta["tags"] == {"status": "normal"}
        assert meta["stats"]["max"] <= 1.0 + cast_tolerance("uint8")
    assert main(["verify", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "status  normal: 3" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "report.jsonl").open()]
    assert [line["status"] for line in lines] == ["ok"] * 3


def test_cli_reports_user_mistakes_in_one_line(tmp_path, phantom_files, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    bad_spacing = ["--spacing", "0", "1", "1"]
    assert main(["pack", str(phantom_files[0]), "--out", str(tmp_path / "o"), *bad_spacing]) == 2
    (tmp_path / "a-file").write_text("")
    assert main(["pack", str(phantom_files[0]), "--out", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "spacing must be" in err and "cannot create the output" in err
    assert "Traceback" not in err
