"""compare: one table row per trained model, its key params next to its evaluation.

Test metrics live on evaluate runs, params on the pretrain/finetune run an evaluate run scored (its
tag pipeline.upstream.model_run). A row joins the two: the training run's params and best_val_*
metrics plus the evaluate run's metrics. A model evaluated twice has two rows; a training run that
was never evaluated has one row with its best_val_* metrics only.
"""

from __future__ import annotations

import functools
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipeline.config import CompareConfig
from pipeline.errors import PipelineError
from pipeline.evaluate.compare_plot import plot_comparison
from pipeline.evaluate.keys import HASH_CHARS
from pipeline.evaluate.stats import ScoredImages, significance_columns
from pipeline.track import tracking
from pipeline.track.evaluation_logging import load_class_keys, load_scored_images
from pipeline.track.references import get_run

TRAIN_STEPS = ("pretrain", "finetune", "prune")
EVALUATE = "evaluate"
TAG_MODEL_RUN = "pipeline.upstream.model_run"
TAG_PARENT = "mlflow.parentRunId"
KEY_PARAMS = ("arch", "frozen_layers", "lr", "batch_size", "weight_decay", "epochs", "optimizer")
ID_COLUMNS = ("run_id", "run_name", "step", "evaluate_run_id")
DEFAULT_SORT = ("test_f1_macro", "best_val_f1_macro")  # the first one some row has
# Summary metrics of an evaluate run, after its `<split>_` prefix, in the order shown.
SUMMARY = ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "precision_weighted",
           "recall_weighted", "average_precision_macro")
AVERAGES = ("macro", "weighted")
PER_CLASS = re.compile(r"^(train|val|test)_(f1|precision|recall|average_precision)_(.+)$", re.S)
HASHED_KEY = re.compile(rf"-[0-9a-f]{{{HASH_CHARS}}}$")  # pipeline.evaluate.keys' form for a name MLflow would refuse
# Bootstrap interval bounds (`test_f1_macro_ci_low`): PER_CLASS matches them too, so they are told
# apart first; only those of summary metrics are shown, next to their metric.
INTERVAL = re.compile(r"^(.+)_ci_(low|high)$")
SIGNIFICANCE = ("p_mcnemar", "p_f1_macro", "vs_best")


# --- which runs ---------------------------------------------------------------------------

def _experiment(ref: str):
    exp = mlflow.get_experiment_by_name(ref)
    if exp is None and ref.isdigit():
        try:
            exp = mlflow.get_experiment(ref)
        except MlflowException:
            exp = None
    if exp is None:
        names = [e.name for e in mlflow.search_experiments(max_results=20)]
        raise PipelineError(
            f"no experiment {ref!r} in tracking store {mlflow.get_tracking_uri()}; pass one of "
            f"{', '.join(repr(n) for n in names) or '(none)'} as the experiment, or set MLFLOW_TRACKING_URI to the "
            "store that holds it"
        )
    return exp


def _current_experiment() -> str:
    """The experiment MLflow would log to: MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID, else Default."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID") or "Default"


def _finished(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.info.status == "FINISHED"]


def _descendants(root: Run) -> list[Run]:
    """Children, grandchildren... of `root` (tag mlflow.parentRunId), from one search of its experiment."""
    children = defaultdict(list)
    for run in mlflow.search_runs([root.info.experiment_id], output_format="list"):
        children[run.data.tags.get(TAG_PARENT)].append(run)
    found, frontier = [], [root.info.run_id]
    while frontier:
        level = [run for parent in frontier for run in children.get(parent, [])]
        found += level
        frontier = [run.info.run_id for run in level]
    return found


def select_runs(experiment: str = "", parent: str = "", run_ids: Sequence[str] = ()) -> list[Run]:
    """The runs named (any status), a parent's FINISHED descendants, or an experiment's FINISHED runs
    (the first of these given; CompareConfig allows one)."""
    if run_ids:
        return [get_run(run_id) for run_id in dict.fromkeys(run_ids)]
    if parent:
        runs = _finished(_descendants(get_run(parent)))
        if not runs:
            raise PipelineError(
                f"run {parent} has no FINISHED child runs; pass the parent run of a tune study or of main"
            )
        return runs
    exp = _experiment(experiment or _current_experiment())
    return _finished(mlflow.search_runs([exp.experiment_id], output_format="list"))


# --- the table ----------------------------------------------------------------------------


def _step(run: Run | None) -> str:
    return run.data.tags.get(tracking.TAG_STEP, "") if run else ""


def _number(text: str | None):
    """Params are strings; numbers become numbers so they sort and plot."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _shown(metric: str) -> bool:
    """An evaluate run's metrics minus system/* and per-class precision, recall and AP (per-class
    F1 stays: one number per class is what fits a table)."""
    if metric.startswith("system/"):
        return False
    bound = INTERVAL.match(metric)
    if bound:  # an interval is shown for a summary metric only, never for one class
        m = PER_CLASS.match(bound.group(1))
        return not m or m.group(3) in AVERAGES
    m = PER_CLASS.match(metric)
    return not m or m.group(3) in AVERAGES or m.group(2) == "f1"


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _metric_order(name: str):
    bound = INTERVAL.match(name)
    if bound:  # right after its metric: value, low, high
        return (*_metric_order(bound.group(1)), 1 if bound.group(2) == "low" else 2)
    m = PER_CLASS.match(name)
    if m and m.group(3) not in AVERAGES and m.group(2) == "f1":
        return (1, _natural(name))
    if name.startswith("best_"):
        return (2, _natural(name))
    suffix = name.split("_", 1)[-1]
    return (0, SUMMARY.index(suffix) if suffix in SUMMARY else len(SUMMARY), _natural(name))


