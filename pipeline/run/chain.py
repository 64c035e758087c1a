"""main: prepare_data -> pretrain -> finetune -> evaluate, each a nested run under one parent,
then (with register_as) the fine-tuned model registered with its test metrics.

A step is reused instead of recomputed when a FINISHED run exists whose step, parameters,
upstream run ids, code version and (for image folders/archives) source fingerprint all match:
its cache key, a tag on every step run main starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import mlflow

from pipeline.config import ARCHS, NUM_STAGES, EvaluateConfig, PrepareConfig, TrainConfig, opt, same_as
from pipeline.evaluate.stats import with_interval
from pipeline.run.evaluation_run import run_evaluate
from pipeline.run.runners import run_prepare, run_train
from pipeline.track import tracking
from pipeline.track.references import run_name_of
from pipeline.track.registry import register_evaluated

TAG_CACHE_KEY = "pipeline.cache_key"


@dataclass(frozen=True)
class ChainConfig:
    prepare: PrepareConfig
    pretrain: TrainConfig  # its `data` is filled in from the prepare_data run
    finetune: TrainConfig  # its `data` and `pretrained` are filled in
    evaluate_split: str = "test"
    register_as: str = ""  # registered model name for the fine-tuned model; empty = do not register


@dataclass(frozen=True)
class MainConfig:
    """main's options (steps/main.py generates its command line from these): one value per option, or
    one per training step where they differ (epochs, lr); to_chain() spreads them over the steps."""

    source: str = same_as(PrepareConfig, "source")
    data_dir: str = same_as(PrepareConfig, "data_dir")
    image_size: int = same_as(PrepareConfig, "image_size")
    val_fraction: float = same_as(PrepareConfig, "val_fraction")
    test_fraction: float = same_as(PrepareConfig, "test_fraction")
    classes: str = same_as(PrepareConfig, "classes")
    samples_per_class: int = same_as(PrepareConfig, "samples_per_class")
    arch: str = opt("resnet18", " | ".join(ARCHS))  # not TrainConfig's: auto means nothing before pretrain
    weights: str = same_as(TrainConfig, "weights")
    pretrain_epochs: int = opt(10, "epochs of pretraining")
    finetune_epochs: int = opt(5, "epochs of fine-tuning")
    batch_size: int = same_as(TrainConfig, "batch_size")
    pretrain_lr: float | None = same_as(TrainConfig, "lr")  # auto: the arch's recipe, as pretrain's lr
    finetune_lr: float = opt(0.01, "peak learning rate of finetune (explicit: a fine-tuning choice, not the arch's "
                                   "recipe; the other recipe options follow the arch)")
    augment: str = same_as(TrainConfig, "augment")
    frozen_layers: int = same_as(TrainConfig, "frozen_layers", 3)
    precision: str = same_as(TrainConfig, "precision")
    device: str = same_as(TrainConfig, "device")
    seed: int = opt(0, "seed for splits, init, shuffling, augmentation")
    register_as: str = opt("", "registered model name for the fine-tuned model, described with its test metrics "
                               "(alias `champion` moves on better test macro-F1); empty = do not register")
    system_metrics: bool = same_as(TrainConfig, "system_metrics")

    def to_chain(self) -> ChainConfig:
        """The step configs (each validates its part); finetune's `pretrained` is filled in by the chain."""
        shared = dict(arch=self.arch, batch_size=self.batch_size, augment=self.augment, precision=self.precision,
                      device=self.device, seed=self.seed, system_metrics=self.system_metrics)
        prepare = PrepareConfig(source=self.source, data_dir=self.data_dir, image_size=self.image_size,
                                val_fraction=self.val_fraction, test_fraction=self.test_fraction, classes=self.classes,
                                samples_per_class=self.samples_per_class, seed=self.seed)
        return ChainConfig(
            prepare=prepare,
            # arch is known here (never auto): resolved now, so the cache key holds the values trained with
            pretrain=TrainConfig(epochs=self.pretrain_epochs, lr=self.pretrain_lr, weights=self.weights,
                                 **shared).resolved(),
            finetune=TrainConfig(epochs=self.finetune_epochs, lr=self.finetune_lr, frozen_layers=self.frozen_layers,
                                 pretrained="(from pretrain)", **shared).resolved(),
            register_as=self.register_as,
        )


def source_fingerprint(source: str) -> str:
    """Cheap identity of a local source (paths, sizes, mtimes), so edited data is not reused."""
    if not os.path.exists(source):
        return source
    h = hashlib.sha256()
    paths = [source] if os.path.isfile(source) else sorted(
        os.path.join(d, f) for d, _, files in os.walk(source) for f in files
    )
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, source)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# Parameters that change what a run records, not what it computes: a rerun that only flips them reuses.
NOT_IN_CACHE_KEY = ("system_metrics",)


