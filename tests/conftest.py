"""Shared test fixtures (keep small: every test module sees them)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory) -> list[Path]:
    """Three small deterministic MR phantoms (NIfTI, 24x20x16, random spacing and axis flips)."""
    from sslmed.io.synthetic import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("phantoms"), 3, shape=(24, 20, 16), seed=7)


@pytest.fixture(scope="session")
def packed_wds(tmp_path_factory, phantom_files) -> Path:
    """`phantom_files` packed as WebDataset shards (int16, zstd, small shards)."""
    from sslmed.io.pack import pack

    out = tmp_path_factory.mktemp("packed") / "wds"
    pack(phantom_files, out, fmt="wds", shard_size=16e3)
    return out


@pytest.fixture(scope="session")
def registered(tmp_path_factory) -> dict:
    """A phantom template and three subjects registered to it through known maps, packed with --atlas
    (tests/atlas_inputs.py)."""
    from atlas_inputs import pack_registered

    return pack_registered(tmp_path_factory.mktemp("registered"))
