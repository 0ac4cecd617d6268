"""Full-state checkpoints (atomic, last K kept), resume, and encoder export.

A checkpoint is `RUN/checkpoints/step_N/`: the DeepSpeed engine state (model, optimizer, LR schedule,
step), `teachers.pt` (what the method keeps outside the engine: its EMA teachers in float32, keys
`teacher.<attribute>.<tensor>`, and its held state such as MoCo key queues, keys `held.<name>`),
`extras/rank_R.pt` per rank (data pipeline position), `config.yaml`, and the `complete` marker (JSON:
step, world size, ZeRO stage, config digest). No RNG state is saved: a step's random draws are a
function of its position (`sslmed.rng`). It is written as `tmp-step_N`, the marker last, then renamed:
a crash at any point leaves either a complete `step_N` or a `tmp-*` directory that resume ignores.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sslmed import __version__
from sslmed.config import Config, config_from_dict, save_config
from sslmed.errors import CheckpointError, ConfigError, SslmedError
from sslmed.methods.base import keeps_outside_state, load_outside_state, outside_state
from sslmed.models.location import accept_location, is_location_conditioned

MARKER = "complete"
LATEST = "latest"
TEACHERS = "teachers.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # RUN/checkpoints/step_N
    step: int
    world: int
    zero_stage: int
    digest: str

    @property
    def tag(self) -> str:
        return self.path.name


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def read_checkpoint(path: Path) -> Checkpoint:
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no '{MARKER}' marker); "
                              "it was interrupted while being written")
    try:
        info = json.loads(marker.read_text())
        return Checkpoint(Path(path), int(info["step"]), int(info["world"]), int(info["zero_stage"]),
                          str(info.get("digest", "")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{marker}: unreadable checkpoint marker") from None


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first; temporary and unmarked directories are skipped."""
    root = checkpoints_dir(run_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            if STEP_DIR.match(child.name) and (child / MARKER).is_file():
                found.append(read_checkpoint(child))
    return sorted(found, key=lambda c: c.step)


def find_resume(cfg: Config, run_dir: Path) -> Checkpoint | None:
    """`checkpoint.resume`: auto (the newest complete checkpoint of this run that loads, if any), none,
    or a checkpoint path. A new run (none, or another run's checkpoint) is refused in a run.dir that
    holds checkpoints: they would outrank its own, which pruning would then delete as they are written."""
    choice = cfg.checkpoint.resume
    if choice == "auto":
        return newest_loadable(complete_checkpoints(run_dir), cfg.checkpoint.trust)
    chosen = None if choice == "none" else explicit_checkpoint(choice)
    existing = complete_checkpoints(run_dir)
    if existing and (chosen is None or chosen.path.parent.resolve() != checkpoints_dir(run_dir).resolve()):
        raise CheckpointError(f"run.dir {run_dir} already holds another run's checkpoints (newest "
                              f"{existing[-1].path}); continue it with checkpoint.resume=auto, or start "
                              f"this run in a new run.dir (or move {checkpoints_dir(run_dir)} away first)")
    return chosen


def newest_loadable(found: list[Checkpoint], trust: bool) -> Checkpoint | None:
    """The newest checkpoint whose files all load; each one skipped is reported with its reason, so a
    requeued job whose last checkpoint was damaged continues from the one before."""
    reasons = []
    for candidate in reversed(found):
        reason = unloadable_reason(candidate, trust)
        if reason is None:
            return candidate
        print(f"sslmed: warning: skipping checkpoint {candidate.path}: {reason}", file=sys.stderr)
        reasons.append(f"{candidate.path.name}: {reason}")
    if reasons:
        raise CheckpointError(f"no loadable checkpoint in {found[0].path.parent} ({'; '.join(reasons)})")
    return None


def unloadable_reason(candidate: Checkpoint, trust: bool) -> str | None:
    """Why a checkpoint's files cannot be loaded (config, engine states, extras), or None. Only the
    pickled structure is read (tensors are memory-mapped), through the same restricted loader as
    the resume itself."""
    from sslmed.train.engine import safe_checkpoint_loads

    try:
        load_saved_config(candidate.path)
        with safe_checkpoint_loads(trust):
            for state in sorted(candidate.path.glob("*.pt")) + sorted(candidate.path.glob("extras/*.pt")):
                torch.load(state, map_location="cpu", mmap=True, weights_only=not trust)
    except CheckpointError as exc:
        return str(exc)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:  # truncated or garbled files
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def explicit_checkpoint(choice: str) -> Checkpoint:
    path = Path(choice)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: no checkpoint directory '{choice}'")
    if not (path / MARKER).is_file():  # a run directory: take its latest checkpoint
        found = complete_checkpoints(path)
        if not found:
            raise CheckpointError(f"checkpoint.resume: '{choice}' holds no complete checkpoint")
        return found[-1]
    return read_checkpoint(path)


def check_compatible(ckpt: Checkpoint, cfg: Config, zero_stage: int) -> None:
    """The model, method and ZeRO stage must match for the state to load; the number of ranks, the
    schedule's length and the data may change."""
    if ckpt.zero_stage != zero_stage:
        raise CheckpointError(f"checkpoint {ckpt.path} was saved with ZeRO stage {ckpt.zero_stage}, this run "
                              f"uses stage {zero_stage}: resume with train.zero_stage={ckpt.zero_stage} "
                              "(the number of ranks may change)")
    saved = load_saved_config(ckpt.path)
    for section in ("model", "method"):
        if getattr(saved, section) != getattr(cfg, section):
            old, new = asdict(getattr(saved, section)), asdict(getattr(cfg, section))
            diff = ", ".join(f"{section}.{k}: {old.get(k)!r} → {new.get(k)!r}" for k in {**old, **new}
                             if old.get(k) != new.get(k))
            raise CheckpointError(f"checkpoint {ckpt.path} was trained with a different {section} "
                                  f"configuration ({diff}); start the new configuration in a new run.dir")


def load_saved_config(path: Path) -> Config:
    file = Path(path) / "config.yaml"
    try:
        return config_from_dict(yaml.safe_load(file.read_text()))
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        raise CheckpointError(f"{file}: cannot read the checkpoint's config: {exc}") from None


# ---- seeds and per-rank extras ------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed the global RNGs: what is drawn outside training steps (initial weights) is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def extras_path(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / "extras" / f"rank_{rank}.pt"


def load_extras(ckpt: Checkpoint, rank: int) -> dict[str, Any]:
    path = extras_path(ckpt.path, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint extras: {exc}") from None


# ---- save ---------------------------------------------------------------------------------------


def save_checkpoint(engine: Any, run_dir: Path, step: int, loader_state: dict, cfg: Config) -> Path:
    """Every rank writes its engine shard and extras into tmp-step_N; rank 0 then adds the config and
    the marker, renames the directory and prunes old checkpoints beyond `checkpoint.keep`."""
    from sslmed.train.engine import barrier

    root = checkpoints_dir(run_dir)
    tmp, final = root / f"tmp-step_{step}", root / f"step_{step}"
    rank = engine.info.rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(root, tmp.name)
    extras = extras_path(tmp, rank)
    extras.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"loader": loader_state, "step": step}, extras)
    if rank == 0 and keeps_outside_state(engine.module):  # the same on every rank: rank 0 writes it
        torch.save(outside_state(engine.module), tmp / TEACHERS)
    barrier()
    if rank == 0:
        save_config(cfg, tmp / "config.yaml")
        marker = {"step": step, "world": engine.info.world, "zero_stage": engine.zero_stage,
                  "digest": cfg.digest()}
        write_atomic(tmp / MARKER, json.dumps(marker))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        # DeepSpeed's own tag file, so its tools (zero_to_fp32, ...) find the newest without `-t`
        write_atomic(root / LATEST, final.name)
        prune(run_dir, cfg.checkpoint.keep)
    barrier()
    return final


