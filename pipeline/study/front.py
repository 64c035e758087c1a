"""A two-objective study's Pareto front on its parent run: which trials are on it, the member
register_pick picks, and the front as study/pareto_front.csv and study/pareto_front.png.

The selection itself is pipeline.pareto's (plain Python); this module feeds it the study's complete
trials and logs what it found.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import mlflow
import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from pipeline import pareto
from pipeline.config import TuneConfig
from pipeline.study.tracking import ATTR_RUN_ID
from pipeline.track import tracking

FRONT_TABLE = "study/pareto_front.csv"
FRONT_PLOT = "study/pareto_front.png"


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]


def front_trials(study: optuna.Study, cfg: TuneConfig) -> list[FrozenTrial]:
    """The complete trials no other complete trial dominates, in trial order (Optuna's best_trials)."""
    trials = {t.number: t for t in _complete(study)}
    front = pareto.pareto_front([(n, t.values) for n, t in trials.items()], cfg.directions)
    return [trials[n] for n, _ in front]


def picked_trial(study: optuna.Study, cfg: TuneConfig, rule: str | None = None) -> FrozenTrial | None:
    """One objective: the best trial. Two: the front member `rule` (default cfg.register_pick) picks.
    None while no trial is complete."""
    if not cfg.multi_objective:
        return study.best_trial if _complete(study) else None
    front = front_trials(study, cfg)
    if not front:
        return None
    number, _ = pareto.pick([(t.number, t.values) for t in front], cfg.directions,
                            pareto.parse_pick(rule or cfg.register_pick))
    return next(t for t in front if t.number == number)


def front_table(front: list[FrozenTrial], cfg: TuneConfig, picked: FrozenTrial | None) -> pd.DataFrame:
    """One row per front member: trial number, run id, both objectives (by their trial-run metric
    names), its params, and whether register_pick picks it; best metric first."""
    rows = [
        {"number": t.number, "run_id": t.user_attrs.get(ATTR_RUN_ID, ""),
         **dict(zip(cfg.objective_metrics, t.values)), **{f"params_{k}": v for k, v in t.params.items()},
         "picked": picked is not None and t.number == picked.number}
        for t in front
    ]
    table = pd.DataFrame(rows)
    return table.sort_values(cfg.metric, ascending=cfg.direction == "minimize", kind="stable") if rows else table


def log_front(study: optuna.Study, cfg: TuneConfig,
              log: Callable[[str], None]) -> tuple[list[FrozenTrial], FrozenTrial | None]:
    """On the active (parent) run: the front's table, its plot, its size and the pick's objectives as
    metrics (pareto_front_size, pick_<metric>, pick_<cost>); returns the front and the pick."""
    front = front_trials(study, cfg)
    picked = picked_trial(study, cfg)
    mlflow.log_text(front_table(front, cfg, picked).to_csv(index=False), FRONT_TABLE)
    finished = len(_complete(study))
    tracking.log_metrics({"pareto_front_size": len(front)}, step=finished)
    if picked is not None:
        tracking.log_metrics({f"pick_{k}": v for k, v in zip(cfg.objective_metrics, picked.values)}, step=finished)
        mlflow.set_tags({"pipeline.pick_trial_number": str(picked.number),
                         "pipeline.pick_run_id": picked.user_attrs.get(ATTR_RUN_ID, "")})
    if front:
        log_study_figure("pareto_front", lambda: draw_front(study, cfg, front, picked), log)
    return front, picked


def log_study_figure(name: str, draw: Callable[[], object], log: Callable[[str], None]) -> None:
    """draw() -> matplotlib axes (one of Optuna's matplotlib plots), logged as study/<name>.png at 8x5
    inches; a plot that cannot be drawn is skipped with one line, never fatal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning on every call
            ax = draw()
        fig = np.ravel(ax)[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        mlflow.log_figure(fig, f"study/{name}.png")
    except Exception as exc:  # a plot is a nicety: a study never fails for it
        log(f"tune: skipped the {name} plot ({type(exc).__name__}: {exc})")
    finally:
        plt.close("all")


def draw_front(study: optuna.Study, cfg: TuneConfig, front: list[FrozenTrial], picked: FrozenTrial | None):
    """Optuna's Pareto-front plot (every complete trial, the front highlighted), the front's trial
    numbers written beside their points and the pick starred."""
    from optuna.visualization import matplotlib as ovm

    ax = ovm.plot_pareto_front(study, target_names=cfg.objective_metrics)
    for t in front:
        ax.annotate(f"#{t.number}", t.values, textcoords="offset points", xytext=(5, 5), fontsize=8)
    if picked is not None:
        ax.scatter(*picked.values, marker="*", s=250, facecolors="none", edgecolors="black",
                   label=f"register_pick: trial {picked.number}", zorder=5)
        ax.legend()
    return ax


def describe_front(front: list[FrozenTrial], cfg: TuneConfig, picked: FrozenTrial | None) -> str:
    """The parent description's sentences on the front and the pick."""
    cost = cfg.objective_metrics[1]
    text = (f"\n\nTwo objectives, so no trial is pruned (Optuna's pruners judge one). {len(front)} trial(s) on the "
            "Pareto front "
            f"({', '.join(str(t.number) for t in front) or 'none yet'}): `{FRONT_TABLE}`, `{FRONT_PLOT}`.")
    if picked is not None:
        run_id = picked.user_attrs.get(ATTR_RUN_ID, "")
        text += (f" register_pick={cfg.register_pick} picks trial {picked.number}: {cfg.metric}="
                 f"{picked.values[0]:.4f}, {cost}={picked.values[1]:.4g}, run `{run_id}`.")
    return text
