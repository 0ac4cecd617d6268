"""`pretrain(cfg)`: the training loop. It knows no method — only `loss, logs = method(batch)`.

Between two log steps the loop never waits for the device: the method's terms stay device tensors, the
non-finite check is a device-side flag, and the cross-rank reduction, the flag and the stop request are
read once per `train.log_every` steps (and before a checkpoint is written).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from sslmed import rng
from sslmed.config import Config, save_config
from sslmed.data.augment import on_device
from sslmed.errors import DataError, SslmedError
from sslmed.lock import DirectoryLock
from sslmed.progress import progress
from sslmed.train import checkpoint as ckpt
from sslmed.train import engine as eng
from sslmed.train import watchdog
from sslmed.train.logging import RunLogger, Throughput, peak_memory_mb

MethodFactory = Callable[[Config], nn.Module]
LoaderFactory = Callable[[Config, int, int], Any]


def pretrain(cfg: Config) -> Path:
    """Pretrain `cfg.method.name` on `cfg.data.path`; returns the run directory."""
    from sslmed.data.pipeline import build_loader
    from sslmed.methods import build_method

    with watchdog.watch_peers(cfg):
        return run_pretraining(cfg, build_method, build_loader)


def run_pretraining(cfg: Config, build_method: MethodFactory, build_loader: LoaderFactory) -> Path:
    """`pretrain` with the method and loader factories passed in (any nn.Module / loader that follow
    docs/architecture.md)."""
    info = eng.init_distributed()
    with hold_run_dir(Path(cfg.run.dir), info.rank):
        return pretrain_holding_run_dir(cfg, info, build_method, build_loader)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, rank: int) -> Iterator[None]:
    """Rank 0 holds run.dir's lock for the whole run; when it cannot, every rank raises the same error."""
    lock = DirectoryLock(run_dir, "sslmed pretrain", what="run.dir")
    failure = None
    if rank == 0:
        try:
            lock.acquire()
        except SslmedError as exc:
            failure = str(exc)
    failure = eng.broadcast_object(failure)
    if failure is not None:
        raise SslmedError(failure)
    try:
        yield
    finally:
        lock.release()


def pretrain_holding_run_dir(cfg: Config, info: eng.DistInfo, build_method: MethodFactory,
                             build_loader: LoaderFactory) -> Path:
    run_dir = Path(cfg.run.dir)
    resume = eng.broadcast_object(ckpt.find_resume(cfg, run_dir) if info.rank == 0 else None)
    if resume is not None:
        ckpt.check_compatible(resume, cfg, eng.zero_stage(cfg, info.world))
    if info.rank == 0:
        save_config(cfg, run_dir / "config.yaml")

    ckpt.seed_everything(cfg.train.seed)  # identical initial weights on every rank
    method = build_method(cfg)
    engine = eng.build_engine(cfg, method, info,
                              universal=resume is not None and ckpt.needs_universal(resume, info.world))
    loader = build_loader(cfg, info.rank, info.world)
    step = 0
    if resume is not None:
        step = resume.step
        ckpt.restore(engine, resume, loader)
        if info.rank == 0:
            tqdm.write(f"resumed from {resume.path} at step {step}")
    # A step's random draws depend on its position alone (`step_rng`), so nothing about them is restored.
    batches = first_batch_checked(iter(loader), cfg)
    # float and augmented on the device; augmentation draws from the AUGMENT stream of each step's position
    batches = on_device(batches, cfg, info.rank, info.device, first_step=step + 1)

    with stop_on_sigterm() as stop_requested:
        step = train(cfg, engine, loader, batches, run_dir, step, stop_requested)
    if step >= cfg.train.steps:
        export_final(cfg, engine, run_dir)
    return run_dir


def train(cfg: Config, engine: eng.Engine, loader: Any, batches: Iterator[dict], run_dir: Path, step: int,
          stop_requested: Callable[[], bool]) -> int:
    """Optimizer steps until `train.steps` or a stop request; checkpoints as configured. Returns the
    last completed step."""
    info, steps, method = engine.info, cfg.train.steps, engine.module
    logger = RunLogger(run_dir, step) if info.rank == 0 else None
    meter = Throughput()
    health = NonFinite(info.device)
    bar = progress(steps, initial=step, disable=info.rank != 0, desc="pretrain", unit="step")
    try:
        while step < steps:
            watchdog.note_step(step + 1)
            lr = engine.lr()  # the rate this step uses; the schedule advances inside engine.step()
            terms = accumulate(engine, batches, meter, cfg, step + 1)
            step += 1
            health.observe(terms["loss"], step)
            with engine.full_params():
                method.on_step_end(step, steps)
            every = cfg.checkpoint.every
            log_due = step % cfg.train.log_every == 0 or step == steps
            save_due = bool(every and step % every == 0) or step == steps
            stop = False
            if log_due or save_due:  # the only points where the host waits for the device
                stop = health.check_and_stop(stop_requested())
            if log_due:
                record = log_record(step, terms, lr, engine, meter, loader)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                if logger is not None:
                    logger.log(record)
            bar.update(1)
            if save_due or stop:
                ckpt.save_checkpoint(engine, run_dir, step, loader.state_dict(), cfg)
            if stop:
                if info.rank == 0:
                    tqdm.write(f"stopped by SIGTERM at step {step}; checkpoint saved")
                break
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    return step


