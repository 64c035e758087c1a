"""prune as one tracked MLflow run: a trained model in, a pruned and fine-tuned model out.

The run is tagged pipeline.step=prune and holds an ordinary logged model (the same pyfunc as
pretrain/finetune), so every step that takes a model takes it. Its model_meta.json records the pruned
layers' shapes (models.PRUNED_LAYERS); models.build_logged_net rebuilds the network from them.
Before/after metrics: before_* (the model given), pruned_* (right after pruning, test scores only) and
after_* (after recovery): params, macs, size_bytes, img_per_s_b1, img_per_s_b64, test_accuracy,
test_f1_macro; plus macs_reduction, params_reduction and speedup_b1/b64 (before / after).
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from pipeline.config import PruneConfig
from pipeline.data.imageset import DatasetSplits, ImageSet
from pipeline.data.loader import prepare_input
from pipeline.errors import PipelineError
from pipeline.evaluate.scoring import EvaluationReport, score_net
from pipeline.model.device import resolve_device
from pipeline.model.models import PRUNED_LAYERS, ImageClassifier, build_logged_net, pruned_layers
from pipeline.prune.pruning import TIMED_BATCHES, measure_cost, prune_channels
from pipeline.track import registry, tracking
from pipeline.track.references import load_dataset_ref, load_model_ref
from pipeline.train.loop import fit, seed_everything

TAYLOR_BATCHES = 4  # training batches whose loss gradients score channels for importance=taylor
TEST_KEYS = ("test_accuracy", "test_f1_macro")


def run_prune(cfg: PruneConfig, nested: bool = False, tags: dict | None = None) -> str:
    """prune: score the model, remove channels, fine-tune, score again, log the pruned model; returns the run id."""
    device = resolve_device(cfg.device)
    name = f"prune ratio={cfg.pruning_ratio:g} {cfg.importance}"
    with tracking.step_run("prune", name, tags, nested, system_metrics=cfg.system_metrics) as run:
        state, meta = load_model_ref(cfg.model)
        cfg = cfg.resolved(meta["arch"])  # the recovery options left at auto: the arch's recipe
        tracking.log_params(cfg.to_params())
        ds, manifest, data_uri = load_dataset_ref(cfg.data)
        _check_classes(ds, meta)
        _log_inputs(meta, manifest, data_uri)
        seed_everything(cfg.seed)
        net = build_logged_net(meta, state)
        before, _ = _measure(net, ds, device, cfg)
        taylor = cfg.importance == "taylor"
        gradients = _gradient_batches(ds.splits["train"], ds.image_size, cfg.batch_size) if taylor else ()
        prune_channels(net, ds.image_size, cfg.pruning_ratio, cfg.importance, cfg.iterative_steps, gradients)
        pruned = _score(net, ds, device).metrics
        tracking.log_metrics({f"pruned_{k}": pruned[k] for k in TEST_KEYS})
        best = _recover(net, ds, cfg, meta["arch"])
        after, report = _measure(net, ds, device, cfg)
        _log_comparison(before, after)
        _log_pruned_model(net, ds, meta)
        tracking.set_note(_note(cfg, meta, before, after, best, run.info.run_id))
        if cfg.register_as:
            registry.register_trained_run(run.info.run_id, cfg.register_as, report, ds.splits["test"].images,
                                          ds.class_names)
        return run.info.run_id


def _check_classes(ds: DatasetSplits, meta: dict) -> None:
    if list(ds.class_names) != list(meta["class_names"]):
        raise PipelineError(
            f"dataset classes ({', '.join(ds.class_names)}) differ from the model's "
            f"({', '.join(meta['class_names'])}); prune with the dataset the model was trained on"
        )


def _log_inputs(meta: dict, manifest: dict, data_uri: str) -> None:
    """Lineage as finetune records it: the model it started from and the data it fine-tuned on."""
    mlflow.set_tags({"pipeline.upstream.data": data_uri, "pipeline.upstream.pretrained": meta["model_uri"],
                     "pipeline.upstream.pretrained_run": meta["source_run_id"], tracking.TAG_ARCH: meta["arch"]})
    tracking.log_params({"arch": meta["arch"], "num_classes": len(meta["class_names"])})
    tracking.log_dataset_input(manifest, data_uri, context="training")


def _gradient_batches(train: ImageSet, image_size: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to TAYLOR_BATCHES batches of training images drawn at random (seeded by seed_everything)."""
    order = torch.randperm(len(train))[: TAYLOR_BATCHES * batch_size].numpy()
    batches = []
    for start in range(0, len(order), batch_size):
        rows = np.sort(order[start : start + batch_size])
        x = prepare_input(torch.from_numpy(train.images[rows]), image_size).float()
        batches.append((x, torch.from_numpy(train.labels[rows]).long()))
    return batches


