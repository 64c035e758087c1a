"""Issue 25's time-to-accuracy benchmark: the fast recipe (arch=airnet at its recipe defaults) trained on
the JPEG CIFAR-10 archive through the real pipeline, tracking on.

prepare_data (pipeline.run.runners.run_prepare: the archive at 32 px, a stratified 10% test carve = 5,000
images, 2% of the rest for validation, seed 0, then `samples_per_class` training images per class, 0 = all),
pretrain (run_train, arch=airnet with every recipe option left at auto) and evaluate on the carved test split
(pipeline.run.evaluation_run.run_evaluate, fp32 as served, the recipe's flip TTA; it logs the bootstrap
95% intervals), each a tracked MLflow run in a temporary sqlite store (or MLFLOW_TRACKING_URI when set).
One JSON record, `{"bench": "recipe", ...}`: test accuracy with its interval, the training run's wall seconds
and img/s, and the training compute counted from the network (forward MACs per image at the run's image
size from torch-pruning's op counter, x2 FLOP per MAC, x3 for forward + backward).

Run alone with `python -m benchmarks.recipe_bench` or as part of `make bench` (benchmarks.run; --skip-recipe
leaves it out). --recipe-samples-per-class 600 (the default, 6,000 training images) is expected to take
minutes on 2 cores; 0 trains on all 44,100 images left after the test and validation carves, 7.35x as many
(expected to take about an hour on 2 cores, not yet timed: run it in the background, see docs/performance.md).
--tiny is a smoke test: 300 of the archive's images at 16 px, one epoch, batch 32, figures meaningless.
"""

from __future__ import annotations

import os

# As benchmarks.run: passive OpenMP waiting keeps a shared 2-core box from collapsing (set before torch loads).
if os.environ.get("BENCH_OMP_DEFAULT") != "1":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from benchmarks.prune_bench import DEFAULT_ARCHIVE  # noqa: E402
from pipeline.config import ARCHS, EvaluateConfig, PrepareConfig, TrainConfig  # noqa: E402
from pipeline.data.tree import scan_image_tree  # noqa: E402
from pipeline.model.device import resolve_device  # noqa: E402
from pipeline.model.models import build_logged_net  # noqa: E402
from pipeline.model.precision import cpu_model_name  # noqa: E402
from pipeline.prune.pruning import count_macs_and_params  # noqa: E402
from pipeline.run.evaluation_run import run_evaluate  # noqa: E402
from pipeline.run.runners import TrialHooks, run_prepare, run_train  # noqa: E402
from pipeline.track.references import load_model_ref  # noqa: E402

FLOP_PER_MAC = 2
FORWARD_AND_BACKWARD = 3  # the usual count: the backward pass costs about twice the forward
EXPERIMENT = "bench-recipe"


@dataclass(frozen=True)
class RecipeBenchSettings:
    """What the bench prepares, trains and scores. Recipe options (lr, batch, schedule, ...) are the arch's."""

    archive: str = DEFAULT_ARCHIVE
    arch: str = "airnet"
    epochs: int = TrainConfig.epochs  # TrainConfig's default, 10 (airbench94 trains about 10 epochs)
    samples_per_class: int = 600  # training images per class; 0 = all (4,410 a class here)
    image_size: int = 32
    test_fraction: float = 0.1  # 5,000 of the archive's 50,000, stratified
    val_fraction: float = 0.02  # 900 of the other 45,000: fit()'s per-epoch validation, kept small
    batch_size: int | None = None  # None: the arch's recipe (airnet 1024)
    precision: str = "auto"  # pretrain's default: fp32 vs bf16 measured on this CPU
    device: str = "auto"
    subset_per_class: int = 0  # > 0: prepare from a folder of this many of the archive's images a class (--tiny)
    seed: int = 0


TINY = dict(image_size=16, epochs=1, samples_per_class=0, test_fraction=0.2, val_fraction=0.1, batch_size=32,
            precision="fp32", subset_per_class=30)  # 300 images: 60 test, 24 val, 216 train; fp32: no measuring


def tiny_settings(archive: str = DEFAULT_ARCHIVE, arch: str = "airnet") -> RecipeBenchSettings:
    return RecipeBenchSettings(archive=archive, arch=arch, **TINY)


