"""evaluate as one tracked MLflow run: score a model on a dataset split or the user's own images
(any folder layout), as the served model would, and log metrics, intervals, tables and plots.
"""

from __future__ import annotations

import dataclasses
import os

import mlflow
import numpy as np

from pipeline.config import EvaluateConfig
from pipeline.data.sources import choose_split, decode_tree, scan_image_tree
from pipeline.errors import PipelineError
from pipeline.evaluate.calibration import temperature_of
from pipeline.evaluate.scoring import score_net
from pipeline.evaluate.stats import with_interval
from pipeline.model.device import resolve_device
from pipeline.model.models import build_logged_net
from pipeline.track import tracking
from pipeline.track.evaluation_logging import log_evaluation
from pipeline.track.references import load_dataset_ref, load_model_ref, run_name_of


def _evaluation_images(cfg: EvaluateConfig, meta: dict):
    """(images, labels, data_uri, manifest or None, skipped files) from a dataset reference or an image
    folder/archive. Class names and splits are checked before any image is decoded."""
    is_user_images = os.path.exists(cfg.data) and not os.path.isfile(os.path.join(cfg.data, "manifest.json"))
    if is_user_images:
        return _user_images(cfg, meta)
    ds, manifest, uri = load_dataset_ref(cfg.data, (cfg.split,))
    if ds.class_names != meta["class_names"]:
        raise PipelineError(
            f"dataset classes ({', '.join(ds.class_names)}) differ from the model's "
            f"({', '.join(meta['class_names'])}); evaluate on data with the model's classes"
        )
    s = ds.splits[cfg.split]
    return s.images, s.labels, uri, manifest, []


def _user_images(cfg: EvaluateConfig, meta: dict):
    """An image folder/archive in any accepted layout: the split named `split` when the tree has it,
    else its only split (a plain `<class>/<img>` folder, or `test/<class>/<img>` alone)."""
    tree = scan_image_tree(cfg.data)
    unknown = [c for c in tree.class_names if c not in meta["class_names"]]
    if unknown:
        raise PipelineError(
            f"{cfg.data!r} has class folders the model does not know: {', '.join(unknown)}; "
            f"the model's classes are {', '.join(meta['class_names'])}"
        )
    split = choose_split(tree, cfg.split)
    src = decode_tree(tree, meta["image_size"], cfg.on_bad_image, cfg.max_image_pixels, splits=(split,))
    images = src.splits[split]
    remap = np.array([meta["class_names"].index(c) for c in src.class_names], np.int64)
    return images.images, remap[images.labels], os.path.abspath(cfg.data), None, src.skipped_files


def run_evaluate(cfg: EvaluateConfig, nested: bool = False, tags: dict | None = None) -> str:
    """evaluate: score a model on a split (or the user's images); log metrics, tables and plots."""
    device = resolve_device(cfg.device)
    with tracking.step_run("evaluate", f"evaluate {cfg.split}", tags, nested) as run:
        tracking.log_params(dataclasses.asdict(cfg))
        state, meta = load_model_ref(cfg.model)
        images, labels, data_uri, manifest, skipped = _evaluation_images(cfg, meta)
        mlflow.set_tags({"pipeline.upstream.model": meta["model_uri"],
                         "pipeline.upstream.model_run": meta["source_run_id"], "pipeline.upstream.data": data_uri})
        model_name = run_name_of(meta["source_run_id"])
        if model_name:  # "evaluate test: finetune resnet18 frozen=3 lr=0.01" scans better in the runs table
            mlflow.set_tag("mlflow.runName", f"evaluate {cfg.split}: {model_name}")
        if manifest is not None:
            tracking.log_dataset_input(manifest, data_uri, context="evaluation")
        report = score_net(build_logged_net(meta, state), images, labels, meta["class_names"], cfg.split, device,
                           cfg.precision, cfg.tta, cfg.batch_size, temperature_of(meta))  # as served
        intervals = log_evaluation(report, meta["class_names"], cfg.split, images,
                                   digest=manifest["digest"] if manifest else "")
        m = {**report.metrics, **intervals}
        if manifest is None:  # the user's images: say what was left out, as prepare_data does
            tracking.log_metrics({"skipped_files": len(skipped)})
            if skipped:
                mlflow.log_text("\n".join(skipped) + "\n", "evaluation/skipped_files.txt")
                print(f"evaluate: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
        tracking.set_note(f"Scored `{meta['model_uri']}` on the {cfg.split} split of `{data_uri}` ({len(labels)} images"
                          + (f"; {len(skipped)} unreadable files skipped" if skipped else "") + "): "
                          f"accuracy {with_interval(m, f'{cfg.split}_accuracy')}, "
                          f"macro-F1 {with_interval(m, f'{cfg.split}_f1_macro')}. "
                          "Plots and tables under `evaluation/`.")
        return run.info.run_id
