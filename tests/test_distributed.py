"""Training on several processes (torchrun, DistributedDataParallel): the sharding and reduction
helpers on their own, then real 2-process gloo runs on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import click
import mlflow
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline import distributed
from pipeline.config import PrepareConfig, TrainConfig
from pipeline.data.loader import iter_train_batches
from pipeline.distributed import SINGLE, World
from pipeline.errors import PipelineError
from pipeline.track import references
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


# --- helpers, one process ------------------------------------------------------------------

def test_read_world_from_torchrun_variables():
    assert distributed.read_world({}) == SINGLE
    assert distributed.read_world({"WORLD_SIZE": "1", "RANK": "0"}) == SINGLE
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert distributed.read_world(env) == World(rank=3, local_rank=1, size=4, local_size=2)
    assert not distributed.read_world(env).is_main and SINGLE.is_main


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_cover_every_row_once_in_order(size):
    for n in range(0, 13):
        ranges = [distributed.shard_range(n, rank, size) for rank in range(size)]
        assert [i for start, stop in ranges for i in range(start, stop)] == list(range(n))
        lengths = [stop - start for start, stop in ranges]
        assert max(lengths) - min(lengths) <= 1
        # join_shards undoes the padding gather_rows adds for all_gather's equal shapes.
        rows = -(-n // size)
        parts = [torch.full((rows, 2), -1.0) for _ in range(size)]
        for part, (start, stop) in zip(parts, ranges):
            part[: stop - start] = torch.arange(start, stop, dtype=torch.float32)[:, None]
        assert distributed.join_shards(parts, n)[:, 0].tolist() == list(range(n))


def test_epoch_steps_and_images():
    assert distributed.count_epoch(10, 4, 1) == (3, 10)  # one process keeps the short last batch
    assert distributed.count_epoch(8, 4, 1) == (2, 8)
    assert distributed.count_epoch(10, 4, 2) == (3, 10)  # last batch of 2: one image per rank
    assert distributed.count_epoch(9, 4, 2) == (2, 8)  # last batch of 1 < 2 ranks: left out
    assert distributed.count_epoch(12, 4, 4) == (3, 12)


def test_sharded_batches_split_every_global_batch_between_ranks():
    n, batch, size = 33, 8, 2  # 4 global batches of 8, then 1 image, which two ranks cannot share
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 4, 4, 3).contiguous()
    labels = torch.arange(n)

    def epoch(shard):
        gen = torch.Generator().manual_seed(7)  # the same permutation seed on every rank
        return [y.tolist() for _, y in iter_train_batches(images, labels, batch, "none", gen, torch.Generator(), shard)]

    whole = epoch((0, 1))
    ranks = [epoch((rank, size)) for rank in range(size)]
    steps, used = distributed.count_epoch(n, batch, size)
    assert len(ranks[0]) == len(ranks[1]) == steps == 4
    for step in range(steps):
        assert ranks[0][step] + ranks[1][step] == whole[step]
        assert len(ranks[0][step]) == len(ranks[1][step]) == batch // size
    assert sum(len(b) for r in ranks for b in r) == used == 32


def test_one_process_helpers_do_not_communicate():
    assert not dist.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert distributed.sum_across(t, SINGLE) is t
    assert distributed.gather_rows(t, 2, SINGLE) is t
    distributed.broadcast_buffers(torch.nn.BatchNorm2d(2), SINGLE)
    with distributed.joining_process_group(SINGLE, torch.device("cpu")):
        assert not dist.is_initialized()
    with pytest.raises(PipelineError) as info, distributed.failing_together(SINGLE):
        raise PipelineError("x")
    assert not distributed.is_raised_on_every_rank(info.value)


def test_batch_size_must_split_evenly_over_the_processes():
    distributed.check_world(SINGLE, 7, torch.device("cpu"))
    distributed.check_world(World(0, 0, 3, 3), 96, torch.device("cpu"))
    with pytest.raises(PipelineError) as info:
        distributed.check_world(World(1, 1, 3, 3), 100, torch.device("cpu"))
    assert str(info.value) == (
        "batch_size=100 is the global batch and must split evenly over the 3 processes; use a multiple of 3, e.g. 99 "
        "or 102"
    )
    assert distributed.is_raised_on_every_rank(info.value)  # the same on every rank: rank 0 reports it


def test_epoch_seeds_differ_by_epoch_and_rank_and_repeat():
    seeds = {distributed.derive_seed(0, epoch, rank) for epoch in range(1, 4) for rank in range(1, 5)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.derive_seed(0, 2) == distributed.derive_seed(0, 2) != distributed.derive_seed(1, 2)


def test_shuffle_augmentation_and_dropout_never_share_a_seed():
    """(seed, epoch) and (seed, epoch, 0) are one SeedSequence: before the stream tags, rank 0's
    augmentation drew the very numbers its shuffle had drawn (issue 27)."""
    streams = (distributed.SHUFFLE_STREAM, distributed.AUGMENT_STREAM, distributed.DROPOUT_STREAM)
    seeds = [distributed.derive_seed(seed, epoch, stream, rank)
             for seed in (0, 1) for epoch in range(1, 4) for stream in streams for rank in range(3)]
    assert len(set(seeds)) == len(seeds)


def test_other_steps_refuse_to_run_under_torchrun():
    from steps.evaluate import main

    before = signal.getsignal(signal.SIGTERM)
    try:
        results = [
            CliRunner().invoke(main, [], env={"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank}) for rank in "01"
        ]
    finally:
        signal.signal(signal.SIGTERM, before)
    assert [r.exit_code for r in results] == [2, 2]
    # Every rank fails alike, so rank 0's line is the only one.
    assert results[0].stderr == "error: this step runs as one process; only pretrain and finetune run under torchrun\n"
    assert results[1].stderr == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for device=cuda without a GPU")
def test_a_configuration_error_is_reported_by_rank_0_alone():
    from steps.pretrain import main

    args = ["--data", "0123456789abcdef0123456789abcdef", "--device", "cuda"]
    before = signal.getsignal(signal.SIGTERM)
    try:
        results = [
            CliRunner().invoke(main, args, env={"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank}) for rank in "01"
        ]
    finally:
        signal.signal(signal.SIGTERM, before)
    assert [r.exit_code for r in results] == [2, 2]
    assert (
        results[0].stderr.startswith("error: device=cuda but no CUDA GPU is visible")
        and results[0].stderr.count("\n") == 1
    )
    assert results[1].stderr == ""


def test_another_ranks_own_error_is_printed_with_its_rank():
    from steps._cli import handle_errors

    @click.command()
    @handle_errors(torchrun=True)
    def step():
        raise PipelineError("cannot read /data on this machine")

    before = signal.getsignal(signal.SIGTERM)
    try:
        result = CliRunner().invoke(step, [], env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 2 and result.stderr == "error: [rank 1] cannot read /data on this machine\n"


# --- two real processes (gloo on CPU) -------------------------------------------------------


def _env(**extra) -> dict:
    return subprocess_env(OMP_WAIT_POLICY="PASSIVE", **extra)


def test_collectives_and_fit_on_two_processes_equal_one_process(tmp_path):
    """tests/ddp_probe.py: gather/sum/broadcast on two ranks, a failure on rank 1 alone reaching
    rank 0, and fit() on two ranks giving one process's weights for a net without BatchNorm."""
    out = tmp_path / "probe.json"
    r = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests" / "ddp_probe.py"), str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["gather_rows"] == [0.0, 1.0, 2.0, 3.0, 4.0] and found["sum_across"] == 3.0
    assert found["failing_together"] == "process rank 1 failed: cannot read the dataset here"
    assert found["max_weight_diff"] < 1e-5
    for key, (two, one) in found["metrics"].items():
        assert two == pytest.approx(one, rel=1e-5, abs=1e-6), key