def log_progress(message: str) -> None:
    """A line on stderr: stdout carries only the JSON record."""
    print(f"[recipe bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def tracking_store() -> Iterator[str]:
    """MLFLOW_TRACKING_URI when set (benchmarks.run sets a temporary one), else a fresh temporary sqlite
    store, kept after the bench so that its runs can be looked at (`mlflow ui --backend-store-uri <uri>`)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        from benchmarks.overhead import temporary_tracking_store

        temporary_tracking_store()
    yield os.environ["MLFLOW_TRACKING_URI"]


@contextlib.contextmanager
def data_source(s: RecipeBenchSettings) -> Iterator[str]:
    """The archive itself, or (subset_per_class > 0) a temporary `<class>/<img>` folder of the first
    subset_per_class JPEGs of each class, as they are in the archive (not re-encoded)."""
    if s.subset_per_class <= 0:
        yield s.archive
        return
    tree = scan_image_tree(s.archive)
    tmp = tempfile.mkdtemp(prefix="recipe-bench-subset-")
    try:
        taken = [0] * len(tree.class_names)
        for name, label, data in sorted(tree.files["train"], key=lambda f: f[0]):
            if taken[label] < s.subset_per_class:
                taken[label] += 1
                target = Path(tmp, tree.class_names[label], Path(name).name)
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(data)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_seconds(run_id: str) -> float:
    info = mlflow.get_run(run_id).info
    return round((info.end_time - info.start_time) / 1000, 1)


def training_compute(train_run_id: str, train_images: int, epochs: int) -> dict:
    """Forward MACs of one image of the trained network at its image size (torch-pruning's counter, as
    pipeline.prune.pruning counts them), and the training FLOP that makes: 2 FLOP a MAC, x3 forward+backward."""
    state, meta = load_model_ref(train_run_id)
    macs, params = count_macs_and_params(build_logged_net(meta, state), meta["image_size"])
    flop_per_image = macs * FLOP_PER_MAC * FORWARD_AND_BACKWARD
    return {"params": params, "forward_macs_per_image": macs, "training_flop_per_image": flop_per_image,
            "training_pflop": float(f"{flop_per_image * train_images * epochs / 1e15:.4g}")}


def device_identity(device: str) -> dict:
    dev = resolve_device(device)
    out = {"device": dev.type, "cpu_model": cpu_model_name()}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def skipped_record(reason: str) -> dict:
    return {"bench": "recipe", "skipped": True, "reason": reason}


def run_recipe_bench(s: RecipeBenchSettings) -> dict:
    """The whole bench: one record (or a skipped one when the archive is absent)."""
    if not os.path.exists(s.archive):
        return skipped_record(f"the CIFAR-10 JPEG archive is not at {s.archive} (see benchmarks/recipe_bench.py)")
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    # The pipeline prints (the precision verdict, ...) go to stderr with the progress: stdout is the record's.
    with tracking_store() as uri, contextlib.redirect_stdout(sys.stderr):
        record = train_and_score(s)
    return {"bench": "recipe", **record, "tracking_uri": uri, "settings": dataclasses.asdict(s),
            "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "bench_wall_s": round(time.perf_counter() - t0, 1)}


def train_and_score(s: RecipeBenchSettings) -> dict:
    if not os.environ.get("MLFLOW_EXPERIMENT_NAME") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(EXPERIMENT)
    with data_source(s) as source:
        log_progress(f"prepare_data from {source} at {s.image_size} px")
        prepare_id = run_prepare(PrepareConfig(source=source, image_size=s.image_size, val_fraction=s.val_fraction,
                                               test_fraction=s.test_fraction, samples_per_class=s.samples_per_class,
                                               seed=s.seed))
    counts = mlflow.get_run(prepare_id).data.metrics
    train_images, test_images = int(counts["train_images"]), int(counts["test_images"])
    cfg = TrainConfig(data=prepare_id, arch=s.arch, epochs=s.epochs, batch_size=s.batch_size, precision=s.precision,
                      device=s.device, seed=s.seed)
    recipe = cfg.resolved()
    log_progress(f"{train_images} train / {int(counts['val_images'])} val / {test_images} test images; pretrain "
                 f"{s.arch}, {s.epochs} epochs, batch {recipe.batch_size}, lr {recipe.lr:g}, {recipe.schedule}")

    def report_epoch(epoch: int, metrics: dict) -> None:
        log_progress(f"epoch {epoch}/{s.epochs}: val_accuracy {metrics['val_accuracy']:.4f}, "
                     f"{metrics['images_per_sec']:.0f} img/s, load {os.getloadavg()[0]:.1f}")

    train_id = run_train(cfg, "pretrain", hooks=TrialHooks(on_epoch=report_epoch))
    log_progress(f"scoring on the {test_images} test images")
    eval_id = run_evaluate(EvaluateConfig(model=train_id, data=prepare_id, split="test", tta=recipe.tta,
                                          device=s.device))
    train_run, test = mlflow.get_run(train_id), mlflow.get_run(eval_id).data.metrics
    rates = [m.value for m in MlflowClient().get_metric_history(train_id, "images_per_sec")]
    params = train_run.data.params
    return {
        "arch": s.arch, "image_size": s.image_size, "samples_per_class": s.samples_per_class,
        "train_images": train_images, "val_images": int(counts["val_images"]), "test_images": test_images,
        "epochs": s.epochs,
        "recipe": {name: getattr(recipe, name) for name in ("batch_size", "lr", "weight_decay", "label_smoothing",
                                                             "schedule", "warmup_epochs", "tta")},
        "test_accuracy": round(test["test_accuracy"], 4),
        "test_accuracy_ci95": [round(test["test_accuracy_ci_low"], 4), round(test["test_accuracy_ci_high"], 4)],
        "test_f1_macro": round(test["test_f1_macro"], 4), "test_tta": recipe.tta,
        "best_val_accuracy": round(train_run.data.metrics["best_val_accuracy"], 4),
        **training_compute(train_id, train_images, s.epochs),
        "train_wall_s": run_seconds(train_id),
        # The training passes alone (no validation, calibration, model logging): images / img/s, summed.
        "train_passes_s": round(sum(train_images / r for r in rates), 1),
        "train_img_per_s": round(statistics.fmean(rates), 1),
        "train_img_per_s_per_epoch": [round(r, 1) for r in rates],
        "prepare_wall_s": run_seconds(prepare_id), "evaluate_wall_s": run_seconds(eval_id),
        "precision": params.get("precision_resolved", params["precision"]),
        **({"cpu_bf16_speedup": round(train_run.data.metrics["cpu_bf16_speedup"], 2)}
           if "cpu_bf16_speedup" in train_run.data.metrics else {}),
        **device_identity(s.device), "torch_threads": torch.get_num_threads(),
        "run_status": train_run.info.status,
        "prepare_run_id": prepare_id, "train_run_id": train_id, "evaluate_run_id": eval_id,
    }


def add_arguments(p: argparse.ArgumentParser, prefix: str = "--recipe-") -> None:
    """The bench's options; benchmarks.run adds them with the --recipe- prefix beside its own."""
    d = RecipeBenchSettings()
    p.add_argument(f"{prefix}samples-per-class", type=int, default=d.samples_per_class,
                   dest="recipe_samples_per_class", help="training images per class (0 = all 4,410)")
    p.add_argument(f"{prefix}arch", default=d.arch, choices=ARCHS, dest="recipe_arch")
    p.add_argument(f"{prefix}epochs", type=int, default=d.epochs, dest="recipe_epochs")
    p.add_argument(f"{prefix}batch-size", type=int, default=None, dest="recipe_batch_size",
                   help="default: the arch's recipe")
    p.add_argument(f"{prefix}precision", default=d.precision, choices=("auto", "bf16", "fp32"),
                   dest="recipe_precision")
    p.add_argument(f"{prefix}device", default=d.device, dest="recipe_device", help="auto | cpu | cuda | cuda:K")


def settings_from(args: argparse.Namespace, archive: str, tiny: bool) -> RecipeBenchSettings:
    if tiny:
        return tiny_settings(archive, args.recipe_arch)
    return RecipeBenchSettings(archive=archive, arch=args.recipe_arch, epochs=args.recipe_epochs,
                               samples_per_class=args.recipe_samples_per_class, batch_size=args.recipe_batch_size,
                               precision=args.recipe_precision, device=args.recipe_device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", default=DEFAULT_ARCHIVE)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("BENCH_TINY") == "1",
                   help="smoke test: 300 images at 16 px, one epoch, batch 32 (also BENCH_TINY=1)")
    add_arguments(p)
    args = p.parse_args(argv)
    print(json.dumps(run_recipe_bench(settings_from(args, args.archive, args.tiny))), flush=True)


if __name__ == "__main__":
    main()
