"""Typed run configuration: dataclass defaults, then a YAML file, then dotted `key=value` overrides.

Every key is checked against the dataclasses before anything starts, so a typo or a wrong type fails
at once, naming the key, instead of deep inside a launched job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable
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
    augment: bool = True  # random flips, affine, intensity, gamma, bias field, blur and noise per crop
    augment_on: Literal["device", "loader"] = "device"  # batched on the training device, or MONAI per crop
    augment_families: list[str] = field(  # which families augment (sslmed/data/augment.py FAMILIES)
        default_factory=lambda: ["flip", "affine", "intensity", "gamma", "bias_field", "blur", "noise"])
    # per-family probabilities and ranges over sslmed/data/augment.py's `Ranges` defaults, e.g.
    # {blur_prob: 0.5, blur_sigma: [0.25, 1.5]}
    augment_ranges: dict[str, Any] = field(default_factory=dict)
    # also emit `image_clean`: the image crop after the spatial augmentation alone (no intensity
    # families), which a reconstruction method restores from the degraded `image`
    clean_view: bool = False
    shuffle_buffer: int = 64  # samples held for in-memory shuffling
    workers: int = 2  # DataLoader worker processes per rank
    strict: bool = False  # raise on a corrupt shard instead of counting and skipping it
    filter_tags: dict[str, str] = field(default_factory=dict)  # keep samples whose tags match
    label_key: str = "label"  # the tag that holds a sample's class label
    roi_centres: str = ""  # CSV key,x,y,z: crop around these voxel centres only (sslmed/data/roi.py)
    roi_jitter: float = 0.0  # standard deviation, in voxels, of the Gaussian jitter of a ROI centre
    # random: crops anywhere in each volume; atlas_grid: crops at grid points of the atlas template, mapped
    # into each subject through its registration (needs data packed with `sslmed pack --atlas`), each batch
    # holding one grid point across subjects (sslmed/data/grid.py)
    sampling: Literal["random", "atlas_grid"] = "random"
    grid_step: float = 26.0  # atlas_grid: millimetres between grid points on the template
    grid_template: str = ""  # atlas_grid: the template volume; "": the one the data was packed with
    grid_mask: str = ""  # atlas_grid: a mask on the template's voxel grid (nonzero kept); "": a threshold
    grid_threshold: float = 0.1  # atlas_grid without grid_mask: keep template voxels above this intensity


@dataclass
class ModelConfig:
    arch: Literal["vit3d", "cnn3d", "cnn3d_cond", "resnet3d"] = "vit3d"
    size: Literal["tiny", "small", "base"] = "tiny"
    patch_size: int = 16
    in_channels: int = 1
    dim: int = 0  # 0: the size's default (ViT width; CNN first-stage width)
    depth: int = 0  # 0: the size's default (ViT blocks; CNN residual units per stage)
    heads: int = 0  # 0: the size's default (ViT attention heads)
    init: str = ""  # an exported encoder (.safetensors + .json) whose weights start the run's encoder
    feature_blocks: int = 1  # ViT: features = pooled tokens of the last N blocks, concatenated
    experts: int = 8  # cnn3d_cond: expert kernels mixed by location in each conditional convolution


def setting(default: Any, check: Callable[[Any], bool] | None = None, rule: str = "") -> Any:
    """A method setting with its range: `check(value)` must hold, `rule` says how in the error."""
    return field(default=default, metadata={"check": check, "rule": rule})


@dataclass
class MethodSettings:
    """The `method:` section: the method's name plus that method's own settings. Each method declares a
    subclass in its own file (`Method.Settings`); `cfg.method` is an instance of the named method's one."""

    name: str = "mae"

    def check(self) -> None:
        """Constraints between settings, beyond each setting's own range (raise ConfigError)."""


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: SGD with momentum (MoCo's, and DrasCLR's, recipe)
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)  # adamw
    momentum: float = 0.9  # sgd
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
    peer_timeout: float = 60.0  # s of silence from a peer rank before this rank stops (0: never)


@dataclass
class CheckpointConfig:
    every: int = 50
    keep: int = 2
    resume: str = "auto"  # auto | none | PATH
    trust: bool = False  # load checkpoints that need classes beyond DeepSpeed's own (UNSAFE: may run code)


