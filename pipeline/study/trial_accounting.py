"""How many trials a study still needs, and the trials a race between workers created in excess.

n_trials is the study's target, not a per-worker count: a worker starts no trial once the study
holds n_trials finished (COMPLETE or PRUNED) trials, counting those other workers are running.
"""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.study.tracking import ATTR_RUN_ID
from pipeline.track.run_checkpoints import has_checkpoint

ATTR_SURPLUS = "surplus"


class SurplusTrial(Exception):
    """A trial created past n_trials by a race between workers: ended FAIL, marked surplus, not run."""


def is_surplus(trials: list[FrozenTrial], number: int, target: int) -> bool:
    """Whether `target` trials numbered below `number` are already finished or running. Trial
    numbers are handed out by the storage one at a time, so of two workers racing for the last slot
    exactly one sees the other's trial ahead of its own."""
    ahead = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(t.number < number and t.state in ahead for t in trials) >= target


def refuse_surplus(trial: optuna.Trial, target: int) -> FrozenTrial:
    """Raise SurplusTrial (the trial marked surplus) when `trial` must not run; else return its frozen copy."""
    trials = trial.study.get_trials(deepcopy=False)
    (frozen,) = [t for t in trials if t.number == trial.number]
    if is_surplus(trials, trial.number, target):
        # Another worker started a trial in the same instant; this one would overshoot n_trials.
        trial.set_user_attr(ATTR_SURPLUS, True)
        trial.study.stop()
        raise SurplusTrial(f"trial {trial.number} not run: the study already has n_trials={target} finished or running")
    if is_fresh(frozen) and any(t.state == TrialState.WAITING for t in trials):
        # A retry (or enqueued trial) was queued while this one was being created: it goes first.
        trial.set_user_attr(ATTR_SURPLUS, True)
        raise SurplusTrial(f"trial {trial.number} not run: a queued trial takes its place")
    return frozen


def is_fresh(trial: FrozenTrial) -> bool:
    """Created by this ask(), not popped from the queue (enqueued by a user, or a retry)."""
    return "fixed_params" not in trial.system_attrs and "failed_trial" not in trial.system_attrs


def checkpoint_of_retried(trial: FrozenTrial) -> str:
    """For the retry of a dead worker's trial: the dead trial's run (its user attrs were copied to
    the retry), if it left a checkpoint."""
    if trial.system_attrs.get("failed_trial") is None:  # set by RetryHeartbeatStaleTrialCallback
        return ""
    run_id = trial.user_attrs.get(ATTR_RUN_ID, "")
    return run_id if run_id and has_checkpoint(run_id) else ""


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state; FAIL trials that were never run (surplus of a race) are counted apart."""
    counts = {s.name.lower(): 0 for s in TrialState} | {"surplus": 0}
    for t in study.get_trials(deepcopy=False):
        surplus = t.state == TrialState.FAIL and t.user_attrs.get(ATTR_SURPLUS)
        counts["surplus" if surplus else t.state.name.lower()] += 1
    return counts


def trials_to_start(study: optuna.Study, target: int) -> int:
    """Trials still to start so the study reaches `target` finished ones, counting running ones
    (other workers') as on their way. Trials of dead workers count until marked FAIL: by the
    heartbeat on SQL storages, never on journal files (raise n_trials to make up for them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
    counts = trial_counts(study)
    return target - counts["complete"] - counts["pruned"] - counts["running"]


class StopAtTarget:
    """optimize() callback: after each trial, stop this worker when nothing is left to start."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, study: optuna.Study, trial) -> None:
        if trials_to_start(study, self.target) <= 0:
            study.stop()