def cache_key(step: str, params: dict, upstream: dict) -> str:
    """What decides reuse: the step, its parameters, its upstream runs (or source fingerprint) and the code."""
    blob = json.dumps({"step": step, "params": params, "upstream": upstream, "code": tracking.code_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def find_finished_run(key: str, experiment_id: str) -> str | None:
    """The newest FINISHED run tagged with this cache key, if any."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{TAG_CACHE_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def reuse_or_run(step: str, params: dict, upstream: dict, experiment_id: str, run: Callable[[dict], str], log,
                  who: str = "main") -> str:
    key = cache_key(step, {k: v for k, v in params.items() if k not in NOT_IN_CACHE_KEY}, upstream)
    found = find_finished_run(key, experiment_id)
    if found:
        log(f"{who}: reusing {step} run {found} (same parameters, inputs and code)")
        mlflow.set_tag(f"pipeline.{step}_reused", "true")
        return found
    run_id = run({TAG_CACHE_KEY: key})
    log(f"{who}: ran {step} -> {run_id}")
    return run_id


def run_main(cfg: ChainConfig, log=print) -> dict[str, str]:
    """main: run (or reuse) the four steps, print their run ids, then register the model if asked."""
    ids = run_chain(cfg, log)
    for step, run_id in ids.items():
        log(f"{step:>12}: {run_id}")
    log(f"{'result':>12}: {headline_text(mlflow.get_run(ids['evaluate']).data.metrics, cfg.evaluate_split)}")
    if cfg.register_as:
        test_images = int(mlflow.get_run(ids["prepare_data"]).data.metrics.get("test_images", 0))
        register_evaluated(ids["finetune"], ids["evaluate"], cfg.register_as, test_images)
    return ids


def run_chain(cfg: ChainConfig, log=print) -> dict[str, str]:
    """Run (or reuse) the four steps; returns {step: run_id}."""
    ids: dict[str, str] = {}
    with tracking.step_run("main", f"main {cfg.pretrain.arch} frozen={cfg.finetune.frozen_layers}") as parent:
        exp = parent.info.experiment_id
        tracking.log_params({"source": cfg.prepare.source, "arch": cfg.pretrain.arch,
                             "frozen_layers": cfg.finetune.frozen_layers})

        prep_params = dataclasses.asdict(cfg.prepare)
        ids["prepare_data"] = reuse_or_run(
            "prepare_data", prep_params, {"source": source_fingerprint(cfg.prepare.source)}, exp,
            lambda tags: run_prepare(cfg.prepare, nested=True, tags=tags), log,
        )
        pre = dataclasses.replace(cfg.pretrain, data=ids["prepare_data"])
        ids["pretrain"] = reuse_or_run(
            "pretrain", pre.to_params(), {"data": ids["prepare_data"]}, exp,
            lambda tags: run_train(pre, "pretrain", nested=True, tags=tags), log,
        )
        fin = dataclasses.replace(cfg.finetune, data=ids["prepare_data"], pretrained=ids["pretrain"])
        ids["finetune"] = reuse_or_run(
            "finetune", fin.to_params(), {"data": ids["prepare_data"], "pretrained": ids["pretrain"]}, exp,
            lambda tags: run_train(fin, "finetune", nested=True, tags=tags), log,
        )
        ev = EvaluateConfig(model=ids["finetune"], data=ids["prepare_data"], split=cfg.evaluate_split,
                            device=cfg.finetune.device)
        ids["evaluate"] = reuse_or_run(
            "evaluate", dataclasses.asdict(ev), {"model": ids["finetune"], "data": ids["prepare_data"]}, exp,
            lambda tags: run_evaluate(ev, nested=True, tags=tags), log,
        )
        mlflow.set_tags({f"pipeline.{step}_run": rid for step, rid in ids.items()})
        final = mlflow.get_run(ids["evaluate"]).data.metrics
        # The headline numbers on the parent, so the runs table compares whole pipelines.
        headline = f"{cfg.evaluate_split}_accuracy"
        tracking.log_metrics({k: v for k, v in final.items() if k == headline or k.endswith(("_macro", "_weighted"))})
        tracking.set_note(describe_chain(cfg, ids, final, parent.info.run_id))
    return ids


def headline_text(metrics: dict[str, float], split: str) -> str:
    """`Test accuracy 0.9778 (95% CI 0.95-0.99), macro-F1 0.9776 (95% CI 0.95-0.99)`."""
    return (f"{split.capitalize()} accuracy {with_interval(metrics, f'{split}_accuracy')}, "
            f"macro-F1 {with_interval(metrics, f'{split}_f1_macro')}")


def describe_chain(cfg: ChainConfig, ids: dict[str, str], final: dict[str, float], parent_id: str) -> str:
    """The parent run's description in the UI: the headline result, then each step and whether it was reused."""
    split = cfg.evaluate_split
    tags = mlflow.get_run(parent_id).data.tags
    lines = [
        f"{cfg.pretrain.arch} pretrained and fine-tuned with the first {cfg.finetune.frozen_layers} of {NUM_STAGES} "
        f"stages frozen, on `{cfg.prepare.source}`. {headline_text(final, split)}.",
        "",
    ]
    for step, run_id in ids.items():
        how = "reused" if tags.get(f"pipeline.{step}_reused") == "true" else "ran"
        lines.append(f"- {step}: {how} `{run_id}` ({run_name_of(run_id)})")
    return "\n".join(lines)