@dataclass
class EvalConfig:
    encoder: str = "random"  # exported encoder (.safetensors), "random", or "monai:<network>"
    data: str = ""  # labelled packed dataset (label in tags) or a folder + labels.csv
    mode: Literal["linear", "knn", "finetune", "fusion", "cluster"] = "linear"
    positive_label: str = ""  # class whose AUROC/AUPRC is reported; "": the second of two sorted labels
    label_fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    test_fraction: float = 0.3
    group_key: str = ""  # tag whose values never straddle train/test (e.g. subject or ROI)
    branches: list[str] = field(default_factory=list)  # fusion: one input tag per branch
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    knn_k: int = 10
    clusters: int = 0  # k-means on embeddings; 0: number of classes (cluster mode: k by the elbow, 2–20)
    head: Literal["linear", "mlp"] = "linear"  # finetune/fusion classifier; mlp: features → 256 → classes
    class_weighted: bool = False  # finetune/fusion: cross-entropy weighted by inverse class frequency
    optimizer: Literal["adamw", "adam"] = "adamw"  # adamw: wd 0.01, cosine decay; adam: constant eval.lr
    cv_folds: int = 0  # k ≥ 2: stratified k-fold CV on the training split, each fold scored on the test split
    fusion_shared: bool = False  # fusion: one encoder (shared weights) for all branches
    fusion_attention: bool = True  # fusion: cross-branch attention between the branches' token features
    # labels.csv columns holding each sample's location in [-1, 1] (x, y, z), for location-conditioned
    # encoders (packed labelled data carries its crops' locations itself)
    location_columns: list[str] = field(default_factory=lambda: ["location_x", "location_y", "location_z"])
    # none: one centre crop per sample; mean / concat: one vector per subject from its crops at every atlas
    # grid point (data.grid_*), each encoded at its own location: their mean, or concatenated in grid order
    pool: Literal["none", "mean", "concat"] = "none"


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
    method: MethodSettings = field(default_factory=lambda: method_settings("mae")())
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
            (self.data.roi_jitter >= 0, "data.roi_jitter must be >= 0"),
            (self.data.grid_step > 0, "data.grid_step must be positive (millimetres between grid points)"),
            (not (self.data.clean_view and self.data.sampling == "atlas_grid"
                  and self.data.augment_on == "loader"),
             "data.clean_view with data.sampling: atlas_grid needs data.augment_on: device"),
            (self.train.steps > 0, "train.steps must be positive"),
            (self.train.micro_batch > 0, "train.micro_batch must be positive"),
            (self.train.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3"),
            (self.train.grad_accum >= 1, "train.grad_accum must be at least 1"),
            (self.train.log_every >= 1, "train.log_every must be at least 1"),
            (self.optim.lr > 0, f"optim.lr must be positive, not {self.optim.lr}"),
            (self.train.peer_timeout >= 0, "train.peer_timeout must be >= 0 (0 switches it off)"),
            (self.optim.warmup_steps >= 0 and self.optim.grad_clip >= 0,
             "optim.warmup_steps and optim.grad_clip must be >= 0"),
            (0.0 <= self.optim.momentum < 1.0, "optim.momentum must be in [0, 1)"),
            (self.checkpoint.keep >= 1, "checkpoint.keep must be at least 1"),
            (self.checkpoint.every >= 0, "checkpoint.every must be >= 0"),
            (all(0 < f <= 1 for f in self.eval.label_fractions), "eval.label_fractions must be in (0, 1]"),
            (0 < self.eval.test_fraction < 1, "eval.test_fraction must be in (0, 1)"),
            (self.eval.cv_folds == 0 or self.eval.cv_folds >= 2, "eval.cv_folds must be 0 (off) or >= 2"),
            (len(self.eval.location_columns) == 3, "eval.location_columns must name 3 columns (x, y, z)"),
            (self.eval.pool == "none" or self.eval.mode in ("linear", "knn", "cluster"),
             f"eval.pool: {self.eval.pool} pools frozen features: use eval.mode linear, knn or cluster"),
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
        from sslmed.data.augment import ranges_of  # the data layer owns the ranges and their rules

        ranges_of(self.data)
        for key in settings_fields(self.method):
            check_range(self.method, key, getattr(self.method, key), "config")
        self.method.check()


# ---- loading ------------------------------------------------------------------------------------


def shipped_names() -> list[str]:
    """Configs a user can name; files starting with `_` are bases that others build on."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def resolve_config_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A YAML path (for a `base:`, also relative to the file naming it), or the name of a config shipped
    in sslmed/configs/ (e.g. `mae-tiny`)."""
    path = Path(name_or_path)
    candidates = [relative_to / path, path] if relative_to is not None and not path.is_absolute() else [path]
    for candidate in candidates:
        if candidate.suffix in (".yaml", ".yml") and candidate.exists():
            return candidate
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"no config file '{name_or_path}' and no shipped config of that name "
                      f"(shipped: {', '.join(shipped_names())})")


