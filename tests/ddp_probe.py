"""Run by tests/test_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU): the collectives
of pipeline.distributed on two real processes, and fit() on two ranks against fit() in one process.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_probe.py OUT.json
Rank 0 writes what it found to OUT.json; a failed check is an AssertionError (non-zero exit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline.train.loop as train  # noqa: E402
from pipeline import distributed  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data.imageset import ImageSet  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.model.models import ResNet9  # noqa: E402

N_TRAIN, N_VAL, BATCH, CLASSES = 70, 23, 16, 3  # 70 = 4 full global batches + an uneven 6 (3 per rank)


def images(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    x = torch.randint(0, 120, (n, 8, 8, 3), generator=g)
    x[torch.arange(n), :, :, labels] += 120
    return ImageSet(x.to(torch.uint8).numpy(), labels.numpy())


def net_without_batchnorm() -> nn.Module:
    """ResNet-9 with its BatchNorm layers taken out: per-rank batch statistics are the one thing
    that legitimately differs between one process and several, so without them the two must agree."""
    torch.manual_seed(0)
    net = ResNet9(CLASSES, width=4)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.Identity())
    return net


def main(out: str) -> None:
    world = distributed.read_world()
    assert world.size == 2, world
    found = {}
    with distributed.joining_process_group(world, torch.device("cpu")):
        # gather_rows: each rank's shard_range rows come back in row order, on every rank.
        start, stop = distributed.shard_range(5, world.rank, world.size)
        rows = torch.arange(start, stop, dtype=torch.float32)[:, None].repeat(1, 2)
        gathered = distributed.gather_rows(rows, 5, world)
        assert torch.equal(gathered[:, 0], torch.arange(5, dtype=torch.float32)), gathered
        found["gather_rows"] = gathered[:, 0].tolist()

        total = distributed.sum_across(torch.tensor([world.rank + 1.0]), world)
        assert total.item() == 3.0
        found["sum_across"] = total.item()

        buf = nn.BatchNorm2d(2)
        buf.running_mean.fill_(world.rank)
        distributed.broadcast_buffers(buf, world)
        assert buf.running_mean.tolist() == [0.0, 0.0]

        # failing_together: rank 1 fails alone; rank 0 raises with rank 1's message, nobody waits.
        try:
            with distributed.failing_together(world):
                if world.rank == 1:
                    raise PipelineError("cannot read the dataset here")
        except PipelineError as exc:
            assert distributed.is_raised_on_every_rank(exc)
            found.setdefault("failing_together", str(exc))
        else:
            raise AssertionError("failing_together did not raise")

        # fit() on two ranks = fit() in one process, for a network without BatchNorm: the same
        # permutation (both seeded from (seed, epoch)), global batch 16 = 8 per rank, uneven last batch.
        cfg = TrainConfig(data="d", arch="resnet9", epochs=1, batch_size=BATCH, lr=0.05, schedule="constant",
                          augment="none", precision="fp32", device="cpu", seed=0)
        trained, val = images(N_TRAIN, 0), images(N_VAL, 1)
        ddp_net = net_without_batchnorm()
        ddp = train.fit(ddp_net, trained, val, cfg, CLASSES, world=world)
        if world.rank == 0:
            one_net = net_without_batchnorm()
            one = train.fit(one_net, trained, val, cfg, CLASSES)
            diff = max(
                (a - b).abs().max().item() for a, b in zip(ddp_net.state_dict().values(), one_net.state_dict().values())
            )
            keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro")
            found["max_weight_diff"] = diff
            found["metrics"] = {k: [ddp.history[0][k], one.history[0][k]] for k in keys}
            Path(out).write_text(json.dumps(found, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
