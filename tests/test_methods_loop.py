"""Every registered method trains through the one `sslmed pretrain` loop from its shipped tiny config,
on packed volumes, and exports an encoder that `sslmed.load_encoder` rebuilds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sslmed
from sslmed.cli import main
from sslmed.methods import METHODS


@pytest.fixture(scope="module")
def tagged_volumes(tmp_path_factory) -> Path:
    """Four 40³ phantoms packed with tags: two `status=normal` (the residual method's stage 1 uses them)."""
    from sslmed.io.pack import pack
    from sslmed.io.synthetic import write_phantoms

    root = tmp_path_factory.mktemp("methods-loop")
    paths = write_phantoms(root / "raw", 4, shape=(40, 40, 40), seed=3)
    tags = root / "tags.csv"
    rows = [f"{p.name},{'normal' if i % 2 == 0 else 'abnormal'}" for i, p in enumerate(paths)]
    tags.write_text("path,status\n" + "\n".join(rows) + "\n")
    out = root / "packed"
    pack(paths, out, fmt="wds", tags=tags)
    return out


# DrasCLR trains on atlas-packed data at atlas grid points: tests/test_drasclr.py runs it through the loop
@pytest.mark.parametrize("name", sorted(set(METHODS) - {"drasclr"}))
def test_method_trains_through_the_loop_and_exports(name, tagged_volumes, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / name
    code = main(["pretrain", f"{name}-tiny", f"data.path={tagged_volumes}", f"run.dir={run}",
                 "train.steps=3", "checkpoint.every=0", "data.workers=0", "data.crops_per_volume=2",
                 "data.shuffle_buffer=4", "method.stage1_steps=1" if name == "residual" else "train.seed=0"])
    assert code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)

    encoder = sslmed.load_encoder(run / "encoder.safetensors")
    info = json.loads((run / "encoder.json").read_text())
    crop = info["crop_size"]
    location = torch.zeros(2, 3) if info["needs_location"] else None  # a located encoder refuses none
    with torch.no_grad():
        features = encoder(torch.rand(2, 1, crop, crop, crop), location)
    assert features.ndim == 2 and features.shape[0] == 2 and torch.isfinite(features).all()
