"""`pretrain(cfg)`: the training loop. It knows no method — only `loss, logs = method(batch)`."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from sslmed.config import Config, save_config
from sslmed.data.augment import on_device
from sslmed.errors import DataError
from sslmed.train import checkpoint as ckpt
from sslmed.train import engine as eng
from sslmed.train.logging import RunLogger, Throughput, peak_memory_mb

MethodFactory = Callable[[Config], nn.Module]
LoaderFactory = Callable[[Config, int, int], Any]


def pretrain(cfg: Config) -> Path:
    """Pretrain `cfg.method.name` on `cfg.data.path`; returns the run directory."""
    from sslmed.data.pipeline import build_loader
    from sslmed.methods import build_method

    return run_pretraining(cfg, build_method, build_loader)


def run_pretraining(cfg: Config, build_method: MethodFactory, build_loader: LoaderFactory) -> Path:
    """`pretrain` with the method and loader factories passed in (any nn.Module / loader that follow
    docs/architecture.md)."""
    info = eng.init_distributed()
    run_dir = Path(cfg.run.dir)
    resume = eng.broadcast_object(ckpt.find_resume(cfg, run_dir) if info.rank == 0 else None)
    if resume is not None:
        ckpt.check_compatible(resume, cfg, eng.zero_stage(cfg, info.world))
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    ckpt.seed_everything(cfg.train.seed)  # identical initial weights on every rank
    method = build_method(cfg)
    engine = eng.build_engine(cfg, method, info,
                              universal=resume is not None and ckpt.needs_universal(resume, info.world))
    ckpt.seed_everything(cfg.train.seed * 1000 + info.rank)  # per-rank randomness (masks, noise)
    loader = build_loader(cfg, info.rank, info.world)
    step, rng = 0, None
    if resume is not None:
        step, rng = resume.step, ckpt.restore(engine, resume, loader)
        if info.rank == 0:
            tqdm.write(f"resumed from {resume.path} at step {step}")
    # Starting the stream draws from the global RNG (a DataLoader takes its base seed there), as it did
    # once before the checkpoint was taken: restore the saved state after that draw, not before.
    batches = first_batch_checked(iter(loader), cfg)
    batches = on_device(batches, cfg, info.rank, info.device, first_step=step)  # float, augmented there
    if rng is not None:
        ckpt.set_rng_state(rng)
    elif resume is not None:  # another world size: fresh per-rank randomness, distinct from step 0's
        ckpt.seed_everything(cfg.train.seed * 1000 + info.rank + 7919 * step)

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
    bar = tqdm(total=steps, initial=step, disable=info.rank != 0, desc="pretrain", dynamic_ncols=True)
    try:
        while step < steps:
            lr = engine.lr()  # the rate this step uses; the schedule advances inside engine.step()
            terms = accumulate(engine, batches, meter, cfg.train.grad_accum)
            step += 1
            with engine.full_params():
                method.on_step_end(step, steps)
            if step % cfg.train.log_every == 0 or step == steps:
                record = log_record(step, terms, lr, engine, meter, loader)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                if logger is not None:
                    logger.log(record)
            bar.update(1)
            stop = eng.all_reduce_max(stop_requested())
            every = cfg.checkpoint.every
            if (every and step % every == 0) or step == steps or stop:
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


def accumulate(engine: eng.Engine, batches: Iterator[dict], meter: Throughput, micro_steps: int
               ) -> dict[str, float]:
    """One optimizer step over `micro_steps` micro-batches; the mean loss and terms."""
    totals: dict[str, float] = {}
    for _ in range(micro_steps):
        batch = next(batches)
        loss, logs = engine(batch)
        engine.backward(loss)
        engine.step()
        meter.add(batch, engine.info.world)
        for key, value in {"loss": float(loss.detach()), **logs}.items():
            totals[key] = totals.get(key, 0.0) + float(value) / micro_steps
    if not math.isfinite(totals["loss"]):
        raise FloatingPointError(f"loss is {totals['loss']} at step {engine.global_step}; lower optim.lr "
                                 "or use train.precision=fp32")
    return totals


def log_record(step: int, terms: dict[str, float], lr: float, engine: eng.Engine, meter: Throughput,
               loader: Any) -> dict[str, Any]:
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
