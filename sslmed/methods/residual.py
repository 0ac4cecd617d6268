"""CAE-residual self-supervision (seed 001), both stages in one run, as the paper's authors build it.

Stage 1 (`method.stage1_steps` steps): a small convolutional autoencoder with a dense bottleneck
(`models.cae.ConvAutoencoder3D`, `method.cae_latent`-d code) learns, with an L1 loss, to reconstruct
normal samples only. As the authors do it, these come from a labelled set separate from the unlabelled
SSL pool: `method.normal_data`, a packed dataset whose volumes tagged `method.normal_tag` are read whole
into memory (a labelled set is small) and cropped at random, the stream's batch being unused in stage 1.
Without `method.normal_data` (the fallback), stage 1 learns from the stream's own samples whose tags
match `method.normal_tag`, ignoring the others. Its tight code is the point: it fails on what it has
not seen, anomalies.
Stage 2: a frozen snapshot of the CAE turns every crop into the soft target
`models.residual_target.residual_target` (|x − CAE(x)|, per-volume 1–99 % percentile rescale to [0, 1],
3-D median filter of `method.median_kernel`), computed on the fly on the step's device, and a 3-D
ResNet with a U-Net decoder (`models.resnet3d.ResUNet3D`) learns to predict it under BCE-with-logits.
The ResNet encoder is the one exported.

With `method.targets: precomputed` there is no stage 1 and no CAE: the run trains on a derived dataset
(`sslmed derive residual-targets`, sslmed/derive.py) whose samples carry the target, streamed as
`batch["target"]`, cut from the image crop's box and moved by its spatial augmentation only.

The stage follows from `steps_done`, a buffer saved with the state, so resume is exact; the host keeps a
copy of it, so that choosing the stage never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sslmed.config import Config, MethodSettings, setting
from sslmed.errors import DataError
from sslmed.methods.base import Method, Needs, frozen_copy, non_negative, positive, require
from sslmed.models import build_backbone
from sslmed.models.cae import CAE_DOWNSAMPLE, ConvAutoencoder3D
from sslmed.models.residual_target import residual_target
from sslmed.models.resnet3d import RESNET_DOWNSAMPLE, ResUNet3D


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    require(bool(sep and key.strip()), f"method.normal_tag must look like key=value, got '{text}'")
    return key.strip(), value.strip()


def odd_positive(v: int) -> bool:
    return v >= 1 and v % 2 == 1


@dataclass
class ResidualSettings(MethodSettings):
    # on_the_fly: stage 1 trains the CAE, stage 2 computes targets per crop; precomputed: stage 2 only,
    # reading each crop's target from a derived dataset (sslmed derive residual-targets)
    targets: Literal["on_the_fly", "precomputed"] = "on_the_fly"
    # steps of CAE training on normal volumes before the residual stage (on_the_fly only)
    stage1_steps: int = setting(0, non_negative, ">= 0 (steps of autoencoder training on normal volumes "
                                                 "before the residual stage)")
    normal_tag: str = "status=normal"  # tag=value marking normal volumes
    normal_data: str = ""  # packed labelled set whose normal_tag volumes train stage 1 ("": the stream's)
    cae_latent: int = setting(512, positive, "> 0")  # the CAE's dense bottleneck (the paper: 512)
    median_kernel: int = setting(5, odd_positive, "odd and >= 1")  # the target's median filter (1: none)

    def check(self) -> None:
        parse_tag(self.normal_tag)
        require(self.targets == "precomputed" or self.stage1_steps > 0,
                "method.stage1_steps must be > 0 (steps of autoencoder training on normal volumes before "
                "the residual stage), or set method.targets: precomputed to train on a derived dataset")


class Residual(Method):
    name = "residual"
    Settings = ResidualSettings
    needs = Needs(backbone="resnet3d")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        multiple = max(RESNET_DOWNSAMPLE, CAE_DOWNSAMPLE)
        require(cfg.data.crop_size % multiple == 0,
                f"method 'residual' needs data.crop_size a multiple of {multiple} (the ResNet's "
                f"downsampling), got {cfg.data.crop_size}")
        if cfg.method.targets == "precomputed":
            require_targets(cfg.data.path)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        s = self.settings
        self.normal_key, self.normal_value = parse_tag(s.normal_tag)
        self.precomputed = s.targets == "precomputed"
        self.stage1_steps = 0 if self.precomputed else s.stage1_steps
        self.median_kernel = s.median_kernel
        self.crop_size, self.seed = cfg.data.crop_size, cfg.train.seed
        # Read when stage 1 first needs it: exporting or resuming in stage 2 does not need the set.
        self.normal_data, self.normal_volumes = s.normal_data, None
        channels = cfg.model.in_channels
        if not self.precomputed:
            self.cae = ConvAutoencoder3D(cfg.data.crop_size, channels, s.cae_latent)
        self.unet = ResUNet3D(build_backbone(cfg), out_channels=channels)
        if not self.precomputed:
            # Stage 2 reads this snapshot, taken when stage 1 ends: it is outside the optimizer, so the
            # optimizer's momentum and weight decay cannot move the CAE that defines the targets.
            self.frozen_cae = frozen_copy(self.cae)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.host_steps = 0  # steps_done as the host knows it; re-read when a state is loaded
        self.register_load_state_dict_post_hook(lambda module, _: module.sync_host_steps())

    def sync_host_steps(self) -> None:
        self.host_steps = int(self.steps_done)

    def encoder(self) -> nn.Module:
        return self.unet.backbone

    @property
    def stage(self) -> int:
        return 1 if self.host_steps < self.stage1_steps else 2

    def is_normal(self, tags: list[dict[str, str]]) -> list[bool]:
        return [str(t.get(self.normal_key)) == self.normal_value for t in tags]

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        return self.stage1(batch) if self.stage == 1 else self.stage2(batch)

    def stage1(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        if self.normal_data:
            if self.normal_volumes is None:
                tag = f"{self.normal_key}={self.normal_value}"
                self.normal_volumes = load_normal_volumes(self.normal_data, tag)
            x = self.normal_batch(batch["image"])
            loss = F.l1_loss(self.cae(x), x)
            return loss, {"loss_cae": loss.detach(), "normal_fraction": 1.0, "stage": 1.0}
        image = batch["image"]
        normal = [i for i, ok in enumerate(self.is_normal(batch["tags"])) if ok]  # tags live on the host
        fraction = len(normal) / len(image)
        if not normal:
            # Nothing to learn from here, but every rank must still take part in the step.
            loss = sum(p.sum() for p in self.cae.parameters()) * 0.0
            return loss, {"loss_cae": loss.detach(), "normal_fraction": fraction, "stage": 1.0}
        x = image.index_select(0, torch.tensor(normal).to(image.device, non_blocking=True))
        loss = F.l1_loss(self.cae(x), x)
        return loss, {"loss_cae": loss.detach(), "normal_fraction": fraction, "stage": 1.0}

    def normal_batch(self, like: torch.Tensor) -> torch.Tensor:
        """As many random crops of the labelled normal volumes as `like` holds, drawn on the host from
        (seed, rank, step) so that a resumed run draws what the uninterrupted one would have."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = np.random.default_rng((self.seed, rank, self.host_steps))
        picks = rng.integers(len(self.normal_volumes), size=len(like))
        crops = np.stack([random_crop(self.normal_volumes[i], self.crop_size, rng) for i in picks])
        return torch.from_numpy(crops).unsqueeze(1).to(like.device, like.dtype, non_blocking=True)

    def target(self, image: torch.Tensor) -> torch.Tensor:
        """The soft residual target in [0, 1] from the frozen CAE (in eval mode: BatchNorm's running
        statistics, so a crop's target does not depend on the rest of its batch)."""
        with torch.no_grad():
            self.frozen_cae.eval()
            return residual_target(image, self.frozen_cae(image), kernel_size=self.median_kernel)

    def stage2(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        image = batch["image"]
        if self.precomputed:
            if "target" not in batch:
                raise DataError("method.targets: precomputed reads each crop's target, and this batch has "
                                "none; train on a dataset from `sslmed derive residual-targets`")
            target = batch["target"]
        else:
            target = self.target(image)
        loss = F.binary_cross_entropy_with_logits(self.unet(image).float(), target)
        return loss, {"loss_residual": loss.detach(), "stage": 2.0}

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.steps_done += 1
        self.host_steps += 1
        if self.host_steps == self.stage1_steps and not self.precomputed:
            with torch.no_grad():
                self.frozen_cae.load_state_dict(self.cae.state_dict())


def require_targets(path: str) -> None:
    """A precomputed-target run needs a derived dataset of residual targets at `path` (checked when its
    manifest can be read; a missing dataset is the loader's to report)."""
    from sslmed.io.manifest import load_manifest

    if not path:
        return
    try:
        target = load_manifest(path).get("target")
    except DataError:
        return
    require(isinstance(target, dict) and target.get("kind") == "residual",
            f"method.targets: precomputed needs a dataset of residual targets, and {path} has none; make one "
            f"with `sslmed derive residual-targets RUN --data {path} --out DIR` and set data.path to DIR")


def load_normal_volumes(path: str, tag: str) -> list[np.ndarray]:
    """Every volume of the packed dataset at `path` tagged `tag` (key=value), as float32 arrays."""
    from sslmed.data.sources import open_dataset

    key, value = parse_tag(tag)
    try:
        dataset = open_dataset(path)
    except DataError as exc:
        raise DataError(f"method.normal_data: {exc}") from None
    chosen = [k for k in dataset.keys if str(dataset.meta(k).get("tags", {}).get(key)) == value]
    if not chosen:
        raise DataError(f"method.normal_data: no volume of {path} is tagged {key}={value} "
                        "(method.normal_tag)")
    return [dataset.read(k).astype(np.float32) for k in chosen]


def random_crop(volume: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A `size`³ crop at a random place of `volume`, zero-padded at the far side where it is smaller."""
    start = [int(rng.integers(max(s - size, 0) + 1)) for s in volume.shape]
    crop = volume[tuple(slice(a, a + size) for a in start)]
    return np.pad(crop, [(0, size - c) for c in crop.shape])
