"""A tiny method and an in-memory loader with the pipeline's interface, for the training tests.

The method masks random tokens (drawn from the step's generator the loop hands it, so exact resume needs
no RNG state) and keeps an EMA teacher as frozen registered parameters updated in `on_step_end` (any
nn.Module may: ZeRO-3 must gather them). The loader is endless,
deterministic in (seed, rank, position) and resumable through state_dict / load_state_dict.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

from sslmed.config import Config, load_config
from sslmed.models import ViT3D

CROP = 16


class TinyMethod(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.backbone = ViT3D(size="tiny", patch_size=8, dim=24, depth=2, heads=2)
        self.decoder = nn.Linear(24, 8**3)
        self.teacher = copy.deepcopy(self.backbone).requires_grad_(False)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"]
        tokens = self.backbone.forward_tokens(x)
        noise = torch.rand(tokens.shape[:2], device=x.device, generator=batch.get("rng"))
        keep = (noise > 0.5).to(tokens.dtype).unsqueeze(-1)
        patches = x.unfold(2, 8, 8).unfold(3, 8, 8).unfold(4, 8, 8).reshape(len(x), -1, 8**3)
        recon = ((self.decoder(tokens * keep) - patches) ** 2).mean()
        with torch.no_grad():
            target = self.teacher(x)
        distill = ((tokens.mean(1) - target) ** 2).mean()
        loss = recon + 0.1 * distill
        return loss, {"loss_recon": recon.detach(), "loss_distill": distill.detach()}

    def encoder(self) -> nn.Module:
        return self.backbone

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        for t, o in zip(self.teacher.parameters(), self.backbone.parameters(), strict=True):
            t.mul_(0.9).add_(o, alpha=0.1)


class ToyLoader:
    def __init__(self, cfg: Config, rank: int, world: int) -> None:
        self.cfg, self.rank, self.position = cfg, rank, 0
        self.epoch = 0

    def __iter__(self):
        while True:
            seed = self.cfg.train.seed * 100003 + self.rank * 1009 + self.position
            gen = torch.Generator().manual_seed(seed)
            self.position += 1
            self.epoch = self.position // 10
            b, s = self.cfg.train.micro_batch, self.cfg.data.crop_size
            yield {"image": torch.rand(b, 1, s, s, s, generator=gen),
                   "location": torch.rand(b, 3, generator=gen),
                   "key": [f"k{i}" for i in range(b)], "tags": [{} for _ in range(b)]}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def tiny_config(run_dir: Path, *overrides: str) -> Config:
    # patch 8: the config names MAE, whose masking needs more than one patch per crop
    return load_config(None, [f"run.dir={run_dir}", f"data.crop_size={CROP}", "model.patch_size=8",
                              "train.micro_batch=2",
                              "train.steps=4", "checkpoint.every=2", "optim.warmup_steps=2",
                              "optim.lr=0.001", *overrides])


def main(argv: list[str]) -> None:
    """`python tests/test_train_support.py RUN_DIR key=value ...` (also under torchrun)."""
    from sslmed.train.loop import run_pretraining

    torch.set_num_threads(1)
    run_pretraining(tiny_config(Path(argv[0]), *argv[1:]), TinyMethod, ToyLoader)


if __name__ == "__main__":
    main(sys.argv[1:])
