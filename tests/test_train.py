import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.loader import crop_flip
from pipeline.data.sources import load_digits
from pipeline.distributed import SINGLE, World
from pipeline.errors import PipelineError
from pipeline.model.device import resolve_amp_dtype, resolve_device
from pipeline.model.models import create_model
from pipeline.train.loop import NonFiniteLossError, _seed_epoch, fit, scaled_loss, seed_everything, set_up
from tests.conftest import EPOCH_METRICS

CPU = dict(device="cpu", precision="fp32", batch_size=64, augment="none")


@pytest.fixture(scope="module")
def digits():
    src = load_digits(8)
    s = src.splits["train"]
    return ImageSet(s.images[:600], s.labels[:600]), ImageSet(s.images[600:800], s.labels[600:800])


def _fit(digits, **kw):
    train, val = digits
    cfg = TrainConfig(data="d", **{**CPU, **kw})
    seed_everything(cfg.seed)
    net = create_model(cfg.arch, 10)
    return net, fit(net, train, val, cfg, 10)


def test_fit_learns_and_reports_every_epoch(digits):
    seen = []
    train, val = digits
    cfg = TrainConfig(data="d", epochs=3, lr=0.05, **CPU)
    seed_everything(0)
    net = create_model("resnet18", 10)
    result = fit(net, train, val, cfg, 10, on_epoch=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2, 3]
    assert all(set(m) == EPOCH_METRICS for _, m in seen)
    assert result.best_metrics["val_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert result.best_metrics["val_f1_macro"] == max(m["val_f1_macro"] for _, m in seen)


def test_same_seed_gives_same_metrics_on_cpu(digits):
    _, a = _fit(digits, epochs=1, augment="basic")
    _, b = _fit(digits, epochs=1, augment="basic")
    untimed = lambda r: [{k: v for k, v in h.items() if k != "images_per_sec"} for h in r.history]  # noqa: E731
    assert untimed(a) == untimed(b)


def test_each_epoch_draws_its_augmentation_apart_from_its_shuffle(digits):
    """One process is rank 0; its augmentation generator once got the shuffle's seed, so every
    crop and flip was drawn from the numbers that had just ordered the batch (issue 27)."""
    train, val = digits
    setup, _ = set_up(create_model("resnet18", 10), train, val, TrainConfig(data="d", **CPU), SINGLE)
    seeds = set()
    for epoch in (1, 2):
        _seed_epoch(setup, 0, epoch, SINGLE)
        seeds |= {setup.shuffle_gen.initial_seed(), setup.aug_gen.initial_seed(), torch.initial_seed()}
    assert len(seeds) == 6


def test_nan_loss_stops_at_once_with_epoch_and_step(digits):
    with pytest.raises(NonFiniteLossError, match=r"training loss became (nan|inf) at epoch 1 step [0-9]+; lower lr"):
        _fit(digits, epochs=2, lr=1e30, optimizer="sgd")


def test_early_stopping_stops_after_patience(digits):
    _, r = _fit(digits, epochs=6, lr=1e-6, schedule="constant", patience=1, monitor="val_loss")
    assert r.stopped_early and len(r.history) < 6


def test_resume_from_checkpoint_matches_uninterrupted_run(digits, tmp_path):
    train, val = digits
    cfg = TrainConfig(data="d", epochs=3, lr=0.05, checkpoint_every=0, **{**CPU, "augment": "basic"})
    seed_everything(0)
    full_net = create_model("resnet18", 10)
    full = fit(full_net, train, val, cfg, 10)

    class Killed(Exception):
        pass

    def kill_after_two(epoch, metrics):
        if epoch == 2:
            raise Killed

    ckpt = tmp_path / "last.pt"
    seed_everything(0)
    with pytest.raises(Killed):
        fit(create_model("resnet18", 10), train, val, cfg, 10, kill_after_two, str(ckpt))
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2
    # The keys are the checkpoint format: checkpoints written before a release must resume after it.
    assert set(state) == {
        "model",
        "optimizer",
        "scheduler",
        "ema",
        "epoch",
        "best_value",
        "best_model",
        "history",
        "stale_epochs",
    }
    resumed_net = create_model("resnet18", 10)
    resumed = fit(resumed_net, train, val, cfg, 10, resume_state=state)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    for k, v in full_net.state_dict().items():
        assert torch.equal(v, resumed_net.state_dict()[k]), k


@pytest.mark.parametrize("sizes", [(3, 3), (3, 2)])  # an even global batch of 6, an uneven last one of 5
def test_scaled_shard_losses_give_the_global_batch_mean_gradient(sizes):
    """DDP averages the ranks' gradients: with scaled_loss, that average is the gradient of the global
    batch's mean loss, as one process computes it."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x, y = torch.randn(sum(sizes), 4), torch.tensor([0, 1, 2, 0, 1, 2])[: sum(sizes)]
    torch.nn.functional.cross_entropy(x @ w, y, label_smoothing=0.1).backward()
    expected, w.grad = w.grad.clone(), None
    world, grads, start = World(size=2), [], 0
    for n in sizes:
        loss, summed = scaled_loss(x[start : start + n] @ w, y[start : start + n], 0.1, sum(sizes), world)
        grads.append(torch.autograd.grad(loss, w)[0])
        start += n
    torch.testing.assert_close(sum(grads) / world.size, expected)
    loss, summed = scaled_loss(x @ w, y, 0.1, sum(sizes), SINGLE)  # one process: the mean, and the sum
    torch.testing.assert_close(summed, loss.detach() * sum(sizes))


def test_no_validation_images_is_an_error(digits):
    train, val = digits
    with pytest.raises(PipelineError, match="no validation images"):
        fit(create_model("resnet18", 10), train, val.subset(np.arange(0)), TrainConfig(data="d", **CPU), 10)


def test_cuda_without_gpu_and_precision_resolution():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PipelineError, match="device=cuda but no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_amp_dtype("fp32", torch.device("cpu")) is None
    assert resolve_amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_crop_flip_is_a_shifted_or_mirrored_crop():
    x = torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = crop_flip(x, gen)
    pad = 1
    for i in range(len(x)):
        padded = torch.zeros(8 + 2 * pad, 8 + 2 * pad, 3, dtype=torch.uint8)
        padded[pad:-pad, pad:-pad] = x[i]
        crops = [padded[dy : dy + 8, dx : dx + 8] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(1)) for c in crops)
