"""The paper recipes on the method side: SSSD's shipped teacher and `model.init`, the baselines' shared
ResNet-18, the residual method's CAE / soft target / BCE, the contrastive autoencoder's dense code."""

from __future__ import annotations

import pytest
import torch

from sslmed.config import load_config
from sslmed.errors import ConfigError
from sslmed.methods import build_method
from sslmed.train.checkpoint import export_encoder

torch.set_num_threads(1)


def smooth(n: int, size: int) -> torch.Tensor:
    coarse = torch.randn(n, 1, 3, 3, 3)
    return torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)


# ---- SSSD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sssd-tiny", "sssd-base"])
def test_shipped_sssd_configs_use_the_stop_gradient_teacher(name: str) -> None:
    assert load_config(name).method.distill_target == "stopgrad"


def decoder_grads(method, image: torch.Tensor, with_distill: bool) -> list[torch.Tensor]:
    """Gradients of the decoder for the same mask (same generator seed), with or without distillation."""
    method.zero_grad()
    out = method.masked_forward(image, torch.Generator().manual_seed(7))
    loss = method.reconstruction_loss(image, out)
    if with_distill:
        student = method.distill_head(out["visible"])
        teacher = method.teacher_latent(image, out)
        assert not teacher.requires_grad
        loss = loss + ((student - teacher) ** 2).sum()
    loss.backward()
    return [p.grad.clone() for p in method.decoder.parameters()]


def test_the_stop_gradient_teacher_receives_no_gradient_from_distillation() -> None:
    torch.manual_seed(0)
    method = build_method(load_config("sssd-tiny", ["model.dim=16", "model.heads=2"]))
    assert not method.teachers()  # no EMA copy: the teacher is the decoder itself
    image = smooth(2, method.cfg.data.crop_size)
    plain, distilled = decoder_grads(method, image, False), decoder_grads(method, image, True)
    assert all(torch.equal(a, b) for a, b in zip(plain, distilled, strict=True))
    assert method.distill_head[0].weight.grad.abs().sum() > 0  # the student side does learn


def test_model_init_starts_the_encoder_from_an_export_and_refuses_another_architecture(tmp_path) -> None:
    small = ["model.dim=16", "model.heads=2"]
    torch.manual_seed(1)
    source = build_method(load_config("mae-tiny", small))
    path = export_encoder(source.encoder(), tmp_path / "mae.safetensors", {"method": "mae"})
    torch.manual_seed(2)  # a different random start, so equality can only come from the export
    started = build_method(load_config("sssd-tiny", [*small, f"model.init={path}"]))
    want, got = source.encoder().state_dict(), started.encoder().state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    fresh = build_method(load_config("sssd-tiny", small)).encoder().state_dict()
    assert not all(torch.equal(fresh[k], got[k]) for k in fresh)
    with pytest.raises(ConfigError) as error:
        build_method(load_config("sssd-tiny", ["model.dim=24", "model.heads=2", f"model.init={path}"]))
    assert "\n" not in str(error.value) and "model.init" in str(error.value) and "dim=16" in str(error.value)
    with pytest.raises(ConfigError, match="model.init: .*not found"):
        build_method(load_config("sssd-tiny", [*small, f"model.init={tmp_path / 'none.safetensors'}"]))


# ---- the CAE-residual paper's method and baselines on one ResNet-18 ------------------------------


def test_the_resnet18_configs_build_one_and_the_same_backbone() -> None:
    from sslmed.models.resnet3d import ResNet3D

    exports = {}
    baselines = ("simclr-resnet18", "byol-resnet18", "simsiam-resnet18", "spark-resnet18")
    for name in (*baselines, "residual-resnet18"):
        cfg = load_config(name)
        encoder = build_method(cfg).encoder()
        assert type(encoder) is ResNet3D and cfg.data.crop_size == 64
        exports[name] = encoder.export_config()
        assert encoder.widths == [64, 128, 256, 512] and encoder.depth == 18
        assert sum(p.numel() for p in encoder.parameters()) == sum(
            p.numel() for p in ResNet3D(size="base", depth=18).parameters())
    assert len({str(sorted(e["kwargs"].items())) for e in exports.values()}) == 1
    simclr = build_method(load_config("simclr-resnet18"))
    assert simclr.settings.temperature == 0.07
    linears = [m for m in simclr.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512)]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in simclr.projector)