def _score(net: torch.nn.Module, ds: DatasetSplits, device: torch.device) -> EvaluationReport:
    """Test scores in fp32, as the served model computes them."""
    test = ds.splits["test"]
    return score_net(net, test.images, test.labels, ds.class_names, "test", device, "fp32")


def _measure(net, ds: DatasetSplits, device, cfg: PruneConfig) -> tuple[dict[str, float], EvaluationReport]:
    """Cost on the CPU (params, MACs, size, img/s) and test scores: the numbers before/after compare."""
    report = _score(net, ds, device)
    cost = measure_cost(net, ds.image_size, cfg.timing_seconds, cfg.timing_threads)
    return {**cost, **{k: report.metrics[k] for k in TEST_KEYS}}, report


def _recover(net, ds: DatasetSplits, cfg: PruneConfig, arch: str) -> dict[str, float]:
    """Fine-tune the pruned net (recovery_epochs, the usual training options); the best epoch's val metrics."""
    if cfg.recovery_epochs == 0:
        return {}

    def log_epoch(epoch: int, metrics: dict) -> None:
        tracking.log_metrics(metrics, step=epoch)

    result = fit(net, ds.splits["train"], ds.splits["val"], cfg.recovery_config(arch), ds.num_classes, log_epoch)
    best_val = {f"best_{k}": v for k, v in result.best_metrics.items() if k.startswith("val_")}
    tracking.log_metrics({"best_epoch": result.best_epoch, **best_val})
    return best_val


def _log_comparison(before: dict[str, float], after: dict[str, float]) -> None:
    tracking.log_metrics({**{f"before_{k}": v for k, v in before.items()},
                          **{f"after_{k}": v for k, v in after.items()},
                          "macs_reduction": before["macs"] / after["macs"],
                          "params_reduction": before["params"] / after["params"],
                          **{f"speedup_b{b}": after[f"img_per_s_b{b}"] / before[f"img_per_s_b{b}"]
                             for b in TIMED_BATCHES}})


def _log_pruned_model(net, ds: DatasetSplits, meta: dict) -> None:
    """The pruned net as an ordinary logged model; its metadata records the pruned layers' shapes."""
    net.cpu()
    new_meta = {"arch": meta["arch"], "num_classes": ds.num_classes, "class_names": ds.class_names,
                "image_size": ds.image_size, "dropout": meta.get("dropout", 0.0),
                PRUNED_LAYERS: pruned_layers(net, meta["arch"], ds.num_classes)}
    tracking.log_model(ImageClassifier(net, ds.class_names, ds.image_size), new_meta, ds.splits["val"].images[:2])


def _note(cfg: PruneConfig, meta: dict, before: dict, after: dict, best: dict, run_id: str) -> str:
    recovery = f"fine-tuned {cfg.recovery_epochs} epochs at lr {cfg.lr:g}" if cfg.recovery_epochs else "not fine-tuned"
    return (f"Pruned {cfg.pruning_ratio:.0%} of the channels ({cfg.importance}, {cfg.iterative_steps} steps) of "
            f"`{meta['model_uri']}` ({meta['arch']}), {recovery}. MACs {before['macs'] / 1e6:.1f}M -> "
            f"{after['macs'] / 1e6:.1f}M, params {before['params'] / 1e6:.2f}M -> {after['params'] / 1e6:.2f}M, "
            f"CPU img/s at batch 64 {before['img_per_s_b64']:.0f} -> {after['img_per_s_b64']:.0f}, test accuracy "
            f"{before['test_accuracy']:.4f} -> {after['test_accuracy']:.4f}"
            + (f" (best val macro-F1 {best['best_val_f1_macro']:.4f})" if "best_val_f1_macro" in best else "")
            + f". Model: `runs:/{run_id}/{tracking.MODEL_NAME}`.")
