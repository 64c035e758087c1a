"""Issue 15's performance target: a pruned ResNet-18 against its unpruned parent, side by side.

On the JPEG CIFAR-10 archive at 32 px: train the parent (small-stem ResNet-18, pipeline.train.loop.fit),
prune a copy with pipeline.prune.pruning.prune_channels, recover it with fit at a lower lr (as the prune
step does), then measure both in the same run: params, MACs, CPU inference img/s at batch 1 and 64
(pipeline.prune.pruning.measure_cost, parent and pruned alternated round by round so a change of load hits
both) and test accuracy on the same held-out images. One JSON record, `{"bench": "prune", ...}`, with
the ratios and `target_met` per criterion:

    macs_reduction >= 2.5, accuracy_drop_points <= 1.5, speedup_b1 and speedup_b64 >= 2.

Torch and the pipeline core only (no mlflow, no optuna). Run alone with `python -m benchmarks.prune_bench`
or as part of `make bench` (benchmarks.run; --skip-prune leaves it out). --tiny is a smoke test: a few
images at 16 px, one epoch each, figures meaningless.
"""

from __future__ import annotations

import os

# As benchmarks.run: passive OpenMP waiting keeps a shared 2-core box from collapsing (set before torch loads).
if os.environ.get("BENCH_OMP_DEFAULT") != "1":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data.imageset import ImageSet  # noqa: E402
from pipeline.data.tree import decode_tree, scan_image_tree  # noqa: E402
from pipeline.evaluate.scoring import score_net  # noqa: E402
from pipeline.model.models import create_model  # noqa: E402
from pipeline.model.precision import resolve_cpu_amp_dtype  # noqa: E402
from pipeline.prune.pruning import TIMED_BATCHES, measure_cost, prune_channels  # noqa: E402
from pipeline.train.loop import fit, seed_everything  # noqa: E402

DEFAULT_ARCHIVE = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10-jpeg-train.tar.gz"))
ARCH = "resnet18"  # create_model's small-image ResNet-18 (3x3/1 stem, no max-pool), as pretrain builds it
# The target.
MIN_MACS_REDUCTION = 2.5
MAX_ACCURACY_DROP_POINTS = 1.5
MIN_SPEEDUP = 2.0
CPU = torch.device("cpu")


@dataclass(frozen=True)
class PruneBenchSettings:
    """What the bench trains, prunes and times. Defaults: 9 minutes on a quiet 2-core CPU, 24 at load 2-5."""

    archive: str = DEFAULT_ARCHIVE
    image_size: int = 32
    train_per_class: int = 600  # 6,000 training images: enough for a sensible parent in the time
    val_per_class: int = 50  # fit() picks its best epoch on these (disjoint from train and test)
    test_images: int = 2000  # held out, stratified, disjoint from train and val; both models scored on them
    epochs: int = 10  # the parent's training
    recovery_epochs: int = 5  # the pruned copy's fine-tuning (on top of the parent's epochs it inherits)
    batch_size: int = 128
    lr: float = 0.05  # TrainConfig's default (SGD Nesterov, cosine)
    recovery_lr: float = 0.01  # PruneConfig's default lr: recovery fine-tunes, it does not retrain
    pruning_ratio: float = 0.5  # ~(1 - 0.5)^2 of the MACs are left: 4.0x fewer measured here
    importance: str = "magnitude"
    precision: str = "auto"  # settled by measuring fp32 vs bf16 on this CPU, as pretrain does
    train_threads: int = 2  # at most 2 torch threads for training (a shared 2-core box)
    timing_threads: int = 1  # the prune step's default: more threads than free cores ran far slower
    timing_seconds: float = 1.0  # per img/s measurement
    timing_rounds: int = 3  # parent/pruned alternations; medians reported
    seed: int = 0


TINY = dict(image_size=16, train_per_class=6, val_per_class=2, test_images=20, epochs=1, recovery_epochs=1,
            batch_size=32, precision="fp32", timing_seconds=0.05, timing_rounds=1)  # fp32: no ~1 s measurement


