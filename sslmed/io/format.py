"""The packed-dataset format (shards/README.md) in one place: names, sample encoding, checksums.

Writers (`pack`), checkers (`manifest`) and readers (`sslmed.data`) all go through these helpers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sslmed.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.jsonl"
ZARR_STORE = "volumes.zarr"
CODECS = ("none", "zstd", "lz4")
VOLUME_EXTENSIONS = ("vol.npy", "vol.blosc")  # tar member suffixes holding the array
META_EXTENSION = "meta.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


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


def decode_volume(extension: str, payload: bytes) -> np.ndarray:
    """Inverse of `encode_volume`; never unpickles."""
    if extension == "vol.blosc":
        from numcodecs import Blosc

        payload = bytes(Blosc().decode(payload))
    elif extension != "vol.npy":
        raise DataError(f"unknown volume member extension '{extension}'")
    return np.load(io.BytesIO(payload), allow_pickle=False)


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


def content_sha256(array: np.ndarray, meta: dict) -> str:
    """A sample's content checksum, the same in either format and in any shard or task grouping:
    sha256 of its metadata as canonical JSON (sorted keys, no spaces, UTF-8), a NUL byte, then the
    stored array's bytes (C order, little-endian)."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    stored = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
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


def zarr_compressors(codec: str):
    import zarr

    if codec == "none":
        return None
    return zarr.codecs.BloscCodec(cname=codec, clevel=5, shuffle="bitshuffle")