def reference_target(image: torch.Tensor, reconstruction: torch.Tensor, kernel: int):
    """numpy/scipy: |x − x̂|, per-volume 1–99 % percentile rescale clipped to [0, 1], median filter."""
    import numpy as np
    from scipy.ndimage import median_filter

    out = []
    for x, r in zip(image.numpy(), reconstruction.numpy(), strict=True):
        residual = np.abs(x - r)
        lo, hi = np.percentile(residual, [1, 99])
        scaled = np.clip((residual - lo) / (hi - lo), 0, 1)
        out.append(median_filter(scaled, size=(1, kernel, kernel, kernel), mode="nearest"))
    return torch.from_numpy(np.stack(out)).float()


def test_residual_stage1_is_l1_of_a_dense_cae_on_normals_and_stage2_bce_against_the_soft_target() -> None:
    from sslmed.models.cae import ConvAutoencoder3D

    torch.manual_seed(5)
    method = build_method(load_config("residual-tiny", ["method.stage1_steps=1", "method.cae_latent=24"]))
    assert isinstance(method.cae, ConvAutoencoder3D) and method.cae.to_code.out_features == 24
    image = smooth(3, method.cfg.data.crop_size).sigmoid()
    batch = {"image": image, "tags": [{"status": "normal"}, {"status": "anomalous"}, {"status": "normal"}]}
    loss, _ = method(batch)
    normals = image[[0, 2]]
    assert torch.allclose(loss, (method.cae(normals) - normals).abs().mean())
    loss.backward()
    method.on_step_end(0, 2)  # stage 1 ends: the frozen CAE is the trained one
    assert method.stage == 2
    loss, logs = method(batch)
    with torch.no_grad():
        method.frozen_cae.eval()
        target = reference_target(image, method.frozen_cae(image), method.cfg.method.median_kernel)
        logits = method.unet(image)
    assert target.min() >= 0 and target.max() <= 1 and target.std() > 0
    assert torch.allclose(method.target(image), target, atol=1e-6)
    expected = -(target * torch.nn.functional.logsigmoid(logits)
                 + (1 - target) * torch.nn.functional.logsigmoid(-logits)).mean()
    assert torch.allclose(loss, expected, atol=1e-5) and logs["stage"] == 2.0


# ---- the contrastive autoencoder ------------------------------------------------------------------


def test_the_contrastive_autoencoder_contrasts_the_dense_code_its_decoder_reads(tmp_path) -> None:
    from sslmed.methods.losses import nt_xent
    from sslmed.train.checkpoint import load_encoder

    torch.manual_seed(6)
    method = build_method(load_config("contrastive_ae-tiny", ["method.code_dim=12", "method.gather=false"]))
    x1, x2 = smooth(4, 32), smooth(4, 32)
    codes: dict[str, list[torch.Tensor]] = {"projector": [], "decoder": []}
    # every input the projector and the decoder receive is the encoder's output h
    for reader in codes:
        getattr(method, reader).register_forward_hook(lambda m, args, out, r=reader: codes[r].append(args[0]))
    loss, logs = method({"image": x1, "image2": x2})
    h1, h2 = method.backbone(x1), method.backbone(x2)
    assert h1.shape == (4, 12)
    for reader in ("projector", "decoder"):
        assert all(torch.allclose(a, b) for a, b in zip(codes[reader], (h1, h2), strict=True))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in method.projector)
    assert sum(isinstance(m, torch.nn.Linear) for m in method.projector) == 3
    s = method.settings
    recon = ((method.decoder(h1) - x1) ** 2).mean() + ((method.decoder(h2) - x2) ** 2).mean()
    expected = s.contrastive_weight * nt_xent(method.projector(h1), method.projector(h2), s.temperature,
                                              gather=False) + 0.1 * recon
    assert s.recon_weight == 0.1 and torch.allclose(loss, expected, atol=1e-5)
    # the exported encoder gives h: what the cluster evaluation reads
    path = export_encoder(method.encoder(), tmp_path / "cae.safetensors", {})
    assert torch.allclose(load_encoder(path)(x1), h1.detach(), atol=1e-5)


# ---- SparK on the ResNet, and the residual method's separate labelled normal set ----------------------


