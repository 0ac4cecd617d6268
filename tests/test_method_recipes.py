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
