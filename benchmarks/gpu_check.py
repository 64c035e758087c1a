"""The GPU figures in one go, on a bare GPU machine: torch and the pipeline core only (no mlflow,
no optuna, no network), fit() called directly on an image archive.

    python -m benchmarks.gpu_check --archive PATH [--out DIR] [--device cuda]

Prints one JSON line per section and writes them to DIR/gpu_check.jsonl:
  warmup      first-epoch cost of cuDNN autotuning (and torch.compile), ResNet-9, compile off / on
  throughput  steady img/s per architecture, fit() next to the classic DataLoader loop
  recipe      the ResNet-9 recipe on the archive (90/10 stratified split): seconds to 90% / 93%
              validation accuracy, per-epoch accuracy
and each section's peak GPU memory (torch.cuda.max_memory_allocated). --device cuda stops at once
when no CUDA GPU is visible; --tiny (BENCH_TINY=1) runs everything tiny on the CPU, on a generated
archive when none is given (a smoke test of the script; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch

from benchmarks.throughput import Case, compare
from pipeline.config import TrainConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.sources import read_image_tree
from pipeline.model.models import create_model
from pipeline.train.loop import fit, seed_everything

TARGETS = (0.90, 0.93)
GPU_CASES = (Case("resnet9", "small", warmup=20, steps=100), Case("resnet18", "small", warmup=10, steps=50),
             Case("resnet50", "imagenet", warmup=10, steps=50))
TINY_CASES = (Case("resnet9", "small", warmup=1, steps=1),)


def emit(out: str, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(out, "gpu_check.jsonl"), "a") as f:
        f.write(line + "\n")


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def write_tiny_archive(folder: str, per_class: int = 24, size: int = 16) -> str:
    """A .tar.gz of PNGs in two classes whose colour tells them apart: the archive path, end to end."""
    from PIL import Image

    rng = np.random.default_rng(0)
    path = os.path.join(folder, "tiny.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for label, name in enumerate(("red", "blue")):
            for i in range(per_class):
                pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                pixels[..., 2 * label] += 120
                file = os.path.join(folder, f"{name}{i}.png")
                Image.fromarray(pixels).save(file)
                tar.add(file, arcname=f"train/{name}/{i}.png")
    return path


def split_stratified(images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int = 0):
    """(train, val) ImageSets with val_fraction of every class held out (numpy only: no sklearn here)."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val_idx.extend(idx[: max(1, round(len(idx) * val_fraction))])
    is_val = np.zeros(len(labels), bool)
    is_val[val_idx] = True
    return ImageSet(images[~is_val], labels[~is_val]), ImageSet(images[is_val], labels[is_val])


def recipe_config(args, epochs: int, compile: bool = False) -> TrainConfig:
    """The airbench-style ResNet-9 recipe the pipeline exposes as parameters."""
    return TrainConfig(data="gpu-check", arch="resnet9", epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                       optimizer="sgd", weight_decay=5e-4, label_smoothing=0.2, schedule="onecycle", augment="basic",
                       ema=args.ema, tta=True, compile=compile, precision=args.precision, device=args.device,
                       seed=0)


def measure_warmup(args, train: ImageSet, val: ImageSet, classes: int, device: torch.device, compile: bool) -> dict:
    """First epoch vs second epoch of the same fit(): the difference is the one-time kernel choice / compile."""
    n = min(len(train), args.batch_size * args.warmup_steps)
    times = []
    start = [time.perf_counter()]

    def on_epoch(epoch, metrics):
        times.append(time.perf_counter() - start[0])
        start[0] = time.perf_counter()

    seed_everything(0)
    reset_peak(device)
    net = create_model("resnet9", classes)
    fit(net, train.subset(np.arange(n)), val, recipe_config(args, 2, compile), classes, on_epoch=on_epoch)
    return {"section": "warmup", "arch": "resnet9", "compile": compile, "images_per_epoch": n,
            "first_epoch_s": round(times[0], 2), "second_epoch_s": round(times[1], 2),
            "warmup_s": round(times[0] - times[1], 2), "peak_gpu_mb": peak_memory_mb(device)}


