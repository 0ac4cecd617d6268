"""Loader throughput: crops per second per CPU core, sslmed streams vs. MONAI, on the same volumes.

One process, one core, the same volumes (phantoms from sslmed.io.synthetic, stored as int16) and the
same number of crops per loaded volume for every source:

    loadimage    MONAI LoadImage on .nii.gz + RandSpatialCropSamples
    persistent   MONAI PersistentDataset (LoadImaged cached to disk before timing) + RandSpatialCropSamplesd
    sslmed-tar   sslmed WebDataset shards (blosc-zstd), build_loader(workers=0), no augmentation
    sslmed-zarr  sslmed Zarr store (blosc-zstd, 64³ chunks), build_loader(workers=0), no augmentation
    limit        numcodecs decompress + copy of the tar shards' compressed arrays: crops/s if the loader
                 did nothing but decode each volume once per `crops_per_volume` crops

Augmentation is off everywhere: this measures reading and cropping, which is what differs.

    python benchmarks/loader.py [--quick]      (or: sslmed bench loader [--quick])
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sslmed.config import Config  # noqa: E402
from sslmed.data.pipeline import build_loader  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 volumes of 128³, 48³ crops (under 2 minutes)")
    p.add_argument("--volumes", type=int, help="default 8 (quick: 4)")
    p.add_argument("--shape", type=int, help="volume edge in voxels, default 256 (quick: 128)")
    p.add_argument("--crop", type=int, help="crop edge in voxels, default 96 (quick: 48)")
    p.add_argument("--crops-per-volume", type=int, default=4)
    p.add_argument("--results", help="directory for loader.jsonl (default benchmarks/results)")
    args = p.parse_args(argv)
    args.volumes = args.volumes or (4 if args.quick else 8)
    args.shape = args.shape or (128 if args.quick else 256)
    args.crop = args.crop or (48 if args.quick else 96)
    return args


def prepare(work: Path, args: argparse.Namespace) -> dict[str, object]:
    """Phantoms → tar shards and a Zarr store; the stored int16 arrays → .nii.gz for MONAI."""
    import nibabel as nib

    from sslmed.io.pack import pack
    from sslmed.io.synthetic import write_phantoms

    inputs = write_phantoms(work / "in", args.volumes, shape=(args.shape,) * 3, seed=0)
    pack(inputs, work / "wds", fmt="wds", codec="zstd", shard_size=256e6)
    pack(inputs, work / "zarr", fmt="zarr", codec="zstd", chunk=64)
    import zarr

    nifti = []
    for key in json.loads((work / "zarr" / "manifest.json").read_text())["arrays"]:
        stored = zarr.open_array(str(work / "zarr" / key["path"]), mode="r")[...]
        path = work / "nifti" / f"{key['key']}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(stored, np.eye(4)), str(path))  # the same int16 voxels, gzip as usual
        nifti.append(str(path))
    return {"nifti": nifti, "wds": work / "wds", "zarr": work / "zarr"}


def timed(run: Callable[[], int]) -> dict[str, float]:
    start = time.perf_counter()
    crops = run()
    seconds = time.perf_counter() - start
    return {"crops": crops, "seconds": seconds, "crops_per_s": crops / seconds}


def monai_loadimage(files: list[str], args: argparse.Namespace) -> dict:
    from monai.transforms import Compose, LoadImage, RandSpatialCropSamples

    transform = Compose([LoadImage(image_only=True, ensure_channel_first=True),
                         RandSpatialCropSamples(roi_size=(args.crop,) * 3, num_samples=args.crops_per_volume,
                                                random_size=False)])
    transform.set_random_state(0)
    return timed(lambda: sum(len(transform(f)) for f in files))


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
    result = timed(lambda: sum(len(dataset[i]) for i in range(len(dataset))))
    return {**result, "cache_build_s": build}


def sslmed_stream(path: Path, args: argparse.Namespace) -> dict:
    cfg = Config()
    cfg.data.path, cfg.data.crop_size, cfg.data.crops_per_volume = str(path), args.crop, args.crops_per_volume
    cfg.data.workers, cfg.data.augment, cfg.data.shuffle_buffer = 0, False, 16
    cfg.train.micro_batch = args.crops_per_volume
    loader = build_loader(cfg, 0, 1)

    def run() -> int:
        crops = 0
        for _ in range(args.volumes):  # one epoch: every volume once, crops_per_volume crops each
            crops += next(loader)["image"].shape[0]
        return crops

    return timed(run)


def decode_limit(wds_dir: Path, args: argparse.Namespace) -> dict:
    """Decompress + copy each compressed array of the shards with numcodecs: the floor on decode cost."""
    import numcodecs

    payloads = []
    for shard in sorted(wds_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            payloads += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".vol.blosc")]
    codec = numcodecs.Blosc(cname="zstd")

    def run() -> int:
        for payload in payloads:
            np.frombuffer(codec.decode(payload), dtype=np.uint8).copy()
        return len(payloads) * args.crops_per_volume

    result = timed(run)
    result["bytes_per_s"] = sum(args.shape**3 * 2 for _ in payloads) / result["seconds"]
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # per core: every source runs single-threaded in this one process
    used = (f"{args.volumes} int16 volumes of {args.shape}³, {args.crop}³ crops, "
            f"{args.crops_per_volume} crops per loaded volume, 1 process, 1 thread")
    print(f"loader benchmark: {used}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sslmed-bench-loader-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        data = prepare(work, args)
        print(f"prepared volumes in {time.perf_counter() - start:.1f} s", flush=True)
        rows = {"loadimage": monai_loadimage(data["nifti"], args),
                "persistent": monai_persistent(data["nifti"], args, work / "cache"),
                "sslmed-tar": sslmed_stream(data["wds"], args),
                "sslmed-zarr": sslmed_stream(data["zarr"], args),
                "limit": decode_limit(data["wds"], args)}
    base, persistent, limit = (rows[k]["crops_per_s"] for k in ("loadimage", "persistent", "limit"))
    table = []
    for name, row in rows.items():
        table.append({"source": name, **row, "vs_loadimage": row["crops_per_s"] / base,
                      "vs_persistent": row["crops_per_s"] / persistent,
                      "of_limit": row["crops_per_s"] / limit})
    print(common.format_table(table, ["source", "crops", "seconds", "crops_per_s", "vs_loadimage",
                                      "vs_persistent", "of_limit", "cache_build_s"]))
    best = max(("sslmed-tar", "sslmed-zarr"), key=lambda k: rows[k]["crops_per_s"])
    summary = {"speedup_vs_loadimage": rows[best]["crops_per_s"] / base,
               "speedup_vs_persistent": rows[best]["crops_per_s"] / persistent,
               "fraction_of_limit": rows[best]["crops_per_s"] / limit}
    record = {"benchmark": "loader", "quick": args.quick, "setup": used, "volumes": args.volumes,
              "shape": args.shape, "crop": args.crop, "crops_per_volume": args.crops_per_volume,
              "sources": rows, "best": best, **summary, "machine": common.machine_info()}
    path = common.append_results("loader", [record], args.results)
    print(f"best sslmed source: {best}; results appended to {path}")
    print(common.summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
