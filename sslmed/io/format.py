"""The packed-dataset format (shards/README.md) in one place: names, sample encoding, checksums.

Writers (`pack`), checkers (`manifest`) and readers (`sslmed.data`) all go through these helpers.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.jsonl"
ZARR_STORE = "volumes.zarr"
CODECS = ("none", "zstd", "lz4")
VOLUME_EXTENSIONS = ("vol.npy", "vol.blosc")  # tar member suffixes holding the array
META_EXTENSION = "meta.json"
# A derived dataset's samples also carry a `target`: an array voxel-aligned with the volume (e.g. the
# residual method's precomputed soft target), stored as the tar member `<key>.target.vol.*` or the
# Zarr array `targets.zarr/<key>`, its dtype in the sample metadata's `target_dtype`.
TARGET = "target"
TARGET_EXTENSIONS = tuple(f"{TARGET}.{extension}" for extension in VOLUME_EXTENSIONS)
TARGET_STORE = "targets.zarr"


# What the writers name shards, and nothing else: `shard_name` (one pack), a Ray task's
# shard-<task hash>-NNNN.tar, and either with a part's pNNNNN- prefix once `merge` joined the parts.
SHARD_NAME = re.compile(r"(p[0-9]{5}-)?shard-([0-9]{6}|[0-9a-f]{16}-[0-9]{4})\.tar")
KEY = re.compile(r"[A-Za-z0-9_-]+")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def is_shard_name(name: object) -> bool:
    """True only for names the writers give shards (`SHARD_NAME`): a manifest entry is substituted into
    paths and shard URLs (`pipe:` commands), so nothing else may pass."""
    return isinstance(name, str) and SHARD_NAME.fullmatch(name) is not None


def is_array_path(path: object) -> bool:
    """True only for `volumes.zarr/<key>` with a key of the format's own alphabet (no `..`, no `/`)."""
    if not isinstance(path, str) or not path.startswith(f"{ZARR_STORE}/"):
        return False
    return KEY.fullmatch(path[len(ZARR_STORE) + 1:]) is not None


def encode_volume(array: np.ndarray, codec: str) -> tuple[str, bytes]:
    """Array → (tar member extension, payload): `.npy` bytes, Blosc-compressed unless codec is 'none'."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    raw = buffer.getvalue()
    if codec == "none":
        return "vol.npy", raw
    from numcodecs import Blosc, blosc

    # The .npy header is padded to a multiple of 64 bytes, so the whole file views as the array's item
    # size; that lets bit-shuffle group the bits of each int16/float16 value instead of single bytes.
    itemsize = array.dtype.itemsize
    view = np.frombuffer(raw, dtype=f"u{itemsize}") if len(raw) % itemsize == 0 else np.frombuffer(raw, "u1")
    # Blosc's global thread pool lays compressed blocks out in completion order; the single-threaded
    # context gives the same bytes every time, so shards and their checksums are reproducible.
    threaded, blosc.use_threads = blosc.use_threads, False
    try:
        return "vol.blosc", bytes(Blosc(cname=codec, clevel=5, shuffle=Blosc.BITSHUFFLE).encode(view))
    finally:
        blosc.use_threads = threaded


Buffer = bytes | np.ndarray  # a payload: bytes, or the uint8 array `read_span` / `map_span` give
BLOSC_HEADER_BYTES = 16
NPY_HEADER_LIMIT = 65536 + 10  # magic, version, length and the largest version-1 header dict


def npy_layout(data: Buffer) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, header bytes) of `.npy` bytes, read from the header alone."""
    stream = io.BytesIO(memoryview(data)[:NPY_HEADER_LIMIT])  # copies the header only
    version = np.lib.format.read_magic(stream)
    npy = np.lib.format
    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)  # parses a literal dict: no pickle involved
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return shape, dtype, fortran, stream.tell()


def check_payload(extension: str, head: Buffer, length: int, meta: dict) -> None:
    """Cheap structural check of a payload of `length` bytes from its first bytes `head` (headers and
    lengths, no decompression), so truncation is caught before anything is decoded, and a payload
    that would decompress beyond what its metadata's shape and dtype need (a bomb) is never decoded."""
    head = memoryview(head)
    if extension == "vol.blosc":
        cbytes = int.from_bytes(head[12:16], "little") if len(head) >= BLOSC_HEADER_BYTES else -1
        if cbytes != length:
            raise ValueError(f"blosc buffer of {length} bytes, header says {cbytes}")
        nbytes = int.from_bytes(head[4:8], "little")
        bound = NPY_HEADER_LIMIT + int(np.prod(meta["shape"])) * np.dtype(meta["dtype"]).itemsize
        if nbytes > bound:
            raise ValueError(f"blosc buffer decompresses to {nbytes} bytes; its metadata "
                             f"({meta['dtype']}{meta['shape']}) allows at most {bound}")
        return
    shape, dtype, _, header = npy_layout(head)
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if length != expected:
        raise ValueError(f".npy payload of {length} bytes, header implies {expected}")


