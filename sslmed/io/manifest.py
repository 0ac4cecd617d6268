"""Reading, verifying and summarising a packed dataset (shards/README.md)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sslmed.errors import DataError
from sslmed.io.format import (
    CODECS,
    FORMAT_VERSION,
    KEY,
    MANIFEST,
    TARGET,
    TARGET_STORE,
    check_meta,
    content_sha256,
    decode_volume,
    file_sha256,
    is_array_path,
    is_shard_name,
    map_span,
    tar_sample,
    tar_samples,
    tar_target,
    target_encoding,
    tree_sha256,
)

REQUIRED = ("format_version", "format", "codec", "preprocessing", "samples", "voxels", "bytes")


def load_manifest(directory: str | Path) -> dict:
    """The dataset's manifest.json, checked for the fields every reader relies on."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DataError(f"packed dataset {directory}: no such directory")
    if not path.is_file():
        raise DataError(f"{directory}: no {MANIFEST} (not a packed dataset, or `sslmed pack` never finished)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: must be a JSON object")
    missing = [k for k in REQUIRED if k not in manifest]
    entries = "shards" if manifest.get("format") == "wds" else "arrays"
    valid_format = manifest.get("format") in ("wds", "zarr")
    if missing or not valid_format or not isinstance(manifest.get(entries), list):
        raise DataError(f"{path}: not a valid manifest (missing {missing or [entries]}, format "
                        f"{manifest.get('format')!r})")
    problem = _schema_problem(manifest, entries)
    if problem:
        raise DataError(f"{path}: invalid manifest: {problem}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise DataError(f"{path}: format version {manifest['format_version']} is newer than this sslmed "
                        f"understands ({FORMAT_VERSION}); upgrade sslmed")
    return manifest


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _schema_problem(manifest: dict, entries: str) -> str | None:
    """The first field of the manifest with a wrong type or value, named; None when all are right.
    Entry paths are checked against the format's own naming rule because they are substituted into
    file paths and shard URLs (a `pipe:` command): a name like `x.tar; rm -rf ~` must never get there."""
    top = [(k, _is_count(manifest[k])) for k in ("format_version", "samples", "voxels", "bytes")]
    top.append(("codec", manifest["codec"] in CODECS))
    top.append(("preprocessing", isinstance(manifest["preprocessing"], dict)))
    for field, ok in top:
        if not ok:
            return f"{field} is {manifest[field]!r}"
    for index, entry in enumerate(manifest[entries]):
        where = f"{entries}[{index}]"
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        checks = _shard_checks(entry) if entries == "shards" else _array_checks(entry)
        for field, ok in checks:
            if field not in entry:
                return f"{where} has no '{field}'"
            if not ok(entry[field]):
                return f"{where}.{field} is {entry[field]!r}" + (
                    " (not a shard name shard-NNNNNN.tar)" if (entries, field) == ("shards", "path") else "")
        if entries == "arrays" and not _is_relative_list(entry.get("files", [])):
            return f"{where}.files is not a list of relative paths inside the array"
        if entries == "arrays" and entry["path"] != f"volumes.zarr/{entry['key']}":
            return f"{where}.path {entry['path']!r} does not match its key {entry['key']!r}"
        if entries == "arrays" and TARGET in entry and not _is_target_entry(entry[TARGET], entry["key"]):
            return f"{where}.{TARGET} is not a target array entry for key {entry['key']!r}"
        if entries == "shards" and len(entry["keys"]) != entry["samples"]:
            return f"{where} lists {len(entry['keys'])} keys for {entry['samples']} samples"
    return None


def _is_relative_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, str) and v and not v.startswith("/") and ".." not in v.split("/") for v in value)


def _is_target_entry(value: object, key: str) -> bool:
    """A Zarr entry's `target`: {path: targets.zarr/<its key>, sha256, files}."""
    return (isinstance(value, dict) and value.get("path") == f"{TARGET_STORE}/{key}"
            and _is_sha256(value.get("sha256")) and _is_relative_list(value.get("files", [])))


def _is_key_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(k, str) and KEY.fullmatch(k) for k in value)


def _shard_checks(entry: dict) -> list:
    return [("path", is_shard_name), ("samples", _is_count), ("voxels", _is_count), ("bytes", _is_count),
            ("sha256", _is_sha256), ("keys", _is_key_list)]


def _array_checks(entry: dict) -> list:
    def is_shape(v: object) -> bool:
        return isinstance(v, list) and len(v) == 3 and all(_is_count(n) and n > 0 for n in v)

    return [("key", lambda k: isinstance(k, str) and KEY.fullmatch(k) is not None), ("path", is_array_path),
            ("shape", is_shape), ("voxels", _is_count), ("bytes", _is_count), ("sha256", _is_sha256)]


