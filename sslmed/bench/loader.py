"""Loader throughput: crops per second per CPU core, sslmed streams vs. MONAI, on the same volumes.

One process, one core, the same volumes (phantoms from sslmed.io.synthetic, stored as int16) and the
same number of crops per loaded volume for every source:

    loadimage         MONAI LoadImage on .nii.gz + RandSpatialCropSamples, crops stacked into a batch
    persistent        MONAI PersistentDataset (LoadImaged cached to disk before timing)
                      + RandSpatialCropSamplesd, crops stacked into a batch
    sslmed-tar-CODEC  sslmed WebDataset shards (codec none = raw int16 .npy, lz4 or zstd),
                      build_loader(workers=0)
    sslmed-zarr-CODEC sslmed Zarr store (64³ chunks, lz4 or zstd), build_loader(workers=0)

Every sslmed row carries its own `limit`, measured in the same run on the same stored bytes held in
memory: decompress + copy of every compressed array (tar) or chunk (zarr), or a plain copy (codec none),
as crops/s if loading did nothing but that once per `crops_per_volume` crops. Sizes on disk are reported
per row. Each figure is the fastest of 3 passes over all volumes. Blosc and zarr run single-threaded
(numcodecs `use_threads=False`, zarr `threading.max_workers=1`), so every figure is one core's;
`cores_used` (CPU seconds / wall seconds) shows it.

Augmentation is off everywhere: this measures reading and cropping, which is what differs.

sslmed's loader raises glibc's mmap and trim thresholds (`keep_freed_memory_for_reuse`): without that,
every multi-megabyte crop or volume comes from fresh pages that fault in on first touch. Every row,
MONAI's included, runs with those settings, made at the start, so the ratios compare loaders, not
allocators. `--glibc-default` measures only the MONAI rows, as MONAI users run them.

    python -m sslmed.bench.loader [--quick]      (or: sslmed bench loader [--quick])
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sslmed.bench import common
from sslmed.config import Config
from sslmed.data.pipeline import build_loader, keep_freed_memory_for_reuse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 volumes of 128³, 48³ crops (under 2 minutes)")
    p.add_argument("--volumes", type=int, help="default 8 (quick: 4)")
    p.add_argument("--shape", type=int, help="volume edge in voxels, default 256 (quick: 128)")
    p.add_argument("--crop", type=int, help="crop edge in voxels, default 96 (quick: 48)")
    p.add_argument("--crops-per-volume", type=int, default=4)
    p.add_argument("--results", help="directory for loader.jsonl (default benchmarks/results)")
    p.add_argument("--augment", action="store_true",
                   help="augmentation: MONAI per crop in the loader vs. batched on the training device")
    p.add_argument("--glibc-default", action="store_true",
                   help="only the MONAI rows, with glibc's default allocator settings (as MONAI users run)")
    args = p.parse_args(argv)
    args.volumes = args.volumes or (4 if args.quick else 8)
    args.shape = args.shape or (128 if args.quick else 256)
    args.crop = args.crop or (48 if args.quick else 96)
    return args


TAR_CODECS, ZARR_CODECS = ("none", "lz4", "zstd"), ("lz4", "zstd")


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path | list[str]]:
    """Phantoms → tar shards and Zarr stores per codec; the stored int16 arrays → .nii.gz for MONAI."""
    import nibabel as nib
    import zarr

    from sslmed.io.pack import pack
    from sslmed.io.synthetic import write_phantoms

    inputs = write_phantoms(work / "in", args.volumes, shape=(args.shape,) * 3, seed=0)
    data: dict[str, Path | list[str]] = {}
    for codec in TAR_CODECS:
        data[f"sslmed-tar-{codec}"] = work / f"tar-{codec}"
        pack(inputs, work / f"tar-{codec}", fmt="wds", codec=codec, shard_size=256e6)
    for codec in ZARR_CODECS:
        data[f"sslmed-zarr-{codec}"] = work / f"zarr-{codec}"
        pack(inputs, work / f"zarr-{codec}", fmt="zarr", codec=codec, chunk=64)
    nifti = []
    packed = work / f"zarr-{ZARR_CODECS[0]}"
    for key in json.loads((packed / "manifest.json").read_text())["arrays"]:
        stored = zarr.open_array(str(packed / key["path"]), mode="r")[...]
        path = work / "nifti" / f"{key['key']}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(stored, np.eye(4)), str(path))  # the same int16 voxels, gzip as usual
        nifti.append(str(path))
    data["nifti"] = nifti
    return data


def disk_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for root in paths for p in ([root] if root.is_file() else root.rglob("*"))
               if p.is_file())


REPEATS = 3  # every measurement is taken this many times and the fastest kept (others share the machine)


def timed(run: Callable[[], int]) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(REPEATS):
        start, cpu = time.perf_counter(), time.process_time()
        crops = run()
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        if not best or crops / seconds > best["crops_per_s"]:
            best = {"crops": crops, "seconds": seconds, "cpu_s": cpu_s, "crops_per_s": crops / seconds}
    return best


def monai_loadimage(files: list[str], args: argparse.Namespace) -> dict:
    from monai.transforms import Compose, LoadImage, RandSpatialCropSamples

    transform = Compose([LoadImage(image_only=True, ensure_channel_first=True),
                         RandSpatialCropSamples(roi_size=(args.crop,) * 3, num_samples=args.crops_per_volume,
                                                random_size=False)])
    transform.set_random_state(0)
    # stacked into a batch, as a DataLoader's collate does (and as sslmed's rows are): MONAI's crops are
    # views of the loaded volume until something copies them
    result = timed(lambda: sum(len(torch.stack(transform(f))) for f in files))
    return {**result, "disk_bytes": disk_bytes([Path(f) for f in files])}


def monai_persistent(files: list[str], args: argparse.Namespace, cache: Path) -> dict:
    from monai.data import PersistentDataset
    from monai.transforms import Compose, LoadImaged, RandSpatialCropSamplesd

    transform = Compose([LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
                         RandSpatialCropSamplesd(keys="image", roi_size=(args.crop,) * 3,
                                                 num_samples=args.crops_per_volume, random_size=False)])
    dataset = PersistentDataset([{"image": f} for f in files], transform=transform, cache_dir=cache)
    start = time.perf_counter()
    for i in range(len(dataset)):  # builds the cache (LoadImaged output saved with torch.save)
        dataset[i]
    build = time.perf_counter() - start
    result = timed(lambda: sum(len(torch.stack([crop["image"] for crop in dataset[i]]))
                               for i in range(len(dataset))))
    return {**result, "cache_build_s": build, "disk_bytes": disk_bytes([cache])}


def stream_config(path: Path, args: argparse.Namespace, augment_on: str | None = None) -> Config:
    """One volume's crops per batch; augmentation off, or on the loader core / the training device."""
    cfg = Config()
    cfg.data.path, cfg.data.crop_size, cfg.data.crops_per_volume = str(path), args.crop, args.crops_per_volume
    # shuffle blocks of one volume's crops: a pass over the volumes then never hands out crops that an
    # earlier, separately timed pass already cut
    cfg.data.workers, cfg.data.augment = 0, augment_on is not None
    cfg.data.shuffle_buffer = args.crops_per_volume
    cfg.data.augment_on = augment_on or "device"
    cfg.train.micro_batch = args.crops_per_volume
    return cfg


