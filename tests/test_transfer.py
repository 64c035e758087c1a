"""transfer: the study's table and verdict on hand-made numbers, its config, and one tiny run on digits."""

from __future__ import annotations

import dataclasses

import matplotlib
import mlflow
import numpy as np
import pytest
import yaml

from pipeline.config import TransferConfig
from pipeline.errors import PipelineError
from pipeline.evaluate.transfer import (
    SCRATCH,
    Arm,
    PairedTests,
    accuracy_vs_depth_figure,
    best_arm,
    markdown_table,
    outcome,
    paired_tests,
    parent_metrics,
    results_table,
    verdict,
)
from tests.test_project import ROOT


def arm(depth, acc, half=0.03, f1=None, params=1000, seconds=10.0) -> Arm:
    f1 = acc if f1 is None else f1
    return Arm(depth, acc, acc - half, acc + half, f1, f1 - half, f1 + half, params, seconds, seconds + 5)


SCRATCH_ARM = arm(None, 0.60, params=11_000_000, seconds=100.0)


def test_beats_only_when_the_interval_excludes_scratch():
    arms = [arm(0, 0.62), arm(3, 0.70, params=8_000_000, seconds=60.0), arm(5, 0.55), SCRATCH_ARM]
    best = best_arm(arms)
    assert best.frozen_depth == 3 and outcome(best, SCRATCH_ARM) == "beats"
    text = verdict(arms, PairedTests(0.001, 0.002, 1500), target_images=100)
    assert text.startswith("Pretrained and fine-tuned with the first 3 stages frozen, the network beats")
    assert "+10.0 points" in text and "100 target training images per class" in text
    assert "8,000,000" in text and "60 s against scratch's 100 s" in text
    assert "a significant difference at the 5% level" in text and "What would change it" not in text


def test_a_gain_inside_the_interval_is_not_called_a_win():
    arms = [arm(1, 0.62), arm(4, 0.61), SCRATCH_ARM]  # best 0.62, interval 0.59-0.65 holds scratch's 0.60
    assert outcome(best_arm(arms), SCRATCH_ARM) == "unresolved"
    text = verdict(arms, PairedTests(0.4, 0.5, 1500))
    assert "does not beat scratch by more than its interval" in text and "beats training" not in text
    assert "+2.0 points" in text and "same 1,500 test images" in text and "no difference at the 5% level" in text
    assert "weights=imagenet" in text and "more source images per class" in text


def test_scratch_above_the_whole_interval_loses():
    arms = [arm(2, 0.50), SCRATCH_ARM]
    assert outcome(best_arm(arms), SCRATCH_ARM) == "loses"
    text = verdict(arms, None)
    assert text.startswith("Pretraining does not pay here") and "No paired test" in text


def test_best_depth_ties_go_to_macro_f1_then_the_deeper_freeze():
    assert best_arm([arm(1, 0.7, f1=0.68), arm(2, 0.7, f1=0.69), SCRATCH_ARM]).frozen_depth == 2
    assert best_arm([arm(1, 0.7), arm(4, 0.7), SCRATCH_ARM]).frozen_depth == 4
    with pytest.raises(ValueError):
        best_arm([SCRATCH_ARM])


