"""Input folders for the split and cluster packing tests: small phantoms, two files sharing a name in
different folders (so keys need de-duplication across any split) and unreadable files among them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

BAD_INPUTS = {"corrupt.nii.gz": "cannot read", "text.nii": "cannot read"}


def write_mixed_inputs(root: Path) -> Path:
    from sslmed.io.synthetic import write_phantoms

    folder = root / "in"
    first = write_phantoms(folder / "a", 3, shape=(24, 20, 16), seed=11)
    write_phantoms(folder / "c", 2, shape=(20, 24, 18), seed=12)
    (folder / "b").mkdir()
    shutil.copy(first[0], folder / "b" / first[0].name)  # same name, another folder: keys x and x_1
    bad = folder / "z-bad"  # last in input order
    bad.mkdir()
    (bad / "corrupt.nii.gz").write_bytes(first[1].read_bytes()[:300])
    (bad / "text.nii").write_text("not an image\n")
    return folder


def write_big_input(folder: Path, edge: int = 224) -> Path:
    """A noise volume large enough that packing it takes about a second: a task that is surely running
    when a test kills it. Named to come last in input order."""
    import nibabel as nib

    array = np.random.default_rng(0).standard_normal((edge,) * 3, dtype=np.float32)
    path = folder / "zz-big.nii"
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def report(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]


def final_status(out: Path) -> dict[str, dict]:
    """input file (folder/name) → its last report line, 'ok' preferred (a resumed run also logs skips)."""
    final: dict[str, dict] = {}
    for line in report(out):
        name = "/".join(Path(line["path"]).parts[-2:])
        if final.get(name, {}).get("status") != "ok":
            final[name] = line
    return final