def sslmed_stream(path: Path, args: argparse.Namespace, augment_on: str | None = None) -> dict:
    loader = build_loader(stream_config(path, args, augment_on), 0, 1)

    def run() -> int:
        crops = 0
        for _ in range(args.volumes):  # one epoch: every volume once, crops_per_volume crops each
            crops += next(loader)["image"].shape[0]
        return crops

    return timed(run)


# ---- --augment: MONAI per crop on the loader core vs. batched on the training device -----------


def merged(batches: list[dict], size: int) -> list[dict]:
    """Loader batches regrouped into batches of `size` crops (a GPU step takes more than one volume's)."""
    crops = [{k: v[i:i + 1] if isinstance(v, torch.Tensor) else v[i:i + 1] for k, v in b.items()}
             for b in batches for i in range(len(b["key"]))]
    groups = [crops[i:i + size] for i in range(0, len(crops) - size + 1, size)] or [crops]
    return [{k: torch.cat([c[k] for c in group]) if isinstance(group[0][k], torch.Tensor)
             else sum((c[k] for c in group), []) for k in group[0]} for group in groups]


def device_augment(batches: list[dict], cfg: Config, device: str) -> dict:
    """sslmed.data.augment.prepare alone (host → device copy, to float, augmentation) on loader batches."""
    from sslmed.data.augment import prepare

    if device.startswith("cuda"):
        batches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                   for b in merged(batches, 32)]

    def run() -> int:
        crops = sum(prepare(batch, cfg, 0, step, device)["image"].shape[0]
                    for step, batch in enumerate(batches))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return crops

    return timed(run)


def monai_augment_alone(batches: list[dict]) -> dict:
    """MONAI's per-crop Compose (today's loader-side augmentation) on the same float crops."""
    from sslmed.data.augment import to_float
    from sslmed.data.stages import augmentation

    transform = augmentation()
    crops = [crop.numpy() for batch in batches for crop in to_float(batch)["image"]]

    def run() -> int:
        for seed, crop in enumerate(crops):
            transform.set_random_state(seed=seed)
            np.asarray(transform(crop), dtype=np.float32)
        return len(crops)

    return timed(run)


