"""What MLflow tracking and Optuna tuning cost on top of training.

Both measurements need a tracking store: benchmarks.run points MLFLOW_TRACKING_URI at a temporary
sqlite store before calling them, so ./mlflow.db is never touched.

tracking_overhead: one short training (scikit-learn's digits at their native 8x8, 800 of them for
  training, the default ResNet-18, two epochs) as plain fit(), and as the product's tracked step
  pipeline.run.runners.run_train. fit() and its helpers are wrapped, not changed, to time directly
  what the epoch loop spends on tracking and resumability: the per-epoch callback (metrics, and
  the checkpoint uploaded as an artifact) and fit() writing that checkpoint. (Comparing the two
  trainings' wall times is reported too, but is noise-bound on a busy machine.) The rest of
  run_train's wall time is its fixed per-run cost: dataset download and sha256 check, params,
  dataset input, model logging. log_metrics is also timed alone, synchronous and with MLflow's
  asynchronous logging (mlflow.config.enable_async_logging).

tuning_overhead: seconds per trial that tracking and the product's tuning bookkeeping add, with training
  taken out (fit() replaced by a stand-in that only reports epochs and writes the checkpoint where
  fit() would). Two sides in the same run: the product's own study loop (pipeline.run.tuning.run_study,
  each trial a nested finetune run with its model logged), and the same trials with tracking off
  (the same sampler, search space and sqlite storage; the network built from the same pretrained
  model, the stand-in, the temperature fitted; no MLflow). The headline per_trial_s is their
  difference (per_trial_cpu_s the same in process CPU time, steadier on a busy machine). A bare
  Optuna study whose objective opens a nested MLflow run with params and per-epoch metrics (no
  model) is reported too, for comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import statistics
import tempfile
import time

import mlflow
import optuna

from pipeline.config import PrepareConfig, TrainConfig, TuneConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.model.device import resolve_device
from pipeline.model.models import create_model
from pipeline.train.checkpoint import save_atomic
from pipeline.train.loop import VAL_KEYS, FitResult, fit, seed_everything

TRAIN_CFG = dict(
    arch="resnet18", epochs=2, batch_size=64, lr=0.05, augment="none", precision="auto", device="cpu", seed=0
)


@contextlib.contextmanager
def async_logging(enabled: bool):
    mlflow.config.enable_async_logging(enabled)
    try:
        yield
    finally:
        mlflow.flush_async_logging()
        mlflow.config.enable_async_logging(False)


@dataclasses.dataclass
class Probe:
    fit_s: float = 0.0  # wall time of fit() inside run_train
    callback_s: float = 0.0  # time inside run_train's per-epoch callback (metrics + checkpoint upload)
    checkpoint_write_s: float = 0.0  # time fit() spends writing its resumable checkpoint
    checkpoint_upload_s: float = 0.0  # part of callback_s: run_checkpoints.log_checkpoint (artifact copy)


@contextlib.contextmanager
def probed_run_train(probe: Probe):
    """Time what run_train adds around training, by wrapping (not changing) fit() and save_atomic."""
    import pipeline.run.runners as runners
    import pipeline.track.run_checkpoints as run_checkpoints
    import pipeline.train.checkpoint as checkpoint

    real_fit, real_save = runners.fit, checkpoint.save_atomic
    real_upload = run_checkpoints.log_checkpoint
    sig = inspect.signature(real_fit)

    def timed_save(*args, **kwargs):
        t = time.perf_counter()
        real_save(*args, **kwargs)
        probe.checkpoint_write_s += time.perf_counter() - t

    def timed_upload(*args, **kwargs):
        t = time.perf_counter()
        real_upload(*args, **kwargs)
        probe.checkpoint_upload_s += time.perf_counter() - t

    def timed_fit(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        callback = bound.arguments.get("on_epoch")
        if callback is not None:

            def timed_callback(epoch, metrics):
                t = time.perf_counter()
                callback(epoch, metrics)
                probe.callback_s += time.perf_counter() - t

            bound.arguments["on_epoch"] = timed_callback
        t = time.perf_counter()
        result = real_fit(*bound.args, **bound.kwargs)
        probe.fit_s += time.perf_counter() - t
        return result

    runners.fit, checkpoint.save_atomic = timed_fit, timed_save
    run_checkpoints.log_checkpoint = timed_upload
    try:
        yield probe
    finally:
        runners.fit, checkpoint.save_atomic = real_fit, real_save
        run_checkpoints.log_checkpoint = real_upload


def _plain_fit(ds, cfg: TrainConfig) -> float:
    seed_everything(cfg.seed)
    net = create_model(cfg.arch, ds.num_classes)
    t0 = time.perf_counter()
    fit(net, ds.splits["train"], ds.splits["val"], cfg, ds.num_classes)
    return time.perf_counter() - t0


def log_metrics_cost(async_: bool, calls: int = 20) -> float:
    """Seconds one epoch's tracking.log_metrics call takes in the training loop (median of `calls`)."""
    from pipeline.track import tracking

    metrics = {
        "train_loss": 1.0,
        "train_accuracy": 0.5,
        "val_loss": 1.0,
        **{k: 0.5 for k in VAL_KEYS},
        "lr": 0.1,
        "images_per_sec": 100.0,
    }
    times = []
    with async_logging(async_), mlflow.start_run(run_name=f"bench log_metrics {'async' if async_ else 'sync'}"):
        for step in range(calls):
            t = time.perf_counter()
            tracking.log_metrics(metrics, step=step)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def tracking_overhead(epochs: int = 2, device: str = "cpu") -> dict:
    """The product's tracked training step (run_train) against plain fit() on the same data."""
    from pipeline.run.runners import run_prepare, run_train

    use_experiment("bench-tracking")
    prep_cfg = PrepareConfig(source="digits", image_size=8, samples_per_class=80, seed=0)
    prep = run_prepare(prep_cfg)
    ds, _ = prepare_dataset(prep_cfg)  # the same arrays, untracked
    cfg = TrainConfig(**{**TRAIN_CFG, "epochs": epochs, "data": prep, "device": device})
    base = _plain_fit(ds, cfg)
    with probed_run_train(Probe()) as probe:
        t0 = time.perf_counter()
        run_train(cfg, "pretrain")
        wall = time.perf_counter() - t0
    in_loop = probe.callback_s + probe.checkpoint_write_s
    sync_metrics, async_metrics = log_metrics_cost(False), log_metrics_cost(True)
    return {
        "bench": "tracking_overhead",
        "training": f"{cfg.arch}, digits {ds.image_size}x{ds.image_size}, {len(ds.splits['train'])} train images, "
        f"{epochs} epochs, batch {cfg.batch_size}, device {resolve_device(device).type}",
        # Headline: share of the training's wall time that the epoch loop spends on tracking and
        # resumability (per-epoch metrics + checkpoint write + checkpoint upload), as shipped,
        # then split: metrics and other callback work vs the per-epoch checkpoint.
        "overhead_pct": round(100 * in_loop / base, 2),
        "metrics_pct": round(100 * (probe.callback_s - probe.checkpoint_upload_s) / base, 2),
        "checkpoint_pct": round(100 * (probe.checkpoint_write_s + probe.checkpoint_upload_s) / base, 2),
        "plain_fit_s": round(base, 2),
        "fit_in_run_train_s": round(probe.fit_s, 2),
        "wall_delta_pct": round(100 * (probe.fit_s - base) / base, 1),  # same, from wall clocks: noisy
        "per_epoch_callback_s": round(probe.callback_s / epochs, 4),  # log_metrics + log_checkpoint
        "per_epoch_checkpoint_write_s": round(probe.checkpoint_write_s / epochs, 4),
        "per_epoch_checkpoint_upload_s": round(probe.checkpoint_upload_s / epochs, 4),
        "log_metrics_s": {"sync": round(sync_metrics, 5), "async": round(async_metrics, 5)},
        # Once per run: dataset download + sha256 check, params, dataset input, model logging.
        "run_train_s": round(wall, 2),
        "fixed_per_run_s": round(wall - probe.fit_s, 2),
    }


