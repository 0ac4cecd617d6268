"""Ray Tune sweeps: label fraction × mask ratio × seed, plus random-init baselines.

Two Tune phases on one Ray session:

1. pretraining — one trial per distinct mask ratio. Each exported encoder is cached on disk under
   `OUT/pretrain/<digest of the pretraining config>`, so a re-run (or a later sweep sharing OUT) never
   pretrains the same configuration twice; `OUT/pretrain/pretrain.jsonl` logs every run it did.
2. evaluation — one trial per (mask ratio or random init, label fraction, seed), each a `finetune` of
   the matching encoder on `eval.data`.

A trial that raises is recorded as failed, with its error, and the sweep goes on. Outputs in
`sweep.out` (or `run.dir`): results.csv (one row per trial), results.md (mean ± std over seeds), PNG plots.

This is the only module that imports ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import ray
from ray import tune

from sslmed.config import Config, config_from_dict, set_key
from sslmed.errors import CheckpointError, DataError, SslmedError
from sslmed.eval.reports import mean_std
from sslmed.eval.sweep_report import write_reports

OBJECT_STORE_BYTES = 256 * 2**20  # trials exchange only paths and small dicts
PRETRAIN_LOG = "pretrain.jsonl"
ENCODER_FILE = "encoder.safetensors"
RESULT_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "auprc")
CLUSTER_METRICS = ("nmi", "ari", "cluster_accuracy")


def sweep(cfg: Config, address: str | None = None) -> Path:
    """Run the sweep that `cfg.sweep` and `cfg.eval` describe; returns the output directory."""
    check_inputs(cfg)
    out = Path(cfg.sweep.out or cfg.run.dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = absolute_paths(cfg).to_dict()
    ratios = list(dict.fromkeys(cfg.sweep.mask_ratios or [cfg.method.mask_ratio]))
    with ray_session(address):
        encoders = run_pretraining(cfg, base, ratios, out)
        rows = run_evaluation(cfg, base, evaluation_trials(cfg, ratios), encoders, out)
    table = write_reports(rows, out, RESULT_METRICS)
    print(table)
    return out


def check_inputs(cfg: Config) -> None:
    """Missing data would fail every trial: say so before starting Ray and pretraining anything."""
    for dotted, value in (("data.path", cfg.data.path), ("eval.data", cfg.eval.data)):
        if not value or not Path(value).is_dir():
            raise DataError(f"{dotted}: '{value}' is not a folder; a sweep pretrains on data.path and "
                            "evaluates on eval.data")


# ---- Ray session -------------------------------------------------------------------------------


def start_local_ray(num_cpus: int | None = None) -> Path:
    """A private local Ray instance: no dashboard, a small object store, a short socket path (Unix
    sockets live under the temp dir and their paths must stay short). Returns the temp dir."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES, _temp_dir=str(temp_dir),
             log_to_driver=False, configure_logging=False)
    return temp_dir


