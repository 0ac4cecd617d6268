"""The one place that knows DeepSpeed: process group, ds_config, optimizer, schedule, precision.

Everything else in sslmed talks to `Engine`, a thin facade over `deepspeed.DeepSpeedEngine`, so the
loop and the checkpoint code stay free of DeepSpeed imports and of precision handling.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from sslmed.config import Config
from sslmed.errors import CheckpointError, ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)  # the last resort behind the heartbeat (watchdog.py)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device


# ---- process group ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def _skip_shm_comm_op() -> None:
    """DeepSpeed JIT-compiles a shared-memory allreduce op on its first CPU init (about a minute);
    marking the op incompatible makes its comm backend fall back to plain torch.distributed (gloo)."""
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_distributed() -> DistInfo:
    """Join the process group a launcher (torchrun, deepspeed, srun) describes through RANK /
    WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, or make a 1-rank group for a plain process."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    if on_cpu():
        _skip_shm_comm_op()
        backend, device = "gloo", torch.device("cpu")
    else:
        backend = get_accelerator().communication_backend_name()
        get_accelerator().set_device(local_rank)
        device = torch.device(get_accelerator().device_name(local_rank))
    if not dist.is_initialized():
        # A plain process gets its own 1-rank group on a free local port, passed explicitly rather
        # than through the environment so that child processes never mistake it for a launcher's.
        alone = {} if launched else {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0,
                                     "world_size": 1}
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # DeepSpeed's engine asserts it is set
        if launched and "TORCHELASTIC_RESTART_COUNT" in os.environ:
            join_torchrun_attempt(backend)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=PROCESS_GROUP_TIMEOUT, **alone)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def join_torchrun_attempt(backend: str) -> None:
    """The process group of this torchrun attempt, in keys of its own. torchrun's agent store outlives
    the workers it restarts (`--max-restarts`); without a fresh key space, a restarted rank reads the
    addresses its predecessors left there and fails to connect (torch 2.13, gloo). Every node's
    workers fail once per incident (the heartbeat ends the survivors), so their restart counts agree."""
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=PROCESS_GROUP_TIMEOUT)
    store = dist.PrefixStore(f"sslmed/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/", client)
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=PROCESS_GROUP_TIMEOUT)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors handed to a collective live: NCCL (like other accelerator backends) takes only
    device tensors, gloo host tensors."""
    return torch.device("cpu") if on_cpu() else torch.device(get_accelerator().current_device_name())


def all_reduce_max(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. one rank got SIGTERM)."""
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _stacked(values: list[float | torch.Tensor]) -> torch.Tensor:
    """Scalars (host floats or tensors on any device) as one float64 vector on the collective device;
    nothing here waits for the device."""
    device = collective_device()
    return torch.stack([torch.as_tensor(v).to(device, torch.float64, non_blocking=True).reshape(())
                        for v in values])


def all_reduce_mean(values: list[float | torch.Tensor]) -> list[float]:
    """The mean over ranks of each value, brought to the host in one transfer."""
    tensor = _stacked(values)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def all_reduce_max_values(values: list[float | torch.Tensor]) -> list[float]:
    """The maximum over ranks of each value, brought to the host in one transfer."""
    tensor = _stacked(values)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def broadcast_object(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- ds_config ----------------------------------------------------------------------------------


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_user_ds_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"train.ds_config: no such file '{path}'")
    try:
        tree = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.ds_config: '{path}' is not valid JSON: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"train.ds_config: '{path}' must hold a JSON object")
    return tree


def check_precision(precision: str) -> None:
    if precision == "fp16" and on_cpu():
        raise ConfigError("train.precision=fp16 is not supported on CPU; use bf16 or fp32")
    if precision == "bf16" and not get_accelerator().is_bf16_supported():
        raise ConfigError("train.precision=bf16 is not supported by this accelerator; use fp16 or fp32")


def build_ds_config(cfg: Config, world: int, universal: bool = False) -> dict:
    """The DeepSpeed config the typed Config implies, with the user's JSON (train.ds_config) over it."""
    t = cfg.train
    check_precision(t.precision)
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # the loop does its own logging
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-built fused Adam
        "checkpoint": {"load_universal": universal},
    }
    if t.ds_config:
        generated = deep_merge(generated, read_user_ds_config(t.ds_config))
    return generated


def zero_stage(cfg: Config, world: int) -> int:
    """The ZeRO stage a run uses: train.zero_stage unless the user's ds_config sets another."""
    return int(build_ds_config(cfg, world)["zero_optimization"].get("stage", 0))


