"""The step runners: each step as one tracked MLflow run, config in, artifacts and metrics out, run id returned.

run_prepare and run_train (pretrain and finetune); evaluate's is pipeline.run.evaluation_run, prune's
pipeline.prune.pruning_run. The steps/ commands call them; pipeline.run.chain (main) calls them nested under one
parent run, pipeline.run.tuning calls run_train per trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
import torch

from pipeline import distributed
from pipeline.config import NUM_STAGES, PrepareConfig, TrainConfig
from pipeline.data.imageset import DatasetSplits
from pipeline.data.prepare import prepare_dataset
from pipeline.data.store import save_dataset
from pipeline.errors import PipelineError
from pipeline.evaluate.calibration import temperature_of
from pipeline.evaluate.scoring import score_net
from pipeline.model.device import resolve_device
from pipeline.model.models import (
    PRUNED_LAYERS,
    ImageClassifier,
    build_logged_net,
    count_trainable,
    create_model,
    freeze,
    initialise_from_data,
    pruned_layers,
    replace_head,
)
from pipeline.model.precision import resolve_cpu_amp_dtype
from pipeline.track import preflight, registry, tracking
from pipeline.track.evaluation_logging import log_val_calibration
from pipeline.track.references import load_dataset_ref, load_model_ref
from pipeline.track.run_checkpoints import (
    CHECKPOINT_UPLOAD_S,
    LAST_CHECKPOINT,
    CheckpointUploads,
    delete_checkpoints,
    load_resume_point,
)
from pipeline.train.loop import FitResult, fit, seed_everything

MAX_LISTED_SKIPS = 100
TAG_STOPPED_EARLY = "pipeline.stopped_early"  # true when early stopping (patience) ended training


def run_prepare(cfg: PrepareConfig, nested: bool = False, tags: dict | None = None) -> str:
    """prepare_data: decode the source once, carve splits, log the `dataset` artifact."""
    name = f"prepare_data {os.path.basename(cfg.source.rstrip('/')) or cfg.source}"
    with tracking.step_run("prepare_data", name, tags, nested) as run:
        tracking.log_params(dataclasses.asdict(cfg))
        ds, skipped = prepare_dataset(cfg)
        dataset_bytes = sum(s.images.nbytes + s.labels.nbytes for s in ds.splits.values())
        preflight.check_free_space(run.info.artifact_uri, preflight.estimate_run_bytes(0, 0, dataset_bytes))
        info = {"source": cfg.source, "seed": cfg.seed, "skipped_files": skipped[:MAX_LISTED_SKIPS],
                "num_skipped": len(skipped)}
        with tempfile.TemporaryDirectory() as tmp:
            manifest = save_dataset(ds, tmp, info)
            tracking.log_dataset(tmp, manifest)
        counts = {f"{split}_images": len(s) for split, s in ds.splits.items()}
        tracking.log_metrics({**counts, "num_classes": ds.num_classes, "skipped_files": len(skipped)})
        mlflow.set_tag("pipeline.dataset_digest", manifest["digest"])
        sizes = " / ".join(f"{len(s)} {split}" for split, s in ds.splits.items())
        tracking.set_note(f"Prepared `{cfg.source}`: {sizes} images of {ds.num_classes} classes at {ds.image_size} px"
                          + (f", {len(skipped)} unreadable files skipped" if skipped else "")
                          + f". Dataset: `runs:/{run.info.run_id}/{tracking.DATASET_ARTIFACT}` "
                            f"(digest {manifest['digest']}).")
        if skipped:
            print(f"prepare_data: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
        return run.info.run_id


@dataclass(frozen=True)
class TrialHooks:
    """What a tuning trial adds to a finetune run; the defaults are a plain run's behaviour.

    on_epoch(epoch, metrics) is called after each epoch is logged; it may raise one of the `stopped`
    exception types to end training early on purpose (pruning): the run then ends KILLED instead of
    FAILED, and the exception propagates.
    upload_checkpoints=False keeps the resumable checkpoint local (trials without heartbeats: ~100 MB
    each); otherwise it goes up at most every `upload_every` seconds, and on interruption.
    start_from: an unfinished run of this step whose last checkpoint a NEW run continues from (the
    retry of a dead worker's trial), unlike cfg.resume, which reopens the interrupted run itself.
    prepare_net(net, image_size) may change the network before training (a trial prunes it; on every
    rank alike) and log to the active run; the logged model then records the changed layer shapes.
    """

    on_epoch: Callable[[int, dict], None] | None = None
    stopped: tuple[type[BaseException], ...] = ()
    upload_checkpoints: bool = True
    upload_every: float = CHECKPOINT_UPLOAD_S
    start_from: str = ""
    input_example: bool = True  # False: the model is logged without one (no reload by MLflow to check it)
    prepare_net: Callable[[torch.nn.Module, int], None] | None = None


@dataclass(frozen=True)
class TrainingInputs:
    """What a training run starts from, with every pretrain/finetune difference already settled."""

    cfg: TrainConfig  # arch=auto resolved to the pretrained model's
    ds: DatasetSplits
    manifest: dict
    data_uri: str
    net: torch.nn.Module
    upstream: dict[str, str]  # pipeline.upstream.* tags: the dataset (and pretrained model) it came from
    origin: str  # for the run's description: " from scratch", " from `<model uri>` with the first k ... frozen"
    pruned: bool = False  # fine-tuned from a pruned model: its layer shapes go into the logged model's meta


def run_train(cfg: TrainConfig, step: str, nested: bool = False, tags: dict | None = None,
              hooks: TrialHooks = TrialHooks()) -> str | None:
    """pretrain (all layers from scratch or ImageNet) or finetune (from `pretrained`, first k stages frozen).

    Under torchrun every process runs this and trains on its shard of each global batch; only rank 0
    starts, logs to and ends the MLflow run, writes checkpoints, calls hooks.on_epoch and returns the run
    id. The other ranks only read MLflow (dataset, pretrained model, resume point) and return None.
    """
    world = distributed.read_world()
    cfg, tags, resume_state = _resume_point(cfg, step, tags, hooks.start_from)
    cfg = cfg if cfg.arch == "auto" else cfg.resolved()  # finetune's auto: resolved with the pretrained arch
    device = _check_training(cfg, step, world)
    main = world.is_main
    # Everything up to the first collective runs in failing_together: a rank failing there alone
    # (its dataset download, say) makes every rank fail with its message instead of waiting.
    step_run = tracking.step_run if main else _no_run
    with distributed.joining_process_group(world, device), step_run(
            step, _train_run_name(step, cfg), tags, nested, hooks.stopped, run_id=cfg.resume or None,
            system_metrics=cfg.system_metrics) as run:
        with distributed.failing_together(world):
            inputs = _prepare_net(load_training_inputs(cfg, step), hooks)
            if main:
                _check_training_space(run.info.artifact_uri, inputs.net, hooks)
                log_training_inputs(inputs, step, world)
        inputs = _settle_cpu_precision(inputs, device, world)
        result = _fit_uploading_checkpoints(inputs, step, resume_state, world, hooks)
        if not main:
            return None
        log_training_outputs(inputs, step, result, run.info.run_id, device, hooks.input_example)
    if not inputs.cfg.keep_checkpoint:  # the run ended FINISHED: nothing will resume it
        delete_checkpoints(run.info.run_id, run.info.artifact_uri)
    return run.info.run_id


def _resume_point(cfg: TrainConfig, step: str, tags: dict | None, start_from: str):
    """(config, tags, checkpoint or None): a resumed run's stored config, or a retried trial's checkpoint."""
    if cfg.resume:
        stored, state = load_resume_point(cfg.resume, step)
        return TrainConfig(**{**stored, "resume": cfg.resume}), tags, state
    if start_from:
        _, state = load_resume_point(start_from, step)
        return cfg, {**(tags or {}), "pipeline.resumed_from": start_from}, state
    return cfg, tags, None


def _check_training(cfg: TrainConfig, step: str, world) -> torch.device:
    """Refuse what cannot train (on every rank alike), before any download; returns the device."""
    with distributed.failing_alike():
        if step == "finetune" and not cfg.pretrained:
            raise PipelineError("finetune needs pretrained: a pretrain run id, or a runs:/ or models:/ URI")
        if step == "pretrain" and (cfg.pretrained or cfg.frozen_layers):
            raise PipelineError("pretrain trains every layer from scratch; "
                                "use the finetune step for pretrained/frozen_layers")
        device = resolve_device(cfg.device)  # fail on device=cuda without a GPU before any download
        if cfg.batch_size is not None:  # arch=auto: checked once its recipe is known (load_training_inputs)
            distributed.check_world(world, cfg.batch_size, device)
        if not cfg.data:
            raise PipelineError("data is empty; pass a prepare_data run id or a dataset artifact URI")
    return device


def _train_run_name(step: str, cfg: TrainConfig) -> str:
    lr = "" if cfg.lr is None else f" lr={cfg.lr:g}"  # finetune with arch=auto: named again once resolved
    return f"{step} {cfg.arch}" + (f" frozen={cfg.frozen_layers}" if step == "finetune" else "") + lr


def load_training_inputs(cfg: TrainConfig, step: str) -> TrainingInputs:
    """Load the dataset and build the network: from scratch or ImageNet (pretrain), or from the
    pretrained model with its first stages frozen and, for a new class set, a fresh head (finetune)."""
    splits = ("train", "val", "test") if cfg.register_as else ("train", "val")
    ds, manifest, data_uri = load_dataset_ref(cfg.data, splits)
    if cfg.register_as:
        registry.require_test_split(manifest)  # before training, not after it
    upstream = {"pipeline.upstream.data": data_uri}
    seed_everything(cfg.seed)
    if step == "finetune":
        net, cfg, meta = _build_finetune_net(cfg, ds.class_names)
        upstream["pipeline.upstream.pretrained"] = meta["model_uri"]
        upstream["pipeline.upstream.pretrained_run"] = meta["source_run_id"]
        origin = f" from `{meta['model_uri']}` with the first {cfg.frozen_layers} of {NUM_STAGES} stages frozen"
        pruned = bool(meta.get(PRUNED_LAYERS))
    else:
        net = create_model(cfg.arch, ds.num_classes, cfg.dropout, cfg.weights)
        if cfg.weights == "none":  # airnet's whitening stem; finetune and resume load the trained one
            initialise_from_data(net, ds.splits["train"].images)
        origin = f" from {'ImageNet' if cfg.weights == 'imagenet' else 'scratch'}"
        pruned = False
    return TrainingInputs(cfg, ds, manifest, data_uri, net, upstream, origin, pruned)


def _prepare_net(inputs: TrainingInputs, hooks: TrialHooks) -> TrainingInputs:
    """hooks.prepare_net's changes on the whole net, then the frozen stages frozen again: torch-pruning
    leaves layers without gradients alone, and makes new parameters where it prunes."""
    if hooks.prepare_net is None:
        return inputs
    freeze(inputs.net, 0)
    hooks.prepare_net(inputs.net, inputs.ds.image_size)
    freeze(inputs.net, inputs.cfg.frozen_layers)
    return dataclasses.replace(inputs, pruned=True)  # pruned_layers() then finds which shapes changed, if any


def _build_finetune_net(cfg: TrainConfig, class_names: list[str]) -> tuple[torch.nn.Module, TrainConfig, dict]:
    state, meta = load_model_ref(cfg.pretrained)
    if cfg.arch not in ("auto", meta["arch"]):
        raise PipelineError(
            f"pretrained model {cfg.pretrained!r} is a {meta['arch']}, not arch={cfg.arch}; "
            f"set arch={meta['arch']} (or auto)"
        )
    net = build_logged_net({**meta, "dropout": cfg.dropout}, state)  # a pruned model's layers at their shapes
    if list(meta["class_names"]) != list(class_names):
        replace_head(net, len(class_names))  # a new class set needs a fresh head
    freeze(net, cfg.frozen_layers)
    cfg = dataclasses.replace(cfg, arch=meta["arch"]).resolved()  # arch=auto: the recipe options only now
    distributed.check_world(distributed.read_world(), cfg.batch_size, resolve_device(cfg.device))
    return net, cfg, meta


def log_training_inputs(inputs: TrainingInputs, step: str, world) -> None:
    """The run's name (arch=auto now resolved), upstream tags, params, and for a new run its config and data."""
    cfg, ds = inputs.cfg, inputs.ds
    tags = {**inputs.upstream, tracking.TAG_ARCH: cfg.arch}
    if step == "finetune":
        tracking.set_run_name(_train_run_name(step, cfg), tags)
    else:
        mlflow.set_tags(tags)
    tracking.log_params({**cfg.to_params(), "num_classes": ds.num_classes,
                         "trainable_params": count_trainable(inputs.net),
                         "train_images": len(ds.splits["train"]), "world_size": world.size})
    if not cfg.resume:  # a new run (a trial's retry too) records its config and data
        tracking.log_config(cfg.to_params())
        tracking.log_dataset_input(inputs.manifest, inputs.data_uri, context="training")


def _settle_cpu_precision(inputs: TrainingInputs, device: torch.device, world) -> TrainingInputs:
    """precision=auto on a CPU: measure fp32 against bf16 autocast for this network and image size
    (pipeline.model.precision, cached per CPU model) and train in the faster; the run records the choice
    (param precision_resolved) and the measured speed-up (metric cpu_bf16_speedup). Several processes
    keep the flag-based choice, so that every rank trains alike without a measurement each."""
    cfg = inputs.cfg
    if cfg.precision != "auto" or device.type != "cpu" or world.size > 1:
        return inputs
    _, verdict = resolve_cpu_amp_dtype(cfg.arch, inputs.ds.image_size, cfg.batch_size, inputs.ds.num_classes)
    tracking.log_params({"precision_resolved": verdict.choice})
    tracking.log_metrics({"cpu_bf16_speedup": verdict.ratio})
    print(verdict.describe())
    return dataclasses.replace(inputs, cfg=dataclasses.replace(cfg, precision=verdict.choice))


def _check_training_space(artifact_uri: str, net: torch.nn.Module, hooks: TrialHooks) -> None:
    """Refuse to train when the model (and the checkpoint, where it goes up) clearly cannot be stored."""
    n = sum(p.numel() for p in net.parameters())
    preflight.check_free_space(artifact_uri, preflight.estimate_run_bytes(n, checkpoints=int(hooks.upload_checkpoints)),
                               temp_bytes=preflight.estimate_run_bytes(n, checkpoints=1))


def _fit_uploading_checkpoints(inputs: TrainingInputs, step: str, resume_state: dict | None, world,
                               hooks: TrialHooks) -> FitResult:
    """fit(), logging each epoch's metrics and sending its checkpoint up as CheckpointUploads decides.

    The checkpoint is written under .pipeline/checkpoints/<run id>/ and removed once the run no longer
    needs it there; it stays when the tracking server is lost mid-run, for the resume command printed then.
    """
    cfg, ds = inputs.cfg, inputs.ds
    if hooks.upload_checkpoints and hooks.upload_every < cfg.checkpoint_every:
        # Uploads more often than fit() writes would send the same file again: write as often as it goes up.
        cfg = dataclasses.replace(cfg, checkpoint_every=hooks.upload_every)
    run_id = mlflow.active_run().info.run_id if world.is_main else ""
    ckpt = preflight.kept_checkpoint_path(run_id, LAST_CHECKPOINT) if world.is_main else None
    uploads = CheckpointUploads(ckpt, hooks.upload_checkpoints, hooks.upload_every)
    done: list[int] = []

    def log_epoch(epoch: int, metrics: dict) -> None:
        tracking.log_metrics(metrics, step=epoch)
        done.append(epoch)
        uploads.after_epoch()  # fit() wrote the checkpoint atomically just before
        if hooks.on_epoch is not None:
            hooks.on_epoch(epoch, metrics)

    try:
        # The last epoch's checkpoint is read only if it goes up now or is kept: fit() then skips the write.
        result = fit(inputs.net, ds.splits["train"], ds.splits["val"], cfg, ds.num_classes,
                     log_epoch if world.is_main else None, ckpt, resume_state, world,
                     final_checkpoint=lambda: cfg.keep_checkpoint or uploads.is_due())
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: keep the last finished epoch for `resume`
        uploads.on_interrupt()
        _remove_local_checkpoint(ckpt)
        raise
    except Exception as exc:
        if ckpt and preflight.is_lost_server(exc):
            message = preflight.outage_message(mlflow.get_tracking_uri(), step, run_id, ckpt,
                                               done[-1] if done else None)
            raise preflight.TrackingLost(message) from exc
        _remove_local_checkpoint(ckpt)
        raise
    if cfg.keep_checkpoint:  # asked for: the final epoch's, whatever the upload interval
        uploads.upload_now()
    _remove_local_checkpoint(ckpt)
    return result


def _remove_local_checkpoint(ckpt: str | None) -> None:
    if ckpt:
        shutil.rmtree(os.path.dirname(ckpt), ignore_errors=True)


def log_training_outputs(inputs: TrainingInputs, step: str, result: FitResult, run_id: str, device,
                         input_example: bool = True) -> None:
    """Best-epoch metrics, whether early stopping ended it, the model, the description, and registration."""
    cfg, ds, net = inputs.cfg, inputs.ds, inputs.net
    best_val = {f"best_{k}": v for k, v in result.best_metrics.items() if k.startswith("val_")}
    tracking.log_metrics({"best_epoch": result.best_epoch, **best_val})
    mlflow.set_tag(TAG_STOPPED_EARLY, str(result.stopped_early).lower())
    meta = {"arch": cfg.arch, "num_classes": ds.num_classes, "class_names": ds.class_names,
            "image_size": ds.image_size, "dropout": cfg.dropout,
            "temperature": log_val_calibration(net, ds.splits["val"], ds.class_names, inputs.manifest["digest"],
                                                cfg.calibrate),  # null: calibrate=false, plain softmax
            PRUNED_LAYERS: pruned_layers(net, cfg.arch, ds.num_classes) if inputs.pruned else {}}
    sample = ds.splits["val"].images[:2]
    tracking.log_model(ImageClassifier(net, ds.class_names, ds.image_size), meta, sample, input_example)
    best = result.best_metrics
    tracking.set_note(f"{step} {cfg.arch} on `{inputs.data_uri}`{inputs.origin}, {cfg.epochs} epochs at lr {cfg.lr:g}. "
                      f"Best epoch {result.best_epoch}: val accuracy {best.get('val_accuracy', float('nan')):.4f}, "
                      f"val macro-F1 {best.get('val_f1_macro', float('nan')):.4f}. "
                      f"Model: `runs:/{run_id}/{tracking.MODEL_NAME}`.")
    if cfg.register_as:  # the model just logged is `net`: scored here, not downloaded again
        test = ds.splits["test"]
        report = score_net(net, test.images, test.labels, ds.class_names, "test", device, "fp32",
                           temperature=temperature_of(meta))  # the probabilities the served model gives
        registry.register_trained_run(run_id, cfg.register_as, report, test.images, ds.class_names)


@contextlib.contextmanager
def _no_run(*args, **kwargs):
    """step_run's stand-in on ranks other than 0: no MLflow run."""
    yield None
