"""The `sslmed` command. Thin: parse arguments, build a config, call one function."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from sslmed import __version__
from sslmed.bench import BENCHMARKS
from sslmed.errors import SslmedError


def parse_size(text: str) -> int:
    """'512MB', '2GiB', '1000' → bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    unit = stripped[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB)") from None
    if unit not in units or value <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB)")
    return int(value * units[unit])


def parse_part(text: str) -> tuple[int, int]:
    """'3/8' → (3, 8): the part's index (from 0) and the number of parts."""
    index, _, count = text.partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"not a part: {text!r} (I/N with 0 <= I < N, e.g. 0/8)")
    return int(index), int(count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslmed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sslmed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    pack = sub.add_parser("pack", help="pack volumes into WebDataset shards or a Zarr store")
    pack.add_argument("inputs", nargs="+", help="files or folders (NIfTI, DICOM series, NRRD, .npy/.npz)")
    pack.add_argument("--out", required=True, help="output directory")
    pack.add_argument("--format", choices=["wds", "zarr"], default="wds")
    pack.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="resample to mm")
    pack.add_argument("--modality", choices=["ct", "mr", "auto"], default="auto")
    pack.add_argument("--dtype", choices=["int16", "uint8", "float16"], default="int16")
    pack.add_argument("--shard-size", type=parse_size, default=parse_size("512MB"))
    pack.add_argument("--workers", type=int, default=1)
    pack.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    pack.add_argument("--tags", help="CSV with a 'path' or 'key' column and per-sample tags")
    pack.add_argument("--codec", choices=["none", "zstd", "lz4"], default="zstd",
                      help="compression of each array (numcodecs Blosc)")
    pack.add_argument("--foreground-crop", action="store_true", help="crop to the foreground bounding box")
    pack.add_argument("--repair-nonfinite", action="store_true",
                      help="replace NaN/Inf by 0 instead of refusing")
    pack.add_argument("--chunk", type=int, default=64, help="zarr chunk edge in voxels")
    pack.add_argument("--ray", metavar="ADDRESS",
                      help="pack on a Ray cluster: auto, HOST:PORT of its head, or local (start one here)")
    pack.add_argument("--ray-cpus-per-task", type=float, default=1.0, metavar="N",
                      help="CPUs Ray reserves for each task (also its torch threads)")
    pack.add_argument("--ray-memory-per-task", type=parse_size, metavar="SIZE",
                      help="memory Ray reserves for each task, e.g. 8GB")
    pack.add_argument("--part", type=parse_part, metavar="I/N",
                      help="pack only part I of N (from 0) into OUT/parts/I; join with `sslmed merge OUT`")

    merge = sub.add_parser("merge", help="join the parts packed with --part I/N into one dataset")
    merge.add_argument("dir")
    pack.add_argument("--atlas", metavar="TEMPLATE",
                      help="register each volume to this template (affine) and store atlas coordinates")

    derive = sub.add_parser("derive", help="a derived packed dataset: each sample with a precomputed target")
    derive.add_argument("kind", choices=["residual-targets"],
                        help="residual-targets: the residual method's soft target from a run's stage-1 CAE")
    derive.add_argument("run", help="a `residual` run whose stage 1 has finished")
    derive.add_argument("--data", required=True, help="the packed dataset to derive from")
    derive.add_argument("--out", required=True, help="output directory (must not exist)")
    derive.add_argument("--median-kernel", type=int, help="median filter size (default: the run's)")
    derive.add_argument("--target-dtype", choices=["float16", "float32"], default="float16")
    derive.add_argument("--batch", type=int, default=8, help="CAE tiles per forward pass")
    derive.add_argument("--slab", type=int, default=0,
                        help="slices per median-filter pass (default 0: as many as fit in 512 MiB)")
    derive.add_argument("--shard-size", type=parse_size, default=parse_size("512MB"))
    derive.add_argument("--chunk", type=int, default=64, help="zarr chunk edge in voxels")
    derive.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that needs classes beyond DeepSpeed's own "
                        "(UNSAFE: may run code)")

    for name, text in (("verify", "check every shard/array against the manifest"),
                       ("inspect", "summarise a packed dataset")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("dir")

    for name, text in (("pretrain", "self-supervised pretraining"),
                       ("finetune", "downstream evaluation of an encoder"),
                       ("sweep", "Ray Tune sweep over label fractions, mask ratios and seeds")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="YAML path or shipped config name (e.g. mae-tiny)")
        cmd.add_argument("overrides", nargs="*", help="section.key=value")
        if name == "sweep":
            cmd.add_argument("--address", help="join an existing Ray cluster")

    export = sub.add_parser("export", help="export a run's encoder to safetensors + json")
    export.add_argument("run")
    export.add_argument("--out", required=True)
    export.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that needs classes beyond DeepSpeed's own "
                        "(UNSAFE: may run code)")

    sample = sub.add_parser("sample", help="decode new volumes from a Gaussian fitted on a run's codes "
                            "(contrastive_ae)")
    sample.add_argument("run")
    sample.add_argument("--n", type=int, default=8, help="how many volumes")
    sample.add_argument("--out", help="output folder (default RUN/samples)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that needs classes beyond DeepSpeed's own "
                        "(UNSAFE: may run code)")

    bench = sub.add_parser("bench", help="benchmarks (print a table and a key=value summary line)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("args", nargs=argparse.REMAINDER)

    demo = sub.add_parser("demo", help="the whole pipeline on real volumes, on this machine; `demo anomaly`: "
                          "CAE-residual SSL against its four baselines on crops with synthetic lesions; "
                          "`demo sweep-transfer`: every method, same budget, on the cross-subject task")
    demo.add_argument("which", nargs="?", choices=["anomaly", "sweep-transfer"],
                      help="anomaly: seed 001's comparison; sweep-transfer: pretrain each method with one "
                           "budget, probe across subjects")
    demo.add_argument("--out", help="output folder (default demo-out, demo-anomaly-out or "
                      "sweep-transfer-out)")
    demo.add_argument("--quick", action="store_true", help="smaller, for tests")
    demo.add_argument("--config", help="the pretraining config of the main demo (default demo; e.g. "
                      "brain-mri-cpu)")
    demo.add_argument("--steps", type=int, default=300, help="sweep-transfer: steps per method")
    demo.add_argument("--micro-batch", type=int, default=8, help="sweep-transfer: crops per step")
    demo.add_argument("--family", default="tiny", choices=["tiny", "base"],
                      help="sweep-transfer: each method's <method>-FAMILY config")
    demo.add_argument("--methods", nargs="+", help="sweep-transfer: a subset of the methods")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "pack":
        from sslmed.io.pack import pack

        summary = pack(
            args.inputs, args.out, fmt=args.format, spacing=args.spacing, modality=args.modality,
            dtype=args.dtype, shard_size=args.shard_size, workers=args.workers, on_error=args.on_error,
            tags=args.tags, codec=args.codec, foreground_crop=args.foreground_crop,
            repair_nonfinite=args.repair_nonfinite, chunk=args.chunk, ray=args.ray,
            ray_cpus_per_task=args.ray_cpus_per_task, ray_memory_per_task=args.ray_memory_per_task,
            part=args.part, atlas=args.atlas,
        )
        return 1 if summary.get("failed") and args.on_error == "fail" else 0
    if args.command == "merge":
        from sslmed.io.parts import merge

        merge(args.dir)
        return 0
    if args.command == "derive":
        from sslmed.derive import derive_residual_targets

        derive_residual_targets(args.run, args.data, args.out, batch=args.batch, slab=args.slab,
                                median_kernel=args.median_kernel, target_dtype=args.target_dtype,
                                shard_size=args.shard_size, chunk=args.chunk, trust=args.trust_checkpoint)
        return 0
    if args.command == "verify":
        from sslmed.io.manifest import verify

        problems = verify(args.dir)
        for problem in problems:
            print(f"BAD {problem}")
        print("ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if args.command == "inspect":
        from sslmed.io.manifest import inspect

        print(inspect(args.dir))
        return 0
    if args.command in ("pretrain", "finetune", "sweep"):
        from sslmed.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "pretrain":
            from sslmed.train.loop import pretrain

            pretrain(cfg)
        elif args.command == "finetune":
            from sslmed.eval.probe import finetune

            finetune(cfg)
        else:
            from sslmed.eval.sweep import sweep

            sweep(cfg, address=args.address)
        return 0
    if args.command == "export":
        from sslmed.train.checkpoint import export_run

        export_run(args.run, args.out, trust=args.trust_checkpoint)
        return 0
    if args.command == "sample":
        from sslmed.sample import sample_run

        for path in sample_run(args.run, args.n, args.out or str(Path(args.run) / "samples"), args.seed,
                               trust=args.trust_checkpoint):
            print(path)
        return 0
    if args.command == "bench":
        return run_benchmark(args.name, args.args)
    if args.command == "demo" and args.which == "sweep-transfer":
        from sslmed.demo_transfer import METHODS, run_sweep_transfer

        run_sweep_transfer(args.out or "sweep-transfer-out", steps=args.steps, micro_batch=args.micro_batch,
                           family=args.family, methods=tuple(args.methods or METHODS), quick=args.quick)
        return 0
    if args.command == "demo" and args.which == "anomaly":
        from sslmed.demo_anomaly import run_anomaly_demo

        if args.config:
            raise SslmedError("sslmed demo anomaly pretrains its five methods from their *-resnet18 configs; "
                              "--config belongs to the main demo")
        run_anomaly_demo(args.out or "demo-anomaly-out", quick=args.quick)
        return 0
    if args.command == "demo":
        from sslmed.demo import run_demo

        run_demo(args.out or "demo-out", quick=args.quick, config=args.config or "demo")
        return 0
    raise AssertionError(args.command)


def run_benchmark(name: str, argv: list[str]) -> int:
    """`sslmed bench NAME ...`: the benchmark module's `main(argv)`, from the installed package."""
    module = importlib.import_module(f"sslmed.bench.{name}")
    try:
        result = module.main(argv)
    except SystemExit as exc:  # argparse's usage errors and --help, or a benchmark's own message
        if isinstance(exc.code, str):
            raise SslmedError(exc.code) from None
        return exc.code or 0
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SslmedError as exc:
        print(f"sslmed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslmed: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sslmed inspect DIR | head`: the reader left, nothing is wrong
        sys.stdout = None
        return 0


if __name__ == "__main__":
    sys.exit(main())