# ---- optimizer and schedule ---------------------------------------------------------------------


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at train.steps (as a factor of lr)."""
    o, steps = cfg.optim, cfg.train.steps
    if o.lr <= 0:
        return 1.0
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
    lr = o.min_lr + (o.lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr / o.lr


def offloads_optimizer(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def build_optimizer(module: torch.nn.Module, cfg: Config, offloaded: bool = False) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum, `optim.optimizer: sgd`); no weight decay on biases, norms and other
    1-D parameters (tokens, positions). When ZeRO offloads the optimizer, its step runs on CPU
    partitions: DeepSpeed's vectorised CPU Adam in AdamW mode (compiled on first use, prebuilt in
    docker/Dockerfile), which ZeRO-Offload requires."""
    decay, no_decay = [], []
    for _, param in sorted(module.named_parameters()):
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optim.optimizer == "sgd":
        if offloaded:
            raise ConfigError("optim.optimizer: sgd cannot run with ZeRO-Offload, whose CPU optimizer is "
                              "Adam: use adamw or leave offload_optimizer out of train.ds_config")
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    if offloaded:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))


# ---- the engine ---------------------------------------------------------------------------------


class Engine:
    """`loss, logs = engine(batch)`, `engine.backward(loss)`, `engine.step()`, save / load."""

    def __init__(self, ds_engine: Any, info: DistInfo, dtype: torch.dtype, zero_stage: int,
                 clip: float = 0.0):
        self.ds = ds_engine
        self.info = info
        self.dtype = dtype
        self.zero_stage = zero_stage
        self.own_norm = owns_clipping(zero_stage, dtype)
        self.clip = clip  # applied here when own_norm: DeepSpeed's clipping is then off
        self._norm: torch.Tensor | None = None  # stays on the device until grad_norm() is asked
        self.trust_checkpoints = False  # checkpoint.trust: load checkpoints that need arbitrary classes

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def global_step(self) -> int:
        return int(self.ds.global_steps)

    def prepare(self, batch: dict) -> dict:
        """Tensors to the device; floating ones to the engine's compute dtype (the model's weights
        are in that dtype under DeepSpeed bf16/fp16). Everything else (keys, tags) passes through."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.info.device, non_blocking=True)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.ds(self.prepare(batch))

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        if self.own_norm and self.ds.is_gradient_accumulation_boundary():
            # ZeRO-0 fp32 has no optimizer wrapper that records the norm; measure it, and clip with it
            # (gradients are already averaged over the ranks: no collective needed, unlike DeepSpeed's);
            # the norm stays on the device
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
            if self.clip > 0 and params:
                torch.nn.utils.clip_grads_with_norm_(params, self.clip, norm)
            self._norm = norm.detach() if norm is not None else None
        self.ds.step()

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def grad_norm(self) -> float:
        """The last step's gradient norm before clipping (reading it waits for the device)."""
        norm = self._norm if self.own_norm else self.ds.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    @contextlib.contextmanager
    def full_params(self, frozen_only: bool = True) -> Iterator[None]:
        """Full parameters for code that reads or writes them outside forward/backward (EMA teacher
        updates in `on_step_end`). Under ZeRO-3 every parameter is a shard; gathering them, with rank 0's
        result re-partitioned on exit, gives the hook the whole tensors. Other stages hold them already.
        With `frozen_only`, only modules that keep teachers (EMA teachers, which live outside the
        registered modules, or frozen parameters) pay for the gather."""
        params = list(self.module.parameters())
        teachers = getattr(self.module, "teachers", None)
        keeps_teachers = bool(teachers()) if callable(teachers) else False
        trained_only = not keeps_teachers and all(p.requires_grad for p in params)
        if self.zero_stage < 3 or (frozen_only and trained_only):
            yield
            return
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield

    def save(self, directory: Path, tag: str) -> None:
        self.ds.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load(self, directory: Path, tag: str) -> None:
        with safe_checkpoint_loads(trust=self.trust_checkpoints):
            path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(Path(directory) / tag)
        # The optimizer state brings back the rate its last step set; recompute it from the restored
        # position so that a resumed run with another train.steps follows the new schedule at once.
        schedule = self.ds.lr_scheduler
        for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs,
                                       schedule.lr_lambdas, strict=True):
            group["lr"] = base * factor(schedule.last_epoch)


