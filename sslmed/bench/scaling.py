"""Data-parallel scaling: 1 vs 2 ranks on CPU (gloo), and ZeRO communication projected to 8 and 64 GPUs.

Each world size is launched as separate processes (this file with `--worker`, RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT in the environment, as torchrun sets them). Every rank steps a method through
sslmed's DeepSpeed engine (or plain DDP with `--engine ddp`) on a fixed synthetic batch and reports its
own samples/s. Scaling efficiency = mean per-rank samples/s at N ranks ÷ samples/s at 1 rank.

    python -m sslmed.bench.scaling --quick
    sslmed bench scaling --zero-stage 2 --project
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sslmed.bench import common

# Link bandwidths per GPU per direction, bytes/s. NVLink 4 (H100/H200 SXM): 900 GB/s both ways
# together; InfiniBand NDR: one 400 Gb/s NIC per GPU (rail-optimised 8-GPU nodes).
LINKS = {"nvlink4": 450e9, "ib_ndr400": 400e9 / 8}
GPUS_PER_NODE = 8


# ---- communication model ------------------------------------------------------------------------


def comm_elements_per_gpu(psi: int, stage: int, world: int) -> float:
    """Elements each GPU sends per optimizer step with ring collectives (bandwidth term only).

    Ring all-reduce = reduce-scatter + all-gather, each sending (N−1)/N·Ψ per GPU.
    ZeRO-0 (DDP): all-reduce of gradients, 2(N−1)/N·Ψ. ZeRO-1/2: reduce-scatter of gradients then
    all-gather of the updated parameter partitions, also 2(N−1)/N·Ψ. ZeRO-3: parameters all-gathered
    before forward and again before backward, gradients reduce-scattered, 3(N−1)/N·Ψ.
    """
    if world <= 1:
        return 0.0
    passes = 3 if stage == 3 else 2
    return passes * (world - 1) / world * psi


def bottleneck_link(world: int) -> str:
    """Within one node the ring runs over NVLink; across nodes every GPU's share crosses its IB NIC."""
    return "nvlink4" if world <= GPUS_PER_NODE else "ib_ndr400"


def projection(psi: int, worlds: tuple[int, ...] = (8, 64), bytes_per_element: int = 2) -> list[dict]:
    """Per-GPU bytes and communication time per step for each ZeRO stage and world size."""
    rows = []
    for stage in (0, 1, 2, 3):
        for world in worlds:
            volume = comm_elements_per_gpu(psi, stage, world) * bytes_per_element
            link = bottleneck_link(world)
            rows.append({"zero_stage": stage, "gpus": world, "params_m": psi / 1e6,
                         "passes_of_psi": 3 if stage == 3 else 2, "per_gpu_mb": volume / 1e6,
                         "link": link, "link_gb_s": LINKS[link] / 1e9,
                         "comm_ms": volume / LINKS[link] * 1e3})
    return rows


def mae_parameter_count(size: str = "base", crop: int = 96) -> int:
    """Ψ: trainable parameters of sslmed's MAE (encoder + decoder) at `size`, counted on the real model."""
    from sslmed.config import load_config
    from sslmed.methods import build_method

    cfg = load_config(None, ["method.name=mae", "model.arch=vit3d", f"model.size={size}",
                             f"data.crop_size={crop}"])
    method = build_method(cfg)
    return sum(p.numel() for p in method.parameters() if p.requires_grad)


# ---- one rank -----------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Runs in a launched process: step `args.steps` times after `args.warmup`, write samples/s."""
    began = time.perf_counter()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads_per_rank)
    from sslmed.bench.step import bench_config, build_sslmed, synthetic_batch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(args.seed)
    cfg = bench_config(args, args.method, args.size, args.crop, False)
    method = build_sslmed(cfg)
    batch = synthetic_batch(args.batch, args.crop, torch.device("cpu"), seed=args.seed + rank)
    step = deepspeed_step(method, cfg) if args.engine == "deepspeed" else ddp_step(method, cfg)
    total = args.warmup + args.steps
    ready = time.perf_counter()
    for i in range(args.warmup):
        step(batch, i, total)
    dist.barrier()
    start = time.perf_counter()
    for i in range(args.warmup, total):
        step(batch, i, total)
    elapsed = time.perf_counter() - start
    dist.barrier()
    result = {"rank": rank, "world": world, "seconds": elapsed, "setup_s": ready - began,
              "warmup_s": start - ready, "samples_per_s": args.batch * args.steps / elapsed}
    Path(args.worker_out).write_text(json.dumps(result))
    dist.destroy_process_group()