def augment_comparison(args: argparse.Namespace) -> dict:
    """Rows of the --augment run (raw int16 tar shards, 1 core) and its summary."""
    from sslmed.io.pack import pack
    from sslmed.io.synthetic import write_phantoms

    with tempfile.TemporaryDirectory(prefix="sslmed-bench-augment-") as tmp:
        work = Path(tmp)
        inputs = write_phantoms(work / "in", args.volumes, shape=(args.shape,) * 3, seed=0)
        path = work / "tar-none"
        pack(inputs, path, fmt="wds", codec="none", shard_size=256e6)
        rows = {"loader-monai-augment": sslmed_stream(path, args, "loader"),
                "loader-for-device-augment": sslmed_stream(path, args, "device")}
        cfg = stream_config(path, args, "device")
        loader = build_loader(cfg, 0, 1)
        batches = [next(loader) for _ in range(args.volumes)]
    rows["monai-augment-alone"] = monai_augment_alone(batches)
    rows["device-augment-cpu"] = device_augment(batches, cfg, "cpu")
    if torch.cuda.is_available():
        rows["device-augment-cuda"] = device_augment(batches, cfg, "cuda")
    for row in rows.values():
        # CPU time per crop as well: on a machine shared with other jobs it still measures the work done
        row["ms_per_crop"] = 1e3 / row["crops_per_s"]
        row["cpu_ms_per_crop"] = 1e3 * row["cpu_s"] / row["crops"]
    monai, device = rows["loader-monai-augment"], rows["loader-for-device-augment"]
    summary = {"aug_speedup_vs_monai_cpu_time": monai["cpu_ms_per_crop"] / device["cpu_ms_per_crop"],
               "device_aug_cpu_ms_per_crop": rows["device-augment-cpu"]["cpu_ms_per_crop"],
               "monai_aug_cpu_ms_per_crop": rows["monai-augment-alone"]["cpu_ms_per_crop"],
               "monai_loader_crops_per_s": rows["loader-monai-augment"]["crops_per_s"],
               "device_loader_crops_per_s": rows["loader-for-device-augment"]["crops_per_s"],
               "monai_aug_ms_per_crop": rows["monai-augment-alone"]["ms_per_crop"]}
    if "device-augment-cuda" in rows:
        summary["gpu_aug_ms_per_crop"] = rows["device-augment-cuda"]["ms_per_crop"]
    speedup = summary["device_loader_crops_per_s"] / summary["monai_loader_crops_per_s"]
    summary["aug_speedup_vs_monai"] = speedup
    summary["device_aug_ms_per_crop"] = rows["device-augment-cpu"]["ms_per_crop"]
    return {"rows": rows, "summary": summary}


def stored_blobs(path: Path) -> list[np.ndarray]:
    """The stored bytes the loader decodes, in memory: each tar array payload, or each Zarr chunk."""
    from sslmed.io.format import read_span, tar_samples

    if (path / "volumes.zarr").is_dir():
        return [blob for shard in sorted((path / "volumes.zarr").glob("*/c/**/*")) if shard.is_file()
                for blob in zarr_chunks(shard)]
    return [read_span(shard, span) for shard in sorted(path.glob("shard-*.tar"))
            for _, spans in tar_samples(shard) for ext, span in spans.items() if ext.startswith("vol.")]