def step_rng(cfg: Config, engine: eng.Engine, step: int, micro_step: int) -> torch.Generator:
    """The generator every random draw of (step, micro-step) on this rank comes from, on its device."""
    return rng.step_generator(cfg.train.seed, engine.info.rank, step, engine.info.device,
                              stream=rng.METHOD, micro_step=micro_step)


def accumulate(engine: eng.Engine, batches: Iterator[dict], meter: Throughput, cfg: Config, step: int
               ) -> dict[str, torch.Tensor | float]:
    """Optimizer step `step` over `train.grad_accum` micro-batches; the mean loss and terms, still on the
    device (plain floats where a method logs a host value)."""
    from sslmed.methods.base import RNG

    micro_steps = cfg.train.grad_accum
    totals: dict[str, torch.Tensor | float] = {}
    for micro_step in range(micro_steps):
        batch = next(batches)
        loss, logs = engine({**batch, RNG: step_rng(cfg, engine, step, micro_step)})
        engine.backward(loss)
        engine.step()
        meter.add(batch, engine.info.world)
        for key, value in {"loss": loss.detach(), **logs}.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            totals[key] = totals.get(key, 0.0) + value / micro_steps
    return totals


class NonFinite:
    """Catches a non-finite loss without a per-step sync: each step updates, on the device, the first step
    whose loss was not finite (one isfinite and one where on a scalar); `check_and_stop` reads it, with
    the stop request, in one cross-rank reduction at log and checkpoint steps. The cost: a non-finite loss
    is reported up to `train.log_every` − 1 steps after it happened, but always before a checkpoint."""

    NONE = float(2**52)  # larger than any step: "no non-finite loss yet"

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), self.NONE, dtype=torch.float64, device=device)

    def observe(self, loss: torch.Tensor | float, step: int) -> None:
        loss = torch.as_tensor(loss)
        bad = ~torch.isfinite(loss.to(self.first.device, non_blocking=True))
        here = torch.full_like(self.first, step)
        self.first = torch.where(bad, torch.minimum(self.first, here), self.first)

    def check_and_stop(self, stop_here: bool) -> bool:
        """Raise if any rank saw a non-finite loss; True if any rank was asked to stop."""
        first, stop = eng.all_reduce_max_values([-self.first, 1.0 if stop_here else 0.0])  # -max(-x) = min x
        if -first < self.NONE:
            raise FloatingPointError(f"loss is not finite at step {int(-first)}; lower optim.lr or use "
                                     "train.precision=fp32")
        return stop > 0


def log_record(step: int, terms: dict[str, torch.Tensor | float], lr: float, engine: eng.Engine,
               meter: Throughput, loader: Any) -> dict[str, Any]:
    keys = sorted(terms)  # every rank logs the same terms, in the same order
    means = dict(zip(keys, eng.all_reduce_mean([terms[k] for k in keys]), strict=True))
    record = {"step": step, "loss": means.pop("loss"), **means, "lr": lr,
              "grad_norm": engine.grad_norm(), **meter.rates(),
              "peak_mem_mb": peak_memory_mb(engine.info.device)}
    if hasattr(loader, "epoch"):
        record["epoch"] = int(loader.epoch)
    return record


def first_batch_checked(batches: Iterator[dict], cfg: Config) -> Iterator[dict]:
    """An empty dataset shows up as an exhausted stream; say so instead of a bare StopIteration."""
    try:
        first = next(batches)
    except StopIteration:
        raise DataError(f"data.path '{cfg.data.path}': the dataset yields no samples "
                        "(empty, or every sample filtered out by data.filter_tags)") from None

    def chained() -> Iterator[dict]:
        yield first
        yield from batches
        raise DataError(f"data.path '{cfg.data.path}': the data stream ended; the loader must be endless")

    return chained()


def export_final(cfg: Config, engine: eng.Engine, run_dir: Path) -> None:
    """RUN/encoder.safetensors + .json from the in-memory weights (gathered under ZeRO-3)."""
    with engine.full_params(frozen_only=False):
        if engine.info.rank == 0:
            ckpt.export_encoder(engine.module.encoder(), run_dir / "encoder.safetensors",
                                ckpt.encoder_meta(cfg))
    eng.barrier()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[Callable[[], bool]]:
    """SIGTERM (scheduler pre-emption) asks the loop to checkpoint and return at the next step."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received.is_set
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: received.set())
    try:
        yield received.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)
