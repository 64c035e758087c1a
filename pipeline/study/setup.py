"""Creating or loading a tune study: its sampler (seeded per trial), its pruner, and the checks that
a rerun or another worker continues the same study (metric, direction, choices, heartbeat).

Where the study is stored is pipeline.study.storage's business; this module decides how it searches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import optuna
from optuna.samplers import BaseSampler

from pipeline.config import TuneConfig
from pipeline.errors import PipelineError
from pipeline.study.storage import open_storage, storage_identity
from pipeline.study.tracking import on_stale_trial


def trial_seed(seed: int, number: int) -> int:
    """A sampler seed for trial `number`, independent of which worker runs it."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """Runs a fresh inner sampler seeded with (seed, trial number) for every trial.

    Parallel workers given the same seed would otherwise draw the same hyperparameters; seeding
    per trial keeps them apart while a single worker stays reproducible.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study, trial) -> None:
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def create_sampler(cfg: TuneConfig) -> BaseSampler:
    if cfg.sampler == "random":
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), cfg.seed)
    startup = cfg.startup_trials
    # constant_liar: a running trial counts as a bad result, so parallel workers spread out.
    # Two objectives use the same TPE (MOTPE: it splits the trials by Pareto rank): NSGA-II, the classic
    # choice, draws its first generation (population 50) at random, more trials than a study of
    # fine-tuning runs usually has, while TPE learns from every trial after startup_trials.
    return TrialSeededSampler(
        lambda s: optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True, seed=s), cfg.seed
    )


def create_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.multi_objective:
        return optuna.pruners.NopPruner()  # Optuna's pruners judge one value per step; trials never report
    if cfg.pruner == "median":
        # Prune a trial whose epoch-k value is worse than the median of earlier trials at epoch k.
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=0)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig) -> optuna.Study:
    """Create the study, or load it (a rerun, another worker) after checking it optimizes cfg.metric."""
    storage = open_storage(cfg.storage, cfg.heartbeat, on_stale_trial)
    # directions=[one] makes the same single-objective study as direction=one.
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study_name,
        directions=cfg.directions,
        sampler=create_sampler(cfg),
        pruner=create_pruner(cfg),
        load_if_exists=True,
    )
    _pin_study_attr(study, "metric", cfg.metric, lambda have: (
        f"study {cfg.study_name!r} in {storage_identity(cfg.storage)} optimizes {have}, not metric={cfg.metric}; "
        f"pass metric={have} to continue it, or pick a new study_name"))
    _check_batch_sizes(study, cfg)
    _check_objectives(study, cfg)
    # Other workers judge this worker's trials dead by the heartbeat they use: all must use one.
    _pin_study_attr(study, "heartbeat", cfg.heartbeat, lambda have: (
        f"study {cfg.study_name!r} runs with heartbeat={have}, not {cfg.heartbeat}; "
        f"pass heartbeat={have} (every worker of a study must use the same)"))
    return study


def _pin_study_attr(study: optuna.Study, name: str, value, refusal: Callable[[object], str]) -> None:
    """Store `value` as the study's user attr `name`, or refuse a continued study that stored another
    value `have` with the message refusal(have)."""
    have = study.user_attrs.get(name)
    if have is None:
        study.set_user_attr(name, value)
    elif have != value:
        raise PipelineError(refusal(have))


def _check_objectives(study: optuna.Study, cfg: TuneConfig) -> None:
    """A continued study keeps its objectives: Optuna fixes the directions when the study is created,
    and two objectives of the same directions (macs, img_per_s differ) are told apart by a user attr."""
    stored = study.user_attrs.get("objectives")
    directions = [d.name.lower() for d in study.directions]
    if stored is None and cfg.multi_objective and directions == cfg.directions:
        study.set_user_attr("objectives", cfg.objective_names)  # a new study (or one made by hand to enqueue trials)
        stored = cfg.objective_names
    have = stored or [cfg.metric]  # a single-objective study has none: its objective is the metric checked above
    if have != cfg.objective_names or directions != cfg.directions:
        named = directions if stored is None else [f"{d} {n}" for d, n in zip(directions, have)]
        held = " and ".join(named)
        keep = f"objectives={','.join(have)}" if stored else "objectives= (empty: one objective)"
        raise PipelineError(
            f"study {cfg.study_name!r} was created to {held}, not objectives={','.join(cfg.objective_names)}; "
            f"pass {keep} to continue it, or pick a new study_name"
        )
    if cfg.multi_objective:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(cfg.objective_metrics)  # names the trials table's columns and the plots' axes


def _check_batch_sizes(study: optuna.Study, cfg: TuneConfig) -> None:
    """Optuna cannot change a categorical parameter's choices within a study (the float and int ranges
    may change): refuse other batch_sizes here rather than fail every trial with Optuna's ValueError."""
    space = next(
        (t.distributions["batch_size"] for t in study.get_trials(deepcopy=False) if "batch_size" in t.distributions),
        None,
    )
    if space is not None and list(space.choices) != cfg.batch_size_choices:
        have = ",".join(str(c) for c in space.choices)
        raise PipelineError(
            f"study {cfg.study_name!r} draws batch_size from {have}, not batch_sizes={cfg.batch_sizes}; "
            f"pass batch_sizes={have} to continue it (Optuna cannot change a study's choices), or pick a new study_name"
        )