def test_table_metrics_and_markdown():
    arms = [SCRATCH_ARM, arm(5, 0.66, params=2565), arm(0, 0.64)]
    table = results_table(arms)
    assert list(table.frozen_depth) == ["0", "5", SCRATCH]  # depths in order, scratch last
    md = markdown_table(table)
    assert md.splitlines()[2].startswith("| 0 | 64.0% (61.0%-67.0%) | 64.0% (61.0%-67.0%) | 1,000 |")
    assert "| scratch | 60.0% (57.0%-63.0%)" in md and "11,000,000" in md
    m = parent_metrics(arms, PairedTests(0.01, 0.02, 1500))
    assert m["test_accuracy_depth_5"] == 0.66 and m["test_accuracy_scratch"] == 0.60
    assert m["test_accuracy_ci_low_depth_0"] == pytest.approx(0.61) and m["trainable_params_depth_5"] == 2565
    assert m["best_depth"] == 5 and m["accuracy_gain_over_scratch"] == pytest.approx(0.06)
    assert m["beats_scratch"] == 1.0 and m["p_mcnemar_best_vs_scratch"] == 0.01
    fig = accuracy_vs_depth_figure(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["scratch 95% CI", "scratch 60.0%"]
    matplotlib.pyplot.close(fig)


def test_paired_tests_use_the_same_images():
    y = np.repeat(np.arange(5), 40)
    better = y.copy()
    worse = y.copy()
    worse[::4] = (worse[::4] + 1) % 5  # wrong on 50 images the other gets right
    tests = paired_tests(y, better, worse, 5)
    assert tests.images == 200 and tests.p_mcnemar < 1e-10 and tests.p_f1_macro < 0.01
    same = paired_tests(y, worse, worse, 5)
    assert same.p_mcnemar == 1.0


def test_config_validates_and_spreads_over_the_steps():
    cfg = TransferConfig(frozen_depths="5, 0,3,3", seed=4)
    assert cfg.depths == [0, 3, 5]
    assert cfg.source_prepare().class_subset == ["airplane", "automobile", "bird", "cat", "deer"]
    assert cfg.target_prepare().samples_per_class == 100 and cfg.target_prepare().seed == 4
    fin, scratch = cfg.finetune(3, data="d", pretrained="p"), cfg.scratch(data="d")
    assert (fin.frozen_layers, fin.lr, fin.epochs, fin.pretrained) == (3, 0.01, 15, "p")
    assert (scratch.epochs, scratch.batch_size, scratch.weights) == (fin.epochs, fin.batch_size, "none")
    assert cfg.pretrain().epochs == 8 and cfg.pretrain().warmup_epochs == 1.0
    for bad, fragment in [({"frozen_depths": "0,6"}, "from 0 to 5"), ({"frozen_depths": "x"}, "integers"),
                          ({"target_classes": "cat,dog"}, "cat is in both"), ({"target_classes": "dog"}, "2 classes"),
                          ({"finetune_epochs": 0}, "epochs=0")]:
        with pytest.raises(PipelineError, match=fragment):
            TransferConfig(**bad)


def test_transfer_defaults_are_the_mlproject_defaults():
    params = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["transfer"]["parameters"]
    cfg = TransferConfig()
    assert set(params) == {f.name for f in dataclasses.fields(TransferConfig)}
    for name, spec in params.items():
        value = getattr(cfg, name)
        expected = str(value).lower() if isinstance(value, bool) else value
        assert (float(spec["default"]) if spec["type"] == "float" else spec["default"]) == expected, name


@pytest.mark.slow
def test_transfer_on_digits_logs_table_plot_metrics_and_verdict(store):
    from pipeline.run.transfer import PLOT, RESULTS_CSV, RESULTS_MD, run_transfer

    cfg = TransferConfig(source="digits", image_size=8, val_fraction=0.1, test_fraction=0.2,
                         source_classes="0,1,2,3,4", target_classes="5,6,7,8,9", source_samples_per_class=40,
                         target_samples_per_class=20, pretrain_epochs=1, finetune_epochs=1, warmup_epochs=0.0,
                         frozen_depths="0,5", augment="none", precision="fp32", device="cpu", system_metrics=False)
    lines = []
    runs = run_transfer(cfg, log=lines.append)
    parent = mlflow.get_run(runs.parent)
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs(experiment_ids=[parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{runs.parent}'", output_format="list")
    # two datasets, pretrain, two fine-tunings, scratch, three evaluations
    assert len(children) == 9 and {c.info.status for c in children} == {"FINISHED"}
    names = {c.info.run_name for c in children}
    assert "scratch resnet18 lr=0.05" in names and "evaluate test: scratch resnet18 lr=0.05" in names
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.parent, "transfer")}
    assert artifacts == {RESULTS_CSV, RESULTS_MD, PLOT}
    m = parent.data.metrics
    for key in ("test_accuracy_depth_0", "test_accuracy_depth_5", "test_accuracy_scratch", "best_depth",
                "accuracy_gain_over_scratch", "p_mcnemar_best_vs_scratch", "p_f1_macro_best_vs_scratch",
                "trainable_params_depth_5", "train_seconds_scratch"):
        assert key in m, key
    assert m["best_depth"] in (0, 5)
    assert m["trainable_params_depth_5"] < m["trainable_params_depth_0"] == m["trainable_params_scratch"]
    table = mlflow.artifacts.load_text(f"runs:/{runs.parent}/{RESULTS_CSV}")
    assert table.splitlines()[0].startswith("frozen_depth,test_accuracy,test_accuracy_ci_low")
    assert [row.split(",")[0] for row in table.splitlines()[1:]] == ["0", "5", "scratch"]
    note = parent.data.tags["mlflow.note.content"]
    assert "paired tests give p =" in note and f"`{runs.pretrain}`" in note and "reused" not in note

    again = run_transfer(cfg, log=lines.append)  # every step reused, the result logged again
    assert again.train == runs.train and again.evaluate == runs.evaluate
    assert "- pretrain: reused" in mlflow.get_run(again.parent).data.tags["mlflow.note.content"]
