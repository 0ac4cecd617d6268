"""Training-step throughput of sslmed's methods, with MONAI's MaskedAutoEncoderViT side by side.

A trimmed copy of the training loop (forward, backward, optimizer step, `on_step_end`) on a fixed
synthetic batch, so it measures the model step and nothing else: no data loading and, unless
`--engine deepspeed`, no DeepSpeed. FLOPs of one step (forward + backward) are counted once per
configuration with torch's FlopCounterMode, without activation checkpointing, so TFLOP/s and MFU are
model FLOPs (recomputation is not credited).

    python -m sslmed.bench.step --quick
    sslmed bench step --methods mae --sizes base --crops 96 --batch 64 --compile
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from sslmed.bench import common
from sslmed.errors import SslmedError

TWINNED = ("mae",)  # methods that MONAI's MaskedAutoEncoderViT computes as well
# A timing choice, not a need: the residual method's timed steps are its stage 2 (stage 1 lasts one step).
# DrasCLR's queues: one per grid point; the synthetic batch is at one point, and a step's time does not
# depend on how many queues there are.
TIMED_STAGE = {"residual": ["method.stage1_steps=1"], "drasclr": ["method.locations=1"]}


@dataclass
class Case:
    method: str
    size: str
    crop: int
    checkpointing: bool
    impl: str = "sslmed"  # or "monai"


# ---- what is stepped ----------------------------------------------------------------------------


def synthetic_batch(batch: int, crop: int, device: torch.device, seed: int = 0) -> dict:
    """Every key any method reads (architecture.md's batch table), filled with fixed random values."""
    gen = torch.Generator().manual_seed(seed)

    def volume() -> torch.Tensor:
        return torch.randn(batch, 1, crop, crop, crop, generator=gen).to(device)

    def location() -> torch.Tensor:
        return (torch.rand(batch, 3, generator=gen) * 2 - 1).to(device)  # [-1, 1], as the stream's

    out = {"image": volume(), "image2": volume(), "location": location(), "neighbour": volume(),
           "neighbour_location": location(), "key": [f"synthetic-{i}" for i in range(batch)],
           "tags": [{"status": "normal", "label": str(i % 2)} for i in range(batch)]}
    # the atlas-grid keys (one grid point per batch, its second-nearest neighbour)
    return {**out, "neighbour2": volume(), "neighbour2_location": location(), "grid_point": [0] * batch}


def bench_config(args: argparse.Namespace, method: str, size: str, crop: int, checkpointing: bool):
    """The config defaults for `method`, with what its declared needs ask for (sslmed.methods.METHODS)
    and `--mask-ratio` where the method has that setting."""
    from sslmed.config import load_config
    from sslmed.errors import ConfigError
    from sslmed.methods import METHODS

    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    cls = METHODS[method]
    masked = "mask_ratio" in cls.Settings.__dataclass_fields__
    overrides = [f"method.name={method}", f"model.size={size}", f"data.crop_size={crop}",
                 f"train.micro_batch={args.batch}", f"train.precision={args.precision}",
                 f"train.activation_checkpointing={checkpointing}",
                 f"train.compile={args.compile}", f"train.zero_stage={args.zero_stage}",
                 *cls.needs.overrides(), *([f"method.mask_ratio={args.mask_ratio}"] if masked else []),
                 *TIMED_STAGE.get(method, []), *args.set]
    return load_config(None, overrides)


def build_sslmed(cfg) -> nn.Module:
    from sslmed.methods import build_method

    return build_method(cfg)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, D, H, W) → (B, T, patch³·C), tokens in D-H-W raster order as a strided Conv3d emits them."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // patch, patch, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, -1, patch**3 * c)


class MonaiMAE(nn.Module):
    """MONAI's MaskedAutoEncoderViT computing the MAE objective: MSE on the masked patches only."""

    def __init__(self, net: nn.Module, patch: int) -> None:
        super().__init__()
        self.net, self.patch = net, patch

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"]
        pred, mask = self.net(x)
        per_patch = (pred.float() - patchify(x, self.patch).float()).pow(2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach()}

    def on_step_end(self, step: int, max_steps: int) -> None:
        return None


def monai_twin(method: nn.Module, cfg) -> MonaiMAE:
    """MONAI's MAE with the sslmed method's encoder and decoder shapes and mask ratio. MONAI adds a
    class token (one more token per sequence) and lets a random multinomial draw choose the kept patches."""
    from monai.networks.nets import MaskedAutoEncoderViT

    enc, dec = method.encoder(), method.decoder
    dec_dim, dec_blocks = dec.embed.out_features, dec.transformer.blocks
    net = MaskedAutoEncoderViT(
        in_channels=enc.in_channels, img_size=cfg.data.crop_size, patch_size=enc.patch_size,
        hidden_size=enc.dim, mlp_dim=int(enc.dim * enc.mlp_ratio), num_layers=enc.depth, num_heads=enc.heads,
        masking_ratio=cfg.method.mask_ratio, decoder_hidden_size=dec_dim,
        decoder_mlp_dim=dec_blocks[0].mlp[0].out_features, decoder_num_layers=len(dec_blocks),
        decoder_num_heads=dec_blocks[0].heads, qkv_bias=True, proj_type="conv", pos_embed_type="sincos")
    return MonaiMAE(net, enc.patch_size)


