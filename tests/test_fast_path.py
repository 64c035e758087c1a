"""The fast path, on CPU and tiny: ResNet-9, the training recipe reaching the optimizer, the loss
and the evaluation (label smoothing, lr, weight decay, EMA, flip TTA), the batch augmentation,
and channels_last memory format end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pipeline.train.loop as train
from pipeline.config import TrainConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.loader import crop_flip, iter_eval_batches, iter_train_batches, normalize
from pipeline.model.device import predict_logits
from pipeline.model.models import ResNet9, create_model
from pipeline.train.loop import fit, validate
from pipeline.train.optim import create_optimizer

NUM_CLASSES = 3
SIZE = 8  # pixels: ResNet-9's three 2x poolings take it to 1x1


def tiny_set(n: int = 48, seed: int = 0) -> ImageSet:
    """Random images whose mean colour depends on the class, so a few steps learn something."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.randint(0, 120, (n, SIZE, SIZE, 3), generator=g)
    images[torch.arange(n), :, :, labels] += 120
    return ImageSet(images.to(torch.uint8).numpy(), labels.numpy())


def tiny_net(seed: int = 0) -> ResNet9:
    torch.manual_seed(seed)
    return ResNet9(NUM_CLASSES, width=8)


def tiny_cfg(**overrides) -> TrainConfig:
    base = dict(arch="resnet9", epochs=2, batch_size=16, lr=0.05, schedule="constant", augment="basic",
                precision="fp32", device="cpu", seed=0)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("size", [32, 16])
def test_resnet9_gives_one_logit_per_class(size):
    net = create_model("resnet9", 10).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_one_optimizer_step_changes_weights_and_lowers_the_loss():
    net = tiny_net()
    data = tiny_set(16)
    x = normalize(torch.from_numpy(data.images)).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(data.labels)
    opt = create_optimizer(net.parameters(), tiny_cfg(lr=0.01))
    before = [p.detach().clone() for p in net.parameters()]
    loss0 = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
    with torch.no_grad():
        loss1 = F.cross_entropy(net(x), y)
    assert loss1 < loss0


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lr_and_weight_decay_reach_the_optimizer(optimizer):
    opt = create_optimizer(tiny_net().parameters(), tiny_cfg(optimizer=optimizer, lr=0.123, weight_decay=0.0042))
    assert isinstance(opt, torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)
    (group,) = opt.param_groups
    assert group["lr"] == 0.123 and group["weight_decay"] == 0.0042
    if optimizer == "sgd":
        assert group["nesterov"] and group["momentum"] == 0.9


def test_fit_trains_with_the_configured_recipe(monkeypatch):
    """fit() builds its optimizer from the config, and the training loss is label-smoothed."""
    smoothing, optimizers = [], []
    real_ce, real_make = F.cross_entropy, train.create_optimizer

    def spy_ce(*args, **kwargs):
        smoothing.append(kwargs.get("label_smoothing", 0.0))
        return real_ce(*args, **kwargs)

    def spy_make(params, cfg):
        optimizers.append(real_make(params, cfg))
        return optimizers[-1]

    monkeypatch.setattr(F, "cross_entropy", spy_ce)
    monkeypatch.setattr(train, "create_optimizer", spy_make)
    cfg = tiny_cfg(label_smoothing=0.2, lr=0.03, weight_decay=0.001, epochs=1)
    result = fit(tiny_net(), tiny_set(), tiny_set(12, seed=1), cfg, NUM_CLASSES)
    steps = 48 // 16
    assert smoothing.count(0.2) == steps  # every training step; validation loss is unsmoothed
    assert smoothing.count(0.0) == 1
    (group,) = optimizers[0].param_groups
    assert group["weight_decay"] == 0.001
    assert result.history[0]["lr"] == 0.03  # constant schedule: the configured lr is the lr used


def test_ema_weights_are_scored_and_returned(monkeypatch):
    data, val = tiny_set(), tiny_set(12, seed=1)
    plain = fit(tiny_net(), data, val, tiny_cfg(ema=0.0, epochs=1), NUM_CLASSES)

    scored = []
    real_eval = train.validate

    def spy_eval(net, *args, **kwargs):
        scored.append(net)
        return real_eval(net, *args, **kwargs)

    monkeypatch.setattr(train, "validate", spy_eval)
    net = tiny_net()
    averaged = fit(net, data, val, tiny_cfg(ema=0.9, epochs=1), NUM_CLASSES)

    # EMA changes what is scored, not how the net trains.
    assert averaged.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-6)
    # resnet9 scales its logits by 1/8, so the two losses are close: different, not far apart.
    assert averaged.history[0]["val_loss"] != pytest.approx(plain.history[0]["val_loss"], rel=1e-5)
    assert scored and all(s is not net and isinstance(s, ResNet9) for s in scored)
    # The net fit() hands back holds the scored (averaged) weights of the best epoch.
    metrics = validate(net, torch.from_numpy(val.images), torch.from_numpy(val.labels), None, NUM_CLASSES)
    assert metrics["val_loss"] == pytest.approx(averaged.best_metrics["val_loss"], rel=1e-5)


def test_tta_averages_the_logits_of_the_image_and_its_mirror():
    net = tiny_net().eval()
    images = torch.from_numpy(tiny_set(5).images)
    got = predict_logits(net, images, None, tta=True)
    with torch.no_grad():
        x = normalize(images)
        expected = (net(x) + net(x.flip(3))) / 2  # NCHW: dim 3 is the width, a horizontal flip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, predict_logits(net, images, None, tta=False))


def test_fit_validates_with_tta_when_asked(monkeypatch):
    seen = []
    real = train.predict_logits

    def spy(net, images, amp_dtype, tta=False, *args, **kwargs):
        seen.append(tta)
        return real(net, images, amp_dtype, tta, *args, **kwargs)

    monkeypatch.setattr(train, "predict_logits", spy)
    fit(tiny_net(), tiny_set(), tiny_set(12, seed=1), tiny_cfg(tta=True, epochs=1), NUM_CLASSES)
    assert seen == [True]


def test_crop_flip_is_a_shifted_and_maybe_mirrored_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    size, pad = 16, 2  # CROP_PADDING_FRACTION = 1/8 of the side
    x = torch.randint(0, 256, (64, size, size, 3), dtype=torch.uint8, generator=g)
    out = crop_flip(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x.permute(0, 3, 1, 2), (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    def window(i, dy, dx, flip):
        w = padded[i, dy : dy + size, dx : dx + size]
        return w.flip(1) if flip else w  # NHWC: dim 1 of one image is its width

    offsets = range(2 * pad + 1)
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, f)
            for dy in offsets
            for dx in offsets
            for f in (False, True)
            if torch.equal(out[i], window(i, dy, dx, f))
        ]
        assert matches, f"image {i} is not a window of its padded original"
        seen.update(matches)
    assert {f for _, _, f in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 5


@pytest.mark.parametrize("augment", ["none", "basic", "strong"])
def test_batches_are_float_nchw_in_channels_last_memory(augment):
    data = tiny_set(20)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    batches = list(iter_train_batches(images, labels, 8, augment, g)) + [
        (x, None) for x in iter_eval_batches(images, 8)
    ]
    for x, _ in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE)
        assert x.is_contiguous(memory_format=torch.channels_last)


def test_fit_runs_the_model_in_channels_last():
    net = tiny_net()
    inputs = []
    net.register_forward_pre_hook(
        lambda _m, args: inputs.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    fit(net, tiny_set(), tiny_set(12, seed=1), tiny_cfg(epochs=1), NUM_CLASSES)
    assert inputs and all(inputs)
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