def volume_member(members: Iterable[str]) -> str:
    """The extension of a tar sample's volume member; ValueError when the sample lacks it or its
    metadata. (Names starting with "__" are WebDataset's own bookkeeping, not members.)"""
    names = sorted(name for name in members if not name.startswith("__"))
    extension = next((e for e in VOLUME_EXTENSIONS if e in names), None)
    if extension is None or META_EXTENSION not in names:
        raise ValueError(f"incomplete sample (members: {names})")
    return extension


def decode_volume(extension: str, payload: Buffer) -> np.ndarray:
    """Inverse of `encode_volume`: the stored 3-D array, a view of the (decompressed) `.npy` bytes
    (no extra copy); never unpickles. ValueError on anything malformed."""
    if extension == "vol.blosc":
        from numcodecs import blosc

        payload = blosc.decompress(payload)  # the codec is named in the blosc header
    elif extension != "vol.npy":
        raise ValueError(f"unknown volume member extension '{extension}'")
    shape, dtype, fortran, header = npy_layout(payload)
    count = int(np.prod(shape))
    if len(payload) < header + count * dtype.itemsize:
        raise ValueError(f".npy payload of {len(payload)} bytes is too short for {shape} {dtype}")
    if len(shape) != 3:
        raise ValueError(f"array has {len(shape)} dimensions, expected 3")
    flat = np.frombuffer(payload, dtype=dtype, count=count, offset=header)
    return flat.reshape(shape, order="F" if fortran else "C")


def to_float(stored: np.ndarray, scale: float, offset: float, out: np.ndarray | None = None) -> np.ndarray:
    """Stored array → normalised float32 intensity, `stored * scale + offset` (into `out` if given):
    two passes, no temporaries."""
    out = np.multiply(stored, np.float32(scale), out=out, dtype=np.float32)
    out += np.float32(offset)
    return out


Span = tuple[int, int]  # (byte offset, byte count) of a member's data inside its tar file


def tar_samples(path: Path) -> Iterator[tuple[str, dict[str, Span]]]:
    """(key, {extension: span}) of each sample of a tar shard, in order, from the member headers alone.

    Payloads are not read here: a reader fetches exactly the bytes it needs with `read_span`, in one
    system call into its own buffer, instead of tarfile's stream copying them in 10 kB pieces. Raises
    tarfile.TarError or OSError on a damaged shard, after the samples that precede the damage."""
    size = Path(path).stat().st_size
    with tarfile.open(path, "r:") as tar:  # random-access mode: iterating seeks past member data
        key, spans = None, {}
        for member in tar:
            if not member.isfile():
                continue
            if member.offset_data + member.size > size:
                raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
            name, _, extension = member.name.partition(".")
            if name != key and spans:
                yield key, spans
                spans = {}
            key, spans[extension] = name, (member.offset_data, member.size)
        if spans:
            yield key, spans


def check_meta(meta: object) -> dict:
    """A sample's metadata, checked for what decoding relies on (shape, dtype, a finite scale and
    offset); ValueError naming the first bad field."""
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
        raise ValueError(f"metadata shape is {shape!r}")
    try:
        numeric = isinstance(meta.get("dtype"), str) and np.dtype(meta["dtype"]).kind in "iuf"
    except TypeError:
        numeric = False
    if not numeric:
        raise ValueError(f"metadata dtype is {meta.get('dtype')!r}")
    for field in ("scale", "offset"):
        value = meta.get(field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metadata {field} is {value!r}")
    return meta


def target_member(members: Iterable[str]) -> str | None:
    """The extension of a tar sample's target member (`target.vol.npy` / `target.vol.blosc`), or None."""
    names = set(members)
    return next((e for e in TARGET_EXTENSIONS if e in names), None)


def target_encoding(member: str) -> str:
    """A target member's extension → the volume extension that `check_payload` / `decode_volume` read."""
    return member.removeprefix(f"{TARGET}.")


def target_meta(meta: dict) -> dict:
    """What checks and decodes a sample's target: the volume's shape, the target's own dtype."""
    dtype = meta.get("target_dtype")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"metadata target_dtype is {dtype!r}")
    return {"shape": meta["shape"], "dtype": dtype}


