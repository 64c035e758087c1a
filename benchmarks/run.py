"""`make bench`: the pipeline's training loop vs the classic loop, then tracking and tuning overhead.

Prints one JSON line per measurement on stdout:
    {"bench": "system", ...}                      the machine (CPU model, bf16/AMX flags), threads
    {"arch": ..., "stem": ..., "precision": ..., "classic_img_s": ..., "pipeline_img_s": ..., "ratio": ...}
    {"bench": "precision", "fp32_img_s": ..., "bf16_img_s": ..., "auto_img_s": ..., "auto_choice": ...}
                                                  per case, when more than one precision ran
    {"bench": "tracking_overhead", "overhead_pct": ..., ...}
    {"bench": "tuning_overhead", "per_trial_s": ..., ...}
    {"bench": "prune", "parent": ..., "pruned": ..., "macs_reduction": ..., "target_met": ...}
                                                  issue 15's target (benchmarks.prune_bench; --skip-prune)
    {"bench": "recipe", "test_accuracy": ..., "test_accuracy_ci95": ..., "train_wall_s": ..., "training_pflop": ...}
                                                  issue 25's time-to-accuracy: airnet's recipe through the tracked
                                                  pipeline (benchmarks.recipe_bench; --skip-recipe)
    {"bench": "total", "wall_s": ...}

Defaults fit a 2-core CPU in a few minutes; on a GPU pass more steps (benchmarks/gpu_check.sh).
BENCH_TINY=1 (or --tiny) runs one step of everything: a smoke test of the harness, not a figure.
MLflow writes to a temporary store, never to ./mlflow.db; precision=auto measures into a temporary
cache (PIPELINE_CACHE_DIR), so every bench shows a fresh verdict and what it cost.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait collapse throughput as soon as anything else wants the
# cores (the pipeline loop ran 4x slower on a shared 2-core box); passive waiting keeps the figures
# stable. It must be set before torch loads its OpenMP runtime. An explicit OMP_WAIT_POLICY wins;
# BENCH_OMP_DEFAULT=1 leaves the runtime's default (spin, then sleep) alone.
if os.environ.get("BENCH_OMP_DEFAULT") != "1":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.prune_bench import add_arguments as add_prune_arguments  # noqa: E402
from benchmarks.prune_bench import run_prune_bench, settings_from  # noqa: E402
from benchmarks.recipe_bench import add_arguments as add_recipe_arguments  # noqa: E402
from benchmarks.recipe_bench import run_recipe_bench  # noqa: E402
from benchmarks.recipe_bench import settings_from as recipe_settings_from  # noqa: E402
from benchmarks.throughput import CPU_CASES, Case, compare, summarize_precisions  # noqa: E402
from pipeline.model.device import resolve_amp_dtype, resolve_device  # noqa: E402
from pipeline.model.precision import CACHE_ENV, cpu_model_name  # noqa: E402

DEFAULT_ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10-jpeg-train.tar.gz")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx_ne_convert")  # what the CPU says; the bench measures


def cpu_identity() -> dict:
    flags = cpu_flags()
    return {"cpu_model": cpu_model_name(), "cpu_bf16_flags": [f for f in BF16_FLAGS if f in flags]}


def system_record(device: str, precision: str) -> dict:
    """The machine; with one precision, also the autocast dtype pipeline.model.device.resolve_amp_dtype gives it."""
    dev = resolve_device(device)
    flags = cpu_flags()
    rec = {
        "bench": "system",
        "cpu": platform.processor() or platform.machine(),
        **cpu_identity(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "device": dev.type,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if "," not in precision:
        amp = resolve_amp_dtype(precision, dev)
        rec["pipeline_precision"] = str(amp).replace("torch.", "") if amp else "fp32"
    if dev.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name()
    return rec


def load_images(kind: str, n: int, image_size: int, archive: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 NHWC images with labels: random pixels, or the JPEG archive decoded once."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8), rng.integers(0, 10, n)
    from pipeline.data.sources import read_image_tree

    train = read_image_tree(archive, image_size).splits["train"]
    idx = rng.permutation(len(train))[:n]
    if len(idx) < n:
        idx = np.resize(idx, n)  # more steps than images: go round again
    return np.ascontiguousarray(train.images[idx]), train.labels[idx]


def parse_cases(text: str) -> list[Case]:
    by_name = {f"{c.arch}:{c.stem}": c for c in CPU_CASES}
    out = []
    for name in filter(None, (t.strip() for t in text.split(","))):
        if name in by_name:
            out.append(by_name[name])
        else:
            arch, _, stem = name.partition(":")
            out.append(Case(arch, stem or "small", warmup=2, steps=8))
    return out


def parse_precisions(text: str) -> tuple[str, ...]:
    names = tuple(filter(None, (t.strip() for t in text.split(","))))
    bad = [n for n in names if n not in ("auto", "bf16", "fp32")]
    if bad or not names:
        raise SystemExit(f"--precision {text!r}: use auto, bf16, fp32 or a comma-separated list of them")
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(f"{c.arch}:{c.stem}" for c in CPU_CASES),
                   help="comma-separated arch:stem (stem imagenet | small)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per measurement (0 = per-case default)")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up steps per measurement (-1 = per-case default)")
    p.add_argument("--rounds", type=int, default=3, help="classic/pipeline alternations; medians are reported")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32,bf16,auto",
                   help="the pipeline's precision(s), comma-separated: auto | bf16 | fp32 (each is timed per round)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--data", choices=("random", "jpeg"), default="random",
                   help="random uint8 pixels, or the CIFAR-10 JPEG archive decoded once (--archive)")
    p.add_argument("--archive", default=os.path.normpath(DEFAULT_ARCHIVE))
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-overhead", action="store_true", help="skip the tracking and tuning overhead")
    p.add_argument("--trials", type=int, default=5, help="Optuna trials for the tuning overhead")
    p.add_argument("--skip-prune", action="store_true",
                   help="skip the pruned-vs-parent ResNet-18 bench on --archive (9-25 minutes on 2 cores)")
    add_prune_arguments(p)
    p.add_argument("--skip-recipe", action="store_true",
                   help="skip the airnet time-to-accuracy bench on --archive (600 training images a class by "
                        "default; --recipe-samples-per-class 0 trains on all 4,410 a class, 7.35x as many)")
    add_recipe_arguments(p)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("BENCH_TINY") == "1",
                   help="one step of everything (harness smoke test; also BENCH_TINY=1)")
    args = p.parse_args(argv)
    precisions = parse_precisions(args.precision)

    from benchmarks.overhead import temporary_tracking_store, tracking_overhead, tuning_overhead

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    temporary_tracking_store()
    os.environ.setdefault(CACHE_ENV, tempfile.mkdtemp(prefix="bench-precision-"))
    emit(system_record(args.device, args.precision))

    cases = parse_cases(args.cases)
    if args.tiny:
        cases = [dataclasses.replace(c, warmup=1, steps=1) for c in cases]
        args.rounds, args.trials = 1, 2
    if args.steps:
        cases = [dataclasses.replace(c, steps=args.steps) for c in cases]
    if args.warmup >= 0:
        cases = [dataclasses.replace(c, warmup=args.warmup) for c in cases]

    if not args.skip_throughput and cases:
        need = max((c.warmup + c.steps) * args.batch_size for c in cases)
        images, labels = load_images(args.data, need, 32, args.archive)
        for case in cases:
            records = compare(case, images, labels, args.batch_size, args.rounds, args.device, precisions)
            for rec in records:
                emit({**rec, "data": args.data})
            if len(records) > 1:
                emit(summarize_precisions(records, cpu_identity()))

    if not args.skip_overhead:
        emit(tracking_overhead(epochs=1 if args.tiny else 2, device=args.device))
        emit(tuning_overhead(n_trials=args.trials, epochs=1 if args.tiny else 3))
    if not args.skip_prune:
        emit(run_prune_bench(settings_from(args, args.archive, args.tiny)))
    if not args.skip_recipe:
        emit(run_recipe_bench(recipe_settings_from(args, args.archive, args.tiny)))
    emit({"bench": "total", "wall_s": round(time.perf_counter() - t_start, 1)})


if __name__ == "__main__":
    main()