def tiny_settings(archive: str = DEFAULT_ARCHIVE) -> PruneBenchSettings:
    return PruneBenchSettings(archive=archive, **TINY)


def load_splits(s: PruneBenchSettings) -> tuple[list[str], ImageSet, ImageSet, ImageSet]:
    """Stratified, disjoint train / val / test sets from the archive's train/ split, seed fixed.

    The archive is scanned once and only the chosen files are decoded (read_image_tree is scan + decode
    of everything: decoding all 50,000 JPEGs would cost the tiny mode most of its seconds)."""
    tree = scan_image_tree(s.archive)
    files = tree.files["train"]
    num_classes = len(tree.class_names)
    labels = np.array([label for _, label, _ in files])
    train_idx, val_idx, test_idx = pick_stratified(labels, num_classes, s)
    chosen = np.concatenate([train_idx, val_idx, test_idx])
    decoded = decode_tree(dataclasses.replace(tree, files={"train": [files[i] for i in chosen]}), s.image_size,
                          on_bad_image="fail").splits["train"]
    cut = np.cumsum([len(train_idx), len(val_idx)])
    parts = np.split(np.arange(len(chosen)), cut)
    return (tree.class_names, *(decoded.subset(p) for p in parts))


def pick_stratified(labels: np.ndarray, num_classes: int, s: PruneBenchSettings) -> list[np.ndarray]:
    """Per class, shuffled once: the first test_images / num_classes go to test, then val, then train."""
    rng = np.random.default_rng(s.seed)
    test_per_class = max(1, s.test_images // num_classes)
    train, val, test = [], [], []
    for c in range(num_classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        need = test_per_class + s.val_per_class + s.train_per_class
        if len(rows) < need:
            raise SystemExit(f"class {c} has {len(rows)} images; the bench needs {need} per class")
        test.append(rows[:test_per_class])
        val.append(rows[test_per_class : test_per_class + s.val_per_class])
        train.append(rows[test_per_class + s.val_per_class : need])
    return [np.sort(np.concatenate(x)) for x in (train, val, test)]


def settle_precision(s: PruneBenchSettings, num_classes: int) -> tuple[str, dict]:
    """precision=auto: measured fp32 vs bf16 for this network (what pretrain's runner does); the choice
    trains both the parent and the recovery (the prune step would pass "auto" on, fp32 without AMX)."""
    if s.precision != "auto":
        return s.precision, {}
    _, verdict = resolve_cpu_amp_dtype(ARCH, s.image_size, s.batch_size, num_classes)
    return verdict.choice, {"auto_choice": verdict.choice, "auto_measured_ratio": round(verdict.ratio, 2)}


def train_config(s: PruneBenchSettings, precision: str, epochs: int, lr: float) -> TrainConfig:
    # checkpoint_every is irrelevant (no checkpoint path); system_metrics off: no tracking here.
    return TrainConfig(arch=ARCH, epochs=epochs, batch_size=s.batch_size, lr=lr, precision=precision, device="cpu",
                       seed=s.seed, system_metrics=False)


def log_progress(message: str) -> None:
    """A line on stderr: the default run takes 9-25 minutes and stdout carries only the JSON record."""
    print(f"[prune bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def train(net: torch.nn.Module, train_set: ImageSet, val: ImageSet, cfg: TrainConfig, num_classes: int,
          name: str) -> dict:
    """fit() in place; what it did: epochs, best epoch, img/s and the val accuracy curve."""
    def report_epoch(epoch: int, metrics: dict) -> None:
        log_progress(f"{name} epoch {epoch}/{cfg.epochs}: val_accuracy {metrics['val_accuracy']:.4f}, "
                     f"{metrics['images_per_sec']:.0f} img/s, load {os.getloadavg()[0]:.1f}")

    t0 = time.perf_counter()
    result = fit(net, train_set, val, cfg, num_classes, report_epoch)
    return {"epochs": cfg.epochs, "lr": cfg.lr, "images": len(train_set), "best_epoch": result.best_epoch,
            "train_s": round(time.perf_counter() - t0, 1),
            "img_per_s": round(statistics.median(h["images_per_sec"] for h in result.history), 1),
            "val_accuracy_per_epoch": [round(h["val_accuracy"], 4) for h in result.history]}


def score(net: torch.nn.Module, test: ImageSet, class_names: list[str]) -> float:
    """Test accuracy in fp32, as the served model computes it (the prune step scores so)."""
    return score_net(net, test.images, test.labels, class_names, "test", CPU, "fp32").metrics["test_accuracy"]


def time_side_by_side(parent: torch.nn.Module, pruned: torch.nn.Module, s: PruneBenchSettings) -> dict:
    """measure_cost of both, alternated (parent first, then pruned first, ...); medians of the rounds."""
    rates: dict[str, dict[int, list[float]]] = {"parent": {b: [] for b in TIMED_BATCHES},
                                                "pruned": {b: [] for b in TIMED_BATCHES}}
    static = {}
    for r in range(s.timing_rounds):
        order = (("parent", parent), ("pruned", pruned)) if r % 2 == 0 else (("pruned", pruned), ("parent", parent))
        for name, net in order:
            cost = measure_cost(net, s.image_size, s.timing_seconds, s.timing_threads)
            static[name] = {k: cost[k] for k in ("params", "macs", "size_bytes")}
            for b in TIMED_BATCHES:
                rates[name][b].append(cost[f"img_per_s_b{b}"])
    return {name: {**static[name], **{f"img_per_s_b{b}": round(statistics.median(v), 1) for b, v in by_b.items()},
                   **{f"img_per_s_b{b}_rounds": [round(x, 1) for x in v] for b, v in by_b.items()}}
            for name, by_b in rates.items()}


def compare(parent: dict, pruned: dict, test_images: int) -> dict:
    """The ratios the target is stated in, and whether each criterion is met."""
    drop = 100 * (parent["test_accuracy"] - pruned["test_accuracy"])
    ratios = {"macs_reduction": round(parent["macs"] / pruned["macs"], 2),
              "params_reduction": round(parent["params"] / pruned["params"], 2),
              **{f"speedup_b{b}": round(pruned[f"img_per_s_b{b}"] / parent[f"img_per_s_b{b}"], 2)
                 for b in TIMED_BATCHES},
              "accuracy_drop_points": round(drop, 2),
              # For reading the drop: one standard error of a difference of two proportions on these images
              # (unpaired, so an upper bound for the same images).
              "accuracy_drop_se_points": round(100 * math.sqrt(sum(a * (1 - a) / test_images for a in (
                  parent["test_accuracy"], pruned["test_accuracy"]))), 2)}
    met = {"macs_reduction": ratios["macs_reduction"] >= MIN_MACS_REDUCTION,
           "accuracy_drop": drop <= MAX_ACCURACY_DROP_POINTS,
           **{f"speedup_b{b}": ratios[f"speedup_b{b}"] >= MIN_SPEEDUP for b in TIMED_BATCHES}}
    return {**ratios, "target": {"min_macs_reduction": MIN_MACS_REDUCTION,
                                 "max_accuracy_drop_points": MAX_ACCURACY_DROP_POINTS, "min_speedup": MIN_SPEEDUP},
            "target_met": {**met, "all": all(met.values())}}


def skipped_record(reason: str) -> dict:
    return {"bench": "prune", "skipped": True, "reason": reason}


def run_prune_bench(s: PruneBenchSettings) -> dict:
    """The whole bench: one record (or a skipped one when the archive is absent)."""
    if not os.path.exists(s.archive):
        return skipped_record(f"the CIFAR-10 JPEG archive is not at {s.archive} (see benchmarks/prune_bench.py)")
    t0, threads = time.perf_counter(), torch.get_num_threads()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(min(s.train_threads, os.cpu_count() or 1))
    try:
        record = measure_parent_and_pruned(s)
    finally:
        torch.set_num_threads(threads)  # the rest of `make bench` keeps its own setting
    return {"bench": "prune", **record, "settings": dataclasses.asdict(s),
            "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "wall_s": round(time.perf_counter() - t0, 1)}


def measure_parent_and_pruned(s: PruneBenchSettings) -> dict:
    class_names, train_set, val, test = load_splits(s)
    num_classes = len(class_names)
    precision, verdict = settle_precision(s, num_classes)
    log_progress(f"{len(train_set)} train / {len(val)} val / {len(test)} test images; training in {precision}")
    seed_everything(s.seed)
    parent = create_model(ARCH, num_classes)
    parent_trained = train(parent, train_set, val, train_config(s, precision, s.epochs, s.lr), num_classes,
                           "parent")
    pruned = copy.deepcopy(parent).cpu()
    prune_channels(pruned, s.image_size, s.pruning_ratio, s.importance)
    pruned_before_recovery = score(pruned, test, class_names)
    recovered = train(pruned, train_set, val, train_config(s, precision, s.recovery_epochs, s.recovery_lr),
                      num_classes, "recovery")
    log_progress("timing parent and pruned, alternated")
    costs = time_side_by_side(parent, pruned, s)
    costs["parent"]["test_accuracy"] = round(score(parent, test, class_names), 4)
    costs["pruned"]["test_accuracy"] = round(score(pruned, test, class_names), 4)
    costs["pruned"]["test_accuracy_before_recovery"] = round(pruned_before_recovery, 4)
    # What each trained for: the pruned model starts from the parent's weights, so it has seen the parent's
    # epochs plus the recovery's; the parent's val curve shows whether more epochs would still have helped it.
    costs["parent"]["trained"] = parent_trained
    costs["pruned"]["trained"] = {**recovered, "inherited_parent_epochs": s.epochs,
                                  "total_epochs": s.epochs + s.recovery_epochs}
    return {"arch": ARCH, "image_size": s.image_size, "train_images": len(train_set), "val_images": len(val),
            "test_images": len(test), "precision": precision, **verdict, "train_threads": torch.get_num_threads(),
            "pruning_ratio": s.pruning_ratio, "importance": s.importance,
            "parent": costs["parent"], "pruned": costs["pruned"],
            **compare(costs["parent"], costs["pruned"], len(test))}


def add_arguments(p: argparse.ArgumentParser, prefix: str = "--prune-") -> None:
    """The bench's options; benchmarks.run adds them with the --prune- prefix beside its own."""
    d = PruneBenchSettings()
    p.add_argument(f"{prefix}train-per-class", type=int, default=d.train_per_class, dest="prune_train_per_class")
    p.add_argument(f"{prefix}test-images", type=int, default=d.test_images, dest="prune_test_images")
    p.add_argument(f"{prefix}epochs", type=int, default=d.epochs, dest="prune_epochs", help="the parent's epochs")
    p.add_argument(f"{prefix}recovery-epochs", type=int, default=d.recovery_epochs, dest="prune_recovery_epochs")
    p.add_argument(f"{prefix}ratio", type=float, default=d.pruning_ratio, dest="prune_ratio",
                   help="share of channels removed (0.5 gives ~4x fewer MACs)")
    p.add_argument(f"{prefix}precision", default=d.precision, choices=("auto", "bf16", "fp32"), dest="prune_precision")
    p.add_argument(f"{prefix}timing-rounds", type=int, default=d.timing_rounds, dest="prune_timing_rounds")


def settings_from(args: argparse.Namespace, archive: str, tiny: bool) -> PruneBenchSettings:
    if tiny:
        return tiny_settings(archive)
    return PruneBenchSettings(archive=archive, train_per_class=args.prune_train_per_class,
                              test_images=args.prune_test_images, epochs=args.prune_epochs,
                              recovery_epochs=args.prune_recovery_epochs, pruning_ratio=args.prune_ratio,
                              precision=args.prune_precision, timing_rounds=args.prune_timing_rounds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prune_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", default=DEFAULT_ARCHIVE)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("BENCH_TINY") == "1",
                   help="smoke test: a few images at 16 px, one epoch each (also BENCH_TINY=1)")
    add_arguments(p)
    args = p.parse_args(argv)
    print(json.dumps(run_prune_bench(settings_from(args, args.archive, args.tiny))), flush=True)


if __name__ == "__main__":
    main()