def read_layers(name_or_path: str, relative_to: Path | None = None, chain: tuple[Path, ...] = ()
                ) -> list[tuple[dict, str]]:
    """The YAML trees to merge, bases first: a file's top-level `base: NAME` (a shipped config or a
    YAML path) is read before the file itself, which then holds only what differs from it."""
    path = resolve_config_path(name_or_path, relative_to)
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        tree = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return [(tree, str(path))]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must name one config, got {base!r}")
    return read_layers(base, path.parent, (*chain, path.resolve())) + [(tree, str(path))]


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (its bases first), then `section.key=value` overrides; validated."""
    cfg = Config()
    if name_or_path:
        for tree, source in read_layers(name_or_path):
            merge_tree(cfg, tree, source=source)
    apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


class ConfigLoader(yaml.SafeLoader):
    """YAML 1.2's reading of plain scalars, which is what people expect of a config: only true/false
    are booleans (`data.path=on` stays the path 'on'), numbers with a leading zero stay text
    (`run.dir=0755` is not octal 493), and `1e-4` is a float (YAML 1.1 wants `1.0e-4`)."""


_REPLACED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"),
                                   list("-+0123456789"))
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML 1.2 scalars through `ConfigLoader`, a SafeLoader: plain data only, never objects."""
    loader = ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def merge_tree(cfg: Config, tree: dict, source: str = "config") -> None:
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping")
        # the method's name first: it decides which settings the rest of the section may hold
        first = "name" if section == "method" else None
        for key, value in sorted(values.items(), key=lambda kv: kv[0] != first):
            set_key(cfg, f"{section}.{key}", value, source)


def apply_overrides(cfg: Config, overrides) -> None:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': not a valid value") from None
        parsed.append((key.strip(), value))
    for key, value in sorted(parsed, key=lambda kv: kv[0] != "method.name"):  # as in merge_tree
        set_key(cfg, key, value, "command line")


def set_key(cfg: Config, dotted: str, value: Any, source: str = "config") -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{source}: key '{dotted}' must be section.key")
    section_name, key = parts
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        raise ConfigError(f"{source}: unknown section '{section_name}' (in '{dotted}'); "
                          f"sections: {', '.join(f.name for f in dataclasses.fields(cfg))}")
    if section_name == "method":
        set_method_key(cfg, key, value, source)
        return
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"{source}: unknown key '{dotted}'; {section_name} has: {', '.join(fields)}")
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, coerce(value, hint, dotted, source))


# ---- the method section: the named method's own settings ----------------------------------------


def method_settings(name: str, source: str = "config") -> type[MethodSettings]:
    """The settings dataclass of the method registered as `name` in sslmed.methods.METHODS."""
    from sslmed.methods import METHODS  # the registry imports this module

    if name not in METHODS:
        raise ConfigError(f"{source}: unknown method.name '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name].Settings


def settings_fields(settings: MethodSettings) -> list[str]:
    """The settings of a method, `name` excepted, in declaration order."""
    return [f.name for f in dataclasses.fields(settings) if f.name != "name"]


def set_method_key(cfg: Config, key: str, value: Any, source: str) -> None:
    """`method.name` switches to that method's settings (its defaults, then the keys given so far, which
    must be its own); any other key must be a setting of the current method, in its type and range."""
    current = cfg.method
    given: dict[str, tuple[Any, str]] = dict(getattr(current, "_given", {}))
    if key == "name":
        value = coerce(value, str, "method.name", source)
        settings = method_settings(value, source)(name=value)
        settings._given = {}
        cfg.method = settings
        for old_key, (old_value, old_source) in given.items():
            set_method_key(cfg, old_key, old_value, old_source)
        return
    names = settings_fields(current)
    if key not in names:
        owners = [other for other, cls in _registry().items() if other != current.name
                  and key in (f.name for f in dataclasses.fields(cls))]
        owned = f" (a setting of {', '.join(owners)})" if owners else ""
        raise ConfigError(f"{source}: method '{current.name}' has no setting '{key}'{owned}; "
                          f"its settings: {', '.join(names) or 'none'}")
    hint = typing.get_type_hints(type(current))[key]
    coerced = coerce(value, hint, f"method.{key}", source)
    check_range(current, key, coerced, source)
    setattr(current, key, coerced)
    current._given = {**given, key: (coerced, source)}


def check_range(settings: MethodSettings, key: str, value: Any, source: str) -> None:
    meta = next(f.metadata for f in dataclasses.fields(settings) if f.name == key)
    check = meta.get("check")
    if check is not None and not check(value):
        raise ConfigError(f"{source}: 'method.{key}' must be {meta.get('rule') or 'in range'} "
                          f"(method '{settings.name}'), got {value!r}")


def _registry() -> dict[str, type[MethodSettings]]:
    from sslmed.methods import METHODS

    return {name: cls.Settings for name, cls in METHODS.items()}


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail()
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list, bool)) or value is None:  # `on`/`null` read as text is a guess
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
