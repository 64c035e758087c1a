"""The transfer study's result from numbers already measured: its table, the best frozen depth, the paired
tests of that depth against the scratch baseline, the verdict paragraph and the accuracy-vs-depth plot.

pandas, numpy and matplotlib only (no MLflow): pipeline.run.transfer gathers the numbers and logs these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from pipeline.evaluate.stats import ALPHA, LEVEL, mcnemar_exact, paired_bootstrap_f1

SCRATCH = "scratch"
COLUMNS = ["frozen_depth", "test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high", "test_f1_macro",
           "test_f1_macro_ci_low", "test_f1_macro_ci_high", "trainable_params", "train_seconds", "run_seconds"]


@dataclass(frozen=True)
class Arm:
    """One trained model of the study, scored on the target's test split."""

    frozen_depth: int | None  # None = the scratch baseline
    test_accuracy: float
    test_accuracy_ci_low: float
    test_accuracy_ci_high: float
    test_f1_macro: float
    test_f1_macro_ci_low: float
    test_f1_macro_ci_high: float
    trainable_params: int
    train_seconds: float  # the training passes alone (no validation, logging)
    run_seconds: float  # the training run's wall time, start to end

    @property
    def label(self) -> str:
        return SCRATCH if self.frozen_depth is None else str(self.frozen_depth)


@dataclass(frozen=True)
class PairedTests:
    """The best frozen depth against scratch on the same test images."""

    p_mcnemar: float  # exact McNemar: equally accurate?
    p_f1_macro: float  # paired bootstrap: equal macro-F1?
    images: int


def results_table(arms: Sequence[Arm]) -> pd.DataFrame:
    """One row per arm, the frozen depths in order and scratch last; frozen_depth is a string ("0".."5",
    "scratch") so the column reads the same in CSV and Markdown."""
    ordered = sorted(arms, key=lambda a: (a.frozen_depth is None, a.frozen_depth or 0))
    rows = [{**asdict(a), "frozen_depth": a.label} for a in ordered]
    return pd.DataFrame(rows, columns=COLUMNS)


def best_arm(arms: Sequence[Arm]) -> Arm:
    """The fine-tuned arm with the highest test accuracy; ties go to higher macro-F1, then to the deeper
    freeze (cheaper to fine-tune)."""
    tuned = [a for a in arms if a.frozen_depth is not None]
    if not tuned:
        raise ValueError("no fine-tuned arm: the study needs at least one frozen depth")
    return max(tuned, key=lambda a: (a.test_accuracy, a.test_f1_macro, a.frozen_depth))


def scratch_arm(arms: Sequence[Arm]) -> Arm:
    found = [a for a in arms if a.frozen_depth is None]
    if len(found) != 1:
        raise ValueError(f"expected one scratch arm, got {len(found)}")
    return found[0]


def paired_tests(y_true, pred_best, pred_scratch, num_classes: int, seed: int = 0) -> PairedTests:
    """Exact McNemar and paired-bootstrap macro-F1 p-values of two arms' predictions on the same images."""
    y_true, pred_best, pred_scratch = np.asarray(y_true), np.asarray(pred_best), np.asarray(pred_scratch)
    return PairedTests(p_mcnemar=mcnemar_exact(pred_best == y_true, pred_scratch == y_true),
                       p_f1_macro=paired_bootstrap_f1(y_true, pred_best, pred_scratch, num_classes, seed=seed),
                       images=len(y_true))


def outcome(best: Arm, scratch: Arm) -> str:
    """"beats" when the best depth's accuracy interval lies wholly above scratch's accuracy, "loses" when
    it lies wholly below, else "unresolved"."""
    if best.test_accuracy_ci_low > scratch.test_accuracy:
        return "beats"
    if best.test_accuracy_ci_high < scratch.test_accuracy:
        return "loses"
    return "unresolved"


def parent_metrics(arms: Sequence[Arm], tests: PairedTests | None) -> dict[str, float]:
    """The parent run's metrics: each arm's test accuracy/macro-F1 (with intervals), trainable params and
    training seconds, then best_depth, the gains of the best depth over scratch and the paired p-values."""
    metrics: dict[str, float] = {}
    for a in arms:
        suffix = SCRATCH if a.frozen_depth is None else f"depth_{a.frozen_depth}"
        for name in COLUMNS[1:]:
            metrics[f"{name}_{suffix}"] = float(getattr(a, name))
    best, scratch = best_arm(arms), scratch_arm(arms)
    metrics.update(best_depth=best.frozen_depth, test_accuracy_best=best.test_accuracy,
                   test_f1_macro_best=best.test_f1_macro,
                   accuracy_gain_over_scratch=best.test_accuracy - scratch.test_accuracy,
                   f1_macro_gain_over_scratch=best.test_f1_macro - scratch.test_f1_macro,
                   beats_scratch=float(outcome(best, scratch) == "beats"))
    if tests is not None:
        metrics.update(p_mcnemar_best_vs_scratch=tests.p_mcnemar, p_f1_macro_best_vs_scratch=tests.p_f1_macro)
    return metrics


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _points(value: float) -> str:
    return f"{100 * value:+.1f} points"


def _frozen(depth: int) -> str:
    return "with no stage frozen" if depth == 0 else f"with the first {depth} stage{'s' * (depth > 1)} frozen"