def deepspeed_step(method, cfg):
    from sslmed.train.engine import build_engine, init_distributed

    engine = build_engine(cfg, method, init_distributed())

    def step(batch: dict, i: int, total: int) -> None:
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        with engine.full_params():
            engine.module.on_step_end(i, total)

    return step


def ddp_step(method, cfg):
    """torch DDP over gloo: the reference without DeepSpeed, with the engine's own optimizer (AdamW,
    parameter groups), schedule and gradient clipping, so that both do the same work per step."""
    import torch
    import torch.distributed as dist

    from sslmed.train.engine import build_optimizer, lr_factor

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(method)
    optimizer = build_optimizer(method, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, cfg))
    bf16 = cfg.train.precision == "bf16"

    def step(batch: dict, i: int, total: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model(batch)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(i, total)

    return step


# ---- launching ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, args: argparse.Namespace, scratch: Path) -> list[dict]:
    """`world` processes of this script as `--worker`, like torchrun; their per-rank results."""
    port = free_port()
    procs, outs = [], []
    for rank in range(world):
        out = scratch / f"world{world}-rank{rank}.json"
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(args.threads_per_rank)}
        cmd = [sys.executable, "-m", "sslmed.bench.scaling", *worker_argv(args),
               "--worker", "--worker-out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env))
        outs.append(out)
    try:
        codes = [proc.wait(timeout=args.timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    if any(codes):
        raise SystemExit(f"scaling: a rank of the {world}-rank run failed (exit codes {codes})")
    return [json.loads(out.read_text()) for out in outs]


def worker_argv(args: argparse.Namespace) -> list[str]:
    return ["--method", args.method, "--size", args.size, "--crop", str(args.crop),
            "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--zero-stage", str(args.zero_stage),
            "--engine", args.engine, "--precision", args.precision, "--threads-per-rank",
            str(args.threads_per_rank), "--seed", str(args.seed),
            *[item for kv in args.set for item in ("--set", kv)]]


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="sslmed-scaling-") as scratch:
        for world in args.ranks:
            ranks = launch(world, args, Path(scratch))
            per_rank = [r["samples_per_s"] for r in ranks]
            rows.append({"ranks": world, "per_rank_samples_per_s": sum(per_rank) / world,
                         "slowest_rank_samples_per_s": min(per_rank), "total_samples_per_s": sum(per_rank),
                         "rank_results": ranks})
    base = rows[0]["per_rank_samples_per_s"] if rows and rows[0]["ranks"] == 1 else None
    for row in rows:
        row["efficiency"] = row["per_rank_samples_per_s"] / base if base else None
    return rows


ENGINES = {"zero0": ("deepspeed", 0), "zero2": ("deepspeed", 2), "ddp": ("ddp", 0)}


def compare_ddp(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """ZeRO-0, ZeRO-2 and torch DDP, 1 and N ranks each, in interleaved rounds (`--repeats`): drifting
    load from other jobs then falls on every engine alike. Each figure is the best of its rounds."""
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.repeats):
        for name, (engine, stage) in ENGINES.items():
            for row in measure(argparse.Namespace(**{**vars(args), "engine": engine, "zero_stage": stage})):
                key = (name, row["ranks"])
                if key not in best or row["per_rank_samples_per_s"] > best[key]["per_rank_samples_per_s"]:
                    best[key] = {"engine": name, **row}
    rows = [best[(name, world)] for name in ENGINES for world in args.ranks]
    for row in rows:
        row["efficiency"] = row["per_rank_samples_per_s"] / best[(row["engine"], 1)]["per_rank_samples_per_s"]
    top = max(args.ranks)
    efficiency = {name: best[(name, top)]["efficiency"] for name in ENGINES}
    summary = {f"{name}_efficiency": value for name, value in efficiency.items()}
    summary.update(ranks=top, deepspeed_vs_ddp=efficiency["zero0"] / efficiency["ddp"])
    return rows, summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 32³ crops, few steps (< 2 min on 2 cores)")
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--method", default="mae")
    p.add_argument("--size", default="tiny")
    p.add_argument("--crop", type=int)
    p.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--engine", choices=["deepspeed", "ddp"], default="deepspeed")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="torch threads per rank (1: one core per rank, as one GPU per rank)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    p.add_argument("--project", action="store_true", help="only print the ZeRO communication projection")
    p.add_argument("--compare-ddp", action="store_true",
                   help="ZeRO-0, ZeRO-2 and torch DDP side by side; ends with deepspeed_vs_ddp=…")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of --compare-ddp (best kept)")
    p.add_argument("--results", help="directory for scaling.jsonl (default benchmarks/results)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"crop": 32 if quick else 64, "steps": 3 if quick else 10, "warmup": 1 if quick else 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile = False  # the fields step.bench_config reads
    return args


def print_projection() -> dict:
    psi = mae_parameter_count("base", 96)
    rows = projection(psi)
    print(f"ZeRO communication per optimizer step, sslmed MAE ViT-B/16 at 96³ (Ψ = {psi:,} parameters), "
          "bf16 (2 bytes/element), ring collectives, bandwidth term only (latency ignored):")
    print(common.format_table(rows, ["zero_stage", "gpus", "params_m", "passes_of_psi", "per_gpu_mb", "link",
                                     "link_gb_s", "comm_ms"]))
    by_key = {(r["zero_stage"], r["gpus"]): r for r in rows}
    return {"psi": psi, **{f"zero{stage}_{gpus}gpu_comm_ms": by_key[(stage, gpus)]["comm_ms"]
                           for stage, gpus in ((2, 8), (2, 64), (3, 64))}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.project:
        summary = print_projection()
        print(common.summary_line(summary))
        return summary
    cores = common.usable_cores()
    print(f"{args.method} {args.size} {args.crop}³, micro-batch {args.batch}/rank, engine {args.engine}, "
          f"ZeRO-{args.zero_stage}, {args.precision}, {args.threads_per_rank} thread(s)/rank, {cores} cores")
    if max(args.ranks) * args.threads_per_rank > cores:
        print(f"note: {max(args.ranks) * args.threads_per_rank} threads on {cores} cores: ranks share cores")
    print("note: CPU ranks share memory bandwidth and caches and gloo's threads; this measures the "
          "software path, not GPU interconnect scaling (see --project)")
    if args.compare_ddp:
        rows, compared = compare_ddp(args)
    else:
        rows, compared = [{"engine": args.engine, **row} for row in measure(args)], {}
    print(common.format_table(rows, ["engine", "ranks", "per_rank_samples_per_s",
                                     "slowest_rank_samples_per_s", "total_samples_per_s", "efficiency"]))
    machine = common.machine_info("cpu")
    setup = {k: getattr(args, k) for k in ("method", "size", "crop", "batch", "steps", "warmup", "zero_stage",
                                           "engine", "precision", "threads_per_rank", "quick")}
    records = [{**setup, **row, "machine": machine} for row in rows]
    path = common.append_results("scaling", records, args.results)
    print(f"results appended to {path}")
    if compared:
        summary = {"cores": cores, "load_average": machine["load_average"], **compared}
    else:
        summary = {f"per_rank_samples_per_s_{row['ranks']}": row["per_rank_samples_per_s"] for row in rows}
        summary.update(efficiency=rows[-1]["efficiency"], zero_stage=args.zero_stage, engine=args.engine,
                       cores=cores, **print_projection())
    print(common.summary_line(summary))
    return summary


if __name__ == "__main__":
    main()
