"""Typed run configuration: dataclass defaults, then a YAML file, then dotted `key=value` overrides.

Every key is checked against the dataclasses before anything starts, so a typo or a wrong type fails
at once, naming the key, instead of deep inside a launched job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sslmed.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class DataConfig:
    path: str = ""  # a packed directory (manifest.json inside): wds shards or a zarr store
    shard_url: str = ""  # stream wds shards from this WebDataset URL template ("pipe:... {shard} ...")
    crop_size: int = 96  # cubic crops, voxels per side
    crops_per_volume: int = 4  # crops cut from each decoded volume before moving on
    views: int = 1  # 1 for masked/reconstruction methods, 2 for contrastive methods
    neighbour: bool = False  # also emit a crop displaced by up to `neighbour_shift` voxels
    neighbour_shift: int = 16
    foreground_bias: float = 0.0  # probability that a crop centre is drawn from foreground voxels
    augment: bool = True  # MONAI intensity/spatial augmentation per crop
    augment_families: list[str] = field(  # which (sslmed/data/stages.py AUGMENT_FAMILIES)
        default_factory=lambda: ["flip", "affine", "intensity", "noise"])
    shuffle_buffer: int = 64  # samples held for in-memory shuffling
    workers: int = 2  # DataLoader worker processes per rank
    strict: bool = False  # raise on a corrupt shard instead of counting and skipping it
    filter_tags: dict[str, str] = field(default_factory=dict)  # keep samples whose tags match
    label_key: str = "label"  # the tag that holds a sample's class label


@dataclass
class ModelConfig:
    arch: Literal["vit3d", "cnn3d"] = "vit3d"
    size: Literal["tiny", "small", "base"] = "tiny"
    patch_size: int = 16
    in_channels: int = 1
    dim: int = 0  # 0: the size's default (ViT width; CNN first-stage width)
    depth: int = 0  # 0: the size's default (ViT blocks; CNN residual units per stage)
    heads: int = 0  # 0: the size's default (ViT attention heads)
    feature_blocks: int = 1  # ViT: features = pooled tokens of the last N blocks, concatenated


@dataclass
class MethodConfig:
    name: str = "mae"
    mask_ratio: float = 0.75  # masked methods: fraction of patches hidden from the encoder
    norm_pix_loss: bool = False  # MAE: reconstruct per-patch normalised voxels
    decoder_dim: int = 0  # 0: method default
    decoder_depth: int = 0  # 0: method default
    temperature: float = 0.1  # contrastive methods
    proj_dim: int = 128  # projection head output
    hidden_dim: int = 512  # projection / prediction head hidden width
    ema_momentum: float = 0.996  # BYOL / SSSD teacher; cosine-scheduled to 1.0
    gather: bool = True  # gather negatives across ranks (gradient-preserving)
    distill_weight: float = 1.0  # SSSD self-distillation term
    local_weight: float = 1.0  # DrasCLR local (neighbour) term
    global_weight: float = 1.0  # DrasCLR global term
    recon_weight: float = 1.0  # contrastive AE reconstruction term
    contrastive_weight: float = 1.0  # contrastive AE latent term
    stage1_steps: int = 0  # residual: steps of CAE training on `normal` volumes before stage 2
    normal_tag: str = "status=normal"  # residual: tag=value marking normal volumes
    distill_target: Literal["stopgrad", "ema"] = "stopgrad"  # SSSD: teacher = decoder latent, or its EMA copy


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    micro_batch: int = 2  # per rank
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 1
    ds_config: str = ""  # a user ds_config JSON whose keys override the generated ones


@dataclass
class CheckpointConfig:
    every: int = 50
    keep: int = 2
    resume: str = "auto"  # auto | none | PATH


@dataclass
class EvalConfig:
    encoder: str = "random"  # exported encoder (.safetensors), "random", or "monai:<network>"
    data: str = ""  # labelled packed dataset (label in tags) or a folder + labels.csv
    mode: Literal["linear", "knn", "finetune", "fusion"] = "linear"
    label_fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    test_fraction: float = 0.3
    group_key: str = ""  # tag whose values never straddle train/test (e.g. subject or ROI)
    branches: list[str] = field(default_factory=list)  # fusion: one input tag per branch
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    knn_k: int = 10
    clusters: int = 0  # k-means on embeddings; 0: number of classes


@dataclass
class SweepConfig:
    mask_ratios: list[float] = field(default_factory=list)  # empty: the method's own mask_ratio
    pretrain_steps: int = 0  # 0: train.steps
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: as many as resources allow
    include_random: bool = True  # add a random-init baseline per label fraction and seed
    out: str = ""  # "": run.dir


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the whole config, stable across processes."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> None:
        checks = [
            (self.data.crop_size > 0, "data.crop_size must be positive"),
            (self.data.views in (1, 2), "data.views must be 1 or 2"),
            (0.0 <= self.method.mask_ratio < 1.0, "method.mask_ratio must be in [0, 1)"),
            (self.train.steps > 0, "train.steps must be positive"),
            (self.train.micro_batch > 0, "train.micro_batch must be positive"),
            (self.train.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3"),
            (self.train.grad_accum >= 1, "train.grad_accum must be at least 1"),
            (self.train.log_every >= 1, "train.log_every must be at least 1"),
            (self.optim.warmup_steps >= 0 and self.optim.grad_clip >= 0,
             "optim.warmup_steps and optim.grad_clip must be >= 0"),
            (self.checkpoint.keep >= 1, "checkpoint.keep must be at least 1"),
            (self.checkpoint.every >= 0, "checkpoint.every must be >= 0"),
            (all(0 < f <= 1 for f in self.eval.label_fractions), "eval.label_fractions must be in (0, 1]"),
            (0 < self.eval.test_fraction < 1, "eval.test_fraction must be in (0, 1)"),
        ]
        if self.model.arch == "vit3d":
            checks.append(
                (self.data.crop_size % self.model.patch_size == 0,
                 f"data.crop_size ({self.data.crop_size}) must be a multiple of model.patch_size "
                 f"({self.model.patch_size})")
            )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# ---- loading ------------------------------------------------------------------------------------


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a config shipped in sslmed/configs/ (e.g. `mae-tiny`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no config file '{name_or_path}' and no shipped config of that name "
                      f"(shipped: {names})")


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `section.key=value` overrides; validated."""
    cfg = Config()
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        merge_tree(cfg, tree, source=str(path))
    apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def merge_tree(cfg: Config, tree: dict, source: str = "config") -> None:
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping")
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value, source)


