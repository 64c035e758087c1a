"""benchmarks.recipe_bench (issue 25's time-to-accuracy in `make bench`): the tiny bench trains airnet through
the tracked pipeline on the real archive and emits its record; without the archive it says why;
benchmarks.run wires it in, passes its options on, and --skip-recipe leaves it out."""

from __future__ import annotations

import argparse
import json
import os
import statistics

import mlflow
import pytest
import torch
import torch_pruning as tp
from mlflow.tracking import MlflowClient

import benchmarks.overhead
from benchmarks import recipe_bench
from pipeline.model.models import create_model
from tests.conftest import SHARED_ARCHIVE

FIELDS = {"arch", "image_size", "samples_per_class", "train_images", "val_images", "test_images", "epochs", "recipe",
          "test_accuracy", "test_accuracy_ci95", "test_tta", "forward_macs_per_image", "training_flop_per_image",
          "training_pflop", "train_wall_s", "train_passes_s", "train_img_per_s", "train_img_per_s_per_epoch",
          "precision", "cpu_model", "device", "tracking_uri", "prepare_run_id", "train_run_id", "evaluate_run_id",
          "settings", "bench_wall_s"}


def _records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


@pytest.mark.slow  # ~15-20 s on 2 busy cores: 300 of the archive's JPEGs prepared, one airnet epoch at 16 px, scored
@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason=f"the shared CIFAR-10 JPEG archive is not at {SHARED_ARCHIVE}")
def test_the_tiny_recipe_bench_trains_airnet_through_the_tracked_pipeline(experiment, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)  # the bench then leaves the test's experiment active
    recipe_bench.main(["--tiny", "--archive", str(SHARED_ARCHIVE)])
    (rec,) = _records(capsys)  # the pipeline's own prints went to stderr
    assert rec["bench"] == "recipe" and not rec.get("skipped")
    assert FIELDS <= rec.keys()
    # 30 a class from the archive: 20% test (60), 10% of the rest val (24), the rest trains (216), at 16 px.
    assert (rec["train_images"], rec["val_images"], rec["test_images"]) == (216, 24, 60)
    assert rec["arch"] == "airnet" and rec["epochs"] == 1 and rec["image_size"] == 16
    assert rec["recipe"]["schedule"] == "triangle" and rec["recipe"]["batch_size"] == 32  # tiny's batch, recipe rest
    assert rec["precision"] == "fp32" and rec["device"] == "cpu" and rec["cpu_model"]
    assert rec["tracking_uri"] == os.environ["MLFLOW_TRACKING_URI"]  # the session's store, as set

    low, high = rec["test_accuracy_ci95"]
    assert 0 <= low <= rec["test_accuracy"] <= high <= 1 and low < high

    # FLOP/img: 2 FLOP a MAC, x3 forward + backward, of torch-pruning's count on a fresh airnet at 16 px.
    fresh = create_model("airnet", 10).eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(fresh, torch.zeros(1, 3, 16, 16))
    assert rec["forward_macs_per_image"] == int(macs) > 0
    assert rec["training_flop_per_image"] == 6 * int(macs)
    assert rec["training_pflop"] == pytest.approx(6 * macs * 216 * 1 / 1e15, rel=1e-3)

    # The runs, as the store has them: finished, in the test's experiment, the img/s the record averages.
    for key in ("prepare_run_id", "train_run_id", "evaluate_run_id"):
        run = mlflow.get_run(rec[key])
        assert run.info.status == "FINISHED" and run.info.experiment_id == experiment
    history = MlflowClient().get_metric_history(rec["train_run_id"], "images_per_sec")
    assert rec["train_img_per_s"] == pytest.approx(statistics.fmean(m.value for m in history), abs=0.1)
    test_metrics = mlflow.get_run(rec["evaluate_run_id"]).data.metrics
    assert rec["test_accuracy"] == pytest.approx(test_metrics["test_accuracy"], abs=1e-4)
    assert rec["train_wall_s"] > 0 and rec["train_passes_s"] > 0


def test_without_the_archive_the_recipe_bench_says_it_skipped_and_why(tmp_path):
    missing = tmp_path / "no-archive.tar.gz"
    rec = recipe_bench.run_recipe_bench(recipe_bench.tiny_settings(str(missing)))
    assert rec["bench"] == "recipe" and rec["skipped"] is True and str(missing) in rec["reason"]


def test_the_recipe_options_reach_the_settings_and_tiny_overrides_them():
    p = argparse.ArgumentParser()
    recipe_bench.add_arguments(p)
    default = recipe_bench.settings_from(p.parse_args([]), "a.tar.gz", tiny=False)
    assert (default.arch, default.samples_per_class, default.batch_size, default.subset_per_class) == (
        "airnet", 600, None, 0)  # the recipe's batch; the whole archive prepared
    args = p.parse_args(["--recipe-samples-per-class", "0", "--recipe-epochs", "3", "--recipe-arch", "resnet9"])
    full = recipe_bench.settings_from(args, "a.tar.gz", tiny=False)
    assert (full.samples_per_class, full.epochs, full.arch, full.test_fraction) == (0, 3, "resnet9", 0.1)
    tiny = recipe_bench.settings_from(args, "a.tar.gz", tiny=True)
    assert (tiny.image_size, tiny.epochs, tiny.subset_per_class, tiny.arch) == (16, 1, 30, "resnet9")


@pytest.mark.parametrize("skip", [False, True])
def test_make_bench_emits_the_recipe_record_unless_skipped(skip, tmp_path, monkeypatch, capsys):
    """benchmarks.run's wiring (the archive absent, so the call is instant); its store stays this session's."""
    import benchmarks.run as run

    monkeypatch.setattr(benchmarks.overhead, "temporary_tracking_store", lambda: str(tmp_path))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    argv = ["--tiny", "--skip-throughput", "--skip-overhead", "--skip-prune", "--archive",
            str(tmp_path / "absent.tar.gz")]
    run.main(argv + ["--skip-recipe"] * skip)
    records = _records(capsys)
    assert [r.get("bench") for r in records] == (["system", "total"] if skip else ["system", "recipe", "total"])
    if not skip:
        assert records[1]["skipped"] is True and "absent.tar.gz" in records[1]["reason"]