def set_checkpointing(module: nn.Module, on: bool) -> None:
    """sslmed's switch for sslmed modules; MONAI's blocks have no such switch, so they are wrapped."""
    from sslmed.models import set_activation_checkpointing

    if not isinstance(module, MonaiMAE):
        set_activation_checkpointing(module, on)
        return
    for name in ("blocks", "decoder_blocks"):
        seq = getattr(module.net, name)
        for i, block in enumerate(seq):
            inner = block.inner if isinstance(block, Recompute) else block
            seq[i] = Recompute(inner) if on and not isinstance(block, nn.LayerNorm) else inner


class Recompute(nn.Module):
    """A block recomputed in backward, as sslmed's blocks are when their `checkpointing` is on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


# ---- stepping -----------------------------------------------------------------------------------


def with_rng(batch: dict, step: int, device: torch.device) -> dict:
    """The batch with the step's generator, as the training loop hands it to the method."""
    from sslmed.methods.base import RNG
    from sslmed.rng import step_generator

    return {**batch, RNG: step_generator(0, 0, step, device)}


def torch_stepper(module: nn.Module, device: torch.device, bf16: bool, compile_: bool,
                  total: int) -> Callable[[dict, int], None]:
    """nanoGPT-style: AdamW (fused on CUDA), bf16 autocast, the method's own `on_step_end`."""
    forward = torch.compile(module) if compile_ else module
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(batch: dict, i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = forward(with_rng(batch, i, device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.on_step_end(i, total)

    return step


def deepspeed_stepper(module: nn.Module, cfg, total: int) -> Callable[[dict, int], None]:
    """The same step through sslmed's DeepSpeed engine (ZeRO stage, precision, compile from cfg)."""
    from sslmed.train.engine import build_engine, init_distributed

    engine = build_engine(cfg, module, init_distributed())

    def step(batch: dict, i: int) -> None:
        loss, _ = engine(with_rng(batch, i, engine.info.device))
        engine.backward(loss)
        engine.step()
        with engine.full_params():
            engine.module.on_step_end(i, total)

    return step


def count_flops(module: nn.Module, batch: dict, bf16: bool, device: torch.device, checkpointing: bool) -> int:
    """FLOPs of one forward + backward (matmuls, convolutions, attention) counted by torch, with
    recomputation off so that it counts model FLOPs; the gradients it leaves are discarded."""
    set_checkpointing(module, False)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = module(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    set_checkpointing(module, checkpointing)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; process high-water


def measure(case: Case, args: argparse.Namespace, device: torch.device, flops_cache: dict) -> dict:
    torch.manual_seed(args.seed)
    cfg = bench_config(args, case.method, case.size, case.crop, case.checkpointing)
    module = build_sslmed(cfg)
    if case.impl == "monai":
        module = monai_twin(module, cfg)
    module.to(device).train()
    set_checkpointing(module, case.checkpointing)
    batch = synthetic_batch(args.batch, case.crop, device, args.seed)
    bf16 = args.precision == "bf16"
    key = (case.impl, case.method, case.size, case.crop)
    total = args.warmup + args.steps
    deepspeed = args.engine == "deepspeed"
    if deepspeed and key not in flops_cache:  # before the engine takes the module over
        flops_cache[key] = count_flops(module, batch, bf16, device, case.checkpointing)
    step = deepspeed_stepper(module, cfg, total) if deepspeed else torch_stepper(
        module, device, bf16, args.compile, total)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(batch, i)
    if key not in flops_cache:  # after warmup: stateful methods (residual's stage 2) are counted as timed
        flops_cache[key] = count_flops(module, batch, bf16, device, case.checkpointing)
    synchronize(device)
    start = time.perf_counter()
    for i in range(args.warmup, total):
        step(batch, i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    flops = flops_cache[key]
    return {
        "method": case.method, "impl": case.impl, "size": case.size, "crop": case.crop, "batch": args.batch,
        "ckpt": case.checkpointing, "compile": args.compile, "precision": args.precision,
        "engine": "deepspeed" if deepspeed else "torch", "status": "ok",
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "step_ms": seconds * 1e3, "samples_per_s": args.batch / seconds,
        "voxels_per_s": args.batch * case.crop**3 / seconds, "gflop_per_step": flops / 1e9,
        "tflops": flops / seconds / 1e12, "peak_mem_mb": peak_memory_mb(device),
    }


# ---- the run ------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[Case]:
    ckpt = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    cases = []
    for method in args.methods:
        for size in args.sizes:
            for crop in args.crops:
                for on in ckpt:
                    cases.append(Case(method, size, crop, on))
                    if method in TWINNED and not args.no_monai:
                        cases.append(Case(method, size, crop, on, impl="monai"))
    return cases


def add_ratios(rows: list[dict]) -> None:
    """sslmed ÷ MONAI samples/s on the sslmed row of every configuration measured both ways."""
    monai = {(r["method"], r["size"], r["crop"], r["ckpt"]): r for r in rows if r["impl"] == "monai"}
    for row in rows:
        twin = monai.get((row["method"], row["size"], row["crop"], row["ckpt"]))
        if row["impl"] == "sslmed" and twin and "samples_per_s" in twin:
            row["vs_monai"] = row["samples_per_s"] / twin["samples_per_s"]


def headline(rows: list[dict]) -> dict:
    """The largest MAE configuration without recomputation (and its MONAI ratio) for the summary line."""
    sizes = {"tiny": 0, "small": 1, "base": 2}
    mae = [r for r in rows if r["impl"] == "sslmed" and r["method"] == "mae" and not r["ckpt"]
           and "samples_per_s" in r]
    if not mae:
        return {}
    best = max(mae, key=lambda r: (sizes.get(r["size"], -1), r["crop"]))
    return {"mae_samples_per_s": best["samples_per_s"], "speedup_vs_monai": best.get("vs_monai"),
            "mfu": best.get("mfu"), "tflops": best["tflops"], "size": best["size"], "crop": best["crop"]}


COLUMNS = ["method", "impl", "size", "crop", "batch", "ckpt", "params_m", "step_ms", "samples_per_s",
           "voxels_per_s", "gflop_per_step", "tflops", "mfu", "peak_mem_mb", "vs_monai", "status"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, 32³ crops, few steps (< 2 min on 2 cores)")
    p.add_argument("--methods", type=_list(str), help="comma-separated (default: every method in METHODS)")
    p.add_argument("--sizes", type=_list(str), help="default tiny,small,base on GPU; tiny,small on CPU")
    p.add_argument("--crops", type=_list(int), help="default 64,96,128 on GPU; 32,64 on CPU")
    p.add_argument("--batch", type=int, help="micro-batch (default 32 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps (default 20 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5 on GPU, 2 on CPU)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if gpu else "fp32")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                   help="activation checkpointing (sslmed.models.set_activation_checkpointing)")
    p.add_argument("--compile", action="store_true", help="torch.compile the module")
    p.add_argument("--engine", choices=["torch", "deepspeed"], default="torch",
                   help="torch: AdamW loop; deepspeed: through sslmed.train.engine (MONAI rows too)")
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3], help="with --engine deepspeed")
    p.add_argument("--no-monai", action="store_true", help="skip MONAI's MaskedAutoEncoderViT")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: 1 with --quick on CPU, else torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", help="directory for step.jsonl (default benchmarks/results)")
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    quick = args.quick
    defaults = {
        "sizes": ["tiny"] if quick else ["tiny", "small", "base"] if on_gpu else ["tiny", "small"],
        "crops": [32] if quick else [64, 96, 128] if on_gpu else [32, 64],
        "batch": 2 if quick or not on_gpu else 32,
        "steps": 2 if quick else 20 if on_gpu else 5,
        "warmup": 1 if quick else 5 if on_gpu else 2,
        "threads": 1 if quick and not on_gpu else None,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.methods is None:
        from sslmed.methods import METHODS

        args.methods = list(METHODS)
    return args


def _list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            message = f"not a comma-separated list of {kind.__name__}: {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    return parse


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak, peak_source = common.device_peak(device, dtype)
    print(f"device: {common.device_name(args.device)}; peak {peak / 1e12:.3g} TFLOP/s ({peak_source}); "
          f"precision {args.precision}; batch {args.batch}; {args.warmup} warmup + {args.steps} timed steps; "
          f"{torch.get_num_threads()} thread(s); load average {common.load_average():.1f}")
    rows, flops_cache = [], {}
    for case in plan(args):
        try:
            row = measure(case, args, device, flops_cache)
            row["mfu"] = row["tflops"] * 1e12 / peak
        except (torch.OutOfMemoryError, SslmedError) as exc:  # one configuration fails, the rest still run
            if device.type == "cuda":
                torch.cuda.empty_cache()
            status = "oom" if isinstance(exc, torch.OutOfMemoryError) else f"error: {exc}"
            row = {**vars(case), "ckpt": case.checkpointing, "batch": args.batch, "status": status}
        rows.append(row)
        rate = row.get("samples_per_s", float("nan"))
        print(f"  {case.impl:6s} {case.method:14s} {case.size:5s} {case.crop:3d}³ "
              f"ckpt={case.checkpointing!s:5s} {rate:9.2f} samples/s", flush=True)
    add_ratios(rows)
    print(common.format_table(rows, COLUMNS))
    machine = common.machine_info(args.device)
    extra = {"peak_tflops": peak / 1e12, "peak_source": peak_source, "warmup": args.warmup,
             "steps": args.steps, "mask_ratio": args.mask_ratio, "quick": args.quick,
             "zero_stage": args.zero_stage}
    path = common.append_results("step", [{**row, **extra, "machine": machine} for row in rows], args.results)
    print(f"results appended to {path}")
    summary = {**headline(rows), "device": machine["device"], "precision": args.precision}
    print(common.summary_line(summary))
    return summary


if __name__ == "__main__":
    main()