def _ci(a: Arm) -> str:
    return f"{_pct(a.test_accuracy)} ({LEVEL:.0%} CI {_pct(a.test_accuracy_ci_low)}-{_pct(a.test_accuracy_ci_high)})"


def verdict(arms: Sequence[Arm], tests: PairedTests | None, *, target_images: int | None = None,
            alpha: float = ALPHA) -> str:
    """One paragraph: whether pretrained + frozen beats scratch by more than its interval, by how much and
    at which depth, what it costs, and what would change the answer where it does not."""
    best, scratch = best_arm(arms), scratch_arm(arms)
    gain = best.test_accuracy - scratch.test_accuracy
    result = outcome(best, scratch)
    budget = f" with {target_images} target training images per class" if target_images else ""
    cost = (f" It trains {best.trainable_params:,} of the parameters scratch trains ({scratch.trainable_params:,}) "
            f"and its training passes took {best.train_seconds:.0f} s against scratch's {scratch.train_seconds:.0f} s.")
    if tests is None:
        paired = " No paired test: the two arms' predictions are not on the same images."
    else:
        significant = min(tests.p_mcnemar, tests.p_f1_macro) < alpha
        paired = (f" On the same {tests.images:,} test images the paired tests give p = {tests.p_mcnemar:.3g} (exact "
                  f"McNemar, accuracy) and p = {tests.p_f1_macro:.3g} (paired bootstrap, macro-F1): "
                  + (f"a significant difference at the {alpha:.0%} level" if significant
                     else f"no difference at the {alpha:.0%} level")
                  + ". The best depth is picked on these same test images, out of "
                  f"{sum(a.frozen_depth is not None for a in arms)}, so the p-values flatter it somewhat.")
    if result == "beats":
        head = (f"Pretrained and fine-tuned {_frozen(best.frozen_depth)}, the network beats "
                f"training from scratch{budget}: test accuracy {_ci(best)} against {_pct(scratch.test_accuracy)}, "
                f"{_points(gain)} (macro-F1 {_points(best.test_f1_macro - scratch.test_f1_macro)}), and the "
                f"interval excludes the scratch baseline.")
        return head + cost + paired
    if result == "loses":
        head = (f"Pretraining does not pay here{budget}: training from scratch reaches "
                f"{_pct(scratch.test_accuracy)} test accuracy, above the whole interval of the best fine-tuned depth "
                f"(frozen depth {best.frozen_depth}: {_ci(best)}, {_points(gain)}).")
    else:
        head = (f"Pretrained + frozen does not beat scratch by more than its interval{budget}: the best depth "
                f"(frozen depth {best.frozen_depth}) reaches {_ci(best)} against scratch's "
                f"{_pct(scratch.test_accuracy)} ({_points(gain)}), inside the interval.")
    change = (" What would change it: a source that teaches more (more source images per class, more pretrain "
              "epochs), weights=imagenet on a machine that can download them, or more finetune_epochs where the "
              "runs' validation accuracy was still rising at their last epoch.")
    return head + cost + paired + change


def markdown_table(table: pd.DataFrame) -> str:
    """The results table in Markdown: percentages with their intervals, parameters and seconds."""
    lines = ["| frozen depth | test accuracy (95% CI) | test macro-F1 (95% CI) | trainable params | train s | run s |",
             "|---|---|---|---:|---:|---:|"]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.frozen_depth} "
            f"| {_pct(row.test_accuracy)} ({_pct(row.test_accuracy_ci_low)}-{_pct(row.test_accuracy_ci_high)}) "
            f"| {_pct(row.test_f1_macro)} ({_pct(row.test_f1_macro_ci_low)}-{_pct(row.test_f1_macro_ci_high)}) "
            f"| {int(row.trainable_params):,} | {row.train_seconds:.0f} | {row.run_seconds:.0f} |")
    return "\n".join(lines) + "\n"


def accuracy_vs_depth_figure(table: pd.DataFrame):
    """Test accuracy with its interval at each frozen depth; the scratch baseline as a horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = table[table.frozen_depth != SCRATCH]
    depths = tuned.frozen_depth.astype(int).to_numpy()
    acc = tuned.test_accuracy.to_numpy()
    errors = np.vstack([acc - tuned.test_accuracy_ci_low.to_numpy(), tuned.test_accuracy_ci_high.to_numpy() - acc])
    fig, ax = plt.subplots(figsize=(6, 4))
    scratch = table[table.frozen_depth == SCRATCH]
    if len(scratch):
        s = scratch.iloc[0]
        ax.axhspan(s.test_accuracy_ci_low, s.test_accuracy_ci_high, color="tab:gray", alpha=0.25,
                   label=f"scratch {LEVEL:.0%} CI")
        ax.axhline(s.test_accuracy, color="tab:gray", linestyle="--", label=f"scratch {_pct(s.test_accuracy)}")
    ax.errorbar(depths, acc, yerr=errors, fmt="o-", capsize=4, color="tab:blue",
                label=f"pretrained, fine-tuned ({LEVEL:.0%} CI)")
    ax.set_xticks(range(0, max(5, int(depths.max()) if len(depths) else 5) + 1))
    ax.set_xlabel("frozen depth (stages frozen: stem, layer1..layer4)")
    ax.set_ylabel("test accuracy")
    ax.set_title("What freezing buys: accuracy against frozen depth")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig
