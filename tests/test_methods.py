"""Methods: each overfits one tiny batch; teachers move by EMA only; masking; config checks."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sslmed.config import CONFIG_DIR, load_config
from sslmed.errors import ConfigError
from sslmed.methods import METHODS, build_method
from sslmed.methods.base import RNG, cosine_momentum
from sslmed.methods.losses import random_grid_mask
from sslmed.rng import step_generator

torch.set_num_threads(1)

LOSS_FLOOR = {"simsiam": -1.0}  # SimSiam's loss is a negative cosine
# settings without a usable default (drasclr: queues for the grid points of no data set here)
REQUIRED = {"residual": ["method.stage1_steps=1000"], "drasclr": ["method.locations=2"]}
# The residual method's CAE ends in a LeakyReLU, as its authors' does: it reconstructs [0, 1] intensities.
UNIT_INTENSITIES = {"residual"}


def tiny_config(name: str, *extra: str):
    """The smallest config `name` accepts: its declared needs, small heads, the smallest geometry."""
    cls = METHODS[name]
    fields = cls.Settings.__dataclass_fields__
    small = {"hidden_dim": 32, "proj_dim": 16, "decoder_dim": 16, "decoder_depth": 1}
    overrides = [f"method.name={name}", "train.micro_batch=4", *cls.needs.overrides(),
                 *(f"method.{k}={v}" for k, v in small.items() if k in fields), *REQUIRED.get(name, [])]
    if cls.needs.backbone in ("cnn3d", "cnn3d_cond"):
        overrides += ["model.dim=4", "model.depth=1"]
    elif cls.needs.backbone == "resnet3d":
        overrides += ["model.dim=4", "model.depth=10", "method.cae_latent=32"]
    else:
        overrides += ["model.dim=32", "model.depth=2", "model.heads=4"]
    cfg = load_config(None, [*overrides, "data.crop_size=16", "model.patch_size=4", *extra])
    try:
        cls.check_config(cfg)
    except ConfigError:  # e.g. CNN masking: mask patches as large as the CNN's downsampling
        masked = ["method.mask_ratio=0.5"] if "mask_ratio" in fields else []
        cfg = load_config(None, [*overrides, "data.crop_size=32", "model.patch_size=16", *masked, *extra])
        cls.check_config(cfg)
    return cfg


def smooth_volumes(n: int, size: int = 16) -> torch.Tensor:
    """Low-frequency volumes: masked parts are predictable from visible ones."""
    coarse = torch.randn(n, 1, 3, 3, 3)
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)


def tiny_batch(n: int = 4, size: int = 16) -> dict:
    image = smooth_volumes(n, size)
    return {"image": image, "image2": image + 0.1 * torch.randn_like(image),
            "neighbour": torch.roll(image, shifts=2, dims=2) + 0.1 * torch.randn_like(image),
            "neighbour2": torch.roll(image, shifts=-2, dims=3) + 0.1 * torch.randn_like(image),
            "location": torch.rand(n, 3) * 2 - 1, "neighbour_location": torch.rand(n, 3) * 2 - 1,
            "neighbour2_location": torch.rand(n, 3) * 2 - 1, "grid_point": [1] * n,
            "key": [f"v{i}" for i in range(n)], "tags": [{"status": "normal"}] * n}


def train(method, batch: dict, steps: int, lr: float = 3e-3) -> list[float]:
    """Plain AdamW steps on one batch, calling the hook the training loop calls."""
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        loss, logs = method(batch)
        assert set(logs) and all(isinstance(v, float) or (v.ndim == 0 and not v.requires_grad)
                                 for v in logs.values()), "logs are detached scalars"
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_step_end(step, steps)
        losses.append(loss.item())
    return losses


# MoCo's queue fills with the repeated batch's own earlier keys, near copies of its positives: one batch
# shown again and again cannot be overfit by DrasCLR (tests/test_drasclr.py checks its losses instead)
@pytest.mark.parametrize("name", sorted(set(METHODS) - {"drasclr"}))
def test_every_method_overfits_one_tiny_batch(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(tiny_config(name))
    crop = method.cfg.data.crop_size
    batch = tiny_batch(size=crop)
    if name in UNIT_INTENSITIES:
        batch["image"] = batch["image"].sigmoid()
    losses = train(method, batch, steps=40)
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


@pytest.mark.parametrize("name", ["mae", "sssd"])
def test_with_a_clean_view_the_reconstruction_target_is_the_clean_crop(name: str) -> None:
    """`image_clean` (data.clean_view) replaces the augmented input as the target, masking unchanged:
    the loss is the masked MSE against the clean crop's patches, computed here from the predictions."""
    from sslmed.methods.losses import patchify

    method = build_method(tiny_config(name, "method.norm_pix_loss=false"))
    image = tiny_batch(size=method.cfg.data.crop_size)["image"]
    clean = image.flip(2)  # any other crop of the same shape
    losses = {}
    for target in ("image", "clean"):
        batch = {"image": image, RNG: torch.Generator().manual_seed(3)}
        if target == "clean":
            batch["image_clean"] = clean
        torch.manual_seed(0)
        losses[target] = method(batch)[1]["loss_recon"]
    out = method.masked_forward(image, torch.Generator().manual_seed(3))
    error = ((out["pred"] - patchify(clean, method.patch_size)) ** 2).mean(-1)
    expected = (error * out["mask"]).sum() / out["mask"].sum()
    torch.testing.assert_close(losses["clean"], expected.detach())
    assert not torch.allclose(losses["clean"], losses["image"])


