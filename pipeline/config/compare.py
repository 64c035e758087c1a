"""compare's config: which runs go in the table, its order, and the files written."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pipeline.config.base import opt
from pipeline.errors import PipelineError

TABLE_SUFFIXES = (".csv", ".md")


@dataclass(frozen=True)
class CompareConfig:
    """Which runs `compare` puts in its table, the sort order, and the files it writes."""

    experiment: str = opt(
        "",
        "experiment name (or id) whose FINISHED runs to compare; default (no selection at all): the current experiment",
    )
    parent: str = opt("", "run id of a tune study's or main's parent run: compare its FINISHED descendants")
    runs: str = opt("", "run ids (training or evaluate runs) separated by spaces or commas, as RUN_ID arguments are")
    sort: str = opt(
        "", "metric to sort by, best first (lowest first for a *loss*); empty = test_f1_macro, else best_val_f1_macro"
    )
    output: str = opt("", "also write the table to FILE.csv (full precision) or FILE.md (Markdown)")
    plot: str = opt("", "write FILE.png: per-class F1 across runs, and frozen_layers vs macro F1")

    def __post_init__(self) -> None:
        given = [
            name
            for name, value in (("experiment", self.experiment), ("parent", self.parent), ("run ids", self.run_ids))
            if value
        ]
        if len(given) > 1:
            raise PipelineError(
                f"{' and '.join(given)} were both given; select runs with one of experiment, parent or run ids"
            )
        if self.output and not self.output.lower().endswith(TABLE_SUFFIXES):
            raise PipelineError(f"output {self.output!r} has an unknown format; name a .csv or .md file, e.g. runs.csv")
        if self.plot and not self.plot.lower().endswith(".png"):
            raise PipelineError(f"plot {self.plot!r} is not a .png file name; use e.g. compare.png")
        for path in (self.output, self.plot):
            folder = os.path.dirname(path) or "."
            if path and not os.path.isdir(folder):
                raise PipelineError(f"folder {folder!r} for {path!r} does not exist; create it or write elsewhere")

    @property
    def run_ids(self) -> list[str]:
        return list(dict.fromkeys(r for r in re.split(r"[\s,]+", self.runs) if r))