def iter_shard(path: Path, *, decode: bool = True
               ) -> Iterator[tuple[str, np.ndarray | None, dict, np.ndarray | None]]:
    """(key, stored array or None, metadata, target or None) for each sample of one tar shard, in
    order — through the same reader and decoder that training streams with (`tar_samples`,
    `tar_sample`, `decode_volume`). DataError names the shard and sample on anything unreadable."""
    try:
        for key, spans in tar_samples(path):
            try:
                meta, extension, span = tar_sample(path, spans)
                array = decode_volume(extension, map_span(path, span)) if decode else None
                target = decode_target(path, spans, meta) if decode else None
            except (ValueError, RuntimeError) as exc:  # blosc raises RuntimeError on a corrupt buffer
                raise DataError(f"{path.name}: sample '{key}': {exc}") from None
            yield key, array, meta, target
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{path}: unreadable shard ({type(exc).__name__}: {exc})") from None


def decode_target(path: Path, spans: dict, meta: dict) -> np.ndarray | None:
    """A tar sample's target array, or None when it has none."""
    found = tar_target(path, spans, meta)
    if found is None:
        return None
    extension, span = found
    return decode_volume(target_encoding(extension), map_span(path, span))


def verify(directory: str | Path) -> list[str]:
    """Every problem with the dataset, each naming its shard or array; empty when the data matches."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    targets = TARGET in manifest  # a derived dataset: every sample carries a target
    if manifest["format"] == "wds":
        problems = [p for entry in manifest["shards"] for p in _verify_shard(directory, entry, targets)]
    else:
        problems = [p for entry in manifest["arrays"] for p in _verify_array(directory, entry, targets)]
    entries = manifest.get("shards") or manifest.get("arrays") or []
    listed = sum(e.get("samples", 1) for e in entries)
    if listed != manifest["samples"]:
        problems.append(f"{MANIFEST}: samples {manifest['samples']} but the entries list {listed}")
    return problems


def _verify_shard(directory: Path, entry: dict, targets: bool = False) -> list[str]:
    name = entry["path"]
    path = directory / name
    if not path.is_file():
        return [f"{name}: missing file"]
    problems = []
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        problems.append(f"{name}: checksum mismatch (manifest {entry['sha256'][:12]}…, file {digest[:12]}…)")
    keys: list[str] = []
    contents: list[str] = []
    try:
        for key, array, meta, target in iter_shard(path):
            keys.append(key)
            contents.append(content_sha256(array, meta, target))
            if list(array.shape) != list(meta["shape"]) or str(array.dtype) != meta["dtype"]:
                problems.append(f"{name}: sample '{key}' is {array.dtype}{list(array.shape)} but its "
                                f"metadata says {meta['dtype']}{meta['shape']}")
            problems += _target_problems(f"{name}: sample '{key}'", array, target, targets)
    except Exception as exc:  # any decoding failure means a corrupt shard; name it
        problems.append(f"{name}: unreadable after sample {len(keys)} ({type(exc).__name__}: {exc})")
        return problems
    if len(keys) != entry["samples"]:
        problems.append(f"{name}: sample count mismatch (manifest {entry['samples']}, shard {len(keys)})")
    elif keys != entry["keys"]:
        problems.append(f"{name}: keys differ from the manifest")
    elif "content_sha256" in entry:  # written since content checksums were added; older shards lack it
        problems += [f"{name}: sample '{key}' content checksum differs from the manifest"
                     for key, listed, found in zip(keys, entry["content_sha256"], contents, strict=True)
                     if listed != found]
    return problems


def _target_problems(where: str, array: np.ndarray, target: np.ndarray | None, expected: bool) -> list[str]:
    if target is None:
        return [f"{where}: no target, though the manifest describes a dataset of targets"] if expected else []
    if target.shape != array.shape:
        return [f"{where}: target shape {list(target.shape)} differs from the volume's {list(array.shape)}"]
    return []


def _verify_array(directory: Path, entry: dict, targets: bool = False) -> list[str]:
    import zarr

    name = entry["path"]
    root = directory / name
    if not (root / "zarr.json").is_file():
        return [f"{name}: missing array"]
    problems = []
    stored = [(name, root, entry["sha256"])]
    if TARGET in entry:
        stored.append((entry[TARGET]["path"], directory / entry[TARGET]["path"], entry[TARGET]["sha256"]))
    for label, tree, listed in stored:
        digest = tree_sha256(tree)
        if digest != listed:
            problems.append(f"{label}: checksum mismatch (manifest {listed[:12]}…, files {digest[:12]}…)")
    try:
        array = zarr.open_array(str(root), mode="r")
        data = array[...]
        meta = check_meta(dict(array.attrs)["sslmed"])
        target = None
        if TARGET in entry:
            target = zarr.open_array(str(directory / entry[TARGET]["path"]), mode="r")[...]
        if list(data.shape) != list(entry["shape"]) or list(meta["shape"]) != list(entry["shape"]):
            problems.append(f"{name}: shape {list(data.shape)} differs from the manifest {entry['shape']}")
        elif "content_sha256" in entry and content_sha256(data, meta, target) != entry["content_sha256"]:
            problems.append(f"{name}: content checksum differs from the manifest")
        problems += _target_problems(name, data, target, targets)
    except Exception as exc:  # any decoding failure means a corrupt array; name it
        problems.append(f"{name}: unreadable array ({type(exc).__name__}: {exc})")
    return problems


def sample_checksums(directory: str | Path) -> dict[str, str]:
    """key → content checksum of every sample the manifest lists: two datasets hold the same samples
    exactly when these are equal, however their samples are grouped into shards."""
    manifest = load_manifest(directory)
    entries = manifest["shards" if manifest["format"] == "wds" else "arrays"]
    if not all("content_sha256" in entry for entry in entries):
        raise DataError(f"{directory}: packed by an sslmed that recorded no content checksums")
    if manifest["format"] == "wds":
        return {key: digest for entry in entries
                for key, digest in zip(entry["keys"], entry["content_sha256"], strict=True)}
    return {entry["key"]: entry["content_sha256"] for entry in entries}


def iter_metadata(directory: str | Path) -> Iterator[dict]:
    """The metadata of every sample, in dataset order, without decoding arrays."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest["format"] == "wds":
        for entry in manifest["shards"]:
            for _, _, meta, _ in iter_shard(directory / entry["path"], decode=False):
                yield meta
    else:
        import zarr

        for entry in manifest["arrays"]:
            try:
                array = zarr.open_array(str(directory / entry["path"]), mode="r")
                meta = check_meta(dict(array.attrs)["sslmed"])
            except (OSError, KeyError, ValueError, zarr.errors.BaseZarrError) as exc:
                raise DataError(f"{directory / entry['path']}: unreadable array ({type(exc).__name__}: "
                                f"{exc})") from None
            yield meta