def test_spark_on_the_resnet_hides_masked_patches_from_the_maps_and_trains_every_stage() -> None:
    from sslmed.methods.base import RNG
    from sslmed.methods.losses import random_grid_mask

    torch.manual_seed(7)
    method = build_method(load_config("spark-resnet18", ["data.crop_size=32", "model.size=tiny",
                                                         "model.patch_size=16"]))
    image = smooth(2, 32)
    visible, mask = random_grid_mask(image, 16, 0.6, torch.Generator().manual_seed(1))
    hidden = torch.nn.functional.interpolate(1 - visible, size=(32,) * 3, mode="nearest").bool()
    altered = torch.where(hidden, torch.randn_like(image), image)  # new content in masked patches only
    same = method.backbone.forward_features(image, mask=visible)
    other = method.backbone.forward_features(altered, mask=visible)
    assert all(torch.equal(a, b) for a, b in zip(same, other, strict=True))
    probe = torch.where(hidden, image, image + 1.0)  # a change where it is visible does reach the maps
    assert not torch.equal(method.backbone.forward_features(probe, mask=visible)[-1], same[-1])
    # the 1/32 stage is coarser than the 2³ mask grid: computed from masked maps, never zeroed whole
    assert same[-1].abs().sum() > 0
    loss, _ = method({"image": image, RNG: torch.Generator().manual_seed(1)})
    loss.backward()
    net = method.backbone.net  # every stage learns, the last one (never masked) included
    for part in (net.conv1, net.layer1, net.layer2, net.layer3, net.layer4):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_spark_on_the_resnet_refuses_patches_that_straddle_cells() -> None:
    with pytest.raises(ConfigError, match="power of two"):
        build_method(load_config("spark-resnet18", ["data.crop_size=32", "model.size=tiny",
                                                    "model.patch_size=12"]))


def write_normal_set(tmp_path) -> tuple:
    """A packed labelled set: two normal volumes (values < 0.5) and one anomalous (all 0.9)."""
    import numpy as np

    from sslmed.io.pack import pack

    rng = np.random.default_rng(3)
    volumes = {"n1": rng.uniform(0, 0.5, (36, 34, 33)), "n2": rng.uniform(0, 0.5, (30, 34, 32)),
               "a1": np.full((34, 34, 34), 0.9)}
    volumes["a1"][0, 0, 0] = 0.0  # not constant, or pack refuses it
    rows = ["path,status"]
    for name, array in volumes.items():
        np.save(tmp_path / f"{name}.npy", array.astype(np.float32))
        rows.append(f"{name}.npy,{'normal' if name.startswith('n') else 'anomalous'}")
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "labelled"
    pack([str(tmp_path / f"{n}.npy") for n in volumes], out, tags=tmp_path / "tags.csv", modality="ct",
         dtype="float16")
    return out


def test_residual_stage1_learns_from_the_separate_labelled_normal_set(tmp_path) -> None:
    from sslmed.data.sources import open_dataset
    from sslmed.errors import DataError

    labelled = write_normal_set(tmp_path)
    dataset = open_dataset(labelled)
    normals = [dataset.read(k) for k in dataset.keys if dataset.meta(k)["tags"]["status"] == "normal"]
    cfg = load_config("residual-tiny", ["method.stage1_steps=2", "method.cae_latent=8",
                                        f"method.normal_data={labelled}"])
    method = build_method(cfg)
    size = cfg.data.crop_size
    stream = torch.full((3, 1, size, size, size), float("nan"))  # the stream's batch is not read in stage 1
    loss, logs = method({"image": stream, "tags": [{}, {}, {}]})
    assert torch.isfinite(loss) and logs["normal_fraction"] == 1.0
    crops = method.normal_batch(stream)
    assert crops.shape == (3, 1, size, size, size)
    for crop in crops[:, 0].numpy():  # each crop is a block of a normal volume (zero-padded beyond it)
        assert crop.max() < 0.5 + 1e-3 and any(found_in(crop, v) for v in normals)
    assert torch.equal(crops, method.normal_batch(stream))  # drawn from (seed, rank, step): reproducible
    method.on_step_end(0, 2)
    assert not torch.equal(crops, method.normal_batch(stream))
    missing = build_method(load_config("residual-tiny", [f"method.normal_data={labelled}",
                                                        "method.normal_tag=status=healthy"]))
    with pytest.raises(DataError, match="no volume of .* is tagged status=healthy"):
        missing({"image": stream, "tags": [{}, {}, {}]})


def found_in(crop, volume) -> bool:
    """Whether `crop` equals the block of `volume` at some offset, zero-padded past its far side."""
    import numpy as np

    size = crop.shape[0]
    padded = np.pad(volume, [(0, size)] * 3)
    return any(np.array_equal(crop, padded[i:i + size, j:j + size, k:k + size])
               for i in range(max(volume.shape[0] - size, 0) + 1)
               for j in range(max(volume.shape[1] - size, 0) + 1)
               for k in range(max(volume.shape[2] - size, 0) + 1))
