"""tune: trials as nested runs, pruning, failures, resuming, parallel workers, the champion.

A 5-class digits model (8x8 px) is pretrained once per module and fine-tuned on all 10 classes,
so every trial trains a fresh head: a trial with a tiny learning rate stays near chance and is
pruned by the median of two good ones. Each test tracks into its own MLflow store; the dataset
and the pretrained model are passed as local folders, which work in any store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState

from pipeline.config import TuneConfig
from pipeline.errors import PipelineError
from pipeline.run.tuning import run_study
from pipeline.study.setup import trial_seed
from pipeline.study.storage import storage_identity
from pipeline.study.tracking import ATTR_RUN_ID, ATTR_WORKER, TAG_STATE, TAG_STUDY, TAG_TRIAL
from pipeline.track import references

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CPU = dict(augment="none", precision="fp32", device="cpu")
GOOD = dict(lr=0.1, batch_size=16, weight_decay=1e-4, frozen_layers=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """8x8 images gain nothing from intra-op threads, and two threads per process on a busy 2-core
    machine (two workers, or anything else running) were measured 5-10x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _runs(**tags) -> list:
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return mlflow.search_runs(search_all_experiments=True, filter_string=filt, output_format="list")


def _trial_runs(parent_id: str) -> dict[int, object]:
    runs = _runs(**{"mlflow.parentRunId": parent_id, "pipeline.step": "finetune"})
    numbers = [int(r.data.tags[TAG_TRIAL]) for r in runs]
    assert len(numbers) == len(set(numbers)), "a trial number has two runs"
    return dict(zip(numbers, runs))


def _param_set(params: dict) -> tuple:
    return tuple(str(params[k]) for k in ("lr", "batch_size", "weight_decay", "frozen_layers"))


