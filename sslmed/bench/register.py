"""Atlas registration cost and accuracy (`sslmed pack --atlas`, sslmed/io/register.py) on one core.

Two cases, each registered `--repeats` times with SimpleITK limited to one thread:

* known: the ITK example T1 head moved by a known affine (8° about z, 5° about x, 6 % larger, shifted by
  (7, −5, 4) mm) onto a 2 mm grid, registered back to the unmoved head; error = the largest distance at
  nine landmarks spread through the head between the recovered and the true map;
* brain: the brain-extracted ITK T1 at 1 mm registered to the MNI152 2009 template (the demo's pair);
  no ground truth, so the final mutual information is reported.

The CPU seconds (this process, `time.process_time`) are what one core costs per brain whatever else runs
on the machine; the wall seconds depend on that.

    sslmed bench register [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sslmed.bench import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one registration per case")
    p.add_argument("--repeats", type=int, help="registrations per case (default 3, quick: 1)")
    p.add_argument("--note", default="", help="recorded with the results (e.g. 'machine shared')")
    p.add_argument("--results", help="directory for register.jsonl (default benchmarks/results)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def known_move(centre: np.ndarray) -> np.ndarray:
    """Template world → moved world: about `centre`, 5° about x then 8° about z, 6 % larger, then shifted
    by (7, −5, 4) mm."""
    from scipy.spatial.transform import Rotation

    move = np.eye(4)
    move[:3, :3] = 1.06 * Rotation.from_euler("xz", [5.0, 8.0], degrees=True).as_matrix()
    move[:3, 3] = centre + np.array([7.0, -5.0, 4.0]) - move[:3, :3] @ centre
    return move


def known_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(moved array, its affine, template array, its affine, moved world → template world)."""
    import nibabel as nib
    import SimpleITK as sitk

    from sslmed.io.register import to_sitk
    from sslmed.io.synthetic import itk_t1_path

    source = nib.load(str(itk_t1_path()))
    template = np.asarray(source.dataobj, dtype=np.float32)
    centre = (source.affine @ np.append((np.asarray(source.shape) - 1) / 2, 1.0))[:3]
    move = known_move(centre)
    grid_shape = np.array([140, 140, 110])
    moved_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moved_affine[:3, 3] = centre - 2.0 * (grid_shape - 1) / 2
    back = np.linalg.inv(move)
    pull = sitk.AffineTransform(back[:3, :3].ravel().tolist(), back[:3, 3].tolist())
    grid = to_sitk(np.zeros(grid_shape, np.float32), moved_affine)
    moved = sitk.GetArrayFromImage(sitk.Resample(to_sitk(template, source.affine), grid, pull,
                                                 sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    return moved, moved_affine, template, source.affine, back


def prepared(path: Path, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """A volume as `sslmed pack --modality mr` stores it, as floats, and its affine."""
    from sslmed.io.format import to_float
    from sslmed.io.preprocess import preprocess
    from sslmed.io.readers import read_volume

    stored, meta = preprocess(read_volume(str(path)), modality="mr", dtype="float16", spacing=spacing)
    return to_float(stored, meta["scale"], meta["offset"]), np.asarray(meta["affine"], dtype=np.float64)


def landmark_error(found: np.ndarray, truth: np.ndarray, shape) -> float:
    """Largest distance (mm) between two voxel → world maps at the centre and 8 points half-way to the
    corners of a volume of `shape`."""
    centre = (np.asarray(shape) - 1) / 2
    offsets = np.array(np.meshgrid(*[(-0.25, 0.25)] * 3, indexing="ij")).reshape(3, -1).T
    points = np.c_[np.vstack([centre, centre + offsets * np.asarray(shape)]), np.ones(9)].T
    return float(np.linalg.norm(((found - truth) @ points)[:3], axis=0).max())


def timed_rows(case: str, moving, moving_affine, fixed, fixed_affine, repeats: int, truth=None) -> list[dict]:
    from sslmed.io.register import register_arrays

    rows = []
    for repeat in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        registration = register_arrays(moving, moving_affine, fixed, fixed_affine)
        row = {"case": case, "repeat": repeat, "cpu_s": time.process_time() - cpu,
               "wall_s": time.perf_counter() - wall, "metric": registration.metric,
               "load_average": common.load_average()}
        if truth is not None:
            row["max_error_mm"] = landmark_error(registration.atlas_affine, truth, moving.shape)
        rows.append(row)
        print(common.format_table([row], list(row)), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    import SimpleITK as sitk

    from sslmed.io.synthetic import mni152_paths, write_itk_t1_brain

    args = parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    print(f"register benchmark: {args.repeats} registration(s) per case, SimpleITK on one thread", flush=True)
    moved, moved_affine, template, template_affine, back = known_case()
    rows = timed_rows("known", moved, moved_affine, template, template_affine, args.repeats,
                      truth=back @ moved_affine)
    with tempfile.TemporaryDirectory(prefix="sslmed-bench-register-") as tmp:
        brain, brain_affine = prepared(write_itk_t1_brain(Path(tmp)), spacing=(1.0, 1.0, 1.0))
    mni, mni_affine = prepared(mni152_paths()[0])
    rows += timed_rows("brain", brain, brain_affine, mni, mni_affine, args.repeats)
    print(common.format_table(rows, ["case", "repeat", "cpu_s", "wall_s", "max_error_mm", "metric",
                                     "load_average"]))
    record = {"benchmark": "register", "quick": args.quick, "note": args.note, "rows": rows,
              "machine": common.machine_info()}
    path = common.append_results("register", [record], args.results)
    print(f"results appended to {path}")
    summary = {f"{case}_cpu_s": float(np.median([r["cpu_s"] for r in rows if r["case"] == case]))
               for case in ("known", "brain")}
    summary["known_max_error_mm"] = max(r["max_error_mm"] for r in rows if r["case"] == "known")
    summary["brain_metric"] = float(np.median([r["metric"] for r in rows if r["case"] == "brain"]))
    print(common.summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
