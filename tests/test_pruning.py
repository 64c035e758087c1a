"""prune: channel pruning cuts MACs as asked, the pruned model loads without pickling wherever a model goes."""

import mlflow
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from pipeline.config import EvaluateConfig, PrepareConfig, PruneConfig, TrainConfig
from pipeline.errors import PipelineError
from pipeline.model.models import PRUNED_LAYERS, build_logged_net, create_model, pruned_layers
from pipeline.prune.pruning import count_macs_and_params, prune_channels
from pipeline.track.references import load_dataset_ref, load_model_ref
from pipeline.track.tracking import TAG_STEP


def hooked_macs(net: torch.nn.Module, image_size: int) -> int:
    """Multiply-accumulates of the convolutions and Linears of one forward pass, counted from the
    shapes each layer sees: an independent check of torch-pruning's count."""
    total = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total.append(output[0].numel() * module.in_channels // module.groups * k)
        else:
            total.append(module.in_features * module.out_features)

    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, image_size, image_size))
    for h in handles:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("importance", ["magnitude", "bn_scale", "taylor"])
def test_pruning_half_the_channels_leaves_a_quarter_of_the_macs_and_the_output_shape(importance):
    torch.manual_seed(0)
    net = create_model("resnet9", 4)
    before = hooked_macs(net, 16)
    widths = {n: m.out_channels for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
    batches = [(torch.randn(8, 3, 16, 16), torch.arange(8) % 4)]
    prune_channels(net, 16, 0.5, importance, iterative_steps=2, gradient_batches=batches)
    after = hooked_macs(net, 16)
    # Conv MACs scale with in x out channels: halving both leaves 1/4 (the 3-channel input and the
    # class Linear keep theirs, so slightly more).
    assert 0.24 < after / before < 0.27
    assert abs(count_macs_and_params(net, 16)[0] - after) / after < 0.02  # torch-pruning counts the same
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.out_channels == widths[name] // 2, name
    assert net.fc[-1].out_features == 4
    assert net(torch.randn(3, 3, 16, 16)).shape == (3, 4)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_taylor_needs_training_images():
    with pytest.raises(PipelineError, match="importance=taylor needs gradient batches"):
        prune_channels(create_model("resnet9", 3), 8, 0.5, "taylor")


def test_pruned_net_is_rebuilt_from_its_recorded_layer_shapes():
    """Depthwise convolutions (groups follow the channels) and squeeze-excitation layers too."""
    torch.manual_seed(0)
    net = create_model("mobilenet_v3_small", 5)
    prune_channels(net, 16, 0.3)
    shapes = pruned_layers(net, "mobilenet_v3_small", 5)
    assert shapes and pruned_layers(create_model("mobilenet_v3_small", 5), "mobilenet_v3_small", 5) == {}
    assert any(s["type"] == "Conv2d" and s["groups"] > 1 for s in shapes.values())
    rebuilt = build_logged_net({"arch": "mobilenet_v3_small", "num_classes": 5, PRUNED_LAYERS: shapes},
                               net.state_dict()).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(rebuilt(x), net.eval()(x))


@pytest.mark.parametrize("field, value, fragment", [
    ("pruning_ratio", 1.0, "pruning_ratio=1.0 is out of range; use a fraction in (0, 1)"),
    ("importance", "l1", "importance='l1' is not supported; use one of: magnitude, bn_scale, taylor"),
    ("recovery_epochs", -1, "recovery_epochs=-1 must be an integer >= 0"),
    ("lr", 0.0, "lr=0.0 must be a positive number"),
])
def test_prune_config_refuses_bad_values_with_the_fix(field, value, fragment):
    with pytest.raises(PipelineError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        PruneConfig(model="m", data="d", **{field: value})


@pytest.fixture(scope="module")
def pruned_run():
    """digits at 8 px (20 per class), a ResNet-9 trained 1 epoch, pruned by half with 1 recovery epoch."""
    from pipeline.prune.pruning_run import run_prune
    from pipeline.run.runners import run_prepare, run_train

    mlflow.set_experiment(experiment_id=mlflow.create_experiment("prune-fixture"))
    prep = run_prepare(PrepareConfig(source="digits", image_size=8, samples_per_class=20))
    tiny = dict(batch_size=32, augment="none", precision="fp32", device="cpu", system_metrics=False)
    pre = run_train(TrainConfig(data=prep, arch="resnet9", epochs=1, lr=0.05, **tiny), "pretrain")
    run_id = run_prune(PruneConfig(model=pre, data=prep, pruning_ratio=0.5, recovery_epochs=1, timing_seconds=0.05,
                                   register_as="pruned-digits", **tiny))
    return {"prepare": prep, "pretrain": pre, "prune": run_id}


def test_prune_run_logs_a_smaller_model_and_before_after_metrics(pruned_run):
    run = mlflow.get_run(pruned_run["prune"])
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and tags[TAG_STEP] == "prune"
    assert tags["pipeline.upstream.pretrained_run"] == pruned_run["pretrain"]
    assert m["after_macs"] < 0.3 * m["before_macs"] and m["macs_reduction"] == pytest.approx(
        m["before_macs"] / m["after_macs"])
    assert m["after_params"] < 0.3 * m["before_params"] and m["after_size_bytes"] < 0.3 * m["before_size_bytes"]
    for key in ("img_per_s_b1", "img_per_s_b64", "test_accuracy", "test_f1_macro"):
        assert f"before_{key}" in m and f"after_{key}" in m
    assert "pruned_test_accuracy" in m and "best_val_f1_macro" in m and "speedup_b64" in m
    state, meta = load_model_ref(pruned_run["prune"])
    net = build_logged_net(meta, state)
    assert count_macs_and_params(net, 8)[0] == m["after_macs"]  # the logged model is the measured one
    champion = mlflow.MlflowClient().get_model_version_by_alias("pruned-digits", "champion")
    assert champion.run_id == pruned_run["prune"] and m["test_f1_macro"] == pytest.approx(m["after_test_f1_macro"])


def test_pruned_model_predicts_through_the_pyfunc_with_the_logged_scores(pruned_run):
    model = mlflow.pyfunc.load_model(f"runs:/{pruned_run['prune']}/model")
    ds, _, _ = load_dataset_ref(pruned_run["prepare"], ("test",))
    test = ds.splits["test"]
    predicted = model.predict(test.images)["class_name"].to_numpy()
    truth = np.array(ds.class_names)[test.labels]
    m = mlflow.get_run(pruned_run["prune"]).data.metrics
    assert accuracy_score(truth, predicted) == pytest.approx(m["after_test_accuracy"])
    assert f1_score(truth, predicted, average="macro") == pytest.approx(m["after_test_f1_macro"])


def test_pruned_model_finetunes_and_evaluates_like_any_model(pruned_run):
    from pipeline.run.evaluation_run import run_evaluate
    from pipeline.run.runners import run_train

    tiny = dict(batch_size=32, augment="none", precision="fp32", device="cpu", system_metrics=False)
    fin = run_train(TrainConfig(data=pruned_run["prepare"], pretrained=pruned_run["prune"], arch="auto", epochs=1,
                                lr=0.01, frozen_layers=2, **tiny), "finetune")
    _, pruned_meta = load_model_ref(pruned_run["prune"])
    state, meta = load_model_ref(fin)
    assert meta[PRUNED_LAYERS] == pruned_meta[PRUNED_LAYERS]  # still the pruned shapes, recorded again
    assert build_logged_net(meta, state).eval()(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
    ev = run_evaluate(EvaluateConfig(model=pruned_run["prune"], data=pruned_run["prepare"], device="cpu"))
    evaluated = mlflow.get_run(ev).data
    assert evaluated.tags["pipeline.upstream.model_run"] == pruned_run["prune"]
    assert evaluated.metrics["test_accuracy"] == pytest.approx(
        mlflow.get_run(pruned_run["prune"]).data.metrics["after_test_accuracy"])