@pytest.mark.parametrize("name", ["mae", "spark"])
def test_a_steps_mask_is_a_function_of_seed_rank_and_step(name: str) -> None:
    method = build_method(tiny_config(name))
    image = tiny_batch(size=method.cfg.data.crop_size)["image"]
    torch.manual_seed(7)

    def mask(seed: int, rank: int, step: int, micro_step: int = 0) -> torch.Tensor:
        generator = step_generator(seed, rank, step, image.device, micro_step=micro_step)
        if name == "mae":
            return method.masked_forward(image, generator)["mask"]
        return random_grid_mask(image, method.patch_size, method.mask_ratio, generator)[1]

    a = mask(0, 0, 5)
    torch.rand(100)  # the global RNG plays no part
    assert torch.equal(mask(0, 0, 5), a)
    for other in (mask(0, 0, 6), mask(0, 1, 5), mask(1, 0, 5), mask(0, 0, 5, micro_step=1)):
        assert not torch.equal(other, a)


def ema_pairs(method):
    teacher = method.teacher.module
    if method.name == "byol":
        return [(teacher["backbone"], method.backbone), (teacher["projector"], method.projector)]
    return [(teacher["encoder"], method.backbone), (teacher["decoder"], method.decoder)]


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
    registered = {id(p) for p in method.parameters()}
    for teacher in teachers:
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        assert not registered & {id(p) for p in teacher.parameters()}, "teachers live outside the module"
    assert not any("teacher" in key for key in method.state_dict())
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
    batch = tiny_batch(size=method.cfg.data.crop_size)
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
    method.zero_grad()
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
    assert method.encoder() is method.unet.backbone


