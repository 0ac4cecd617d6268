"""`sslmed sample`: a Gaussian fitted on a contrastive autoencoder's codes, decoded to NIfTI volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from sslmed.cli import main
from sslmed.sample import draw, fit_gaussian


def test_draws_follow_the_mean_and_covariance_of_the_codes() -> None:
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(40, 3)) @ np.array([[2.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, -0.3, 0.2]]) + 4.0
    mean, factor = fit_gaussian(torch.from_numpy(codes))
    drawn = draw(mean, factor, 40000, seed=1).double().numpy()
    assert np.allclose(drawn.mean(0), codes.mean(0), atol=0.05)
    assert np.allclose(np.cov(drawn.T), np.cov(codes.T), atol=0.06)
    assert not np.allclose(draw(mean, factor, 2, seed=1), draw(mean, factor, 2, seed=2))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from sslmed.io.pack import pack
    from sslmed.io.synthetic import write_phantoms

    root = tmp_path_factory.mktemp("sample")
    out = root / "packed"
    pack(write_phantoms(root / "raw", 3, shape=(40, 40, 40), seed=1), out, fmt="wds", spacing=(1.5, 1.5, 1.5))
    return out


def test_sample_writes_decoded_volumes_and_refuses_a_run_without_a_code_decoder(packed, tmp_path, capsys):
    torch.set_num_threads(1)
    common = [f"data.path={packed}", "train.steps=2", "data.workers=0", "data.shuffle_buffer=2"]
    run = tmp_path / "cae"
    assert main(["pretrain", "contrastive_ae-tiny", f"run.dir={run}", *common]) == 0
    assert main(["sample", str(run), "--n", "3", "--out", str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").glob("sample-*.nii.gz"))
    assert [f.name for f in files] == ["sample-000.nii.gz", "sample-001.nii.gz", "sample-002.nii.gz"]
    images = [nib.load(str(f)) for f in files]
    assert all(i.shape == (32, 32, 32) and np.allclose(i.header.get_zooms(), 1.5) for i in images)
    arrays = [np.asarray(i.dataobj) for i in images]
    assert all(np.isfinite(a).all() for a in arrays) and not np.allclose(arrays[0], arrays[1])
    mae = tmp_path / "mae"
    assert main(["pretrain", "mae-tiny", f"run.dir={mae}", *common]) == 0
    capsys.readouterr()
    assert main(["sample", str(mae)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sslmed: error:") and "contrastive_ae" in err and "\n" not in err
