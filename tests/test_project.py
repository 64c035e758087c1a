"""The MLproject, the step commands and the environment files agree with each other."""

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["main", "transfer", "prepare_data", "pretrain", "finetune", "evaluate", "compare", "prune"]


_env = subprocess_env


def _cli(step, *args):
    env = _env()
    return subprocess.run(
        [sys.executable, "-m", f"steps.{step}", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )


def test_every_entry_point_parameter_is_a_command_option():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    for step in STEPS:
        entry = project["entry_points"][step]
        assert entry["command"].startswith(f"python -m steps.{step} ")
        placeholders = set(re.findall(r"\{(\w+)\}", entry["command"]))
        assert placeholders == set(entry["parameters"]), step
        # The command's own option list, read in-process (a --help subprocess per step costs ~5 s).
        options = {opt for p in importlib.import_module(f"steps.{step}").main.params for opt in p.opts}
        for name in entry["parameters"]:
            assert f"--{name.replace('_', '-')}" in options, (step, name)


def test_conda_env_pins_the_same_packages_as_requirements():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    reqs = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert sorted(pip) == sorted(reqs)


def test_help_shows_defaults_and_units():
    out = _cli("pretrain", "--help").stdout
    assert "images per optimizer step" in out and "[default: 10]" in out
    # a recipe option: auto by default, and the help says what auto means for each arch
    assert "airnet 1024, others 128 [default: auto]" in " ".join(out.split())


def test_bad_parameter_is_one_line_no_traceback_exit_2():
    r = _cli("pretrain", "--data", "x", "--lr", "-1")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: lr=-1.0 must be a positive number"


def test_unknown_run_id_fails_the_run(tmp_path):
    env_uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = _env(MLFLOW_TRACKING_URI=env_uri)
    r = subprocess.run(
        [sys.executable, "-m", "steps.evaluate", "--model", "f" * 32, "--data", "e" * 32, "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"error: no MLflow run '{'f' * 32}'" in r.stderr
    runs = mlflow.MlflowClient(tracking_uri=env_uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri=env_uri).search_experiments()]
    )
    assert [run.info.status for run in runs] == ["FAILED"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--source", "/nonexistent/images"], "data source '/nonexistent/images' does not exist"),
        (["--source", "digits", "--val-fraction", "1.5"], "val_fraction=1.5 is out of range"),
    ],
)
def test_prepare_data_bad_input(args, fragment, tmp_path):
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    r = subprocess.run(
        [sys.executable, "-m", "steps.prepare_data", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr


def _expected(default):
    """A config default as the MLproject writes it: None (the arch's recipe) as auto, booleans lower-case."""
    if default is None:
        return "auto"
    return str(default).lower() if isinstance(default, bool) else default


def _mlproject_default(spec: dict):
    return float(spec["default"]) if spec["type"] == "float" else spec["default"]


@pytest.mark.parametrize("step", ["pretrain", "finetune"])
def test_train_defaults_are_the_mlproject_defaults(step):
    from pipeline.config import RECIPE_FIELDS, TrainConfig

    params = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][step]["parameters"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if step == "finetune":
        defaults.update(importlib.import_module("steps.finetune").FINETUNE_DEFAULTS)
    finetune_only = {"pretrained", "frozen_layers"} if step == "pretrain" else set()
    assert set(params) == set(defaults) - {"checkpoint_every"} - finetune_only  # checkpoint_every: command line only
    for name, spec in params.items():
        assert _mlproject_default(spec) == _expected(defaults[name]), name
    for name in RECIPE_FIELDS:  # the arch's recipe unless given: auto in the MLproject and on the command line
        if defaults[name] is None:
            assert params[name] == {"type": "string", "default": "auto"}, name


def test_main_defaults_are_the_mlproject_defaults():
    (
        "`mlflow run .` passes every parameter, so a default in one place and not the other "
        "would split the two ways in."
    )
    from pipeline.run.chain import MainConfig

    params = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["main"]["parameters"]
    cfg = MainConfig()
    assert set(params) == {f.name for f in dataclasses.fields(MainConfig)}
    for name, spec in params.items():
        assert _mlproject_default(spec) == _expected(getattr(cfg, name)), name


def test_main_spreads_its_options_over_the_steps():
    from pipeline.run.chain import MainConfig

    chain = MainConfig(pretrain_epochs=2, finetune_epochs=1, frozen_layers=4, seed=7, register_as="m").to_chain()
    assert (chain.pretrain.epochs, chain.pretrain.lr, chain.pretrain.frozen_layers) == (2, 0.05, 0)
    assert (chain.finetune.epochs, chain.finetune.lr, chain.finetune.frozen_layers) == (1, 0.01, 4)
    assert chain.prepare.seed == chain.pretrain.seed == chain.finetune.seed == 7
    assert chain.register_as == "m" and chain.finetune.register_as == ""  # registered after evaluate, not by finetune


def test_prune_defaults_are_the_mlproject_defaults():
    from pipeline.config import PruneConfig

    params = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["prune"]["parameters"]
    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    assert set(params) == set(defaults)
    for name, spec in params.items():
        default = defaults[name]
        if not isinstance(spec, dict):  # required: `model: string`
            assert default == "", name
            continue
        assert _mlproject_default(spec) == _expected(default), name


def test_tune_defaults_are_the_mlproject_defaults():
    from pipeline.config import TuneConfig

    params = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["tune"]["parameters"]
    defaults = {f.name: f.default for f in dataclasses.fields(TuneConfig)}
    assert set(params) == set(defaults)
    for name, spec in params.items():
        if not isinstance(spec, dict):  # required: `data: string`
            assert defaults[name] == "", name
            continue
        default = defaults[name]
        assert _mlproject_default(spec) == _expected(default), name
