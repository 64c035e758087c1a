"""How far the seed moves a short run, for this code or an older checkout (issue 27).

The recipe the README once used, on the JPEG CIFAR-10 archive: samples_per_class=300, val_fraction=0.1,
seed 0 (prepared once by this code and cached as .npz: the arrays are byte-identical across versions);
pretrain ResNet-18 for 4 epochs from scratch, then finetune it with frozen_layers=2 for 2 epochs, every
other option at the code's default. One JSON line per seed: per-epoch train loss and val accuracy of
both stages, best val accuracy after finetune, and accuracy on the 5,000-image test carve.

    python -m benchmarks.seed_spread --seeds 0,1,2 --precision bf16               # this code
    git worktree add /tmp/old 3df18da
    python -m benchmarks.seed_spread --checkout /tmp/old --seeds 0,1,2 --precision bf16   # an older one

Each seed trains in a subprocess whose sys.path starts at the checkout, so the older code's own fit()
runs (its modules were pipeline.models / pipeline.train before the packages). ~10 minutes a seed on 2
busy CPU cores. Extra TrainConfig options: --set warmup_epochs=1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCHIVE = os.path.join(ROOT, "..", "shared", "datasets", "cifar10-jpeg-train.tar.gz")

# Runs in the checkout's interpreter path: imports only what both old and new code have.
TRAIN = textwrap.dedent("""
    import json, sys, numpy as np, torch
    cache, seed, precision, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    from pipeline.config import TrainConfig
    from pipeline.data.imageset import ImageSet
    try:
        from pipeline.model.models import create_model, freeze
        from pipeline.model.device import predict_logits
        from pipeline.train.loop import fit, seed_everything
    except ImportError:  # before the packages (3df18da and older)
        from pipeline.models import create_model, freeze
        from pipeline.train import fit, seed_everything, predict_logits
    d = np.load(cache)
    train, val = ImageSet(d["train_images"], d["train_labels"]), ImageSet(d["val_images"], d["val_labels"])
    common = dict(data="x", arch="resnet18", seed=seed, precision=precision, device="cpu", **extra)
    seed_everything(seed)
    net = create_model("resnet18", 10)
    pre = fit(net, train, val, TrainConfig(epochs=4, **common), 10)
    seed_everything(seed)
    freeze(net, 2)
    ft = fit(net, train, val, TrainConfig(epochs=2, frozen_layers=2, pretrained="x", **common), 10)
    amp = torch.bfloat16 if precision == "bf16" else None
    pred = predict_logits(net, torch.from_numpy(d["test_images"]), amp).argmax(1).numpy()
    epochs = lambda r: [[h["epoch"], round(h["train_loss"], 3), round(h["val_accuracy"], 4)] for h in r.history]
    print(json.dumps({"seed": seed, "pretrain": epochs(pre), "finetune": epochs(ft),
                      "val_accuracy": round(ft.best_metrics["val_accuracy"], 4),
                      "test_accuracy": round(float((pred == d["test_labels"]).mean()), 4)}))
""")

PREPARE = textwrap.dedent("""
    import sys, numpy as np
    from pipeline.config import PrepareConfig
    from pipeline.data.prepare import prepare_dataset
    ds, _ = prepare_dataset(PrepareConfig(source=sys.argv[1], samples_per_class=300, val_fraction=0.1, seed=0))
    np.savez(sys.argv[2], **{f"{s}_{k}": getattr(ds.splits[s], k) for s in ds.splits for k in ("images", "labels")})
""")


def _python(code: str, cwd: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": cwd}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.seed_spread", description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", default=DEFAULT_ARCHIVE)
    p.add_argument("--checkout", default=ROOT, help="project folder whose code trains (default: this one)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 (the same for every checkout compared)")
    p.add_argument("--cache", default=os.path.join(ROOT, "data", "seed_spread.npz"))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a TrainConfig option (float)")
    args = p.parse_args(argv)
    if not os.path.exists(args.cache):
        os.makedirs(os.path.dirname(args.cache), exist_ok=True)
        _python(PREPARE, ROOT, os.path.abspath(args.archive), args.cache)
    extra = json.dumps({k: float(v) for k, v in (item.split("=", 1) for item in args.set)})
    for seed in args.seeds.split(","):
        print(_python(TRAIN, os.path.abspath(args.checkout), args.cache, seed, args.precision, extra), flush=True)


if __name__ == "__main__":
    main()
