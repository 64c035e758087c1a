"""Which knobs of the fast path pay off on this machine: threads, channels_last, bf16, batch size.

    python -m benchmarks.explore [--arch resnet18 --stem imagenet --steps 8 --rounds 2]

Not part of `make bench`. Each variant is the pipeline's training step (iter_train_batches, the
same autocast and loss as pipeline.train.loop.fit) with one knob changed; variants are interleaved
round by round so that background load spreads over all of them, and medians are printed as
JSON lines. The knobs fit() does not expose (NCHW memory format, thread count) are why this
loop is a small copy of fit()'s step rather than a call to fit().
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.throughput import build_net
from pipeline.data.loader import iter_train_batches

DEFAULT_THREADS = torch.get_num_threads()

VARIANTS = {
    # name: (threads (0 = torch's default: one per core), channels_last, bf16 autocast, batch size)
    "fp32 channels_last (fit() on a CPU without AMX)": (0, True, False, 128),
    "fp32 NCHW": (0, False, False, 128),
    "bf16 channels_last": (0, True, True, 128),
    "fp32 channels_last 1 thread": (1, True, False, 128),
    "fp32 channels_last batch 256": (0, True, False, 256),
}


def step_throughput(arch, stem, threads, channels_last, bf16, batch_size, warmup, steps, seed=0) -> float:
    torch.set_num_threads(threads or DEFAULT_THREADS)
    net = build_net(arch, stem, seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    n = (warmup + steps) * batch_size
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(iter_train_batches(images, labels, batch_size, "basic", gen)):
        if i == warmup:
            t0 = time.perf_counter()
        x = x.contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        torch.isfinite(loss).item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.explore")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="", help="comma-separated substrings selecting variants")
    args = p.parse_args(argv)
    names = [n for n in VARIANTS if not args.variants or any(v in n for v in args.variants.split(","))]
    results: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            threads, cl, bf16, bs = VARIANTS[name]
            results[name].append(step_throughput(args.arch, args.stem, threads, cl, bf16, bs, args.warmup, args.steps))
    torch.set_num_threads(DEFAULT_THREADS)
    for name, vals in results.items():
        print(
            json.dumps(
                {
                    "arch": args.arch,
                    "stem": args.stem,
                    "variant": name,
                    "img_s": round(statistics.median(vals), 1),
                    "rounds_img_s": [round(v, 1) for v in vals],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
