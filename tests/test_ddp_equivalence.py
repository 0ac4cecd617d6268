"""Two gloo ranks: N steps through sslmed's DeepSpeed engine (ZeRO-0) leave the same weights as torch DDP
with the same optimizer, schedule and clipping on the same per-rank batches."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

STEPS = 3
TOLERANCE = 1e-6  # fp32; the two sum the same two gradients, clip by norms summed in another order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from sslmed.bench.scaling import ddp_step, deepspeed_step
    from sslmed.bench.step import synthetic_batch
    from sslmed.config import load_config
    from sslmed.methods import build_method
    from sslmed.train.engine import init_distributed

    init_distributed()
    # SimCLR draws nothing at random, and gathers negatives across ranks inside its loss
    cfg = load_config(None, ["method.name=simclr", "data.views=2", "data.crop_size=16", "model.patch_size=8",
                             "model.dim=32", "model.depth=2", "model.heads=2", "train.micro_batch=2",
                             f"train.steps={STEPS}", "optim.lr=0.001", "optim.warmup_steps=1",
                             "optim.grad_clip=0.5"])
    batches = [synthetic_batch(2, 16, torch.device("cpu"), seed=100 * step + rank) for step in range(STEPS)]

    def trained(stepper) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        method = build_method(cfg)
        step = stepper(method, cfg)
        for i, batch in enumerate(batches):
            step(batch, i, STEPS)
        # parameters: BatchNorm running statistics stay per rank under DeepSpeed, while DDP copies
        # rank 0's into every rank at each forward
        return {k: v.detach().clone() for k, v in method.named_parameters()}

    reference, engine = trained(ddp_step), trained(deepspeed_step)
    torch.manual_seed(0)
    initial = dict(build_method(cfg).named_parameters())
    result = {"max_diff": max((reference[k] - engine[k]).abs().max().item() for k in reference),
              "moved": max((reference[k] - initial[k]).abs().max().item() for k in reference)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_deepspeed_zero0_weights_equal_ddp_after_n_steps(tmp_path):
    mp.spawn(run_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["moved"] > 1e-4  # the steps did change the weights
        assert result["max_diff"] <= TOLERANCE, result
