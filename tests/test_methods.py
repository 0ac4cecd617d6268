"""Methods: each overfits one tiny batch; teachers move by EMA only; masking; config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sslmed.config import CONFIG_DIR, load_config
from sslmed.errors import ConfigError
from sslmed.methods import METHODS, build_method
from sslmed.methods.base import cosine_momentum

torch.set_num_threads(1)

CNN_METHODS = {"resmae", "spark", "residual", "contrastive_ae", "drasclr"}
TWO_VIEWS = {"simclr", "byol", "simsiam", "contrastive_ae", "drasclr"}
LOSS_FLOOR = {"simsiam": -1.0}  # SimSiam's loss is a negative cosine


def tiny_config(name: str, *extra: str):
    overrides = [f"method.name={name}", "data.crop_size=16", "model.patch_size=4", "train.micro_batch=4",
                 "method.hidden_dim=32", "method.proj_dim=16", "method.decoder_dim=16",
                 "method.decoder_depth=1"]
    if name in ("resmae", "spark"):  # mask patches as large as the CNN's downsampling
        overrides += ["data.crop_size=32", "model.patch_size=16", "method.mask_ratio=0.5"]
    if name in CNN_METHODS:
        overrides += ["model.arch=cnn3d", "model.dim=4", "model.depth=1"]
    else:
        overrides += ["model.dim=32", "model.depth=2", "model.heads=4"]
    if name in TWO_VIEWS:
        overrides.append("data.views=2")
    if name == "drasclr":
        overrides.append("data.neighbour=true")
    if name == "residual":
        overrides.append("method.stage1_steps=1000")
    return load_config(None, overrides + list(extra))


def smooth_volumes(n: int, size: int = 16) -> torch.Tensor:
    """Low-frequency volumes: masked parts are predictable from visible ones."""
    coarse = torch.randn(n, 1, 3, 3, 3)
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)


def tiny_batch(n: int = 4, size: int = 16) -> dict:
    image = smooth_volumes(n, size)
    return {"image": image, "image2": image + 0.1 * torch.randn_like(image),
            "neighbour": torch.roll(image, shifts=2, dims=2) + 0.1 * torch.randn_like(image),
            "location": torch.rand(n, 3), "neighbour_location": torch.rand(n, 3),
            "key": [f"v{i}" for i in range(n)], "tags": [{"status": "normal"}] * n}


def train(method, batch: dict, steps: int, lr: float = 3e-3) -> list[float]:
    """Plain AdamW steps on one batch, calling the hook the training loop calls."""
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss, logs = method(batch)
        assert set(logs) and all(isinstance(v, float) for v in logs.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_step_end(step, steps)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_overfits_one_tiny_batch(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(tiny_config(name))
    crop = method.cfg.data.crop_size
    losses = train(method, tiny_batch(size=crop), steps=40)
    floor = LOSS_FLOOR.get(name, 0.0)
    first, last = losses[0] - floor, sum(losses[-3:]) / 3 - floor
    assert last <= 0.5 * first, f"{name}: loss {losses[0]:.4f} → {losses[-1]:.4f}"
    encoder = method.encoder()
    assert encoder(tiny_batch(2, crop)["image"]).shape == (2, encoder.feature_dim)


def test_mae_encoder_sees_only_visible_tokens_and_loss_ignores_visible_patches() -> None:
    torch.manual_seed(1)
    method = build_method(tiny_config("mae", "method.mask_ratio=0.75"))
    seen = []
    method.backbone.transformer.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    image = tiny_batch()["image"]
    out = method.masked_forward(image)
    assert seen == [64 - 48]
    assert (out["mask"].sum(1) == 48).all()
    loss = method.reconstruction_loss(image, out)
    out["pred"] = out["pred"] + 10.0 * (1 - out["mask"]).unsqueeze(-1)  # disturb visible predictions
    assert torch.equal(method.reconstruction_loss(image, out), loss)


def test_masks_differ_per_step_and_repeat_under_a_seed() -> None:
    method = build_method(tiny_config("mae"))
    image = tiny_batch()["image"]
    torch.manual_seed(7)
    a = method.masked_forward(image)["mask"]
    b = method.masked_forward(image)["mask"]
    torch.manual_seed(7)
    assert torch.equal(method.masked_forward(image)["mask"], a) and not torch.equal(a, b)


def ema_pairs(method):
    if method.name == "byol":
        return [(method.target["backbone"], method.backbone), (method.target["projector"], method.projector)]
    return [(method.teacher_encoder, method.backbone), (method.teacher_decoder, method.decoder)]


@pytest.mark.parametrize("name,extra", [("byol", ()), ("sssd", ("method.distill_target=ema",))])
def test_teacher_moves_by_ema_only(name: str, extra: tuple[str, ...]) -> None:
    torch.manual_seed(2)
    method = build_method(tiny_config(name, "method.ema_momentum=0.9", *extra))
    batch = tiny_batch()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = method(batch)
    opt.zero_grad()
    loss.backward()
    teachers = [t for t, _ in ema_pairs(method)]
    for teacher in teachers:
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    before = [[p.clone() for p in t.parameters()] for t in teachers]
    opt.step()  # moves the online networks only
    for teacher, old in zip(teachers, before, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), old, strict=True))
    step, max_steps = 3, 10
    method.on_step_end(step, max_steps)
    m = cosine_momentum(0.9, step, max_steps)
    assert m == pytest.approx(1 - 0.1 * (1 + torch.cos(torch.tensor(torch.pi * 0.3)).item()) / 2)
    for (teacher, online), old in zip(ema_pairs(method), before, strict=True):
        for p, q, o in zip(teacher.parameters(), old, online.parameters(), strict=True):
            assert torch.allclose(p, m * q + (1 - m) * o, atol=1e-7)
    assert cosine_momentum(0.9, max_steps, max_steps) == 1.0


def test_sssd_stopgrad_distillation_sends_no_gradient_into_the_decoder() -> None:
    torch.manual_seed(3)
    method = build_method(tiny_config("sssd", "method.distill_target=stopgrad"))
    image = tiny_batch()["image"]
    out = method.masked_forward(image)
    from sslmed.methods.losses import negative_cosine

    distill = negative_cosine(method.distill_head(out["visible"]), method.teacher_latent(image, out))
    distill.backward()
    assert all(p.grad is None for p in method.decoder.parameters())
    assert method.distill_head[0].weight.grad.abs().sum() > 0
    assert method.backbone.patch_embed.weight.grad.abs().sum() > 0


def test_residual_stages_follow_the_saved_step_counter() -> None:
    torch.manual_seed(4)
    method = build_method(tiny_config("residual", "method.stage1_steps=2"))
    batch = tiny_batch()
    batch["tags"] = [{"status": "normal"}, {"status": "abnormal"}, {}, {"status": "normal"}]
    # stage 1 ignores non-normal samples entirely
    loss, logs = method(batch)
    changed = dict(batch, image=batch["image"].clone())
    changed["image"][1:3] += 5.0
    assert logs["stage"] == 1.0 and torch.equal(method(changed)[0], loss)
    # a batch without normal samples still yields a differentiable zero
    none = dict(batch, tags=[{}] * 4)
    zero, _ = method(none)
    zero.backward()
    assert zero.item() == 0.0 and all(p.grad is not None for p in method.cae.parameters())
    train(method, batch, steps=2)
    assert method.stage == 2
    # the frozen snapshot is the CAE as stage 1 left it, and stays so
    for p, q in zip(method.frozen_cae.parameters(), method.cae.parameters(), strict=True):
        assert torch.equal(p, q) and not p.requires_grad
    snapshot = [p.clone() for p in method.frozen_cae.parameters()]
    train(method, batch, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(method.frozen_cae.parameters(), snapshot, strict=True))
    # resume: a fresh method loading the state continues in stage 2 with the same frozen CAE
    fresh = build_method(tiny_config("residual", "method.stage1_steps=2"))
    assert fresh.stage == 1
    fresh.load_state_dict(method.state_dict())
    assert fresh.stage == 2 and int(fresh.steps_done) == 4
    method.eval()
    fresh.eval()
    torch.manual_seed(5)
    assert torch.equal(fresh(batch)[0], method(batch)[0])
    assert method.encoder() is method.residual_net.backbone


@pytest.mark.parametrize("overrides,match", [
    (["method.name=nope"], "unknown method.name"),
    (["method.name=simclr"], "data.views: 2"),
    (["method.name=simclr", "data.views=2", "train.micro_batch=1"], "micro_batch"),
    (["method.name=resmae"], "model.arch: cnn3d"),
    (["method.name=drasclr", "model.arch=cnn3d", "data.views=2"], "data.neighbour"),
    (["method.name=residual", "model.arch=cnn3d"], "stage1_steps"),
    (["method.name=residual", "model.arch=cnn3d", "method.stage1_steps=3", "method.normal_tag=normal"],
     "key=value"),
    (["method.name=spark", "model.arch=cnn3d", "data.crop_size=24", "model.patch_size=8"], "multiple of 16"),
    (["method.name=spark", "model.arch=cnn3d", "data.crop_size=32", "model.patch_size=8"], "downsampling"),
])
def test_config_mistakes_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_method(load_config(None, ["model.dim=8", "model.depth=1", "model.heads=2", "data.crop_size=32",
                                        "model.patch_size=8", *overrides]))


def test_every_method_ships_tiny_and_base_configs_that_load() -> None:
    for name in METHODS:
        for size in ("tiny", "base"):
            cfg = load_config(f"{name}-{size}")
            assert cfg.method.name == name
            assert Path(CONFIG_DIR / f"{name}-{size}.yaml").exists()
        assert cfg.train.precision == "bf16" and cfg.train.zero_stage == 2 and cfg.data.crop_size == 96


@pytest.mark.parametrize("name", ["mae", "drasclr"])
def test_tiny_config_builds_and_steps(name: str) -> None:
    cfg = load_config(f"{name}-tiny")
    method = build_method(cfg)
    batch = tiny_batch(cfg.train.micro_batch, cfg.data.crop_size)
    train(method, batch, steps=1)
