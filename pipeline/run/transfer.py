"""transfer: what freezing buys, as one parent run with every step nested under it.

prepare_data (source classes) -> pretrain; prepare_data (target classes, few images per class) ->
finetune at each frozen depth, and pretrain from scratch on the same target images with the same
epochs; evaluate each on the target's test split. The parent run then holds the table
(transfer/results.csv, .md), the plot (transfer/accuracy_vs_depth.png), per-arm and best-depth
metrics, the paired tests of the best depth against scratch, and a verdict as its description.

Every step goes through main's reuse rule (pipeline.run.chain): a FINISHED run with the same step,
parameters, upstream runs and code is reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

import mlflow
import numpy as np

from pipeline.config import TransferConfig
from pipeline.errors import PipelineError
from pipeline.evaluate.transfer import (
    Arm,
    PairedTests,
    accuracy_vs_depth_figure,
    best_arm,
    markdown_table,
    paired_tests,
    parent_metrics,
    results_table,
    scratch_arm,
    verdict,
)
from pipeline.run.chain import reuse_or_run, source_fingerprint
from pipeline.run.evaluation_run import run_evaluate
from pipeline.run.runners import run_prepare, run_train
from pipeline.track import tracking
from pipeline.track.evaluation_logging import load_scored_images

RESULTS_CSV = "transfer/results.csv"
RESULTS_MD = "transfer/results.md"
PLOT = "transfer/accuracy_vs_depth.png"
TAG_SCRATCH = "pipeline.transfer.scratch"  # on the scratch baseline's training run: "true"


@dataclass(frozen=True)
class TransferRuns:
    """The run ids of one study: the parent, the two datasets, pretrain, and per arm (frozen depth, or None
    for scratch) its training and evaluate runs."""

    parent: str
    source_data: str
    target_data: str
    pretrain: str
    train: dict[int | None, str]
    evaluate: dict[int | None, str]


def run_transfer(cfg: TransferConfig, log=print) -> TransferRuns:
    """Run (or reuse) every step of the study under one parent `transfer` run and log the result on it."""
    name = f"transfer {cfg.arch} {cfg.target_samples_per_class}/class"
    with tracking.step_run("transfer", name) as parent:
        exp, parent_id = parent.info.experiment_id, parent.info.run_id
        tracking.log_params(dataclasses.asdict(cfg))

        def step(step_name: str, params: dict, upstream: dict, run) -> str:
            return reuse_or_run(step_name, params, upstream, exp, run, log, who="transfer")

        fingerprint = {"source": source_fingerprint(cfg.source)}
        src_cfg, tgt_cfg = cfg.source_prepare(), cfg.target_prepare()
        src = step("prepare_data", dataclasses.asdict(src_cfg), fingerprint,
                   lambda tags: run_prepare(src_cfg, nested=True, tags=tags))
        pre_cfg = cfg.pretrain(data=src)
        pre = step("pretrain", pre_cfg.to_params(), {"data": src},
                   lambda tags: run_train(pre_cfg, "pretrain", nested=True, tags=tags))
        tgt = step("prepare_data", dataclasses.asdict(tgt_cfg), fingerprint,
                   lambda tags: run_prepare(tgt_cfg, nested=True, tags=tags))

        train: dict[int | None, str] = {}
        for depth in cfg.depths:
            fin_cfg = cfg.finetune(depth, data=tgt, pretrained=pre)
            train[depth] = step("finetune", fin_cfg.to_params(), {"data": tgt, "pretrained": pre},
                                lambda tags, c=fin_cfg: run_train(c, "finetune", nested=True, tags=tags))
        scratch_cfg = cfg.scratch(data=tgt)
        train[None] = step("pretrain", scratch_cfg.to_params(), {"data": tgt},
                           lambda tags: run_train(scratch_cfg, "pretrain", nested=True,
                                                  tags={**tags, TAG_SCRATCH: "true"}))
        # "pretrain resnet18 lr=0.05" would read as the source's pretraining in the runs table (and in its evaluate's)
        mlflow.MlflowClient().set_tag(train[None], "mlflow.runName", f"scratch {cfg.arch} lr={cfg.scratch_lr:g}")

        evaluate: dict[int | None, str] = {}
        for arm, model in train.items():
            ev_cfg = cfg.evaluate(model, tgt)
            evaluate[arm] = step("evaluate", dataclasses.asdict(ev_cfg), {"model": model, "data": tgt},
                                 lambda tags, c=ev_cfg: run_evaluate(c, nested=True, tags=tags))

        runs = TransferRuns(parent_id, src, tgt, pre, train, evaluate)
        mlflow.set_tags({"pipeline.transfer.source_data_run": src, "pipeline.transfer.target_data_run": tgt,
                         "pipeline.transfer.pretrain_run": pre,
                         **{f"pipeline.transfer.{_suffix(a)}_train_run": r for a, r in train.items()},
                         **{f"pipeline.transfer.{_suffix(a)}_evaluate_run": r for a, r in evaluate.items()}})
        log_result(cfg, runs, log)
    return runs


def _suffix(arm: int | None) -> str:
    return "scratch" if arm is None else f"depth_{arm}"


def arm_of(depth: int | None, train_run: str, evaluate_run: str) -> Arm:
    """One arm's numbers from its training run (trainable params, seconds) and its evaluate run (test metrics)."""
    trained, scored = mlflow.get_run(train_run), mlflow.get_run(evaluate_run).data.metrics
    missing = [k for k in ("test_accuracy", "test_accuracy_ci_low", "test_f1_macro_ci_low") if k not in scored]
    if missing:
        raise PipelineError(f"evaluate run {evaluate_run} has no {', '.join(missing)}; rerun transfer")
    return Arm(frozen_depth=depth,
               test_accuracy=scored["test_accuracy"], test_accuracy_ci_low=scored["test_accuracy_ci_low"],
               test_accuracy_ci_high=scored["test_accuracy_ci_high"], test_f1_macro=scored["test_f1_macro"],
               test_f1_macro_ci_low=scored["test_f1_macro_ci_low"],
               test_f1_macro_ci_high=scored["test_f1_macro_ci_high"],
               trainable_params=int(trained.data.params["trainable_params"]),
               train_seconds=train_seconds(train_run, int(trained.data.params["train_images"])),
               run_seconds=((trained.info.end_time or trained.info.start_time) - trained.info.start_time) / 1000)


