"""One timed ResNet-9 pretrain on the CIFAR-10 JPEG archive, through the product's own steps.

    python -m benchmarks.pretrain_check --out DIR [--epochs 20 --batch-size 512 --lr 0.2 ...]

prepare_data carves 10% of the archive's 50,000 images (5,000, stratified) for validation and no
test split (test_fraction=0); pretrain then trains ResNet-9 with the airbench-style recipe the
pipeline exposes as parameters (SGD Nesterov, one-cycle, label smoothing, weight EMA, flip TTA at
validation, bf16 where the hardware has it). Writes DIR/pretrain_resnet9.json: wall times (prepare,
the whole tracked step, fit, the epoch loop's tracking), per-epoch metrics, the best epoch.
MLflow writes to a temporary store. --tiny: two classes, 16x16, 32 images per class, 1 epoch (a
CPU smoke test of the script, not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import mlflow
import torch

from benchmarks.overhead import Probe, probed_run_train, temporary_tracking_store, use_experiment
from benchmarks.run import DEFAULT_ARCHIVE, system_record
from pipeline.config import PrepareConfig, TrainConfig
from pipeline.run.runners import run_prepare, run_train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrain_check")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--archive", default=os.path.normpath(DEFAULT_ARCHIVE))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.2)
    p.add_argument("--ema", type=float, default=0.99, help="per-step weight EMA decay (0 = off)")
    p.add_argument("--tta", type=int, default=1)
    p.add_argument("--compile", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", default=os.environ.get("BENCH_TINY") == "1")
    args = p.parse_args(argv)

    temporary_tracking_store()
    use_experiment("gpu-check-pretrain")
    prep_cfg = PrepareConfig(source=args.archive, val_fraction=0.1, test_fraction=0.0, seed=0)
    if args.tiny:
        prep_cfg = PrepareConfig(source=args.archive, val_fraction=0.1, test_fraction=0.0, seed=0,
                                 image_size=16, classes="airplane,automobile", samples_per_class=32)
        args.epochs, args.batch_size = 1, 16
    t0 = time.perf_counter()
    prep = run_prepare(prep_cfg)
    prepare_s = time.perf_counter() - t0
    counts = {k: int(v) for k, v in mlflow.get_run(prep).data.metrics.items() if k.endswith("_images")}

    cfg = TrainConfig(
        data=prep, arch="resnet9", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        optimizer="sgd", weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        schedule="onecycle", augment="basic", ema=args.ema, tta=bool(args.tta), compile=bool(args.compile),
        precision=args.precision, device=args.device, seed=0,
    )
    with probed_run_train(Probe()) as probe:
        t0 = time.perf_counter()
        run_id = run_train(cfg, "pretrain")
        train_step_s = time.perf_counter() - t0

    client = mlflow.MlflowClient()
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro", "images_per_sec", "lr")
    history: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            history.setdefault(m.step, {"epoch": m.step})[key] = m.value
    epochs = [history[k] for k in sorted(history)]
    train_loop_s = sum(counts.get("train_images", 0) / e["images_per_sec"] for e in epochs if e.get("images_per_sec"))
    run_metrics = mlflow.get_run(run_id).data.metrics
    result = {
        "system": system_record(args.device, args.precision),
        "dataset": {"source": os.path.basename(args.archive), **counts, "val_fraction": 0.1, "test_fraction": 0.0},
        "config": cfg.to_params(),
        "prepare_s": round(prepare_s, 1),
        "pretrain_step_s": round(train_step_s, 1),  # the whole tracked step: load, fit, model logging
        "fit_s": round(probe.fit_s, 1),  # training + per-epoch validation + checkpoints
        "train_loop_s": round(train_loop_s, 1),  # the epochs' training passes alone
        "tracking_in_loop_s": round(probe.callback_s + probe.checkpoint_write_s, 2),
        "tracking_in_loop_pct_of_fit": round(
            100 * (probe.callback_s + probe.checkpoint_write_s) / max(probe.fit_s, 1e-9), 1
        ),
        "checkpoint_write_s": round(probe.checkpoint_write_s, 2),
        "checkpoint_upload_s": round(probe.checkpoint_upload_s, 2),
        "best_epoch": run_metrics.get("best_epoch"),
        "best_val_accuracy": run_metrics.get("best_val_accuracy"),
        "best_val_f1_macro": run_metrics.get("best_val_f1_macro"),
        "final_val_accuracy": epochs[-1].get("val_accuracy") if epochs else None,
        "epochs": epochs,
        "tiny": args.tiny,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pretrain_resnet9.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    summary = {
        k: result[k]
        for k in (
            "prepare_s",
            "pretrain_step_s",
            "fit_s",
            "train_loop_s",
            "tracking_in_loop_pct_of_fit",
            "best_epoch",
            "best_val_accuracy",
            "final_val_accuracy",
        )
    }
    print(
        json.dumps({"bench": "pretrain_resnet9", "device": result["system"]["device"], **summary, "written": path}),
        flush=True,
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
