"""Stage-2 step time of the residual method: targets precomputed (`method.targets: precomputed`, read
from the batch as a derived dataset streams them) against targets computed on the fly from the frozen
CAE (`on_the_fly`), with the same U-Net, batch and median kernel.

A trimmed copy of the training loop (forward, backward, AdamW step, `on_step_end`), as `step.py`, on the
model the anomaly demo trains: `residual-resnet18` at `model.size=tiny` (MONAI's ResNet-18 at widths
16/32/64/128 under a U-Net decoder) on 32³ crops. The on-the-fly step includes the frozen CAE's forward,
the percentile rescale and the median filter; the precomputed batch carries the target, computed once
before timing by the same function. The two variants alternate step by step, so a machine that others
load slows both alike; each figure is the median over `--repeats` steps, wall and CPU seconds, plus the
target computation alone (what the derived dataset saves every step).

    sslmed bench residual [--quick] [--batch 8] [--crop 32] [--kernel 5] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sslmed.bench import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps")
    p.add_argument("--batch", type=int, default=8, help="crops per step")
    p.add_argument("--crop", type=int, default=32, help="crop edge (a multiple of 32)")
    p.add_argument("--kernel", type=int, default=5, help="median kernel of the on-the-fly target")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "base"], help="ResNet-18 widths")
    p.add_argument("--repeats", type=int, help="timed steps per variant (default 10, quick: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--note", default="", help="recorded with the results (e.g. 'machine shared')")
    p.add_argument("--results", help="directory for residual.jsonl (default benchmarks/results)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 10)
    return args


def build(targets: str, args: argparse.Namespace) -> torch.nn.Module:
    """The method in stage 2, seeded so both variants start from the same U-Net weights."""
    from sslmed.config import load_config
    from sslmed.methods import build_method

    cfg = load_config("residual-resnet18", [
        f"data.crop_size={args.crop}", f"model.size={args.size}", f"method.targets={targets}",
        "method.stage1_steps=1", f"method.median_kernel={args.kernel}", "method.cae_latent=64"])
    torch.manual_seed(0)
    method = build_method(cfg)
    method.on_step_end(0, 1)  # past stage 1 (its one step): the frozen CAE is the untrained one, as good a
    # timing subject as a trained one, since the target's cost does not depend on the weights
    return method.train()


def stepper(method: torch.nn.Module, batch: dict):
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss, _ = method(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.on_step_end(0, 1)

    return step


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(args.batch, 1, args.crop, args.crop, args.crop, generator=gen)
    on_the_fly = build("on_the_fly", args)
    with torch.no_grad():
        target = on_the_fly.target(image)
    variants = {"on_the_fly": stepper(on_the_fly, {"image": image}),
                "precomputed": stepper(build("precomputed", args), {"image": image, "target": target})}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    target_times = []
    for _ in range(args.warmup):
        for step in variants.values():
            step()
    for i in range(args.repeats):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(timed(variants[name]))
        target_times.append(timed(lambda: on_the_fly.target(image)))
    rows = [{"targets": name, "step_s": statistics.median(w for w, _ in measured),
             "step_cpu_s": statistics.median(c for _, c in measured), "target_s": None}
            for name, measured in times.items()]
    rows[0]["target_s"] = statistics.median(w for w, _ in target_times)  # on the fly only
    ratio = rows[0]["step_s"] / rows[1]["step_s"]
    cpu_ratio = rows[0]["step_cpu_s"] / rows[1]["step_cpu_s"]
    for row in rows:
        row["vs_precomputed"] = row["step_s"] / rows[1]["step_s"]
    print(f"residual stage-2 step: batch {args.batch} × {args.crop}³, ResNet-18 ({args.size}) U-Net, median "
          f"kernel {args.kernel}, {args.threads} thread(s), median of {args.repeats} steps")
    print(common.format_table(rows, ["targets", "step_s", "step_cpu_s", "target_s", "vs_precomputed"]))
    record = {"benchmark": "residual", "machine": common.machine_info(), "note": args.note,
              "quick": args.quick, "batch": args.batch, "crop": args.crop, "kernel": args.kernel,
              "size": args.size, "repeats": args.repeats, "threads": args.threads, "rows": rows}
    common.append_results("residual", [record], args.results)
    summary = {"on_the_fly_step_s": rows[0]["step_s"], "precomputed_step_s": rows[1]["step_s"],
               "target_s": rows[0]["target_s"], "on_the_fly_over_precomputed": ratio,
               "cpu_ratio": cpu_ratio}
    print(common.summary_line(summary))
    return summary


if __name__ == "__main__":
    main()
