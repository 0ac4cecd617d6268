"""Labelled data for downstream evaluation, read whole into memory (evaluation sets are small).

`eval.data` is either a packed dataset (a `manifest.json` inside; the class label is the sample tag
`data.label_key`) or a folder with `labels.csv` (columns `path`, the label column, optionally a group
column; paths relative to the folder). Every sample becomes a `data.crop_size`³ array: the volume's
centre, zero-padded where the volume is smaller.

Each sample's location in [−1, 1] (for location-conditioned encoders, sslmed/models/location.py): in a
packed dataset the centre crop's own location, as the pretraining stream computes it (atlas coordinates
when packed with `--atlas`); in a folder, the labels.csv columns `eval.location_columns` when present.

Inputs: `eval.branches` (fusion) names one input per branch: a tag (packed) or CSV column holding the
key/path of a co-registered sibling volume (e.g. another MRI sequence); `self` is the sample itself.
Without branches every sample has one input channel.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmed.config import Config
from sslmed.errors import ConfigError, DataError

SELF = "self"


@dataclass
class LabelledSet:
    images: np.ndarray  # (N, C, S, S, S) float32: one channel per input branch
    labels: np.ndarray  # (N,) int64 class indices into `classes`
    classes: list[str]
    groups: np.ndarray | None  # (N,) group ids that must not straddle train/test, or None
    keys: list[str]
    locations: np.ndarray | None = None  # (N, 3) float32 in [-1, 1], or None (a folder without them)


def input_branches(cfg: Config) -> list[str]:
    if cfg.eval.mode != "fusion":
        return [SELF]
    if not cfg.eval.branches:
        raise ConfigError("eval.mode=fusion needs eval.branches: the tags (or labels.csv columns) naming "
                          "each sample's co-registered inputs, 'self' for the sample itself")
    return list(cfg.eval.branches)


def load_labelled(cfg: Config) -> LabelledSet:
    root = Path(cfg.eval.data)
    if not cfg.eval.data or not root.is_dir():
        raise DataError(f"eval.data: '{cfg.eval.data}' is not a folder (a packed dataset or a folder "
                        "with labels.csv)")
    if (root / "manifest.json").exists():
        rows = _packed_rows(cfg, root)
    elif (root / "labels.csv").exists():
        rows = _folder_rows(cfg, root)
    else:
        raise DataError(f"eval.data: {root} holds neither manifest.json (packed) nor labels.csv")
    return _assemble(rows, cfg.eval.data)


@dataclass
class _Row:
    key: str
    label: str
    group: str | None
    inputs: list[np.ndarray]  # one (S, S, S) array per branch
    location: np.ndarray | None = None  # (3,) in [-1, 1]


def _assemble(rows: list[_Row], source: str) -> LabelledSet:
    if not rows:
        raise DataError(f"eval.data: no labelled sample in {source}")
    classes = sorted({r.label for r in rows})
    if len(classes) < 2:
        raise DataError(f"eval.data: {source} has a single class ({classes[0]!r}); need at least two")
    index = {name: i for i, name in enumerate(classes)}
    groups = None if rows[0].group is None else np.array([r.group for r in rows])
    located = rows[0].location is not None
    return LabelledSet(
        images=np.stack([np.stack(r.inputs) for r in rows]).astype(np.float32),
        labels=np.array([index[r.label] for r in rows], dtype=np.int64),
        classes=classes, groups=groups, keys=[r.key for r in rows],
        locations=np.stack([r.location for r in rows]).astype(np.float32) if located else None,
    )


def _packed_rows(cfg: Config, root: Path) -> list[_Row]:
    from sslmed.data.sources import open_dataset

    dataset = open_dataset(root)
    known = set(dataset.keys)
    size = cfg.data.crop_size
    branches = input_branches(cfg)
    rows = []
    for key in dataset.keys:
        tags = dataset.meta(key).get("tags", {})
        if cfg.data.label_key not in tags:  # unlabelled volumes (e.g. fusion siblings) are not samples
            continue
        inputs = []
        for branch in branches:
            source = key if branch == SELF else tags.get(branch)
            if source not in known:
                raise DataError(f"eval.data: sample '{key}' branch '{branch}': "
                                + (f"sibling '{source}' is not in {root}" if source else "no such tag"))
            inputs.append(_centre_crop_packed(dataset, source, size))
        rows.append(_Row(key, tags[cfg.data.label_key], _group_of(cfg, tags, key), inputs,
                         _centre_location(dataset.meta(key), size)))
    return rows


def _centre_start(meta: dict, size: int) -> np.ndarray:
    return (np.asarray(meta["shape"]) - size) // 2  # negative where the volume is smaller: zero padding


def _centre_crop_packed(dataset, key: str, size: int) -> np.ndarray:
    return dataset.read_crop(key, _centre_start(dataset.meta(key), size), (size, size, size))


def _centre_location(meta: dict, size: int) -> np.ndarray:
    from sslmed.data.stages import location

    return location(_centre_start(meta, size), meta["shape"], size, meta)


def _group_of(cfg: Config, tags: dict, key: str) -> str | None:
    if not cfg.eval.group_key:
        return None
    if cfg.eval.group_key not in tags:
        raise DataError(f"eval.data: sample '{key}' lacks the group tag '{cfg.eval.group_key}' "
                        "(eval.group_key)")
    return str(tags[cfg.eval.group_key])


def _folder_rows(cfg: Config, root: Path) -> list[_Row]:
    table = root / "labels.csv"
    with open(table, newline="") as handle:
        records = list(csv.DictReader(handle))
    columns = set(records[0]) if records else set()
    group_column = cfg.eval.group_key or ("group" if "group" in columns else "")
    branches = input_branches(cfg)
    needed = {"path", cfg.data.label_key, *([group_column] if group_column else []),
              *(b for b in branches if b != SELF)}
    if missing := needed - columns:
        raise DataError(f"{table}: missing column(s) {', '.join(sorted(missing))} "
                        f"(has: {', '.join(sorted(columns))})")
    located = [c for c in cfg.eval.location_columns if c in columns]
    if located and len(located) != 3:
        raise DataError(f"{table}: location column(s) {', '.join(located)} without the others of "
                        f"{', '.join(cfg.eval.location_columns)} (eval.location_columns)")
    rows = []
    for line, record in enumerate(records, start=2):
        paths = [record["path"] if b == SELF else record[b] for b in branches]
        inputs = [_centre_crop_file(root / p, cfg.data.crop_size) for p in paths]
        group = record[group_column] if group_column else None
        location = _csv_location(record, located, f"{table}:{line}") if located else None
        rows.append(_Row(record["path"], record[cfg.data.label_key], group, inputs, location))
    return rows


def _csv_location(record: dict, columns: list[str], where: str) -> np.ndarray:
    try:
        value = np.array([float(record[c]) for c in columns], dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{where}: location {[record[c] for c in columns]} is not three numbers") from None
    if not np.all(np.isfinite(value)) or np.abs(value).max() > 1:
        raise DataError(f"{where}: location {value.tolist()} outside [-1, 1] (locations are scaled to "
                        "[-1, 1] per axis: docs/architecture.md)")
    return value


def _centre_crop_file(path: Path, size: int) -> np.ndarray:
    """A volume file normalised as `sslmed pack` does it, then centre-cropped/padded with MONAI."""
    from monai.transforms import ResizeWithPadOrCrop

    from sslmed.io.format import to_float
    from sslmed.io.preprocess import preprocess
    from sslmed.io.readers import read_volume

    if not path.exists():
        raise DataError(f"labels.csv names {path}, which does not exist")
    stored, meta = preprocess(read_volume(path), dtype="float16")
    array = to_float(stored, meta["scale"], meta["offset"])[None]
    return np.asarray(ResizeWithPadOrCrop(spatial_size=(size, size, size))(array))[0]