def _fake_fit(net, train, val, cfg, num_classes, on_epoch=None, checkpoint_path=None, *args,
              final_checkpoint=None, **kwargs) -> FitResult:
    """fit() without training: made-up improving metrics reported to on_epoch, and where fit() would
    write its resumable checkpoint, one of the real size (weights, momentum, best weights). Its epochs
    take no time, so fit()'s schedule (every cfg.checkpoint_every seconds, always after the last
    epoch unless final_checkpoint() says no one reads it) writes only the last one, or every epoch with
    checkpoint_every=0."""
    history = []
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for epoch in range(1, cfg.epochs + 1):
        last = epoch == cfg.epochs
        if checkpoint_path and ((not last and cfg.checkpoint_every <= 0)
                                or (last and (final_checkpoint is None or final_checkpoint()))):
            save_atomic(
                {"model": net.state_dict(), "optimizer": state, "best_model": state, "epoch": epoch}, checkpoint_path
            )
        metrics = {
            "train_loss": 1.0 / epoch,
            "train_accuracy": 0.5,
            "val_loss": 1.0 / epoch,
            **{k: 0.5 + 0.01 * epoch for k in VAL_KEYS},
            "lr": cfg.lr,
            "images_per_sec": 0.0,
        }
        history.append({"epoch": epoch, "is_best": True, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    best = history[-1]
    return FitResult(best["epoch"], {k: v for k, v in best.items() if k not in ("epoch", "is_best")}, history)


@dataclasses.dataclass
class Clock:
    """Wall and process CPU seconds of a block (CPU time is less at the mercy of other jobs on the machine)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    @contextlib.contextmanager
    def timing(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self.wall_s += time.perf_counter() - wall
            self.cpu_s += time.process_time() - cpu

    def per_trial(self, trials: int) -> dict:
        return {"trial_s": round(self.wall_s / trials, 3), "trial_cpu_s": round(self.cpu_s / trials, 3)}


def _tune_config(tmp: str, n_trials: int, epochs: int) -> TuneConfig:
    """The study both sides run: a dataset and a pretrained model logged first (fit() stubbed out)."""
    from pipeline.run import runners

    use_experiment("bench-tuning")
    prep = runners.run_prepare(PrepareConfig(source="digits", image_size=8, seed=0))
    with stubbed_fit():
        pre = runners.run_train(TrainConfig(data=prep, **{**TRAIN_CFG, "epochs": 1}), "pretrain")
    return TuneConfig(data=prep, pretrained=pre, n_trials=n_trials, epochs=epochs, pruner="none", sampler="random",
                      storage=f"sqlite:///{tmp}/optuna.db", study_name="bench", precision="fp32", device="cpu")


@contextlib.contextmanager
def stubbed_fit():
    import pipeline.run.runners as runners

    real_fit, runners.fit = runners.fit, _fake_fit
    try:
        yield
    finally:
        runners.fit = real_fit


@contextlib.contextmanager
def timed_checkpoint_writes():
    """Clock the stand-in's checkpoint writes (save_atomic as _fake_fit calls it)."""
    global save_atomic
    clock, real_save = Clock(), save_atomic

    def timed_save(*args, **kwargs):
        with clock.timing():
            real_save(*args, **kwargs)

    save_atomic = timed_save
    try:
        yield clock
    finally:
        save_atomic = real_save


def _product_tuning(cfg: TuneConfig) -> dict:
    """pipeline.run.tuning.run_study with fit() stubbed out: the study loop as users run it. Per trial:
    the wall time of its trial loop (run_trials: Optuna's bookkeeping between trials included) / trials."""
    from pipeline.run import tuning

    loop, real_run_trials = Clock(), tuning.run_trials

    def timed_run_trials(*args, **kwargs):
        with loop.timing():
            return real_run_trials(*args, **kwargs)

    tuning.run_trials = timed_run_trials
    try:
        with stubbed_fit(), timed_checkpoint_writes() as writes, Clock().timing() as study_clock:
            tuning.run_study(cfg, log=lambda _msg: None)
    finally:
        tuning.run_trials = real_run_trials
    study = optuna.load_study(study_name=cfg.study_name, storage=cfg.storage)
    durations = [t.duration.total_seconds() for t in study.trials if t.duration is not None]
    return {
        **loop.per_trial(len(durations)),
        # Part of trial_s: the resumable checkpoint fit() writes after the last epoch (134 MB with fsync here).
        "checkpoint_write_s": round(writes.wall_s / len(durations), 3),
        "median_trial_duration_s": round(statistics.median(durations), 3),  # Optuna's own, start to end
        "trials": len(durations),
        "study_fixed_s": round(study_clock.wall_s - loop.wall_s, 2),  # open study, parent run, summary, registry
        "method": "pipeline.run.tuning.run_study, fit() replaced by a no-training stand-in; each trial is a "
        "nested finetune run: params, per-epoch metrics, calibration, the model logged, the run tagged",
    }


def _tracking_off_tuning(cfg: TuneConfig) -> dict:
    """The same trials with tracking off: the same sampler, search space and kind of storage (sqlite),
    each trial building its network from the same pretrained model (loaded once, as a worker does) and
    calling the same fit() stand-in, without a checkpoint path; no MLflow run, nothing logged."""
    from pipeline.run import runners, tuning
    from pipeline.track.references import reusing_loads

    study = optuna.create_study(study_name="off", storage=cfg.storage.replace("optuna.db", "optuna-off.db"),
                                direction="maximize", sampler=optuna.samplers.RandomSampler(seed=cfg.seed),
                                pruner=optuna.pruners.NopPruner())

    def objective(trial: optuna.Trial) -> float:
        inputs = runners.load_training_inputs(tuning.trial_config(cfg, tuning.suggest(trial, cfg)), "finetune")

        def on_epoch(epoch: int, metrics: dict) -> None:
            trial.report(metrics[cfg.metric], epoch)
            if epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned()

        ds = inputs.ds
        result = _fake_fit(inputs.net, ds.splits["train"], ds.splits["val"], inputs.cfg, ds.num_classes, on_epoch)
        _fit_temperature(inputs.net, ds.splits["val"])  # calibration is training too; its logging is not
        return result.best_metrics[cfg.metric]

    with reusing_loads():
        runners.load_training_inputs(tuning.trial_config(cfg, {}), "finetune")  # the downloads, before timing
        with tuning.collecting_trial_garbage_only(), Clock().timing() as clock:
            study.optimize(objective, n_trials=cfg.n_trials, gc_after_trial=True)  # as run_trials does
    return {**clock.per_trial(cfg.n_trials), "trials": cfg.n_trials,
            "method": "optuna study (sqlite, random sampler), each trial: network built from the pretrained model, "
                      "the fit() stand-in, epochs reported to Optuna; no MLflow"}


def _fit_temperature(net, val) -> float:
    """What run_train's calibration computes, without logging it: the val logits and their temperature."""
    import torch

    from pipeline.evaluate.calibration import fit_temperature
    from pipeline.model.device import predict_logits

    logits = predict_logits(net, torch.from_numpy(val.images), None).double().numpy()
    return fit_temperature(logits, val.labels)


def _bare_tuning(n_trials: int, epochs: int, tmp: str) -> dict:
    """A bare Optuna study whose objective is a nested MLflow run with params and metrics only."""
    storage = f"sqlite:///{tmp}/optuna-bare.db"
    study = optuna.create_study(
        study_name="bare", storage=storage, direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
    )
    use_experiment("bench-tuning-bare")

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        with mlflow.start_run(run_name=f"trial {trial.number}", nested=True):
            mlflow.log_params({"lr": lr, "weight_decay": wd})
            value = 0.0
            for epoch in range(1, epochs + 1):
                value = 0.5 + 0.01 * epoch
                mlflow.log_metrics({"val_f1_macro": value, "val_loss": 1.0 / epoch}, step=epoch)
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        return value

    with mlflow.start_run(run_name="bare study"), Clock().timing() as clock:
        study.optimize(objective, n_trials=n_trials)
    return {
        **clock.per_trial(n_trials),
        "trials": n_trials,
        "method": "bare optuna (sqlite storage, TPE) + nested mlflow run per trial: params and per-epoch metrics, no "
                  "model",
    }


def tuning_overhead(n_trials: int = 5, epochs: int = 3) -> dict:
    """Headline per_trial_s: what the product's trial costs beyond the same trial with tracking off."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {"bench": "tuning_overhead", "epochs_per_trial": epochs, "load_avg_1min": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tune_config(tmp, n_trials, epochs)
        out["tracking_off"] = _tracking_off_tuning(cfg)
        try:
            out["product"] = _product_tuning(cfg)
        except Exception as exc:  # still report the other figures
            out["product"] = {"error": f"{type(exc).__name__}: {exc}"}
        out["bare"] = _bare_tuning(n_trials, epochs, tmp)
    if "trial_s" in out["product"]:
        out["per_trial_s"] = round(out["product"]["trial_s"] - out["tracking_off"]["trial_s"], 3)
        out["per_trial_cpu_s"] = round(out["product"]["trial_cpu_s"] - out["tracking_off"]["trial_cpu_s"], 3)
    return out


_STORE: dict[str, str] = {}


def use_experiment(name: str) -> None:
    """Create (once) and select an experiment whose artifacts live next to the temporary store
    (a sqlite store's default artifact root is ./mlartifacts in the working directory)."""
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=f"{_STORE['dir']}/artifacts/{name}")
    mlflow.set_experiment(name)


def temporary_tracking_store() -> str:
    """Point MLflow at a fresh sqlite store in a temporary folder; returns the folder."""
    tmp = tempfile.mkdtemp(prefix="bench-mlflow-")
    _STORE["dir"] = tmp
    uri = f"sqlite:///{tmp}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.set_tracking_uri(uri)
    return tmp
