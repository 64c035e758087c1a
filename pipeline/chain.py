"""main: prepare_data -> pretrain -> finetune -> evaluate, each a nested run under one parent.

A step is reused instead of recomputed when a FINISHED run exists whose step, parameters,
upstream run ids, code version and (for image folders/archives) source fingerprint all match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import mlflow

from pipeline import tracking
from pipeline.config import EvaluateConfig, PrepareConfig, TrainConfig
from pipeline.workflow import run_evaluate, run_prepare, run_train


@dataclass(frozen=True)
class ChainConfig:
    prepare: PrepareConfig
    pretrain: TrainConfig  # its `data` is filled in from the prepare_data run
    finetune: TrainConfig  # its `data` and `pretrained` are filled in
    evaluate_split: str = "test"


def source_fingerprint(source: str) -> str:
    """Cheap identity of a local source (paths, sizes, mtimes), so edited data is not reused."""
    if not os.path.exists(source):
        return source
    h = hashlib.sha256()
    paths = [source] if os.path.isfile(source) else sorted(
        os.path.join(d, f) for d, _, files in os.walk(source) for f in files
    )
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, source)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# Parameters that change what a run records, not what it computes: a rerun that only flips them reuses.
NOT_IN_CACHE_KEY = ("system_metrics",)


def _reuse_or_run(step: str, params: dict, upstream: dict, experiment_id: str, run: Callable[[dict], str], log) -> str:
    key = tracking.cache_key(step, {k: v for k, v in params.items() if k not in NOT_IN_CACHE_KEY}, upstream)
    found = tracking.find_finished_run(key, experiment_id)
    if found:
        log(f"main: reusing {step} run {found} (same parameters, inputs and code)")
        mlflow.set_tag(f"pipeline.{step}_reused", "true")
        return found
    run_id = run({tracking.TAG_CACHE_KEY: key})
    log(f"main: ran {step} -> {run_id}")
    return run_id


def run_chain(cfg: ChainConfig, log=print) -> dict[str, str]:
    """Run (or reuse) the four steps; returns {step: run_id}."""
    ids: dict[str, str] = {}
    with tracking.step_run("main", f"main {cfg.pretrain.arch} frozen={cfg.finetune.frozen_layers}") as parent:
        exp = parent.info.experiment_id
        tracking.log_params({"source": cfg.prepare.source, "arch": cfg.pretrain.arch, "frozen_layers": cfg.finetune.frozen_layers})

        prep_params = dataclasses.asdict(cfg.prepare)
        ids["prepare_data"] = _reuse_or_run(
            "prepare_data", prep_params, {"source": source_fingerprint(cfg.prepare.source)}, exp,
            lambda tags: run_prepare(cfg.prepare, nested=True, tags=tags), log,
        )
        pre = dataclasses.replace(cfg.pretrain, data=ids["prepare_data"])
        ids["pretrain"] = _reuse_or_run(
            "pretrain", pre.to_params(), {"data": ids["prepare_data"]}, exp,
            lambda tags: run_train(pre, "pretrain", nested=True, tags=tags), log,
        )
        fin = dataclasses.replace(cfg.finetune, data=ids["prepare_data"], pretrained=ids["pretrain"])
        ids["finetune"] = _reuse_or_run(
            "finetune", fin.to_params(), {"data": ids["prepare_data"], "pretrained": ids["pretrain"]}, exp,
            lambda tags: run_train(fin, "finetune", nested=True, tags=tags), log,
        )
        ev = EvaluateConfig(model=ids["finetune"], data=ids["prepare_data"], split=cfg.evaluate_split,
                            precision=cfg.finetune.precision, device=cfg.finetune.device)
        ids["evaluate"] = _reuse_or_run(
            "evaluate", dataclasses.asdict(ev), {"model": ids["finetune"], "data": ids["prepare_data"]}, exp,
            lambda tags: run_evaluate(ev, nested=True, tags=tags), log,
        )
        mlflow.set_tags({f"pipeline.{step}_run": rid for step, rid in ids.items()})
        final = mlflow.get_run(ids["evaluate"]).data.metrics
        # The headline numbers on the parent, so the runs table compares whole pipelines.
        tracking.log_metrics({k: v for k, v in final.items() if k == f"{cfg.evaluate_split}_accuracy" or k.endswith(("_macro", "_weighted"))})
        tracking.set_note(describe_chain(cfg, ids, final, parent.info.run_id))
    return ids


def describe_chain(cfg: ChainConfig, ids: dict[str, str], final: dict[str, float], parent_id: str) -> str:
    """The parent run's description in the UI: the headline result, then each step and whether it was reused."""
    split = cfg.evaluate_split
    tags = mlflow.get_run(parent_id).data.tags
    lines = [f"{cfg.pretrain.arch} pretrained and fine-tuned with the first {cfg.finetune.frozen_layers} of 5 stages "
             f"frozen, on `{cfg.prepare.source}`. {split.capitalize()} accuracy {final.get(f'{split}_accuracy', float('nan')):.4f}, "
             f"macro-F1 {final.get(f'{split}_f1_macro', float('nan')):.4f}.", ""]
    for step, run_id in ids.items():
        how = "reused" if tags.get(f"pipeline.{step}_reused") == "true" else "ran"
        lines.append(f"- {step}: {how} `{run_id}` ({tracking.run_name_of(run_id)})")
    return "\n".join(lines)