def _with_class_names(evaluation: Run) -> dict[str, float]:
    """The evaluate run's metrics, per-class ones named by their class (`test_f1_bird (small)`) where
    its key differs (`test_f1_bird _small_-<hash>`, see pipeline.evaluate.keys), as evaluation/class_keys.json says."""
    metrics = evaluation.data.metrics
    if not any(HASHED_KEY.search(k) for k in metrics):  # every key is its class name: nothing to read
        return metrics
    names = load_class_keys(evaluation.info.run_id)
    renamed = {}
    for metric, value in metrics.items():
        m = PER_CLASS.match(metric)
        name = names.get(m.group(3)) if m else None
        column = f"{m.group(1)}_{m.group(2)}_{name}" if name else metric
        # A class named `macro` keeps its key: its name would read as the macro average.
        renamed[metric if name in AVERAGES or column in metrics else column] = value
    return renamed


def _row(train: Run | None, evaluation: Run | None, model_run_id: str = "") -> dict:
    params = train.data.params if train else {}
    row = {
        "run_id": train.info.run_id if train else model_run_id,
        "run_name": train.info.run_name if train else "",
        "step": _step(train),
        "evaluate_run_id": evaluation.info.run_id if evaluation else "",
        **{p: _number(params.get(p)) for p in KEY_PARAMS},
    }
    if train:
        row["arch"] = tracking.arch_of(train)  # arch=auto resolved
    if evaluation:
        row.update({k: v for k, v in _with_class_names(evaluation).items() if _shown(k)})
    if train:
        row.update({k: v for k, v in train.data.metrics.items() if k.startswith("best_")})
    return row


def _evaluations_of(model_run_ids: set[str], experiment_ids: set[str]) -> list[Run]:
    found = mlflow.search_runs(
        sorted(experiment_ids),
        filter_string=f"tags.`{tracking.TAG_STEP}` = '{EVALUATE}' and attributes.status = 'FINISHED'",
        output_format="list",
    )
    return [run for run in found if run.data.tags.get(TAG_MODEL_RUN) in model_run_ids]


def _get_run_or_none(run_id: str) -> Run | None:
    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        return None  # deleted, or in another tracking store: the row keeps the evaluate run's side


def comparison_table(runs: list[Run]) -> pd.DataFrame:
    """One row per (training run, evaluate run of it): ids, KEY_PARAMS, metrics (see _row)."""
    training = {r.info.run_id: r for r in runs if _step(r) in TRAIN_STEPS}
    evaluations = [r for r in runs if _step(r) == EVALUATE]
    unevaluated = set(training) - {e.data.tags.get(TAG_MODEL_RUN) for e in evaluations}
    if unevaluated:  # their evaluate runs may lie outside the selection (a tune trial evaluated later)
        evaluations += _evaluations_of(unevaluated, {training[t].info.experiment_id for t in unevaluated})
    by_model = defaultdict(list)
    for e in evaluations:
        by_model[e.data.tags.get(TAG_MODEL_RUN, "")].append(e)
    for model_id in [m for m in by_model if m not in training]:
        model_run = _get_run_or_none(model_id) if model_id else None
        if model_run is not None and _step(model_run) in TRAIN_STEPS:
            training[model_id] = model_run
    rows = [_row(t, e) for t_id, t in training.items() for e in by_model.pop(t_id, [None])]
    rows += [_row(None, e, model_id) for model_id, es in by_model.items() for e in es]
    if not rows:
        raise PipelineError(
            "no pretrain, finetune or evaluate runs among the selected runs; select the runs of this pipeline"
        )
    table = pd.DataFrame(rows)
    metrics = sorted((c for c in table.columns if c not in ID_COLUMNS + KEY_PARAMS), key=_metric_order)
    return table[[*ID_COLUMNS, *KEY_PARAMS, *metrics]]


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ID_COLUMNS + KEY_PARAMS and table[c].notna().any()]