def build_engine(cfg: Config, method: torch.nn.Module, info: DistInfo, universal: bool = False) -> Engine:
    """`deepspeed.initialize` with a torch AdamW and a warmup + cosine LambdaLR; activation
    checkpointing and torch.compile switched on from outside the model when the config asks."""
    if cfg.train.activation_checkpointing:
        from sslmed.models import set_activation_checkpointing

        set_activation_checkpointing(method, True)
    ds_config = build_ds_config(cfg, info.world, universal=universal)
    stage = int(ds_config["zero_optimization"].get("stage", 0))
    precision = "bf16" if ds_config["bf16"].get("enabled") else "fp16" if ds_config["fp16"].get(
        "enabled") else "fp32"
    clip = float(ds_config.get("gradient_clipping", 0.0))
    if owns_clipping(stage, DTYPES[precision]):
        # DeepSpeed's ZeRO-0 fp32 clipping all-reduces a norm that every rank already holds: one more
        # collective per step than DDP. The facade clips with the norm it measures anyway.
        ds_config["gradient_clipping"] = 0.0
    optimizer = build_optimizer(method, cfg, offloaded=offloads_optimizer(ds_config))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    ds_engine, _, _, _ = deepspeed.initialize(model=method, optimizer=optimizer, lr_scheduler=schedule,
                                              config=ds_config, dist_init_required=False)
    cast_float_buffers(ds_engine.module, DTYPES[precision])
    if cfg.train.compile:
        ds_engine.compile()
    engine = Engine(ds_engine, info, DTYPES[precision], stage, clip)
    engine.trust_checkpoints = cfg.checkpoint.trust
    return engine


def owns_clipping(zero_stage: int, dtype: torch.dtype) -> bool:
    """ZeRO-0 in fp32: DeepSpeed wraps no optimizer, and the facade measures the norm and clips."""
    return zero_stage == 0 and dtype == torch.float32


def cast_float_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm's running statistics must
    match its weights' dtype, so floating buffers follow the parameters."""
    for buffer in module.buffers():
        if buffer.is_floating_point() and buffer.dtype != dtype:
            buffer.data = buffer.data.to(dtype)


# ---- checkpoint formats -------------------------------------------------------------------------

# The only classes (besides tensors and plain containers) in the state files DeepSpeed writes for
# sslmed's runs, ZeRO 0-3, fp32/bf16/fp16; everything else in a pickle is refused.
DEEPSPEED_STATE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_classes() -> list[type]:
    import importlib

    classes = []
    for name in DEEPSPEED_STATE_CLASSES:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    return classes


@contextlib.contextmanager
def safe_checkpoint_loads(trust: bool = False) -> Iterator[None]:
    """Every `torch.load` made inside (DeepSpeed's own included: it passes weights_only=False) loads
    with weights_only=True and DeepSpeed's few state classes allowed, so a crafted checkpoint cannot
    run code; a file that needs anything else is refused naming the class. `trust` (checkpoint.trust)
    restores DeepSpeed's unrestricted loading, for a user's own checkpoints from other tools."""
    if trust:
        yield
        return
    unrestricted, allowed = torch.load, _allowed_classes()

    def restricted(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return unrestricted(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            found = re.search(r"[^\n]*(?:GLOBAL|Unsupported)[^\n]*", str(exc))
            reason = found.group(0) if found else "not a plain state file"
            raise CheckpointError(f"{f}: refused to load: {reason} (it could run code; "
                                  "checkpoint.trust=true loads it anyway, unsafe)") from None

    torch.load = restricted
    try:
        yield
    finally:
        torch.load = unrestricted


def to_universal(checkpoint_dir: Path, out: Path, trust: bool = False) -> None:
    """Re-slice a ZeRO checkpoint so that any number of ranks can load it (DeepSpeed universal format,
    written to `out/<tag>`, loaded by an engine built with `universal=True`)."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    args = Namespace(input_folder=str(checkpoint_dir), output_folder=str(tmp / checkpoint_dir.name),
                     num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=True)
    with contextlib.redirect_stdout(None), safe_checkpoint_loads(trust):
        ds_to_universal.main(args)
    os.replace(tmp, out)


def consolidated_state_dict(directory: Path, tag: str, zero_stage: int, trust: bool = False
                            ) -> dict[str, torch.Tensor]:
    """The full module state dict of a saved engine, in fp32 where ZeRO kept fp32 master weights.
    (ZeRO shards are read by DeepSpeed's own consolidation utility.)"""
    with safe_checkpoint_loads(trust):
        if zero_stage >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag))
        state = torch.load(Path(directory) / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=not trust)
    return dict(state["module"])