def inspect(directory: str | Path) -> str:
    """A short human-readable summary of a packed dataset."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    metas = list(iter_metadata(directory))
    entries = manifest.get("shards") or manifest.get("arrays") or []
    kind = "shards" if manifest["format"] == "wds" else "arrays"
    raw_bytes = manifest["voxels"] * np.dtype(manifest["preprocessing"]["dtype"]).itemsize
    lines = [f"dataset     {directory}  (format {manifest['format']}, codec {manifest['codec']}, "
             f"sslmed {manifest.get('sslmed_version', '?')})",
             f"volumes     {len(metas)} in {len(entries)} {kind}; {manifest['voxels']:,} voxels; "
             f"{manifest['bytes'] / 1e6:,.1f} MB on disk ({raw_bytes / 1e6:,.1f} MB uncompressed)"]
    if metas:
        try:
            lines += _summary(metas)
        except (KeyError, TypeError, ValueError) as exc:  # metadata written by something else
            raise DataError(f"{directory}: sample metadata lacks what inspect summarises ({exc!r})") from None
    lines.append(f"preprocess  {json.dumps(manifest['preprocessing'])}")
    if isinstance(manifest.get(TARGET), dict):  # a derived dataset: what its targets are and came from
        target = manifest[TARGET]
        cae = target.get("cae", {})
        lines.append(f"target      {target.get('kind')} ({target.get('dtype')}, median kernel "
                     f"{target.get('median_kernel')}, percentiles {target.get('percentiles')}); CAE "
                     f"{str(cae.get('weights_sha256', '?'))[:12]}… of {cae.get('run')} "
                     f"at step {cae.get('step')}")
    return "\n".join(lines)


def _summary(metas: list[dict]) -> list[str]:
    """Shape, spacing, intensity, foreground, modality and tag summaries of sample metadata."""
    shapes = np.array([m["shape"] for m in metas])
    spacings = np.array([m["spacing"] for m in metas])
    means = np.array([m["stats"]["mean"] for m in metas])
    stds = np.array([m["stats"]["std"] for m in metas])
    fg = np.array([m["foreground_fraction"] for m in metas])
    lines = [
        f"shape       min {'x'.join(map(str, shapes.min(0)))}  max {'x'.join(map(str, shapes.max(0)))}",
        f"spacing mm  min {_triple(spacings.min(0))}  max {_triple(spacings.max(0))}",
        f"intensity   mean {means.mean():.3f} (per-volume {means.min():.3f}–{means.max():.3f}), "
        f"std {stds.mean():.3f}  [normalised]",
        f"foreground  {fg.mean():.1%} of voxels on average",
        f"modality    {_counts(m['modality'] for m in metas)}",
    ]
    tag_names = sorted({t for m in metas for t in m.get("tags", {})})
    for tag in tag_names:
        lines.append(f"tag {tag:<8}{_counts(m.get('tags', {}).get(tag, '-') for m in metas)}")
    return lines


def _triple(values: np.ndarray) -> str:
    return "x".join(f"{v:.2f}" for v in values)


def _counts(values) -> str:
    return ", ".join(f"{value}: {n}" for value, n in sorted(Counter(values).items()))