@contextmanager
def ray_session(address: str | None):
    """Join `address`, reuse a session the caller already started, or start (and stop) a local one."""
    owned = not ray.is_initialized()
    temp_dir = None
    if owned:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            temp_dir = start_local_ray()
    try:
        yield
    finally:
        if owned:
            ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def run_tune(cfg: Config, trainable, trials: list[dict], out: Path, name: str, reuse_actors: bool,
             **params) -> list:
    """One Tune grid over `trials`; `reuse_actors` keeps worker processes (and their imports) warm."""
    resources = {"cpu": cfg.sweep.cpus_per_trial, "gpu": cfg.sweep.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, **params), resources),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent or None,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(out / "tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    return list(tuner.fit())


def error_text(error: BaseException | None) -> str:
    """The last line of a trial's error: `ExceptionType: message`, without the remote traceback."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---- trial configs -----------------------------------------------------------------------------


def absolute_paths(cfg: Config) -> Config:
    """A copy with every path absolute: Tune runs each trial in its own working directory."""
    copy = config_from_dict(cfg.to_dict())
    for dotted in ("run.dir", "data.path", "eval.data", "train.ds_config", "sweep.out"):
        section, key = dotted.split(".")
        value = getattr(getattr(copy, section), key)
        if value:
            setattr(getattr(copy, section), key, str(Path(value).resolve()))
    if Path(copy.eval.encoder).is_file():
        copy.eval.encoder = str(Path(copy.eval.encoder).resolve())
    return copy


def trial_config(base: dict, overrides: dict) -> Config:
    """The sweep's config with one trial's settings, validated (a bad setting fails this trial only)."""
    cfg = config_from_dict(base)
    for dotted, value in overrides.items():
        set_key(cfg, dotted, value, source="sweep trial")
    cfg.validate()
    return cfg


def pretrain_digest(cfg: Config) -> str:
    """Hash of what determines a pretrained encoder (not where it is written, not the evaluation)."""
    tree = {k: v for k, v in cfg.to_dict().items() if k not in ("run", "eval", "sweep")}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=list).encode()).hexdigest()[:16]


# ---- phase 1: pretraining ----------------------------------------------------------------------


def run_pretraining(cfg: Config, base: dict, ratios: list[float], out: Path) -> dict[float, dict]:
    """{mask ratio: {"encoder": path} or {"error": text}}; Tune trials only for encoders not cached yet."""
    cache = out / "pretrain"
    cache.mkdir(parents=True, exist_ok=True)
    steps = cfg.sweep.pretrain_steps or cfg.train.steps
    encoders, pending = {}, []
    for ratio in ratios:
        try:
            digest = pretrain_digest(trial_config(base, pretrain_overrides(ratio, steps)))
        except SslmedError as exc:  # a bad setting fails the trials that need it, not the sweep
            encoders[ratio] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        if (cache / digest / ENCODER_FILE).exists():
            encoders[ratio] = {"encoder": str(cache / digest / ENCODER_FILE)}
        else:
            pending.append({"mask_ratio": ratio})
    if not pending:
        return encoders
    results = run_tune(cfg, pretrain_trial, pending, out, "pretrain",
                       reuse_actors=False,  # each pretraining in a fresh process: no distributed state left
                       base=base, cache=str(cache), steps=steps)
    for result in results:
        ratio = result.config["trial"]["mask_ratio"]
        encoders[ratio] = ({"error": error_text(result.error)} if result.error
                           else {"encoder": result.metrics["encoder"]})
    return encoders


def pretrain_overrides(mask_ratio: float, steps: int) -> dict:
    return {"method.mask_ratio": mask_ratio, "train.steps": steps}


def pretrain_trial(config: dict, base: dict, cache: str, steps: int) -> None:
    """Tune trainable: the encoder for one mask ratio, from the cache or from a new pretraining run."""
    cfg = trial_config(base, pretrain_overrides(config["trial"]["mask_ratio"], steps))
    tune.report({"encoder": str(cached_pretraining(cfg, Path(cache)))})


def cached_pretraining(cfg: Config, cache: Path) -> Path:
    """`cache/<digest>/encoder.safetensors`, pretraining into a private folder first when it is missing."""
    from sslmed.train.loop import pretrain

    digest = pretrain_digest(cfg)
    target = cache / digest
    if (target / ENCODER_FILE).exists():
        return target / ENCODER_FILE
    work = cache / f".{digest}.{uuid.uuid4().hex[:8]}"
    cfg.run.dir, cfg.checkpoint.resume = str(work), "none"
    started = time.perf_counter()
    run_dir = pretrain(cfg)
    if not (Path(run_dir) / ENCODER_FILE).exists():
        raise CheckpointError(f"pretraining for mask ratio {cfg.method.mask_ratio} wrote no {ENCODER_FILE}")
    try:
        os.rename(run_dir, target)
    except OSError:  # another trial or sweep finished the same configuration first: keep theirs
        shutil.rmtree(run_dir, ignore_errors=True)
    entry = {"digest": digest, "mask_ratio": cfg.method.mask_ratio, "method": cfg.method.name,
             "steps": cfg.train.steps, "seconds": round(time.perf_counter() - started, 2)}
    with open(cache / PRETRAIN_LOG, "a") as log:  # one short append per run: safe across processes
        log.write(json.dumps(entry) + "\n")
    return target / ENCODER_FILE


# ---- phase 2: evaluation -----------------------------------------------------------------------


def evaluation_trials(cfg: Config, ratios: list[float]) -> list[dict]:
    trials = [{"encoder": "pretrained", "mask_ratio": r, "label_fraction": f, "seed": s}
              for r in ratios for f in cfg.eval.label_fractions for s in cfg.eval.seeds]
    if cfg.sweep.include_random:
        trials += [{"encoder": "random", "mask_ratio": None, "label_fraction": f, "seed": s}
                   for f in cfg.eval.label_fractions for s in cfg.eval.seeds]
    return trials


def trial_name(trial: dict) -> str:
    source = "random" if trial["encoder"] == "random" else f"mask{trial['mask_ratio']}"
    return f"{source}-frac{trial['label_fraction']}-seed{trial['seed']}"


def run_evaluation(cfg: Config, base: dict, trials: list[dict], encoders: dict[float, dict],
                   out: Path) -> list[dict]:
    # Trials whose pretraining failed will raise, and a raising trial takes its worker process down:
    # run them last so that no later trial pays for a fresh process and its imports.
    def will_fail(trial: dict) -> bool:
        return trial["encoder"] == "pretrained" and "error" in encoders[trial["mask_ratio"]]

    trials = sorted(trials, key=will_fail)  # stable: the grid order is kept otherwise
    results = run_tune(cfg, evaluation_trial, trials, out, "evaluate", reuse_actors=True,
                       base=base, encoders=encoders, trials_dir=str(out / "trials"))
    rows = []
    for result in results:
        trial = result.config["trial"]
        row = {"trial": trial_name(trial), "label_fraction": trial["label_fraction"],
               "mask_ratio": trial["mask_ratio"], "seed": trial["seed"], "encoder": trial["encoder"],
               "status": "failed" if result.error else "ok", "error": error_text(result.error)}
        if not result.error:
            row.update({k: result.metrics.get(k) for k in (*RESULT_METRICS, *CLUSTER_METRICS, "n_labelled")})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["encoder"], r["mask_ratio"] or 0, r["label_fraction"], r["seed"]))


def evaluation_trial(config: dict, base: dict, encoders: dict[float, dict], trials_dir: str) -> None:
    """Tune trainable: `finetune` of one encoder at one label fraction and seed."""
    from sslmed.eval.probe import finetune

    trial = config["trial"]
    encoder = "random"
    if trial["encoder"] == "pretrained":
        pretrained = encoders[trial["mask_ratio"]]
        if "error" in pretrained:
            raise CheckpointError(f"no encoder for mask ratio {trial['mask_ratio']}: pretraining failed "
                                  f"({pretrained['error']})")
        encoder = pretrained["encoder"]
    cfg = trial_config(base, {"eval.encoder": encoder, "eval.label_fractions": [trial["label_fraction"]],
                              "eval.seeds": [trial["seed"]],
                              "run.dir": str(Path(trials_dir) / trial_name(trial))})
    report = finetune(cfg)
    runs = report["runs"]  # one per cross-validation fold with eval.cv_folds, else one
    metrics = {k: mean_std([r["metrics"][k] for r in runs])["mean"] for k in RESULT_METRICS}
    metrics.update({k: report["clustering"][k] for k in CLUSTER_METRICS}, n_labelled=runs[0]["n_labelled"])
    tune.report(metrics)
