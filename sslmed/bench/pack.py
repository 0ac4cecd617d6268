"""Packing throughput: volumes/s packing 256³ CT volumes with the single-machine path (`--workers 1`
and `2`) and on a local Ray cluster with 1 and 2 workers (`--ray`), side by side in one run; then a
projection of wall time and storage bandwidth for a 160k-CT corpus on K nodes × C cores.

Inputs are CT phantoms (sslmed.io.synthetic, int16 HU, random axis flips and spacing) saved as
.nii.gz; two distinct ones are copied to make up the count (every copy is read and packed in full).
Every row packs the same files with the same options (tar shards, zstd, no resampling unless
`--spacing`) into a fresh directory, after a warm-up pack of a few volumes in the same session: the
forkserver of `--workers` and Ray's worker processes have imported torch and MONAI, so the rows
compare steady packing, not start-up. Ray's cluster start is reported on its own (`startup_s`).
The single-machine rows run with one torch thread per process, as Ray's 1-CPU tasks do.

The projection takes the per-core rate of the 1-worker Ray row, scales it to a CT of `--ct-voxels`
voxels (time taken as proportional to voxels), and multiplies by K × C cores; storage read bandwidth
is that rate × `--ct-bytes` per input, write bandwidth the rate × the measured bytes per voxel stored.
On a shared machine a wall-clock rate is whatever share of a core the process got, so the run also
measures the CPU seconds one volume costs (read + preprocess + encode, in this process, best of 2):
`cpu_hours` is the projection at that rate, what unshared cores would do.

    sslmed bench pack [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sslmed.bench import common
from sslmed.io.manifest import load_manifest
from sslmed.io.pack import pack

CORPUS = 160_000  # CTs in the largest public SSL corpus (about 22 TB)
CLUSTERS = ((1, 2), (1, 64), (8, 64), (32, 64), (128, 64))  # (nodes, cores per node) for the projection


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 volumes, 1-volume warm-ups (under 2 minutes)")
    p.add_argument("--volumes", type=int, help="volumes packed per row, default 12 (quick: 4)")
    p.add_argument("--shape", type=int, default=256, help="volume edge in voxels")
    p.add_argument("--spacing", type=float, help="resample to this isotropic spacing in mm (default: none)")
    p.add_argument("--ct-voxels", type=float, default=512 * 512 * 300, help="voxels of one CT (projection)")
    p.add_argument("--ct-bytes", type=float, default=22e12 / CORPUS, help="input bytes of a CT (.nii.gz)")
    p.add_argument("--note", default="", help="recorded with the results (e.g. 'machine shared')")
    p.add_argument("--results", help="directory for pack.jsonl (default benchmarks/results)")
    args = p.parse_args(argv)
    args.volumes = args.volumes or (4 if args.quick else 12)
    return args


def make_inputs(folder: Path, count: int, edge: int) -> list[Path]:
    """`count` CT .nii.gz files: two distinct phantoms, copied to make up the count."""
    import nibabel as nib

    from sslmed.io.synthetic import phantom, random_affine

    folder.mkdir(parents=True)
    distinct = []
    for index in range(min(count, 2)):
        rng = np.random.default_rng([edge, index])
        array = phantom((edge,) * 3, rng, "ct").astype(np.int16)
        path = folder / f"ct-{index:04d}.nii.gz"
        nib.save(nib.Nifti1Image(array, random_affine(rng)), str(path))
        distinct.append(path)
    paths = list(distinct)
    for index in range(len(distinct), count):
        paths.append(folder / f"ct-{index:04d}.nii.gz")
        shutil.copy(distinct[index % len(distinct)], paths[-1])
    return paths


def measure(name: str, inputs: list[Path], work: Path, warmup: int, **options) -> dict:
    """One row: a warm-up pack of `warmup` volumes, then all of `inputs` timed into a fresh directory."""
    pack(inputs[:warmup], work / f"{name}-warmup", **options)
    out = work / name
    start = time.perf_counter()
    summary = pack(inputs, out, **options)
    seconds = time.perf_counter() - start
    if summary["ok"] != len(inputs):
        raise RuntimeError(f"{name}: only {summary['ok']} of {len(inputs)} volumes packed")
    manifest = load_manifest(out)
    return {"config": name, "volumes": len(inputs), "seconds": seconds,
            "volumes_per_s": len(inputs) / seconds,
            "stored_bytes_per_voxel": manifest["bytes"] / manifest["voxels"],
            "load_average": common.load_average()}


def cpu_seconds_per_volume(path: Path, options: dict) -> float:
    """CPU time of one volume's read + preprocess + encode on one thread (best of 2)."""
    from sslmed.io.format import content_sha256, encode_volume
    from sslmed.io.pack import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = {"spacing": options["spacing"], "modality": "auto", "dtype": "int16", "foreground_crop": False,
                "repair_nonfinite": False}
    try:
        prepare(path, settings)  # imports and first-touch costs out of the way
        best = float("inf")
        for _ in range(2):
            start = time.process_time()
            array, meta = prepare(path, settings)
            encode_volume(array, options["codec"])
            content_sha256(array, meta)
            best = min(best, time.process_time() - start)
        return best
    finally:
        torch.set_num_threads(threads)


