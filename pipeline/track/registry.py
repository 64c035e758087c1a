"""The model registry: a trained run's model becomes a version with a description a reviewer can
read (data, pretrained source, test metrics), and alias `champion` follows the best version.

finetune/pretrain (`register_as`) and tune (`register_as`, best trial) both register through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import PipelineError
from pipeline.evaluate.scoring import score_net
from pipeline.model.device import resolve_device
from pipeline.model.models import build_logged_net
from pipeline.track import tracking
from pipeline.track.evaluation_logging import load_class_keys, log_evaluation
from pipeline.track.references import load_dataset_ref, load_model_ref

CHAMPION = "champion"
MAX_LISTED_CLASSES = 50  # a description lists this many class names, then a count
TEST_METRICS = ("test_accuracy", "test_f1_macro", "test_precision_macro", "test_recall_macro")


def require_test_split(manifest: dict) -> None:
    if not sum(manifest.get("counts", {}).get("test", [])):
        raise PipelineError("register_as scores the model on the test split, and this dataset has none; "
                            "re-run prepare_data with test_fraction > 0 (or register without register_as)")


def evaluate_run_on_test(run_id: str, data: str, device: str = "auto", precision: str = "auto"):
    """The run's logged model scored on the dataset's test split: (EvaluationReport, test images, class names)."""
    state, meta = load_model_ref(run_id)
    ds, _, _ = load_dataset_ref(data, ("test",))
    test = ds.splits["test"]
    report = score_net(build_logged_net(meta, state), test.images, test.labels, meta["class_names"], "test",
                       resolve_device(device), precision)
    return report, test.images, meta["class_names"]


def describe_run(run_id: str, metrics: dict[str, float], test_images: int, class_names: Sequence[str] = ()) -> str:
    """Markdown for the version's description: what was trained, on what, from what, how well, and
    (given) which classes, by their names as the data had them."""
    run = mlflow.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    step = tags.get(tracking.TAG_STEP, "training")
    frozen = f", frozen_layers={params['frozen_layers']}" if step == "finetune" else ""
    pretrained = (
        tags.get("pipeline.upstream.pretrained")
        or f"none ({params.get('weights', 'none')} weights, trained from scratch)"
    )
    scores = ", ".join(f"{k[len('test_') :]} {metrics[k]:.4f}" for k in TEST_METRICS if k in metrics)
    return "\n".join(
        [
            f"**{step} {tracking.arch_of(run) or '?'}**{frozen}, lr={params.get('lr', '?')}, "
            f"batch_size={params.get('batch_size', '?')}, "
            f"epochs={params.get('epochs', '?')} (run `{run_id}`)",
            "",
            f"- data: `{tags.get('pipeline.upstream.data', '?')}`",
            f"- pretrained from: `{pretrained}`",
            f"- test split ({test_images} images): {scores}",
            *([f"- classes ({len(class_names)}): {_listed(class_names)}"] if class_names else []),
        ]
    )


def _listed(class_names: Sequence[str]) -> str:
    """Each name in backticks (Markdown shows `a, b` in a name as it is); the first MAX_LISTED_CLASSES."""
    shown = ", ".join(f"`` {name} ``" for name in class_names[:MAX_LISTED_CLASSES])
    return shown + (
        f" and {len(class_names) - MAX_LISTED_CLASSES} more" if len(class_names) > MAX_LISTED_CLASSES else ""
    )


def _model_source(client: MlflowClient, run_id: str) -> str:
    """The run's logged model: models:/<model id> (MLflow 3's own id, which runs:/<run>/model resolves
    to with a warning), else runs:/<run>/model. Either way the version records the run as its source."""
    outputs = client.get_run(run_id).outputs
    model_ids = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    return f"models:/{model_ids[-1]}" if model_ids else f"runs:/{run_id}/{tracking.MODEL_NAME}"


def register_run_model(run_id: str, name: str, description: str, tags: dict[str, str]) -> str:
    """Register the run's model under `name` (one version per run: registering again updates it)."""
    client = MlflowClient()
    existing = _versions_of_run(client, name, run_id)
    if existing:
        version = existing[0]
    else:
        created = mlflow.register_model(_model_source(client, run_id), name).version
        # Tune workers finishing together may each register the run: all keep the lowest version
        # and each drops its own duplicate (a worker's search always sees its own new version).
        version = _versions_of_run(client, name, run_id)[0]
        if created != version:
            client.delete_model_version(name, created)
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version


def _versions_of_run(client: MlflowClient, name: str, run_id: str) -> list[str]:
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return sorted((v.version for v in found), key=int)


def champion_holds(name: str, metric: str, value: float, higher_is_better: bool = True) -> str | None:
    """Why alias `champion` should stay where it is (it holds a `metric` version tag at least as good
    as `value`, or none to compare), or None when a model scoring `value` should take it."""
    try:
        champion = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    held = champion.tags.get(metric)
    if held is None:
        return f"{name}@{CHAMPION} (version {champion.version}) has no {metric} to compare; left as is"
    better = value > float(held) if higher_is_better else value < float(held)
    return (
        None
        if better
        else f"{name}@{CHAMPION} (version {champion.version}, {metric}={float(held):.4f}) stays; the new model has "
             f"{value:.4f}"
    )


def promote(name: str, version: str) -> str:
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    return f"models:/{name}@{CHAMPION} now points to version {version}"


def register_scored_run(
    run_id: str, name: str, metrics: dict[str, float], test_images: int, class_names: Sequence[str] = ()
) -> str:
    """Register the run's model with its test metrics (description and version tags) and promote it
    to `champion` on a better test macro-F1."""
    version = register_run_model(
        run_id,
        name,
        describe_run(run_id, metrics, test_images, class_names),
        {k: f"{metrics[k]:.6g}" for k in TEST_METRICS if k in metrics},
    )
    reason = champion_holds(name, "test_f1_macro", metrics["test_f1_macro"]) or promote(name, version)
    print(f"registered {name} version {version}; {reason}")
    return version


def register_trained_run(run_id: str, name: str, report, test_images, class_names: list[str]) -> str:
    """finetune/pretrain `register_as`: log the test-split report to the run (the active one), then
    register the run's model with those metrics."""
    log_evaluation(report, class_names, "test", test_images)
    return register_scored_run(run_id, name, report.metrics, len(test_images), class_names)


def register_evaluated(train_run_id: str, evaluate_run_id: str, name: str, test_images: int) -> str:
    """main's `register_as`: register the fine-tuned model with the test metrics its evaluate run logged."""
    logged = mlflow.get_run(evaluate_run_id).data.metrics
    metrics = {k: logged[k] for k in TEST_METRICS if k in logged}
    if "test_f1_macro" not in metrics:
        raise PipelineError(
            f"evaluate run {evaluate_run_id} has no test metrics; register a model evaluated on the test split"
        )
    return register_scored_run(
        train_run_id, name, metrics, test_images, list(load_class_keys(evaluate_run_id).values())
    )