def zarr_chunks(shard: Path) -> list[np.ndarray]:
    """The chunk blobs of one zarr shard file, from its index at the end (uint64 offset, length pairs
    followed by a crc32c, per zarr's sharding codec as packed by sslmed: index_location "end")."""
    data = np.fromfile(shard, dtype=np.uint8)
    array_json = json.loads(next(p / "zarr.json" for p in shard.parents if (p / "zarr.json").is_file())
                            .read_text())
    sharding = array_json["codecs"][0]["configuration"]
    assert sharding["index_location"] == "end", sharding
    shard_shape = array_json["chunk_grid"]["configuration"]["chunk_shape"]
    count = int(np.prod([s // c for s, c in zip(shard_shape, sharding["chunk_shape"], strict=True)]))
    index = data[-(16 * count + 4):-4].view("<u8").reshape(count, 2)
    return [data[o:o + n] for o, n in index if o != 2**64 - 1]  # all-fill chunks are not stored


def decode_limit(blobs: list[np.ndarray], volumes: int, args: argparse.Namespace) -> dict:
    """Decompress + copy (or only copy, when stored raw) every stored blob once per volume."""
    from numcodecs import blosc

    compressed = blobs[0][:4].tobytes() != b"\x93NUM"  # raw .npy begins with its magic string

    def run() -> int:
        for blob in blobs:
            np.frombuffer(blosc.decompress(blob), dtype=np.uint8).copy() if compressed else blob.copy()
        return volumes * args.crops_per_volume

    return timed(run)


def single_core() -> None:
    """Every decoder on this one thread/core: blosc's own threads off, zarr's codec pool to one worker."""
    import zarr
    from numcodecs import blosc

    torch.set_num_threads(1)
    blosc.use_threads = False
    zarr.config.set({"threading.max_workers": 1})  # before zarr's pool exists (it is made on first use)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    single_core()
    if not args.glibc_default:
        # from the start, for every row: sslmed's loader makes these allocator settings when it starts (and
        # an earlier use of the heap changes their effect), so the ratios compare loaders, not allocators
        keep_freed_memory_for_reuse()
    used = (f"{args.volumes} int16 volumes of {args.shape}³, {args.crop}³ crops, "
            f"{args.crops_per_volume} crops per loaded volume, 1 process, 1 thread")
    print(f"loader benchmark: {used}", flush=True)
    if args.augment:
        return report_augment(args, used)
    with tempfile.TemporaryDirectory(prefix="sslmed-bench-loader-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        data = prepare(work, args)
        print(f"prepared volumes in {time.perf_counter() - start:.1f} s", flush=True)
        rows = {"loadimage": monai_loadimage(data["nifti"], args),
                "persistent": monai_persistent(data["nifti"], args, work / "cache")}
        for name, path in data.items():
            if name.startswith("sslmed-") and not args.glibc_default:
                limit = decode_limit(stored_blobs(path), args.volumes, args)
                rows[name] = {**sslmed_stream(path, args), "disk_bytes": disk_bytes([path]),
                              "limit_crops_per_s": limit["crops_per_s"]}
                print(f"{name}: {rows[name]['crops_per_s']:.1f} crops/s", flush=True)
    base, persistent = rows["loadimage"]["crops_per_s"], rows["persistent"]["crops_per_s"]
    table = []
    for name, row in rows.items():
        of_limit = row["crops_per_s"] / row["limit_crops_per_s"] if "limit_crops_per_s" in row else None
        table.append({"source": name, **row, "disk_MB": row["disk_bytes"] / 1e6,
                      "cores_used": row["cpu_s"] / row["seconds"], "vs_loadimage": row["crops_per_s"] / base,
                      "vs_persistent": row["crops_per_s"] / persistent, "of_limit": of_limit})
    print(common.format_table(table, ["source", "disk_MB", "crops", "seconds", "cores_used", "crops_per_s",
                                      "limit_crops_per_s", "of_limit", "vs_loadimage", "vs_persistent",
                                      "cache_build_s"]))
    summary = {} if args.glibc_default else best_source(rows)
    record = {"benchmark": "loader", "quick": args.quick, "setup": used, "volumes": args.volumes,
              "shape": args.shape, "crop": args.crop, "crops_per_volume": args.crops_per_volume,
              "allocator": "glibc-default" if args.glibc_default else "sslmed", "sources": rows, **summary,
              "machine": common.machine_info()}
    path = common.append_results("loader", [record], args.results)
    print(f"results appended to {path}")
    if summary:
        print(common.summary_line(summary))
    return 0


def report_augment(args: argparse.Namespace, used: str) -> int:
    result = augment_comparison(args)
    rows = [{"row": name, **row, "cores_used": row["cpu_s"] / row["seconds"]}
            for name, row in result["rows"].items()]
    print(common.format_table(rows, ["row", "crops", "seconds", "cores_used", "crops_per_s", "ms_per_crop",
                                     "cpu_ms_per_crop"]))
    record = {"benchmark": "loader-augment", "quick": args.quick, "setup": used, "volumes": args.volumes,
              "shape": args.shape, "crop": args.crop, "crops_per_volume": args.crops_per_volume,
              "rows": result["rows"], **result["summary"], "machine": common.machine_info()}
    path = common.append_results("loader", [record], args.results)
    print(f"results appended to {path}")
    print(common.summary_line(result["summary"]))
    return 0


def best_source(rows: dict[str, dict]) -> dict:
    best = max((k for k in rows if k.startswith("sslmed-")), key=lambda k: rows[k]["crops_per_s"])
    rate = rows[best]["crops_per_s"]
    return {"best": best, "speedup_vs_loadimage": rate / rows["loadimage"]["crops_per_s"],
            "speedup_vs_persistent": rate / rows["persistent"]["crops_per_s"],
            "fraction_of_limit": rate / rows[best]["limit_crops_per_s"]}


if __name__ == "__main__":
    sys.exit(main())