def apply_overrides(cfg: Config, overrides) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        set_key(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else "", "command line")


def set_key(cfg: Config, dotted: str, value: Any, source: str = "config") -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{source}: key '{dotted}' must be section.key")
    section_name, key = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        raise ConfigError(f"{source}: unknown section '{section_name}' (in '{dotted}'); "
                          f"sections: {', '.join(f.name for f in dataclasses.fields(cfg))}")
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"{source}: unknown key '{dotted}'; {section_name} has: {', '.join(fields)}")
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, coerce(value, hint, dotted, source))


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a type hint, converting where the conversion is lossless."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{source}: '{key}' expects {_describe(hint)}, got {value!r}")

    if origin is Literal:
        if value not in args:
            fail()
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg, key, source)
            except ConfigError:
                continue
        fail()
    if origin in (list, tuple):
        items = [value] if isinstance(value, (int, float, str)) and origin is list else value
        if not isinstance(items, (list, tuple)):
            fail()
        if origin is tuple:
            if len(items) != len(args):
                fail()
            return tuple(coerce(v, a, key, source) for v, a in zip(items, args, strict=True))
        return [coerce(v, args[0], key, source) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return {str(k): coerce(v, args[1], key, source) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            fail()
        return str(value)
    if hint is Any:
        return value
    fail()


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(tree: dict) -> Config:
    cfg = Config()
    merge_tree(cfg, tree, source="saved config")
    return cfg
