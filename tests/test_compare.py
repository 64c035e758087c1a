"""compare: training params joined with evaluate metrics, checked against MlflowClient."""

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.config import CompareConfig, EvaluateConfig
from pipeline.run.compare import compare
from pipeline.run.evaluation_run import run_evaluate
from steps.compare import main

CLASSES = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def runs(trained):
    """The fixture's runs plus an evaluation of the pretrained model, nested two levels under a
    parent run (as a tune trial is under its study) in an experiment of its own."""
    exp_id = mlflow.create_experiment("compare-tests")
    mlflow.set_experiment(experiment_id=exp_id)
    with mlflow.start_run(run_name="parent") as parent:
        with mlflow.start_run(run_name="middle", nested=True):
            ev_pre = run_evaluate(
                EvaluateConfig(model=trained.pretrain, data=trained.prepare, device="cpu", precision="fp32"),
                nested=True,
            )
    return {"trained": trained, "parent": parent.info.run_id, "ev_pre": ev_pre}


def _invoke(*args):
    return CliRunner().invoke(main, list(args), env={"PIPELINE_DEBUG": ""})


def _expected_row(train_id, eval_id):
    client = MlflowClient()
    train, ev = client.get_run(train_id), client.get_run(eval_id)
    assert ev.data.tags["pipeline.upstream.model_run"] == train_id  # the join compare makes
    p = train.data.params
    return {
        "run_id": train_id,
        "run_name": train.info.run_name,
        "step": train.data.tags["pipeline.step"],
        "evaluate_run_id": eval_id,
        "arch": p["arch"],
        "frozen_layers": int(p["frozen_layers"]),
        "lr": float(p["lr"]),
        "batch_size": int(p["batch_size"]),
        "epochs": int(p["epochs"]),
        "weight_decay": float(p["weight_decay"]),
        **{
            k: ev.data.metrics[k]
            for k in (
                "test_accuracy",
                "test_f1_macro",
                "test_average_precision_macro",
                *(f"test_f1_{c}" for c in CLASSES),
            )
        },
        "best_val_f1_macro": train.data.metrics["best_val_f1_macro"],
    }