@pytest.fixture(scope="module")
def digits_run() -> str:
    """All of scikit-learn's digits at 8x8: 1455 training and 162 validation images."""
    from pipeline.run.runners import run_prepare

    mlflow.set_experiment(experiment_id=mlflow.create_experiment(f"ddp-digits-{os.urandom(4).hex()}"))
    return run_prepare(PrepareConfig(source="digits", image_size=8, seed=0))


TRAIN_ARGS = dict(
    arch="resnet9",
    epochs=3,
    batch_size=64,
    lr=0.05,
    augment="none",
    precision="fp32",
    device="cpu",
    seed=0,
    system_metrics=False,
)
# Final val accuracy of these 3 epochs, measured for seeds 0-3: one process 0.975, 0.963, 0.951, 0.981;
# two processes 0.988, 0.975, 0.981, 0.981. Two processes train on the same global batches, but in
# another order (the permutation is seeded per epoch) and with BatchNorm statistics over half a
# batch, so they differ from one process as another seed does: by up to 0.03 here (5 of 162
# images). Twice that is the tolerance.
ACCURACY_TOLERANCE = 0.06


def _cli_args(params: dict) -> list[str]:
    return [
        a
        for k, v in params.items()
        for a in (f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v))
    ]


@pytest.mark.slow
def test_pretrain_under_torchrun_is_one_run_like_one_process(digits_run):
    from pipeline.run.runners import run_train

    exp = mlflow.create_experiment(f"ddp-two-{os.urandom(4).hex()}")
    r = subprocess.run(
        [*TORCHRUN, "-m", "steps.pretrain", "--data", digits_run, *_cli_args(TRAIN_ARGS)],
        cwd=ROOT,
        env=_env(MLFLOW_EXPERIMENT_ID=exp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = mlflow.search_runs([exp], output_format="list")
    assert len(runs) == 1  # rank 1 trained without a run of its own
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert r.stdout.strip().splitlines()[-1] == f"pretrain run: {run.info.run_id}"
    assert run.data.params["world_size"] == "2" and run.data.params["batch_size"] == "64"
    client = MlflowClient()
    for key in ("val_accuracy", "train_loss", "images_per_sec"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    _, meta = references.load_model_ref(run.info.run_id)
    assert meta["arch"] == "resnet9" and meta["num_classes"] == 10

    mlflow.set_experiment(experiment_id=mlflow.create_experiment(f"ddp-one-{os.urandom(4).hex()}"))
    one = mlflow.get_run(run_train(TrainConfig(data=digits_run, **TRAIN_ARGS), "pretrain"))
    assert one.data.params["world_size"] == "1"
    two_acc, one_acc = run.data.metrics["val_accuracy"], one.data.metrics["val_accuracy"]
    assert two_acc > 0.9 and abs(two_acc - one_acc) <= ACCURACY_TOLERANCE, (two_acc, one_acc)


@pytest.mark.slow
def test_a_failure_before_training_is_one_error_line_and_a_failed_run():
    exp = mlflow.create_experiment(f"ddp-fail-{os.urandom(4).hex()}")
    missing = "0123456789abcdef0123456789abcdef"
    r = subprocess.run(
        [*TORCHRUN, "-m", "steps.pretrain", "--data", missing, "--device", "cpu", "--epochs", "1"],
        cwd=ROOT,
        env=_env(MLFLOW_EXPERIMENT_ID=exp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: no MLflow run '{missing}' in tracking store {os.environ['MLFLOW_TRACKING_URI']}; "
        "check the id in `mlflow ui` or set MLFLOW_TRACKING_URI to the store that holds it"
    ]
    assert "interrupted" not in r.stderr  # both ranks failed together; nobody was killed waiting
    assert [run.info.status for run in mlflow.search_runs([exp], output_format="list")] == ["FAILED"]
