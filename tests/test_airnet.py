"""airnet (airbench94's network) and its recipe: five stages, fixed whitening and BatchNorm scales that
stay fixed (freeze, training, pruning), the BatchNorm-bias lr group, the triangle schedule, recipe
options resolved from the arch (explicit values win, runs log the resolved ones), prune and serve."""

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import NUM_STAGES, PrepareConfig, PruneConfig, TrainConfig
from pipeline.data.loader import normalize
from pipeline.errors import PipelineError
from pipeline.model.airnet import AirNet
from pipeline.model.models import (
    build_logged_net,
    create_model,
    fixed_parameters,
    freeze,
    frozen_stages,
    initialise_from_data,
    stages,
)
from pipeline.track.references import load_dataset_ref, load_model_ref
from pipeline.train.optim import create_optimizer, create_scheduler, parameter_groups, triangle


def smooth_images(n: int = 64, side: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 NHWC images with neighbouring pixels and channels correlated, as in photos."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, side // 2, side // 2, generator=g)
    colour = torch.rand(n, 3, side, side, generator=g) * 0.3
    x = F.interpolate(base, size=(side, side), mode="bilinear", align_corners=False) + colour
    return (x / x.amax() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


@pytest.mark.parametrize("side", [8, 16, 32])
def test_airnet_classifies_small_images_through_five_stages_with_parameters(side):
    net = create_model("airnet", 7).eval()
    assert isinstance(net, AirNet) and net(torch.zeros(2, 3, side, side)).shape == (2, 7)
    assert len(stages(net)) == NUM_STAGES
    x, sides = torch.zeros(1, 3, side, side), []
    for stage in stages(net):
        assert sum(p.numel() for m in stage for p in m.parameters()) > 0
        x = stage[0](x)
        sides.append(x.shape[-1])
    if side == 32:
        assert sides == [31, 16, 8, 4, 4]
    assert net.fc[-1].bias is None and net.fc[-1].in_features == 256


@pytest.mark.parametrize("depth", range(NUM_STAGES + 1))
def test_fixed_parameters_stay_fixed_at_every_freezing_depth_and_through_a_training_step(depth):
    torch.manual_seed(0)
    net = create_model("airnet", 3)
    initialise_from_data(net, smooth_images())
    freeze(net, depth)
    fixed = fixed_parameters(net)
    assert len(fixed) == 1 + 6  # the whitening weight, six BatchNorm scales
    assert not any(p.requires_grad for p in fixed)
    assert len(frozen_stages(net)) == depth
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TrainConfig(arch="airnet").resolved()
    opt = create_optimizer(parameter_groups(net, cfg), cfg)
    net.train()
    F.cross_entropy(net(torch.randn(8, 3, 16, 16)), torch.arange(8) % 3).backward()
    opt.step()
    after = net.state_dict()
    assert torch.equal(before["stem.0.weight"], after["stem.0.weight"])
    bn_scales = [k for k in before if k.endswith("weight") and after[k].dim() == 1]
    assert len(bn_scales) == 6 and all(torch.equal(after[k], torch.ones_like(after[k])) for k in bn_scales)
    assert not torch.equal(before["fc.1.weight"], after["fc.1.weight"])  # the head always trains
    assert torch.equal(before["layer4.0.weight"], after["layer4.0.weight"]) == (depth == NUM_STAGES)


def test_fixed_parameters_are_found_again_after_pruning():
    """torch-pruning makes new Parameters, with requires_grad set: fixed_parameters finds them by structure."""
    from pipeline.prune.pruning import prune_channels

    torch.manual_seed(0)
    net = create_model("airnet", 4)
    initialise_from_data(net, smooth_images())
    whitening = net.stem[0].weight.detach().clone()
    prune_channels(net, 8, 0.5)
    assert net.stem[0].out_channels == 12 and net(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    kept = {tuple(w.flatten().tolist()) for w in whitening}
    assert all(tuple(w.flatten().tolist()) in kept for w in net.stem[0].weight.detach())  # filters kept, not changed
    freeze(net, 0)
    assert not any(p.requires_grad for p in fixed_parameters(net))
    in_groups = {id(p) for g in parameter_groups(net, TrainConfig(arch="airnet").resolved()) for p in g["params"]}
    assert not in_groups & {id(p) for p in fixed_parameters(net)}


def test_whitening_makes_the_stem_output_on_training_patches_white():
    images = smooth_images(128)
    net = create_model("airnet", 10)
    initialise_from_data(net, images)
    with torch.no_grad():
        out = F.conv2d(normalize(torch.from_numpy(images)).float(), net.stem[0].weight, net.stem[0].bias)
    rows = out.permute(0, 2, 3, 1).reshape(-1, 24).double()
    second_moment = rows.T @ rows / len(rows)
    half = second_moment[:12, :12]
    assert torch.allclose(half, torch.eye(12, dtype=torch.float64), atol=0.02)
    assert torch.allclose(second_moment[:12, 12:], -half)  # the negated filters
    # unwhitened, the same patches are strongly correlated
    raw = F.unfold(normalize(torch.from_numpy(images)).float(), 2).transpose(1, 2).reshape(-1, 12).double()
    raw_moment = raw.T @ raw / len(raw)
    assert (raw_moment - torch.diag(raw_moment.diag())).abs().max() > 0.5


def test_other_nets_have_no_fixed_parameters_and_one_optimizer_group():
    net = create_model("resnet9", 3)
    initialise_from_data(net, smooth_images())  # nothing to set
    assert fixed_parameters(net) == []
    cfg = TrainConfig().resolved()
    (group,) = create_optimizer(parameter_groups(net, cfg), cfg).param_groups
    assert group["lr"] == 0.05 and group["weight_decay"] == 5e-4
    assert len(group["params"]) == len(list(net.parameters()))


def test_batchnorm_biases_train_at_64x_the_lr_with_the_same_per_step_decay():
    net = create_model("airnet", 10)
    cfg = TrainConfig(arch="airnet", lr=0.5, weight_decay=0.002).resolved()
    opt = create_optimizer(parameter_groups(net, cfg), cfg)
    main, norm = opt.param_groups
    assert main["lr"] == 0.5 and main["weight_decay"] == 0.002
    assert norm["lr"] == 0.5 * 64 and norm["weight_decay"] == pytest.approx(0.002 / 64)
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(main["lr"] * main["weight_decay"])
    assert len(norm["params"]) == 6 and all(p.dim() == 1 for p in norm["params"])
    assert norm["nesterov"] and norm["momentum"] == 0.9
    sched = create_scheduler(opt, cfg, 10)  # the schedule scales both groups alike
    assert opt.param_groups[1]["lr"] == pytest.approx(64 * opt.param_groups[0]["lr"])
    del sched
    adamw = TrainConfig(arch="airnet", optimizer="adamw").resolved()
    assert len(create_optimizer(parameter_groups(net, adamw), adamw).param_groups) == 1


def test_triangle_rises_from_a_fifth_to_the_peak_then_falls_to_seven_percent():
    factor = triangle(100, 23)
    assert factor(0) == pytest.approx(0.2) and factor(23) == pytest.approx(1.0) and factor(99) == pytest.approx(0.07)
    assert factor(11) == pytest.approx(0.2 + 0.8 * 11 / 23)
    assert triangle(10, 0)(0) == 1.0  # no warm-up: from the peak
    cfg = TrainConfig(arch="airnet", epochs=10).resolved()
    assert cfg.schedule == "triangle" and cfg.warmup_epochs == pytest.approx(2.3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = create_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2 * cfg.lr) and max(lrs) == pytest.approx(cfg.lr) == lrs[23]
    assert lrs[-1] == pytest.approx(0.07 * cfg.lr)


def test_recipe_options_follow_the_arch_unless_given():
    resnet = TrainConfig().resolved()
    assert (resnet.lr, resnet.batch_size, resnet.weight_decay, resnet.label_smoothing, resnet.schedule,
            resnet.warmup_epochs, resnet.tta) == (0.05, 128, 5e-4, 0.0, "cosine", 0.0, False)  # the old defaults
    air = TrainConfig(arch="airnet", epochs=20).resolved()
    assert (air.lr, air.batch_size, air.weight_decay, air.label_smoothing, air.schedule, air.tta) == (
        1.0, 1024, 0.00133, 0.2, "triangle", True)
    assert air.warmup_epochs == pytest.approx(0.23 * 20)
    given = TrainConfig(arch="airnet", lr=0.3, batch_size=256, tta=False, schedule="cosine", warmup_epochs=0.0)
    assert (given.resolved().lr, given.resolved().batch_size, given.resolved().tta, given.resolved().schedule,
            given.resolved().warmup_epochs) == (0.3, 256, False, "cosine", 0.0)
    assert air.resolved() is air  # nothing left to fill
    with pytest.raises(PipelineError, match="arch=auto is not known yet"):
        TrainConfig(arch="auto", pretrained="x").resolved()
    pruning = PruneConfig(model="m", data="d").resolved("airnet")
    assert (pruning.lr, pruning.batch_size, pruning.schedule) == (0.01, 1024, "triangle")  # prune's lr is its own


def test_auto_on_the_command_line_is_the_recipe():
    from steps.pretrain import main

    ctx = main.make_context("pretrain", ["--data", "d", "--arch", "airnet", "--lr", "auto", "--batch-size", "64",
                                         "--tta", "false"])
    assert ctx.params["lr"] is None and ctx.params["batch_size"] == 64 and ctx.params["tta"] is False
    assert ctx.params["schedule"] is None  # not given: auto
    cfg = TrainConfig(**{k: v for k, v in ctx.params.items() if k != "debug"}).resolved()
    assert (cfg.lr, cfg.batch_size, cfg.tta, cfg.schedule) == (1.0, 64, False, "triangle")


@pytest.fixture(scope="module")
def airnet_runs():
    """digits at 8 px (20 per class): an airnet pretrained 2 epochs with its recipe (batch size given),
    then pruned by half with 1 recovery epoch."""
    from pipeline.prune.pruning_run import run_prune
    from pipeline.run.runners import run_prepare, run_train

    mlflow.set_experiment(experiment_id=mlflow.create_experiment("airnet-fixture"))
    prep = run_prepare(PrepareConfig(source="digits", image_size=8, samples_per_class=20))
    tiny = dict(batch_size=32, precision="fp32", device="cpu", system_metrics=False)
    pre = run_train(TrainConfig(data=prep, arch="airnet", epochs=2, **tiny), "pretrain")
    pruned = run_prune(PruneConfig(model=pre, data=prep, pruning_ratio=0.5, recovery_epochs=1, timing_seconds=0.05,
                                   **tiny))
    return {"prepare": prep, "pretrain": pre, "prune": pruned}


def test_airnet_run_logs_its_resolved_recipe_and_keeps_its_whitening(airnet_runs):
    params = mlflow.get_run(airnet_runs["pretrain"]).data.params
    assert (params["lr"], params["batch_size"], params["schedule"], params["tta"], params["label_smoothing"]) == (
        "1.0", "32", "triangle", "true", "0.2")
    assert float(params["warmup_epochs"]) == pytest.approx(0.46)
    state, meta = load_model_ref(airnet_runs["pretrain"])
    ds, _, _ = load_dataset_ref(airnet_runs["prepare"], ("train",))
    fresh = create_model("airnet", 10)
    initialise_from_data(fresh, ds.splits["train"].images)
    assert torch.allclose(state["stem.0.weight"], fresh.stem[0].weight)  # set from the data, then never trained
    bn_scales = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 1]
    assert len(bn_scales) == 6 and all(torch.equal(v, torch.ones_like(v)) for v in bn_scales)
    prune_params = mlflow.get_run(airnet_runs["prune"]).data.params
    assert (prune_params["schedule"], prune_params["lr"], prune_params["batch_size"]) == ("triangle", "0.01", "32")


def test_pruned_airnet_serves_raw_images(airnet_runs):
    run = mlflow.get_run(airnet_runs["prune"])
    assert run.info.status == "FINISHED" and run.data.metrics["after_macs"] < 0.35 * run.data.metrics["before_macs"]
    state, meta = load_model_ref(airnet_runs["prune"])
    assert build_logged_net(meta, state).eval()(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
    model = mlflow.pyfunc.load_model(f"runs:/{airnet_runs['prune']}/model")
    ds, _, _ = load_dataset_ref(airnet_runs["prepare"], ("test",))
    predicted = model.predict(ds.splits["test"].images[:5])  # uint8 NHWC as they come
    assert len(predicted) == 5 and set(predicted["class_name"]) <= set(ds.class_names)


def test_a_tuning_trial_searches_lr_batch_and_decay_and_takes_the_rest_from_the_recipe():
    import optuna

    from pipeline.config import TuneConfig
    from pipeline.run.tuning import suggest, trial_config

    cfg = TuneConfig(data="d", pretrained="p", arch="airnet", epochs=4)
    trial = optuna.create_study().ask()
    train = trial_config(cfg, suggest(trial, cfg)).resolved()
    assert train.lr == trial.params["lr"] and train.batch_size == trial.params["batch_size"]
    assert (train.schedule, train.label_smoothing, train.tta) == ("triangle", 0.2, True)
    assert train.warmup_epochs == pytest.approx(0.23 * 4)


def test_airnet_finetunes_with_its_recipe_and_keeps_the_stored_whitening(airnet_runs):
    from pipeline.run.runners import run_train

    fin = run_train(TrainConfig(data=airnet_runs["prepare"], pretrained=airnet_runs["pretrain"], arch="auto",
                                epochs=1, lr=0.01, batch_size=32, precision="fp32", device="cpu",
                                system_metrics=False), "finetune")
    params = mlflow.get_run(fin).data.params
    assert (params["arch"], params["lr"], params["schedule"], params["weight_decay"]) == (
        "airnet", "0.01", "triangle", "0.00133")  # arch=auto resolved first, then its recipe
    pretrained, _ = load_model_ref(airnet_runs["pretrain"])
    finetuned, _ = load_model_ref(fin)
    assert torch.equal(pretrained["stem.0.weight"], finetuned["stem.0.weight"])
    assert not torch.equal(pretrained["stem.0.bias"], finetuned["stem.0.bias"])  # the whitening bias trains