@pytest.mark.parametrize("overrides,match", [
    (["method.name=nope"], "unknown method.name"),
    (["method.name=simclr"], "data.views: 2"),
    (["method.name=mae", "data.views=2"], "data.views: 1"),
    (["method.name=simclr", "data.views=2", "train.micro_batch=1"], "micro_batch"),
    (["method.name=resmae"], "model.arch: cnn3d"),
    (["method.name=drasclr", "model.arch=cnn3d", "data.views=2"], "model.arch: cnn3d_cond"),
    (["method.name=drasclr", "model.arch=cnn3d_cond", "data.views=2"], "data.neighbour"),
    (["method.name=drasclr", "model.arch=cnn3d_cond", "data.views=2", "data.neighbour=true"],
     "data.sampling: atlas_grid"),
    (["method.name=drasclr", "model.arch=cnn3d_cond", "data.views=2", "data.neighbour=true",
      "data.sampling=atlas_grid", "method.queue_size=1", "train.micro_batch=2"], "method.queue_size 1"),
    (["method.name=residual", "model.arch=resnet3d"], "stage1_steps"),
    (["method.name=residual", "model.arch=resnet3d", "method.stage1_steps=3", "method.normal_tag=normal"],
     "key=value"),
    (["method.name=residual", "model.arch=cnn3d", "method.stage1_steps=3"], "model.arch: resnet3d"),
    (["method.name=residual", "model.arch=resnet3d", "method.stage1_steps=3", "data.crop_size=48"],
     "multiple of 32"),
    (["method.name=spark", "model.arch=cnn3d", "data.crop_size=24", "model.patch_size=8"], "multiple of 16"),
    (["method.name=spark", "model.arch=cnn3d", "data.crop_size=32", "model.patch_size=8"], "downsampling"),
    (["method.mask_ratio=1.0"], r"'method.mask_ratio' must be in \(0, 1\)"),
    (["method.mask_ratio=0"], r"'method.mask_ratio' must be in \(0, 1\)"),
    (["data.crop_size=8"], "masks 1; it must hide at least one patch and show at least one"),
    (["method.mask_ratio=0.005"], "masks 0; it must hide at least one patch"),
    (["method.name=byol", "method.ema_momentum=1.5"], "must be in"),
])
def test_config_mistakes_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_method(load_config(None, ["model.dim=8", "model.depth=1", "model.heads=2", "data.crop_size=32",
                                        "model.patch_size=8", *overrides]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_setting_of_another_method_or_an_unknown_one_is_refused_in_one_line(name: str, tmp_path) -> None:
    own = [f for f in METHODS[name].Settings.__dataclass_fields__ if f != "name"]
    foreign = next(f for other in METHODS.values() for f in other.Settings.__dataclass_fields__
                   if f not in own and f != "name")
    for key in (foreign, "no_such_setting"):
        with pytest.raises(ConfigError) as error:
            load_config(None, [f"method.name={name}", f"method.{key}=1"])
        message = str(error.value)
        assert "\n" not in message and f"method '{name}' has no setting '{key}'" in message
        assert message.endswith(f"its settings: {', '.join(own) or 'none'}")
    # the same from a YAML file, whichever order its keys come in; its own settings are accepted there
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"method:\n  {foreign}: 1\n  name: {name}\n")
    with pytest.raises(ConfigError, match=f"run.yaml: method '{name}' has no setting '{foreign}'"):
        load_config(str(yaml))
    values = {k: v for k, v in dataclasses.asdict(METHODS[name].Settings()).items() if k != "name"}
    values.update({k: int(v) for k, v in (o[len("method."):].split("=") for o in REQUIRED.get(name, []))})
    yaml.write_text(json.dumps({"method": {**values, "name": name}}))  # JSON is YAML; `name` comes last
    assert dataclasses.asdict(load_config(str(yaml)).method) == dataclasses.asdict(
        load_config(None, [f"method.name={name}", *REQUIRED.get(name, [])]).method)


def test_every_method_ships_tiny_and_base_configs_that_load() -> None:
    for name in METHODS:
        for size in ("tiny", "base"):
            cfg = load_config(f"{name}-{size}")
            assert cfg.method.name == name
            assert Path(CONFIG_DIR / f"{name}-{size}.yaml").exists()
        assert cfg.train.precision == "bf16" and cfg.train.zero_stage == 2
        assert cfg.data.crop_size == (32 if name == "drasclr" else 96)  # DrasCLR's encoder: 32³ → 1³


@pytest.mark.parametrize("name", ["mae", "drasclr"])
def test_tiny_config_builds_and_steps(name: str) -> None:
    cfg = load_config(f"{name}-tiny", REQUIRED.get(name, []))
    method = build_method(cfg)
    batch = tiny_batch(cfg.train.micro_batch, cfg.data.crop_size)
    train(method, batch, steps=1)


def test_the_readme_lists_exactly_the_registered_methods() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("### Methods"):].split("\n\n")[1]
    listed = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert listed == set(METHODS)