def single_machine_rows(inputs: list[Path], work: Path, warmup: int, options: dict) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # --workers 1 packs in this process: one core, as every other row's worker
    try:
        rows = []
        for workers in (1, 2):
            row = measure(f"workers-{workers}", inputs, work, warmup * workers, workers=workers, **options)
            rows.append({**row, "workers": workers, "startup_s": None})
            print(f"workers={workers}: {row['volumes_per_s']:.3f} volumes/s", flush=True)
        return rows
    finally:
        torch.set_num_threads(threads)


def ray_rows(inputs: list[Path], work: Path, warmup: int, options: dict) -> list[dict]:
    import ray

    rows = []
    for workers in (1, 2):
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=128 * 2**20,
                 _temp_dir=temp_dir, log_to_driver=False, configure_logging=False)
        startup = time.perf_counter() - start
        try:
            address = ray.get_runtime_context().gcs_address
            row = measure(f"ray-{workers}", inputs, work, warmup * workers, ray=address, **options)
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
        rows.append({**row, "workers": workers, "startup_s": startup})
        print(f"ray workers={workers}: {row['volumes_per_s']:.3f} volumes/s (cluster start {startup:.1f} s)",
              flush=True)
    return rows


def projection(per_core: float, cpu_per_core: float, shape: int, stored_bytes_per_voxel: float,
               args: argparse.Namespace) -> list[dict]:
    """Wall time and storage bandwidth for CORPUS CTs on each of CLUSTERS, at `per_core` volumes/s of
    `shape`³ per core (and at `cpu_per_core`, the CPU-time rate), scaled to CTs of `args.ct_voxels`."""
    scale = shape**3 / args.ct_voxels
    rows = []
    for nodes, cores in CLUSTERS:
        rate, cpu_rate = nodes * cores * per_core * scale, nodes * cores * cpu_per_core * scale
        rows.append({"nodes": nodes, "cores_per_node": cores, "ct_per_s": rate, "hours": CORPUS / rate / 3600,
                     "read_GB_s": rate * args.ct_bytes / 1e9,
                     "write_GB_s": rate * args.ct_voxels * stored_bytes_per_voxel / 1e9,
                     "cpu_hours": CORPUS / cpu_rate / 3600, "cpu_read_GB_s": cpu_rate * args.ct_bytes / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warmup = 1 if args.quick else 2
    options = {"fmt": "wds", "codec": "zstd", "spacing": (args.spacing,) * 3 if args.spacing else None}
    setup = (f"{args.volumes} CT volumes of {args.shape}³ int16 .nii.gz → tar shards (zstd), "
             f"spacing {args.spacing or 'as is'}; one core per worker")
    print(f"pack benchmark: {setup}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sslmed-bench-pack-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        inputs = make_inputs(work / "in", args.volumes, args.shape)
        input_bytes = sum(p.stat().st_size for p in inputs) / len(inputs)
        print(f"wrote inputs in {time.perf_counter() - start:.1f} s ({input_bytes / 1e6:.1f} MB each)",
              flush=True)
        cpu_s = cpu_seconds_per_volume(inputs[0], options)
        print(f"one volume costs {cpu_s:.2f} CPU s (read + preprocess + encode)", flush=True)
        rows = single_machine_rows(inputs, work, warmup, options) + ray_rows(inputs, work, warmup, options)
    by_name = {row["config"]: row for row in rows}
    for row in rows:
        row["per_worker_volumes_per_s"] = row["volumes_per_s"] / row["workers"]
        row["vs_workers_1"] = row["volumes_per_s"] / by_name["workers-1"]["volumes_per_s"]
    print(common.format_table(rows, ["config", "workers", "volumes", "seconds", "volumes_per_s",
                                     "per_worker_volumes_per_s", "vs_workers_1", "startup_s",
                                     "load_average"]))
    per_core = by_name["ray-1"]["volumes_per_s"]
    stored = by_name["ray-1"]["stored_bytes_per_voxel"]
    projected = projection(per_core, 1 / cpu_s, args.shape, stored, args)
    print(f"\nprojection: {CORPUS:,} CTs of {args.ct_voxels / 1e6:.0f} M voxels "
          f"({args.ct_bytes / 1e6:.0f} MB each as input, {stored:.2f} stored bytes/voxel), "
          f"{per_core:.3f} volumes/s of {args.shape}³ per core (ray-1 row; cpu_*: {1 / cpu_s:.3f}, from "
          "CPU time), time proportional to voxels:")
    print(common.format_table(projected, ["nodes", "cores_per_node", "ct_per_s", "hours", "read_GB_s",
                                          "write_GB_s", "cpu_hours", "cpu_read_GB_s"]))
    record = {"benchmark": "pack", "quick": args.quick, "setup": setup, "note": args.note,
              "input_mb_per_volume": input_bytes / 1e6, "cpu_s_per_volume": cpu_s, "rows": rows,
              "projection": projected, "machine": common.machine_info()}
    path = common.append_results("pack", [record], args.results)
    print(f"results appended to {path}")
    summary = {f"{name.replace('-', '')}_vol_s": row["volumes_per_s"] for name, row in by_name.items()}
    summary.update(ray2_vs_workers2=by_name["ray-2"]["volumes_per_s"] / by_name["workers-2"]["volumes_per_s"],
                   ray_scaling_1_to_2=by_name["ray-2"]["volumes_per_s"] / per_core,
                   cpu_s_per_volume=cpu_s,
                   hours_160k_8x64=next(r["hours"] for r in projected if r["nodes"] == 8))
    print(common.summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