def _check_rows(table: pd.DataFrame, expected: list[dict]) -> None:
    assert len(table) == len(expected)
    for (_, row), exp in zip(table.iterrows(), expected):
        for key, value in exp.items():
            assert row[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_run_ids_give_one_row_per_evaluated_model_best_first(runs, tmp_path):
    t = runs["trained"]
    csv, md, png = tmp_path / "runs.csv", tmp_path / "runs.md", tmp_path / "runs.png"
    ids = [t.finetune, t.evaluate, t.pretrain, runs["ev_pre"]]
    result = _invoke(*ids, "--output", str(csv), "--plot", str(png))
    assert result.exit_code == 0, result.output
    expected = [_expected_row(t.finetune, t.evaluate), _expected_row(t.pretrain, runs["ev_pre"])]
    expected.sort(key=lambda r: -r["test_f1_macro"])
    assert "sorted by test_f1_macro" in result.stdout and all(i in result.stdout for i in ids)

    table = pd.read_csv(csv, dtype={"run_id": str, "evaluate_run_id": str})
    _check_rows(table, expected)
    assert not any(c.startswith(("system/", "test_precision_0", "test_recall_0")) for c in table.columns)

    # The same selection written as Markdown, sorted by another metric, run ids given with --runs.
    result = _invoke(
        "--runs", f"{t.pretrain},{runs['ev_pre']} {t.finetune} {t.evaluate}", "--sort", "test_f1_3", "--output", str(md)
    )
    assert result.exit_code == 0, result.output
    lines = md.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["run_id", "run_name", "step", "evaluate_run_id"] and "test_f1_9" in header
    assert set(lines[1]) <= set("|:- ") and len(lines) == 4
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    f1_3 = {r["run_id"]: r["test_f1_3"] for r in expected}
    assert sorted(row[0] for row in body) == sorted(f1_3)
    assert f1_3[body[0][0]] >= f1_3[body[1][0]]
    assert [float(row[header.index("test_f1_3")]) for row in body] == pytest.approx(
        [f1_3[row[0]] for row in body], abs=5e-4
    )

    image = Image.open(png)
    image.load()
    assert image.format == "PNG" and image.size[0] > 500


def test_parent_takes_its_descendants_and_joins_the_training_run(runs):
    result = _invoke("--parent", runs["parent"])
    assert result.exit_code == 0, result.output
    assert runs["ev_pre"] in result.stdout
    table, metric = compare(CompareConfig(parent=runs["parent"]))
    assert metric == "test_f1_macro"
    _check_rows(table, [_expected_row(runs["trained"].pretrain, runs["ev_pre"])])


def test_experiment_rows_include_unevaluated_training_runs(runs):
    t = runs["trained"]
    table, _ = compare(CompareConfig(experiment="trained-fixture"))
    evaluated = table[(table.run_id == t.finetune) & (table.evaluate_run_id == t.evaluate)]
    _check_rows(evaluated, [_expected_row(t.finetune, t.evaluate)])
    # pretrain was evaluated in another experiment only: its row holds params and best_val_* metrics
    pre = table[table.run_id == t.pretrain].iloc[0]
    assert pre.evaluate_run_id == "" and pd.isna(pre.test_f1_macro)
    assert pre.best_val_f1_macro == MlflowClient().get_run(t.pretrain).data.metrics["best_val_f1_macro"]
    assert set(table.step) <= {"pretrain", "finetune"}  # prepare_data runs are no rows


@pytest.mark.parametrize(
    "args, message",
    [
        (["f" * 32], f"error: no MLflow run '{'f' * 32}'"),
        (["--experiment", "no-such-experiment"], "error: no experiment 'no-such-experiment' in tracking store"),
        (["--sort", "test_f2_macro"], "error: no compared run has metric 'test_f2_macro'; sort by one of: "),
        (["--output", "runs.txt"], "error: output 'runs.txt' has an unknown format; name a .csv or .md file"),
        (["--plot", "runs.jpg"], "error: plot 'runs.jpg' is not a .png file name"),
        (
            ["--output", "/no/such/folder/runs.csv"],
            "error: folder '/no/such/folder' for '/no/such/folder/runs.csv' does not exist",
        ),
        (["--parent", "PARENT", "RUN"], "error: parent and run ids were both given; select runs with one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runs, args, message):
    args = [{"PARENT": runs["parent"], "RUN": runs["ev_pre"]}.get(a, a) for a in args]
    if args[0] == "--sort":
        args = [runs["ev_pre"], *args]
    result = _invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    if args[-1] == "test_f2_macro":
        assert "test_f1_macro" in result.stderr and "best_val_f1_macro" in result.stderr


def test_interval_metrics_sit_beside_their_metric_and_are_never_taken_for_classes():
    from pipeline.run.compare import _metric_order, _per_class_f1, _shown

    assert _shown("test_accuracy_ci_low") and _shown("test_f1_macro_ci_high")
    assert not _shown("test_f1_cat_ci_low")  # per-class intervals stay in MLflow
    names = ["test_f1_cat", "test_f1_macro_ci_high", "test_accuracy", "test_f1_macro", "test_accuracy_ci_high",
             "test_f1_macro_ci_low", "test_accuracy_ci_low"]
    assert sorted(names, key=_metric_order) == [
        "test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high",
        "test_f1_macro", "test_f1_macro_ci_low", "test_f1_macro_ci_high", "test_f1_cat"]
    table = pd.DataFrame({"run_id": ["a"], "test_f1_cat": [0.5], "test_f1_macro_ci_low": [0.4], "test_f1_macro": [0.5]})
    assert _per_class_f1(table) == ("test", ["test_f1_cat"], ["cat"])


def test_compare_pairs_two_models_scored_on_the_same_test_images(runs):
    from scipy.stats import binomtest

    from pipeline.evaluate.predictions import read_predictions

    trained = runs["trained"]
    table, _ = compare(CompareConfig(runs=f"{trained.evaluate} {runs['ev_pre']}"))
    assert table.vs_best.iloc[0] == "best" and table.vs_best.iloc[1] in ("tie", "differs")
    path = "evaluation/test_predictions.csv"
    a, b = (read_predictions(mlflow.artifacts.download_artifacts(run_id=r, artifact_path=path))
            for r in table.evaluate_run_id)
    right_a, right_b = a.predicted_class == a.true_class, b.predicted_class == b.true_class
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    expected = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    assert table.p_mcnemar.iloc[1] == pytest.approx(expected)
    assert list(table.columns).index("vs_best") == list(table.columns).index("test_f1_macro_ci_high") + 3
