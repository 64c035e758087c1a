"""compare's plot of a comparison table: per-class F1 across runs, and frozen_layers against macro F1."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import NUM_STAGES
from pipeline.evaluate.plots import pyplot

MAX_PLOTTED_RUNS = 10  # bars per class beyond this are unreadable


def _label(row, with_evaluation: bool) -> str:
    name = f"{row['run_name'] or 'run'} [{row['run_id'][:8]}]"
    return name + (f" eval {row['evaluate_run_id'][:8]}" if with_evaluation else "")


def _interval_bars(axes, rows: pd.DataFrame, column: str, x: pd.Series, y: pd.Series) -> None:
    """Error bars from `<column>_ci_low/_ci_high` (95% bootstrap intervals) where rows have them."""
    low, high = f"{column}_ci_low", f"{column}_ci_high"
    if low not in rows or high not in rows:
        return
    has = rows[low].notna() & rows[high].notna()
    if has.any():
        below, above = (y - rows[low].astype(float))[has], (rows[high].astype(float) - y)[has]
        axes.errorbar(x[has], y[has], yerr=[below.clip(lower=0), above.clip(lower=0)], fmt="none",
                      ecolor="gray", capsize=3, linewidth=1)


def plot_comparison(table: pd.DataFrame, path: str, per_class: tuple[str, list[str], list[str]]) -> None:
    """Two panels: per-class F1 as grouped bars (the first MAX_PLOTTED_RUNS rows), and
    frozen_layers against macro F1 (test where evaluated, with its 95% interval as an error bar,
    else best validation). per_class: (split, columns, class names) of the per-class F1 columns."""
    plt = pyplot()
    split, columns, classes = per_class
    fig, (bars, scatter) = plt.subplots(
        1, 2, figsize=(max(10.0, 4 + 0.6 * len(classes)), 4.8), gridspec_kw={"width_ratios": [2, 1]}
    )
    rows = table[table[columns].notna().any(axis=1)] if columns else table.iloc[:0]
    if rows.empty:
        bars.axis("off")
        bars.text(0.5, 0.5, "no per-class F1: none of these models has an evaluate run", ha="center", va="center")
    else:
        shown = rows.head(MAX_PLOTTED_RUNS)
        x = np.arange(len(classes))
        width = 0.8 / len(shown)
        twice = shown.run_id.duplicated(keep=False)  # a model evaluated twice: tell its rows apart
        for k, (i, row) in enumerate(shown.iterrows()):
            f1 = row[columns].astype(float).fillna(0).to_numpy()
            bars.bar(x + (k - (len(shown) - 1) / 2) * width, f1, width, label=_label(row, twice[i]))
        bars.set_xticks(
            x, classes, rotation=45 if len(classes) > 10 else 0, ha="right" if len(classes) > 10 else "center"
        )
        more = f" (first {len(shown)} of {len(rows)})" if len(rows) > len(shown) else ""
        bars.set(ylabel="F1", ylim=(0, 1.05), title=f"per-class {split} F1{more}")
        bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    frozen = pd.to_numeric(table["frozen_layers"], errors="coerce")
    for column, marker, name in (
        ("test_f1_macro", "o", "test F1 (macro)"),
        ("best_val_f1_macro", "x", "best val F1 (macro), not evaluated"),
    ):
        if column not in table:
            continue
        y = table[column].astype(float)
        if column != "test_f1_macro" and "test_f1_macro" in table:
            y = y.where(table["test_f1_macro"].isna())  # evaluated rows are plotted with their test F1
        keep = frozen.notna() & y.notna()
        if keep.any():
            scatter.scatter(frozen[keep], y[keep], marker=marker, label=name)
            _interval_bars(scatter, table[keep], column, frozen[keep], y[keep])
    scatter.set(
        xlabel="frozen_layers (stages frozen)",
        ylabel="macro F1",
        title="frozen layers vs F1",
        xlim=(-0.5, NUM_STAGES + 0.5),
    )
    scatter.set_xticks(range(6))
    if scatter.get_legend_handles_labels()[0]:
        scatter.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # the legend sits below the bars
    plt.close(fig)
