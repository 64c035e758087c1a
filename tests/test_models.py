import urllib.error

import pytest
import torch
import torchvision

from pipeline.config import NUM_STAGES, TrainConfig
from pipeline.data.imageset import ImageSet
from pipeline.errors import PipelineError
from pipeline.model.models import (
    count_trainable,
    create_model,
    freeze,
    frozen_stages,
    replace_head,
    set_train_mode,
    stages,
)
from pipeline.train.loop import fit


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet9"])
def test_small_image_models_keep_resolution_and_output_classes(arch):
    net = create_model(arch, 7).eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    if arch != "resnet9":
        assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
        assert isinstance(net.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("depth", [0, 3, 5])
def test_freeze_first_k_stages_and_keep_their_batchnorm_still(depth):
    torch.manual_seed(0)
    net = create_model("resnet18", 3)
    freeze(net, depth)
    for i, stage in enumerate(stages(net)):
        for m in stage:
            assert all(p.requires_grad == (i >= depth) for p in m.parameters())
    assert all(p.requires_grad for p in net.fc.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert len(stages(net)) == NUM_STAGES and len(frozen_stages(net)) == depth
    set_train_mode(net)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 3, 16, 16) * 3 + 1
    loss = torch.nn.functional.cross_entropy(net(x), torch.arange(8) % 3)
    loss.backward()
    opt.step()
    after = net.state_dict()
    stage_prefixes = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    frozen_prefixes = {p for stage in stage_prefixes[:depth] for p in stage}
    frozen_keys = [k for k in before if k.split(".")[0] in frozen_prefixes]
    assert len(frozen_keys) > 0 or depth == 0
    for k in frozen_keys:  # weights *and* BN running statistics unchanged
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["fc.1.weight"], after["fc.1.weight"])
    if depth < 5:
        assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])


def test_fit_keeps_batchnorm_still_in_the_stages_the_net_has_frozen():
    """Which stages are frozen is read from the net (requires_grad), not from the config: a net frozen
    by freeze() trains with those stages' running statistics unchanged, whatever cfg.frozen_layers says."""
    torch.manual_seed(0)
    net = create_model("resnet9", 3)
    freeze(net, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)

    def images(n):
        return ImageSet(torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=g).numpy(),
                        (torch.arange(n) % 3).numpy())

    cfg = TrainConfig(data="d", arch="resnet9", epochs=1, batch_size=8, lr=0.05, augment="none", precision="fp32",
                      device="cpu", frozen_layers=0)
    fit(net, images(16), images(6), cfg, 3)
    after = net.state_dict()
    for k in before:
        frozen = k.split(".")[0] in ("conv1", "bn1", "layer1")
        assert torch.equal(before[k], after[k]) == frozen, k


def test_head_replacement_and_trainable_count():
    net = create_model("resnet18", 10)
    freeze(net, 5)
    replace_head(net, 4)
    assert net.fc[-1].out_features == 4
    assert count_trainable(net) == 512 * 4 + 4


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for p in reference.parameters():
            p.fill_(0.125)
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(reference.state_dict(), ckpt_dir / weights.url.rsplit("/", 1)[-1])
    net = create_model("resnet18", 5, weights="imagenet")
    assert torch.all(net.layer3[0].conv1.weight == 0.125)
    assert torch.all(net.conv1.weight == 0.125)  # centre of the 7x7 kernels
    assert net.fc[-1].out_features == 5


def test_imagenet_weights_offline_give_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        PipelineError, match=r"resnet18-f37072fd.pth into \$TORCH_HOME/hub/checkpoints/ .* or use weights=none"
    ):
        create_model("resnet18", 5, weights="imagenet")


BUDGET_ARCHS = ["mobilenet_v3_small", "mobilenet_v3_large", "vgg11_bn"]


@pytest.mark.parametrize("arch", BUDGET_ARCHS)
def test_budget_archs_run_on_small_images_with_five_stages_at_resnet_resolutions(arch):
    net = create_model(arch, 7).eval()
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 7)
    assert net(torch.zeros(1, 3, 8, 8)).shape == (1, 7)  # digits-sized images survive the downsampling
    x, sides = torch.zeros(1, 3, 32, 32), []
    for stage in stages(net):
        assert len(stage) == 1  # one module per stage; the head is net.fc, outside every stage
        x = stage[0](x)
        sides.append(x.shape[-1])
    assert sides == [32, 32, 16, 8, 4]  # where ResNet-18's small-image stages end
    assert not any(p is q for stage in stages(net) for p in stage[0].parameters() for q in net.fc.parameters())
    assert len(stages(net)) == NUM_STAGES


@pytest.mark.parametrize("arch", BUDGET_ARCHS)
def test_budget_archs_freeze_by_stage_and_keep_frozen_batchnorm_in_eval(arch):
    torch.manual_seed(0)
    net = create_model(arch, 3)
    freeze(net, 3)
    set_train_mode(net)
    frozen = [m for stage in stages(net)[:3] for m in stage]
    frozen_bns = [bn for m in frozen for bn in m.modules() if isinstance(bn, torch.nn.BatchNorm2d)]
    assert frozen_bns and not any(bn.training for bn in frozen_bns)
    assert all(bn.training for bn in stages(net)[3][0].modules() if isinstance(bn, torch.nn.BatchNorm2d))
    before = [t.clone() for m in frozen for t in m.state_dict().values()]
    trained_before = stages(net)[4][0].state_dict()
    trained_before = {k: v.clone() for k, v in trained_before.items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 16, 16) * 3 + 1), torch.arange(4) % 3).backward()
    opt.step()
    after = [t for m in frozen for t in m.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # weights and BN running statistics
    changed = [k for k, v in stages(net)[4][0].state_dict().items() if not torch.equal(v, trained_before[k])]
    assert any("running_mean" in k for k in changed) and any(k.endswith("weight") for k in changed)


def test_budget_archs_have_the_parameter_counts_of_their_torchvision_features():
    """The small-image nets keep torchvision's convolutional layers: same parameters, minus the heads."""
    for arch in ("mobilenet_v3_small", "vgg11_bn"):
        ours = create_model(arch, 10)
        reference = torchvision.models.get_model(arch, weights=None)
        ref_convs = sum(p.numel() for p in reference.features.parameters())
        assert sum(p.numel() for s in stages(ours) for m in s for p in m.parameters()) == ref_convs