def write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def prune(run_dir: Path, keep: int) -> None:
    found = complete_checkpoints(run_dir)
    for old in found[: max(0, len(found) - max(1, keep))]:
        shutil.rmtree(old.path, ignore_errors=True)
    for stale in checkpoints_dir(run_dir).glob("tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---- load ---------------------------------------------------------------------------------------


def needs_universal(ckpt: Checkpoint, world: int) -> bool:
    """Partitioned (ZeRO >= 1) state saved by another number of ranks must be re-sliced; ZeRO-0 state
    is whole on every rank and loads as it is."""
    return ckpt.zero_stage >= 1 and ckpt.world != world


def restore(engine: Any, ckpt: Checkpoint, loader: Any) -> None:
    """Load engine state, the method's teachers and held state, and data position. When the world size
    changed, positions within an epoch are per rank and do not carry over: the new ranks' streams begin
    at the epoch after the saved one. (RNG states saved by earlier versions in the extras are ignored:
    nothing needs them.)"""
    from sslmed.train.engine import barrier, to_universal

    rank, world = engine.info.rank, engine.info.world
    try:
        if needs_universal(ckpt, world):
            directory = ckpt.path / "universal"
            if rank == 0 and not (directory / MARKER).is_file():
                to_universal(ckpt.path, directory, trust=engine.trust_checkpoints)
                write_atomic(directory / MARKER, "{}")
            barrier()
            engine.load(directory, ckpt.tag)
        else:
            engine.load(ckpt.path.parent, ckpt.tag)
    except SslmedError:
        raise
    except Exception as exc:  # DeepSpeed raises assorted errors for shape/state mismatches
        raise CheckpointError(f"cannot load checkpoint {ckpt.path}: {type(exc).__name__}: {exc}") from None
    restore_outside_state(engine.module, ckpt)
    if ckpt.world != world:
        if loader is not None:
            loader.start_at_epoch(int(load_extras(ckpt, 0)["loader"]["epoch"]) + 1)
        return
    loader.load_state_dict(load_extras(ckpt, rank)["loader"])


def restore_outside_state(module: nn.Module, ckpt: Checkpoint) -> None:
    if not keeps_outside_state(module):
        return
    path = ckpt.path / TEACHERS
    try:
        load_outside_state(module, torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot restore the method's teachers and held state: {exc}"
                              ) from None


# ---- export -------------------------------------------------------------------------------------


def export_encoder(module: nn.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """`path` (.safetensors, fp32 weights) and its `.json` sidecar: `meta` plus `export_config()`."""
    if not hasattr(module, "export_config"):
        raise CheckpointError(f"{type(module).__name__} has no export_config(); cannot export it")
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    part = path.with_name(path.name + ".part")
    save_file(tensors, str(part), metadata={"format": "pt"})
    os.replace(part, path)
    info = {**meta, **module.export_config(), "feature_dim": int(getattr(module, "feature_dim", 0)),
            "needs_location": is_location_conditioned(module),
            "location_coordinates": meta.get("location_coordinates", "volume"), "location_range": [-1, 1]}
    write_atomic(path.with_suffix(".json"), json.dumps(info, indent=2, sort_keys=True))
    return path


def encoder_meta(cfg: Config) -> dict[str, Any]:
    """What a user of the encoder must reproduce at inference: crop, axis order, spacing, intensity."""
    meta: dict[str, Any] = {"sslmed_version": __version__, "crop_size": cfg.data.crop_size,
                            "patch_size": cfg.model.patch_size, "axis_order": "XYZ (RAS+)",
                            "input": "(B, 1, X, Y, Z) float32",
                            "method": cfg.method.name, "steps": cfg.train.steps,
                            "config_digest": cfg.digest()}
    manifest = Path(cfg.data.path) / "manifest.json"
    if manifest.is_file():
        prep = json.loads(manifest.read_text()).get("preprocessing", {})
        meta["spacing"] = prep.get("spacing")
        meta["normalisation"] = {k: prep[k] for k in ("modality", "ct_window", "mr_percentiles") if k in prep}
        if prep.get("atlas"):  # crop locations were atlas coordinates: downstream crops need the same
            meta["location_coordinates"] = "atlas"
            meta["atlas_template"] = Path(prep["atlas"]).name
    return meta


def export_run(run_dir: str | Path, out: str | Path, trust: bool = False) -> Path:
    """The latest complete checkpoint of a run → exported encoder (consolidated fp32 weights). The
    checkpoint's own config never decides `trust`: only the caller does."""
    cfg, method = load_run_method(run_dir, trust)
    return export_encoder(method.encoder(), out, encoder_meta(cfg))


def load_run_method(run_dir: str | Path, trust: bool = False) -> tuple[Config, nn.Module]:
    """The run's config and its method holding the latest complete checkpoint's weights (fp32)."""
    from sslmed.methods import build_method
    from sslmed.train.engine import consolidated_state_dict

    found = complete_checkpoints(Path(run_dir))
    if not found:
        raise CheckpointError(f"{run_dir}: no complete checkpoint under {checkpoints_dir(Path(run_dir))}")
    ckpt = found[-1]
    cfg = load_saved_config(ckpt.path)
    method = build_method(cfg, initialise=False)  # the checkpoint's weights replace any model.init
    try:
        state = consolidated_state_dict(ckpt.path.parent, ckpt.tag, ckpt.zero_stage, trust=trust)
    except SslmedError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as exc:  # truncated or garbled files
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{ckpt.path}: unreadable checkpoint ({type(exc).__name__}: {first})") from None
    try:
        method.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path}: weights do not fit method '{cfg.method.name}': {exc}") from None
    return cfg, method


def load_encoder(path: str | Path) -> nn.Module:
    """Rebuild an exported encoder from its .json sidecar and load the .safetensors weights."""
    from sslmed.models import rebuild_backbone

    weights = Path(path).with_suffix(".safetensors")
    sidecar = weights.with_suffix(".json")
    for file in (weights, sidecar):
        if not file.is_file():
            raise CheckpointError(f"exported encoder file '{file}' not found")
    try:
        info = json.loads(sidecar.read_text())
        module = rebuild_backbone(info)
        state = load_file(str(weights))
    except (json.JSONDecodeError, ConfigError, SafetensorError, TypeError) as exc:
        raise CheckpointError(f"{weights}: not a valid exported encoder: {exc}") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not match the architecture in {sidecar.name}: "
                              f"{exc}") from None
    return accept_location(module.eval(), info.get("location_coordinates", "volume"))