def test_study_nests_trials_prunes_fails_registers_and_resumes(digits, store):
    storage = f"sqlite:///{store}/optuna.db"
    cfg = TuneConfig(
        **digits, study_name="digits", storage=storage, n_trials=3, epochs=2, sampler="random", pruner="median",
        startup_trials=2, lr_min=1e-3, lr_max=0.1, batch_sizes="16,32", frozen_min=4, register_as="digits-tuned", **CPU,
    )
    # The first four trials are fixed: two good ones, one that diverges, one that barely learns
    # (enqueued trials may lie outside the search ranges).
    study = optuna.create_study(storage=storage, study_name="digits", direction="maximize")
    study.enqueue_trial(GOOD)
    study.enqueue_trial({**GOOD, "lr": 0.05, "batch_size": 32})
    study.enqueue_trial({**GOOD, "lr": 1e30})  # nan loss at once -> FAIL
    study.enqueue_trial({**GOOD, "lr": 1e-7, "frozen_layers": 5})  # a random head, untrained -> pruned after epoch 1

    result = run_study(cfg)

    study = optuna.load_study(study_name="digits", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert result.trials_run == 4 and result.counts["complete"] == 2 and result.counts["pruned"] == 1
    assert sorted(study.trials[3].intermediate_values) == [1]  # stopped at the first epoch

    parents = _runs(**{"pipeline.step": "tune", TAG_STUDY: "digits"})
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    parent = parents[0]
    assert parent.info.run_name == "digits" and parent.info.status == "FINISHED"
    runs = _trial_runs(parent.info.run_id)
    assert sorted(runs) == [0, 1, 2, 3]
    expected_status = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
    for t in study.trials:
        run = runs[t.number]
        assert t.user_attrs[ATTR_RUN_ID] == run.info.run_id
        assert run.data.tags[TAG_STATE] == t.state.name
        assert run.info.status == expected_status[t.state.name]
        assert _param_set(run.data.params) == _param_set(t.params)
        assert run.data.params["epochs"] == "2" and run.data.params["monitor"] == "val_f1_macro"
    client = mlflow.MlflowClient()
    for n in (0, 1):
        history = client.get_metric_history(runs[n].info.run_id, "val_f1_macro")
        assert [m.step for m in history] == [1, 2]
        assert runs[n].data.metrics["best_val_f1_macro"] == study.trials[n].value
    assert len(client.get_metric_history(runs[3].info.run_id, "val_f1_macro")) == 1

    # The parent: best value and params, the trials table and the plots.
    best = study.best_trial
    assert result.best_number == best.number and result.best_run_id == best.user_attrs[ATTR_RUN_ID]
    assert parent.data.metrics["best_val_f1_macro"] == pytest.approx(best.value)
    assert parent.data.metrics["best_lr"] == pytest.approx(best.params["lr"])
    assert parent.data.tags["pipeline.best_run_id"] == best.user_attrs[ATTR_RUN_ID]
    note = parent.data.tags["mlflow.note.content"]
    assert "2 complete, 1 pruned, 1 failed of n_trials=3" in note
    assert f"Best: trial {best.number}, val_f1_macro={best.value:.4f}" in note and best.user_attrs[ATTR_RUN_ID] in note
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {
        "study/trials.csv",
        "study/best_trial.json",
        "study/optimization_history.png",
        "study/param_importances.png",
        "study/parallel_coordinate.png",
        "study/intermediate_values.png",
    } <= artifacts
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/study/trials.csv")
    assert "user_attrs_mlflow_run_id" in table and table.count("\n") == 5

    # The champion is the best trial's model, loadable by alias.
    state, meta = references.load_model_ref("models:/digits-tuned@champion")
    assert meta["source_run_id"] == best.user_attrs[ATTR_RUN_ID] and meta["num_classes"] == 10 and state
    # Its version says what it was trained on and from, and how it scores on the test split, which
    # the best trial's run now holds too.
    version = client.get_model_version_by_alias("digits-tuned", "champion")
    best_run = client.get_run(best.user_attrs[ATTR_RUN_ID])
    assert f"accuracy {best_run.data.metrics['test_accuracy']:.4f}" in version.description
    assert digits["data"] in version.description and "pretrained from" in version.description
    assert float(version.tags["val_f1_macro"]) == pytest.approx(best.value, rel=1e-5)

    # Rerun with the same target: nothing new, same parent, no second registration.
    again = run_study(cfg)
    assert again.trials_run == 0 and again.parent_run_id == result.parent_run_id
    assert len(optuna.load_study(study_name="digits", storage=storage).trials) == 4
    assert len(client.search_model_versions("name='digits-tuned'")) == 1

    # A larger target continues the same study under the same parent.
    more = run_study(TuneConfig(**{**cfg.to_params(), "n_trials": 4, "epochs": 1}))
    assert more.trials_run == 1 and more.parent_run_id == result.parent_run_id
    assert len(_runs(**{"pipeline.step": "tune", TAG_STUDY: "digits"})) == 1
    assert sorted(_trial_runs(result.parent_run_id)) == [0, 1, 2, 3, 4]
    champion = client.get_model_version_by_alias("digits-tuned", "champion")
    assert champion.run_id == optuna.load_study(study_name="digits", storage=storage).best_trial.user_attrs[ATTR_RUN_ID]


@pytest.mark.slow
def test_two_workers_share_one_journal_study(digits, store):
    journal = Path(store) / "optuna-journal.log"
    cmd = [
        sys.executable,
        "-m",
        "steps.tune",
        "--data",
        digits["data"],
        "--pretrained",
        digits["pretrained"],
        "--study-name",
        "shared",
        "--storage",
        str(journal),
        "--n-trials",
        "4",
        "--epochs",
        "1",
        "--sampler",
        "tpe",
        "--pruner",
        "none",
        "--seed",
        "0",
        "--batch-sizes",
        "32,64",
        "--augment",
        "none",
        "--precision",
        "fp32",
        "--device",
        "cpu",
    ]
    mlflow.search_experiments()  # create the store's tables first: two processes migrating one new SQLite file collide
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    workers = [
        subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n\n".join(outputs)

    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(journal))))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(study.trials) == 4, [t.state for t in study.trials]
    assert len({_param_set(t.params) for t in study.trials}) == 4, "two trials ran the same hyperparameters"
    assert len({t.user_attrs[ATTR_WORKER] for t in study.trials}) == 2, "one worker did all the work"
    parents = _runs(**{"pipeline.step": "tune", TAG_STUDY: "shared"})
    assert len(parents) == 1
    runs = _trial_runs(parents[0].info.run_id)
    assert sorted(runs) == [0, 1, 2, 3]
    assert {r.info.run_id for r in runs.values()} == {t.user_attrs[ATTR_RUN_ID] for t in study.trials}