def tar_target(path: Path, spans: dict[str, Span], meta: dict) -> tuple[str, Span] | None:
    """The extension and span of a sample's target member, its header checked against its length and
    the metadata (as `tar_sample` checks the volume); None when the sample has no target."""
    extension = target_member(spans)
    if extension is None:
        return None
    offset, length = spans[extension]
    head = read_span(path, (offset, min(length, NPY_HEADER_LIMIT)))
    check_payload(target_encoding(extension), head, length, target_meta(meta))
    return extension, spans[extension]


def tar_sample(path: Path, spans: dict[str, Span]) -> tuple[dict, str, Span]:
    """One sample of a local tar shard, as both training and `verify` read it: its checked metadata
    and the extension and span of its volume member, whose header is checked against its length
    (nothing is decompressed). ValueError says what is wrong."""
    extension = volume_member(spans)
    meta = check_meta(json.loads(read_span(path, spans[META_EXTENSION]).tobytes()))
    offset, length = spans[extension]
    check_payload(extension, read_span(path, (offset, min(length, NPY_HEADER_LIMIT))), length, meta)
    return meta, extension, spans[extension]


def read_span(path: Path, span: Span) -> np.ndarray:
    """The bytes of `span` in a fresh, aligned uint8 array (read straight into it: no extra copy)."""
    offset, size = span
    out = np.empty(size, dtype=np.uint8)
    view = memoryview(out)
    with open(path, "rb", buffering=0) as handle:
        done = 0
        while done < size:  # a large read may return in parts
            got = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{path}: ends {size - done} bytes short of a member")
            done += got
    return out


def map_span(path: Path, span: Span) -> np.ndarray:
    """The bytes of `span` mapped read-only (uint8): nothing is read up front, a decompressor reads the
    page cache directly, and crops of an uncompressed volume touch only their own pages."""
    offset, size = span
    if Path(path).stat().st_size < offset + size:  # mapping past the end would fault on access
        raise OSError(f"{path}: ends before a member it lists (truncated?)")
    if size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(size,))


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside `path` under a temporary name, then rename: readers see the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; a dataset is meant to be shared
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: object) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(array: np.ndarray, meta: dict, target: np.ndarray | None = None) -> str:
    """A sample's content checksum, the same in either format and in any shard or task grouping:
    sha256 of its metadata as canonical JSON (sorted keys, no spaces, UTF-8), a NUL byte, then the
    stored array's bytes (C order, little-endian); a sample with a target continues with a NUL byte,
    `target`, a NUL byte and the target's bytes."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for prefix, data in ((b"\0", array), (b"\0target\0", target)):
        if data is None:
            continue
        digest.update(prefix)
        stored = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
        digest.update(memoryview(stored.reshape(-1)).cast("B"))
    return digest.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Every file under `root`, in sorted relative-path order."""
    files = (p for p in Path(root).rglob("*") if p.is_file())
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def tree_sha256(root: Path) -> str:
    """sha256 over (relative path, contents) of every file under `root`, in sorted path order."""
    digest = hashlib.sha256()
    for path in tree_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in tree_files(root))


def zarr_layout(shape: tuple[int, ...], chunk: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, shards): `chunk`³ chunks clipped to the volume, shards of up to 4 chunks per axis that
    still cover no more than needed (a shard edge is a whole number of chunks)."""
    chunks = tuple(min(chunk, s) for s in shape)
    shards = tuple(c * min(4, -(-s // c)) for c, s in zip(chunks, shape, strict=True))
    return chunks, shards


def zarr_compressors(codec: str) -> tuple:
    """Blosc (unless 'none'), then a crc32c of each compressed chunk: zarr checks it on every read,
    so a flipped byte fails the read instead of decoding to altered voxels (its cost was within
    measurement noise of the loader's throughput)."""
    import zarr

    checksum = zarr.codecs.Crc32cCodec()
    if codec == "none":
        return (checksum,)
    return (zarr.codecs.BloscCodec(cname=codec, clevel=5, shuffle="bitshuffle"), checksum)


def missing_files(root: Path, listed: list[str]) -> list[str]:
    """The files of a Zarr array that its manifest entry lists and the store lacks: zarr reads a missing
    chunk or shard as zeros, so only this list tells a deleted one from an empty one."""
    return [name for name in listed if not (Path(root) / name).is_file()]