def measure_recipe(args, train: ImageSet, val: ImageSet, classes: int, device: torch.device) -> dict:
    """Seconds (wall, training and validation) until the validation accuracy first reaches each target."""
    history, t0 = [], [0.0]

    def on_epoch(epoch, metrics):
        history.append({"epoch": epoch, "s": round(time.perf_counter() - t0[0], 2),
                        "val_accuracy": round(metrics["val_accuracy"], 4),
                        "images_per_sec": round(metrics["images_per_sec"], 1)})

    seed_everything(0)
    reset_peak(device)
    net = create_model("resnet9", classes)
    t0[0] = time.perf_counter()
    fit(net, train, val, recipe_config(args, args.epochs), classes, on_epoch=on_epoch)
    reached = {f"s_to_{round(100 * t)}pct": next((h["s"] for h in history if h["val_accuracy"] >= t), None)
               for t in TARGETS}
    return {"section": "recipe", "arch": "resnet9", "train_images": len(train), "val_images": len(val),
            **reached, "best_val_accuracy": max(h["val_accuracy"] for h in history),
            "fit_s": history[-1]["s"], "peak_gpu_mb": peak_memory_mb(device), "epochs": history}


def throughput_images(train: ImageSet, need: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.resize(np.random.default_rng(0).permutation(len(train)), need)  # round again if short
    return np.ascontiguousarray(train.images[idx]), train.labels[idx]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", default=os.environ.get("ARCHIVE", ""), help="image archive (folder/.tar.gz/.zip)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    p.add_argument("--device", default="cuda", help="cuda | cuda:K (cpu only with --tiny)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--epochs", type=int, default=int(os.environ.get("EPOCHS", 16)))
    p.add_argument("--batch-size", type=int, default=int(os.environ.get("BATCH", 512)))
    p.add_argument("--lr", type=float, default=float(os.environ.get("LR", 0.2)))
    p.add_argument("--ema", type=float, default=float(os.environ.get("EMA", 0.99)))
    p.add_argument("--warmup-steps", type=int, default=40, help="batches per warm-up epoch")
    p.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", 2)))
    p.add_argument("--compile", type=int, default=int(os.environ.get("COMPILE", 1)), help="also time compile's warm-up")
    p.add_argument("--tiny", action="store_true", default=os.environ.get("BENCH_TINY") == "1")
    args = p.parse_args(argv)
    if args.tiny:
        args.device, args.epochs, args.batch_size, args.warmup_steps, args.rounds = "cpu", 2, 16, 2, 1
        args.compile = 0  # compiling on a CPU takes minutes; the GPU run times it
    elif not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device} but torch {torch.__version__} sees no CUDA GPU; "
                 "run on a GPU machine (BENCH_TINY=1 for the CPU smoke test)")
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    open(os.path.join(args.out, "gpu_check.jsonl"), "w").close()
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive or (write_tiny_archive(tmp) if args.tiny else "")
        if not archive or not os.path.exists(archive):
            sys.exit(f"error: archive {archive!r} not found; pass ARCHIVE=path (copied into the tree first)")
        t0 = time.perf_counter()
        tree = read_image_tree(archive, 16 if args.tiny else 32)
        source = tree.splits["train"]
        classes = len(tree.class_names)
        train, val = split_stratified(source.images, source.labels, 0.1)
    emit(args.out, {"section": "system", "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "archive": os.path.basename(archive), "images": len(source), "classes": classes,
                    "decode_s": round(time.perf_counter() - t0, 1)})
    for compile in (False, True) if args.compile else (False,):
        try:
            emit(args.out, measure_warmup(args, train, val, classes, device, compile))
        except Exception as exc:  # torch.compile needs a working compiler toolchain; report, go on
            emit(args.out, {"section": "warmup", "compile": compile, "error": f"{type(exc).__name__}: {exc}"[:500]})
    for case in TINY_CASES if args.tiny else GPU_CASES:
        batch = args.batch_size if case.arch == "resnet9" else 256
        images, labels = throughput_images(train, (case.warmup + case.steps) * batch)
        reset_peak(device)
        for record in compare(case, images, labels, batch, args.rounds, args.device, (args.precision,)):
            emit(args.out, {"section": "throughput", **record, "peak_gpu_mb": peak_memory_mb(device)})
    emit(args.out, measure_recipe(args, train, val, classes, device))


if __name__ == "__main__":
    main()