def sort_table(table: pd.DataFrame, metric: str = "") -> tuple[pd.DataFrame, str | None]:
    """Best first by `metric` (descending; ascending for a *loss*); rows without it last.
    The default is the first of DEFAULT_SORT that some row has (None: left in run order)."""
    available = metric_columns(table)
    if not metric:
        metric = next((m for m in DEFAULT_SORT if m in available), None)
        if metric is None:
            return table, None
    elif metric not in available:
        raise PipelineError(f"no compared run has metric {metric!r}; sort by one of: {', '.join(available)}")
    ordered = table.sort_values(metric, ascending="loss" in metric, na_position="last", kind="stable")
    return ordered.reset_index(drop=True), metric


# --- output -------------------------------------------------------------------------------


def format_table(table: pd.DataFrame, width: int | None = None) -> str:
    """Plain text, 4 significant digits; wider than `width` characters it wraps into column blocks."""
    return table.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", line_width=width)


def write_table(table: pd.DataFrame, path: str) -> None:
    """CSV (full precision) or else Markdown (4 significant digits), chosen by the file's suffix."""
    if Path(path).suffix.lower() == ".csv":
        table.to_csv(path, index=False)
    else:
        cells = table.astype(object).where(table.notna(), None)  # tabulate leaves None cells blank, not NaN
        Path(path).write_text(cells.to_markdown(index=False, floatfmt=".4g", missingval="") + "\n")


def _per_class_f1(table: pd.DataFrame) -> tuple[str, list[str], list[str]]:
    """(split, columns, class names) of the per-class F1 metrics; test preferred."""
    found = defaultdict(list)
    for column in metric_columns(table):
        m = PER_CLASS.match(column)
        if m and m.group(2) == "f1" and m.group(3) not in AVERAGES and not INTERVAL.match(column):
            found[m.group(1)].append(column)
    split = next((s for s in ("test", "val", "train") if found[s]), "")
    columns = found[split]
    return split, columns, [c[len(f"{split}_f1_") :] for c in columns]


# --- paired significance -------------------------------------------------------------------

@functools.lru_cache(maxsize=256)  # a finished evaluate run's artifacts do not change: one download per run
def scored_images_of(evaluate_run_id: str) -> ScoredImages | None:
    """An evaluate run's per-image predictions on the split it scored."""
    return load_scored_images(evaluate_run_id, mlflow.get_run(evaluate_run_id).data.params.get("split", "test"))


def add_significance(table: pd.DataFrame, metric: str | None) -> pd.DataFrame:
    """stats.significance_columns (p_mcnemar, p_f1_macro, vs_best) against the top row, placed after
    the metric sorted by (and its interval), else after the key params."""
    ids = [i for i in table["evaluate_run_id"].dropna().unique() if i]
    scored = {run_id: found for run_id in ids if (found := scored_images_of(run_id)) is not None}
    if not scored:
        return table
    columns = significance_columns(table, scored)
    anchor = next((c for c in (f"{metric}_ci_high", metric) if metric and c in table), KEY_PARAMS[-1])
    at = list(table.columns).index(anchor) + 1
    return pd.concat([table.iloc[:, :at], columns, table.iloc[:, at:]], axis=1)


def compare(cfg: CompareConfig) -> tuple[pd.DataFrame, str | None]:
    """Select, join, sort, add the paired tests against the top row; write the table and plot if asked.
    Returns (table, the metric sorted by)."""
    table, metric = sort_table(comparison_table(select_runs(cfg.experiment, cfg.parent, cfg.run_ids)), cfg.sort)
    table = add_significance(table, metric)
    if cfg.output:
        write_table(table, cfg.output)
    if cfg.plot:
        plot_comparison(table, cfg.plot, _per_class_f1(table))
    return table, metric
