"""Accuracy vs speed: the Pareto front and its pick (pure, against fronts worked out by hand), and a
small two-objective tune study (digits at 8 px, 1 epoch) that prunes trials, logs the front and
registers the member register_pick asks for.
"""

from __future__ import annotations

import io
import random

import mlflow
import optuna
import pandas as pd
import pytest
import torch

from pipeline.config import TuneConfig
from pipeline.errors import PipelineError
from pipeline.model.models import PRUNED_LAYERS, build_logged_net
from pipeline.pareto import PickRule, pareto_front, parse_pick, pick
from pipeline.run.tuning import run_study
from pipeline.study.tracking import ATTR_RUN_ID
from pipeline.track import references

MAX_MIN = ["maximize", "minimize"]
# (trial number, (accuracy, MACs)): 3 is dominated by 0, 4 by 1, 5 by 0 (same MACs, lower accuracy).
POINTS = [(0, (0.90, 100)), (1, (0.95, 200)), (2, (0.94, 120)), (3, (0.80, 150)), (4, (0.95, 250)),
          (5, (0.85, 100)), (6, (0.70, 50))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_tuning: 8 px images gain nothing from threads on a busy machine
    yield
    torch.set_num_threads(before)


def test_front_keeps_exactly_the_undominated_points():
    assert [n for n, _ in pareto_front(POINTS, MAX_MIN)] == [0, 1, 2, 6]
    # Equal points do not dominate each other: both stay, as in Optuna's best_trials.
    assert [n for n, _ in pareto_front([(0, (0.9, 10)), (1, (0.9, 10)), (2, (0.8, 20))], MAX_MIN)] == [0, 1]
    # img/s is maximized: the fast, less accurate model is on the front too.
    fast = [(0, (0.95, 500.0)), (1, (0.90, 2000.0)), (2, (0.90, 1500.0))]
    assert [n for n, _ in pareto_front(fast, ["maximize", "maximize"])] == [0, 1]


def test_front_agrees_with_optuna_best_trials():
    rng = random.Random(0)
    study = optuna.create_study(directions=MAX_MIN)
    for _ in range(40):
        study.add_trial(optuna.trial.create_trial(values=[rng.choice([0.8, 0.85, 0.9, rng.random()]),
                                                          rng.choice([1e6, 2e6, rng.random() * 4e6])]))
    points = [(t.number, t.values) for t in study.trials]
    assert [n for n, _ in pareto_front(points, MAX_MIN)] == sorted(t.number for t in study.best_trials)


@pytest.mark.parametrize("rule, expected", [
    ("best", 1),                   # the best accuracy
    ("fastest_within:0.01", 2),    # 0.94 and 0.95 are within 1 point; 2 has fewer MACs (0.95 - 0.01 in floats too)
    ("fastest_within:0.05", 0),    # 0.90 counts now
    ("fastest_within:0", 1),       # only the best itself
    ("fastest_within:1", 6),       # everything: the cheapest
])
def test_pick_on_a_hand_made_front(rule, expected):
    front = pareto_front(POINTS, MAX_MIN)
    assert pick(front, MAX_MIN, parse_pick(rule))[0] == expected


def test_pick_for_a_minimized_metric_and_maximized_speed_breaks_ties_by_metric_then_number():
    # val_loss (minimized) against img/s (maximized): within 0.1 of the best loss 0.30 -> 0.40 or lower.
    front = [(3, (0.30, 800.0)), (4, (0.38, 2000.0)), (5, (0.40, 2000.0)), (7, (0.45, 5000.0))]
    assert pick(front, ["minimize", "maximize"], PickRule("fastest_within", 0.1))[0] == 4
    assert pick(front, ["minimize", "maximize"], PickRule("best"))[0] == 3
    twins = [(8, (0.9, 100)), (2, (0.9, 100))]
    assert pick(twins, MAX_MIN, PickRule("fastest_within", 0.01))[0] == 2


@pytest.mark.parametrize("change, message", [
    ({"objectives": "val_accuracy,macs"}, "starts with val_accuracy, but metric=val_f1_macro"),
    ({"objectives": "val_f1_macro,latency"}, "objectives=val_f1_macro,latency is not supported"),
    ({"objectives": "val_f1_macro,macs,img_per_s"}, "is not supported"),
    ({"register_pick": "fastest_within:0.01"}, "needs two objectives"),
    ({"objectives": "val_f1_macro,macs", "register_pick": "fastest"}, "register_pick='fastest' is not supported"),
    ({"pruning_ratio_max": 0.95}, "need 0 <= min <= max < 0.9"),
    ({"pruning_ratio_min": 0.5, "pruning_ratio_max": 0.2}, "need 0 <= min <= max"),
])
def test_objective_options_say_the_fix(change, message):
    with pytest.raises(PipelineError, match=message):
        TuneConfig(**{"data": "d", "pretrained": "p", **change})


def test_single_objective_spellings_stay_single():
    for objectives in ("", "val_f1_macro"):
        cfg = TuneConfig(data="d", pretrained="p", objectives=objectives)
        assert not cfg.multi_objective and cfg.directions == ["maximize"]
    cfg = TuneConfig(data="d", pretrained="p", metric="val_loss", objectives="val_loss, img_per_s")
    assert cfg.directions == ["minimize", "maximize"] and cfg.objective_metrics == ["val_loss", "img_per_s_b64"]


def test_a_continued_study_keeps_its_objectives(digits, store):
    storage = f"sqlite:///{store}/optuna.db"
    optuna.create_study(storage=storage, study_name="one", direction="maximize").set_user_attr("metric", "val_f1_macro")
    with pytest.raises(PipelineError, match="'one' was created to maximize, not objectives=val_f1_macro,macs"):
        run_study(TuneConfig(**digits, study_name="one", storage=storage, objectives="val_f1_macro,macs"))
    two = optuna.create_study(storage=storage, study_name="two", directions=["maximize", "minimize"])
    two.set_user_attr("metric", "val_f1_macro")
    two.set_user_attr("objectives", ["val_f1_macro", "macs"])
    with pytest.raises(PipelineError, match="pass objectives=val_f1_macro,macs to continue it"):
        run_study(TuneConfig(**digits, study_name="two", storage=storage))
    assert not optuna.load_study(study_name="two", storage=storage).trials


def test_two_objective_study_prunes_trials_logs_the_front_and_registers_the_pick(digits, store):
    storage = f"sqlite:///{store}/optuna.db"
    cfg = TuneConfig(**digits, study_name="fast", storage=storage, n_trials=3, epochs=1, sampler="random",
                     objectives="val_f1_macro,macs", pruning_ratio_max=0.6, batch_sizes="16", frozen_min=3,
                     register_as="digits-fast", register_pick="fastest_within:0.05", augment="none",
                     precision="fp32", device="cpu")
    study = optuna.create_study(storage=storage, study_name="fast", directions=MAX_MIN)
    good = dict(lr=0.1, batch_size=16, weight_decay=1e-4, frozen_layers=3)
    for ratio in (0.0, 0.5):  # the same training, unpruned and pruned: two distinct MACs counts
        study.enqueue_trial({**good, "pruning_ratio": ratio})

    result = run_study(cfg)

    study = optuna.load_study(study_name="fast", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 and result.counts["pruned"] == 0
    client = mlflow.MlflowClient()
    runs = {t.number: client.get_run(t.user_attrs[ATTR_RUN_ID]) for t in study.trials}
    for t in study.trials:  # each trial's run holds its ratio and its MACs, the second objective
        assert float(runs[t.number].data.params["pruning_ratio"]) == pytest.approx(t.params["pruning_ratio"])
        assert runs[t.number].data.metrics["macs"] == t.values[1]
        assert runs[t.number].data.metrics["best_val_f1_macro"] == t.values[0]
    assert study.trials[1].values[1] < 0.5 * study.trials[0].values[1]  # half the channels: about 1/4 of the MACs

    # The front: the rows Optuna calls best, both objectives, params, and which one is picked.
    parent = result.parent_run_id
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent}/study/pareto_front.csv")))
    front = sorted(t.number for t in study.best_trials)
    assert sorted(table["number"]) == front == result.front
    assert {"run_id", "val_f1_macro", "macs", "params_lr", "params_pruning_ratio", "picked"} <= set(table.columns)
    expected = pick([(t.number, t.values) for t in study.best_trials], MAX_MIN, PickRule("fastest_within", 0.05))[0]
    assert table.loc[table["picked"], "number"].tolist() == [expected] == [result.best_number]
    artifacts = {a.path for a in client.list_artifacts(parent, "study")}
    assert {"study/pareto_front.png", "study/trials.csv", "study/optimization_history.png"} <= artifacts
    parent_run = client.get_run(parent)
    assert parent_run.data.metrics["pareto_front_size"] == len(front)
    assert f"{len(front)} trial(s) on the Pareto front" in parent_run.data.tags["mlflow.note.content"]

    # The picked member is the registered champion, and its (possibly pruned) model rebuilds.
    version = client.get_model_version_by_alias("digits-fast", "champion")
    assert version.run_id == study.trials[expected].user_attrs[ATTR_RUN_ID]
    assert version.tags["register_pick"] == "fastest_within:0.05" and float(version.tags["macs"]) > 0
    state, meta = references.load_model_ref(f"runs:/{runs[1].info.run_id}/model")
    assert meta[PRUNED_LAYERS]  # trial 1 was pruned: its shapes are recorded, and the net loads at them
    assert sum(p.numel() for p in build_logged_net(meta, state).parameters()) == runs[1].data.metrics["params"]


def test_a_trial_net_is_pruned_and_costed():
    from pipeline.model.models import create_model
    from pipeline.prune.pruning import count_macs_and_params, prune_for_trial

    full = count_macs_and_params(create_model("resnet18", 10), 8)
    net = create_model("resnet18", 10)
    cost = prune_for_trial(net, 8, 0.5, timing_seconds=0.05)
    assert (cost["macs"], cost["params"]) == count_macs_and_params(net, 8)
    assert cost["macs"] < 0.3 * full[0] and cost["img_per_s_b64"] > 0  # half the channels: about 1/4 of the MACs
    assert set(prune_for_trial(create_model("resnet18", 10), 8, 0.0)) == {"params", "macs"}  # untimed, unpruned