@pytest.mark.slow
def test_mlflow_run_entry_point_resumes_under_the_first_launch(digits, store):
    """Under `mlflow run`, the first launch's run becomes the parent; a later launch is a worker run
    nested under it, and its trials nest under the parent too."""
    mlflow.search_experiments()  # create the store's tables
    journal = Path(store) / "j.log"

    def launch(n_trials: int) -> str:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(PROJECT_ROOT),
            "-e",
            "tune",
            "--env-manager",
            "local",
            "-P",
            f"data={digits['data']}",
            "-P",
            f"pretrained={digits['pretrained']}",
            "-P",
            "study_name=mlrun",
            "-P",
            f"storage={journal}",
            "-P",
            f"n_trials={n_trials}",
            "-P",
            "epochs=1",
            "-P",
            "frozen_min=4",
            "-P",
            "augment=none",
            "-P",
            "precision=fp32",
            "-P",
            "device=cpu",
            "-P",
            "batch_sizes=32",
        ]
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # the command's `python`
        env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        done = subprocess.run(cmd, cwd=store, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    # The first launch's params, as `mlflow run` logged them (storage as typed, true not True), are its own.
    assert "keeps the first run's params" not in launch(1)
    assert "the parent keeps the first run's params for n_trials;" in launch(2)
    parents = _runs(**{"pipeline.step": "tune", TAG_STUDY: "mlrun"})
    workers = _runs(**{"pipeline.step": "tune_worker", TAG_STUDY: "mlrun"})
    assert len(parents) == 1 and len(workers) == 1
    parent = parents[0]
    assert parent.data.params["n_trials"] == "1" and workers[0].data.params["n_trials"] == "2"
    assert workers[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert sorted(_trial_runs(parent.info.run_id)) == [0, 1]
    assert parent.info.status == "FINISHED" and workers[0].info.status == "FINISHED"


def test_trial_seeds_differ_per_trial_not_per_worker():
    seeds = [trial_seed(0, n) for n in range(50)]
    assert len(set(seeds)) == 50 and seeds == [trial_seed(0, n) for n in range(50)]
    assert trial_seed(1, 0) != trial_seed(0, 1)


def test_storage_names_are_absolute_and_hide_passwords(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage_identity("sqlite:///optuna.db") == f"sqlite:///{tmp_path}/optuna.db"
    assert storage_identity("runs.log") == f"journal:{tmp_path}/runs.log"
    assert storage_identity("journal:j/x") == f"journal:{tmp_path}/j/x"
    assert storage_identity("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr_min": 0.1, "lr_max": 0.01}, "lr_min=0.1 is above lr_max=0.01"),
        ({"wd_min": 0.0}, "wd_min=0.0 must be a positive"),
        ({"batch_sizes": "32,x"}, "comma-separated list of positive integers"),
        ({"frozen_min": 3, "frozen_max": 2}, "0 <= frozen_min <= frozen_max <= 5"),
        ({"n_trials": 0}, "n_trials=0 must be an integer >= 1"),
        ({"study_name": "my study"}, "study_name='my study' is not usable"),
        ({"sampler": "grid"}, "sampler='grid' is not supported"),
        ({"pruner": "asha"}, "pruner='asha' is not supported"),
        ({"metric": "val_f1"}, "metric='val_f1' is not supported"),
        ({"pretrained": ""}, "pretrained is empty"),
    ],
)
def test_config_errors_say_the_fix(change, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TuneConfig(**{"data": "d", "pretrained": "p", **change})


def test_resuming_with_another_metric_is_refused(digits, store):
    storage = f"sqlite:///{store}/optuna.db"
    optuna.create_study(storage=storage, study_name="s", direction="maximize").set_user_attr("metric", "val_accuracy")
    with pytest.raises(PipelineError, match="optimizes val_accuracy, not metric=val_f1_macro"):
        run_study(TuneConfig(**digits, study_name="s", storage=storage, **CPU))


def test_resuming_with_other_batch_sizes_is_refused(digits, store):
    storage = f"sqlite:///{store}/optuna.db"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    trial = study.ask()
    trial.suggest_categorical("batch_size", [16, 32])
    study.tell(trial, 0.5)
    with pytest.raises(
        PipelineError, match="study 's' draws batch_size from 16,32, not batch_sizes=32,64; pass batch_sizes=16,32"
    ):
        run_study(TuneConfig(**digits, study_name="s", storage=storage, batch_sizes="32,64", **CPU))
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1  # no trial was started


def test_an_interrupted_trial_is_logged_in_one_line_without_traceback():
    import io
    import logging

    from pipeline.study.trial_accounting import SurplusTrial

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("optuna.study._optimize")
    logger.addHandler(handler)
    try:
        for error in (KeyboardInterrupt(), SurplusTrial("not run")):
            try:
                raise error
            except BaseException:
                logger.warning("Trial 3 failed because of the following error: %r", error, exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == "Trial 3 failed because of the following error: KeyboardInterrupt()\n"


def test_bad_storage_says_what_is_accepted(digits, store):
    with pytest.raises(PipelineError, match="neither a database URL"):
        run_study(TuneConfig(**digits, storage="optuna.db", **CPU))
    with pytest.raises(PipelineError, match="does not exist"):
        run_study(TuneConfig(**digits, storage=f"journal:{store}/missing/j.log", **CPU))


def test_tune_help_lists_the_search_space():
    from click.testing import CliRunner

    from steps.tune import main

    out = CliRunner().invoke(main, ["--help"]).output
    for flag in (
        "--n-trials",
        "--storage",
        "--lr-min",
        "--batch-sizes",
        "--frozen-max",
        "--register-as",
        "--pruner",
        "--sampler",
    ):
        assert flag in out


def test_mlproject_tune_entry_point_passes_every_option():
    import yaml
    from click.testing import CliRunner

    from steps.tune import main

    entry = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]["tune"]
    options = {p.name for p in main.params} - {"debug", "help"}
    assert set(entry["parameters"]) == options
    assert all(f"--{name.replace('_', '-')} {{{name}}}" in entry["command"] for name in options)
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0