def train_seconds(run_id: str, train_images: int) -> float:
    """Seconds of the training passes: each epoch's training images over its logged images_per_sec."""
    history = mlflow.MlflowClient().get_metric_history(run_id, "images_per_sec")
    return float(sum(train_images / m.value for m in history if m.value > 0))


def tests_of(best_eval: str, scratch_eval: str, seed: int) -> PairedTests | None:
    """The paired tests of two evaluate runs, when both logged predictions on the same images."""
    a, b = load_scored_images(best_eval, "test"), load_scored_images(scratch_eval, "test")
    if a is None or b is None or a.digest != b.digest or not np.array_equal(a.y_true, b.y_true):
        return None
    return paired_tests(a.y_true, a.y_pred, b.y_pred, max(a.num_classes, b.num_classes), seed=seed)


def log_result(cfg: TransferConfig, runs: TransferRuns, log=print) -> str:
    """The table, plot, metrics, paired tests and verdict, on the active (parent) run; returns the verdict."""
    import matplotlib.pyplot as plt

    arms = [arm_of(a, runs.train[a], runs.evaluate[a]) for a in runs.train]
    best, scratch = best_arm(arms), scratch_arm(arms)
    tests = tests_of(runs.evaluate[best.frozen_depth], runs.evaluate[None], cfg.seed)
    table = results_table(arms)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(os.path.join(tmp, "results.csv"), index=False)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(markdown_table(table))
        mlflow.log_artifacts(tmp, "transfer")
    fig = accuracy_vs_depth_figure(table)
    mlflow.log_figure(fig, PLOT)
    plt.close(fig)
    tracking.log_metrics(parent_metrics(arms, tests))
    text = verdict(arms, tests, target_images=cfg.target_samples_per_class or None)
    tracking.set_note(describe(cfg, runs, text))
    log(markdown_table(table))
    log(text)
    log(f"transfer: parent run {runs.parent} (best depth {best.frozen_depth}, scratch "
        f"{scratch.test_accuracy:.4f})")
    return text


def describe(cfg: TransferConfig, runs: TransferRuns, text: str) -> str:
    """The parent's description: the verdict, the set-up, then each run and whether it was reused."""
    setup = (f"{cfg.arch} pretrained on {cfg.source_classes} ({cfg.source_samples_per_class or 'all'} images per "
             f"class, {cfg.pretrain_epochs} epochs), fine-tuned on {cfg.target_classes} "
             f"({cfg.target_samples_per_class or 'all'} images per class, {cfg.finetune_epochs} epochs) at frozen "
             f"depths {', '.join(map(str, cfg.depths))}; scratch: the same images and epochs from random init. "
             f"Source `{cfg.source}` at {cfg.image_size} px. Table: `{RESULTS_MD}`; plot: `{PLOT}`.")
    lines = [text, "", setup, ""]
    named = {"prepare_data (source)": runs.source_data, "pretrain": runs.pretrain,
             "prepare_data (target)": runs.target_data,
             **{f"{'scratch' if a is None else f'finetune frozen={a}'}": r for a, r in runs.train.items()},
             **{f"evaluate {'scratch' if a is None else f'frozen={a}'}": r for a, r in runs.evaluate.items()}}
    for label, run_id in named.items():
        parent = mlflow.get_run(run_id).data.tags.get("mlflow.parentRunId")
        lines.append(f"- {label}: {'ran' if parent == runs.parent else 'reused'} `{run_id}`")
    return "\n".join(lines)
