import json
import math
import time
import warnings

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.sources import load_digits
from pipeline.model import precision
from pipeline.model.models import create_model
from pipeline.model.precision import (
    BF16_MIN_SPEEDUP,
    cache_path,
    cpu_model_name,
    measure_cpu_bf16,
    resolve_cpu_amp_dtype,
    time_fp32_and_bf16,
)
from pipeline.train.loop import fit, seed_everything


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets an empty cache of its own, may warn again, and sees an idle machine."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_warned", False)
    monkeypatch.setattr(precision, "_MEASURED_HERE", {})
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    return tmp_path / "cache"


class FakeTimer:
    """Stands in for the measurement: bf16 runs `speedup` times the fp32 rate; counts its calls."""

    def __init__(self, speedup: float, fp32_img_s: float = 50.0):
        self.speedup, self.fp32_img_s, self.calls = speedup, fp32_img_s, []

    def __call__(self, arch, image_size, batch_size, num_classes):
        self.calls.append((arch, image_size, batch_size, num_classes))
        return self.fp32_img_s, self.fp32_img_s * self.speedup


@pytest.mark.parametrize(("speedup", "choice", "dtype"), [
    (1.5, "bf16", torch.bfloat16),
    (BF16_MIN_SPEEDUP, "bf16", torch.bfloat16),
    (1.1, "fp32", None),
    (0.4, "fp32", None),  # bf16 emulated: slower
])
def test_bf16_only_when_clearly_faster(speedup, choice, dtype):
    dtype_got, verdict = resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=FakeTimer(speedup))
    assert (verdict.choice, dtype_got) == (choice, dtype)
    assert verdict.ratio == pytest.approx(speedup)
    assert (verdict.fp32_img_s, verdict.bf16_img_s) == pytest.approx((50.0, 50.0 * speedup))
    assert verdict.cpu == cpu_model_name() and not verdict.cached


def test_timing_batch_is_capped_by_image_area_and_by_the_run_batch():
    timer = FakeTimer(1.5)
    measure_cpu_bf16("resnet18", 32, 128, 10, timer=timer)  # 8 images of 32x32 per timed step
    measure_cpu_bf16("resnet18", 16, 128, 10, timer=timer)  # 4x fewer pixels: 4x the images
    measure_cpu_bf16("resnet18", 16, 5, 10, timer=timer)  # never more than the run's batch
    assert [c[2] for c in timer.calls] == [8, 32, 5]


def test_the_verdict_is_cached_per_arch_and_image_size():
    timer = FakeTimer(1.5)
    _, first = resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=timer)
    dtype, again = resolve_cpu_amp_dtype("resnet18", 32, 64, 10, timer=FakeTimer(0.5))
    assert len(timer.calls) == 1, "the second call must not measure"
    assert dtype is torch.bfloat16 and again.cached and again.ratio == first.ratio
    resolve_cpu_amp_dtype("resnet9", 32, 128, 10, timer=timer)
    resolve_cpu_amp_dtype("resnet18", 16, 128, 10, timer=timer)
    assert [c[:2] for c in timer.calls] == [("resnet18", 32), ("resnet9", 32), ("resnet18", 16)]
    stored = json.loads(cache_path().read_text())
    assert len(stored) == 3 and all(torch.__version__ in key for key in stored)


def test_a_verdict_measured_on_a_busy_machine_is_used_but_not_cached(monkeypatch):
    """Busy: the verdict holds for this process (a tune worker's later trials reuse it), not the cache."""
    monkeypatch.setattr(precision.os, "getloadavg", lambda: (3.0 * (precision.os.cpu_count() or 1), 0.0, 0.0))
    timer = FakeTimer(1.5)
    dtype, _ = resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=timer)
    _, again = resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=timer)
    assert dtype is torch.bfloat16 and again.cached and len(timer.calls) == 1 and not cache_path().exists()
    monkeypatch.setattr(precision, "_MEASURED_HERE", {})  # another process measures again
    resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=timer)
    assert len(timer.calls) == 2 and not cache_path().exists()


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"k": {"choice": "bf16"}}'])
def test_a_corrupt_cache_is_measured_again_and_replaced(cache_dir, content):
    cache_dir.mkdir()
    (cache_dir / "cpu_precision.json").write_text(content)
    timer = FakeTimer(1.5)
    with pytest.warns(RuntimeWarning, match="unreadable precision cache"):
        dtype, verdict = resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=timer)
    assert dtype is torch.bfloat16 and len(timer.calls) == 1
    _, again = resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=timer)
    assert again.cached and len(timer.calls) == 1  # the rewritten cache is good again


def test_an_unwritable_cache_warns_once_and_still_decides(cache_dir):
    cache_dir.write_text("a file where the cache folder should be")
    timer = FakeTimer(0.8)
    with pytest.warns(RuntimeWarning, match="precision cache") as caught:
        dtype, _ = resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=timer)
    assert len(caught) == 1  # cannot read it, cannot write it: one warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=timer)
    assert dtype is None and len(timer.calls) == 1  # the second run reuses this process's measurement


def test_the_cache_lives_in_xdg_cache_home_without_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    resolve_cpu_amp_dtype("resnet18", 32, 128, 10, timer=FakeTimer(1.5))
    assert list((tmp_path / "xdg").rglob("*")) == [tmp_path / "xdg" / "mlflow-optuna-pipeline",
                                                   tmp_path / "xdg" / "mlflow-optuna-pipeline" / "cpu_precision.json"]


def test_a_real_measurement_gives_finite_positive_rates():
    t0 = time.perf_counter()
    fp32, bf16 = time_fp32_and_bf16("resnet9", 8, 4, 3)
    assert time.perf_counter() - t0 < 10
    assert all(math.isfinite(r) and r > 0 for r in (fp32, bf16))
    _, verdict = resolve_cpu_amp_dtype("resnet9", 8, 4, 3)
    assert verdict.ratio == pytest.approx(verdict.bf16_img_s / verdict.fp32_img_s)
    assert verdict.choice == ("bf16" if verdict.ratio >= BF16_MIN_SPEEDUP else "fp32")


# Accuracy agreement rule (also in the README): the two validation accuracies may differ by at most
# 2 standard errors of a difference of two proportions on n images, sqrt(p1(1-p1)/n + p2(1-p2)/n),
# or 1.5 points, whichever is larger (the floor keeps the bound meaningful when both are near 100%).
# The two runs score the same images, so treating them as independent samples is conservative.
AGREEMENT_FLOOR = 0.015


def allowed_accuracy_gap(p1: float, p2: float, n: int) -> float:
    return max(2 * math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n), AGREEMENT_FLOOR)


def test_allowed_gap_is_two_standard_errors_with_a_floor():
    assert allowed_accuracy_gap(0.9, 0.9, 400) == pytest.approx(2 * math.sqrt(2 * 0.09 / 400))  # 0.042
    assert allowed_accuracy_gap(1.0, 1.0, 400) == AGREEMENT_FLOOR


def train_digits(precision_name: str) -> float:
    """Validation accuracy of one short, seeded resnet9 recipe on digits at 16 px."""
    digits = load_digits(16).splits["train"]
    train = ImageSet(digits.images[:1000], digits.labels[:1000])
    val = ImageSet(digits.images[1000:], digits.labels[1000:])
    cfg = TrainConfig(data="d", arch="resnet9", epochs=3, batch_size=64, lr=2e-3, optimizer="adamw",
                      schedule="cosine", augment="none", precision=precision_name, device="cpu", seed=0)
    seed_everything(cfg.seed)
    net = create_model(cfg.arch, 10)
    return fit(net, train, val, cfg, 10).best_metrics["val_accuracy"]


@pytest.mark.slow  # ~31 s on 2 CPU cores: two 3-epoch trainings
def test_bf16_training_matches_fp32_accuracy():
    n = len(load_digits(16).splits["train"]) - 1000
    fp32, bf16 = train_digits("fp32"), train_digits("bf16")
    assert fp32 > 0.9 and bf16 > 0.9, (fp32, bf16)  # both learned: agreement at chance would prove nothing
    assert abs(fp32 - bf16) <= allowed_accuracy_gap(fp32, bf16, n), (fp32, bf16, n)


def test_a_run_with_precision_auto_trains_in_the_measured_choice_and_records_it(store, monkeypatch):
    import mlflow

    from pipeline.config import PrepareConfig
    from pipeline.run import runners

    monkeypatch.setattr(precision, "time_fp32_and_bf16", lambda *args: (40.0, 100.0))  # bf16 2.5x
    trained_in = []
    real_fit = runners.fit
    monkeypatch.setattr(runners, "fit", lambda net, tr, va, cfg, *a, **k: trained_in.append(cfg.precision)
                        or real_fit(net, tr, va, cfg, *a, **k))
    data = runners.run_prepare(PrepareConfig(source="digits", image_size=8, classes="0,1", samples_per_class=20))
    run_id = runners.run_train(TrainConfig(data=data, arch="resnet9", epochs=1, batch_size=16, device="cpu"),
                               "pretrain")
    run = mlflow.get_run(run_id)
    assert trained_in == ["bf16"]
    assert run.data.params["precision"] == "auto" and run.data.params["precision_resolved"] == "bf16"
    assert run.data.metrics["cpu_bf16_speedup"] == pytest.approx(2.5)


def test_same_seed_trains_alike_whether_the_verdict_was_measured_or_cached(store, capsys):
    """The real measurement builds and runs a network of its own between the run's seeding and fit():
    it must not change what the run trains. The second run reads the verdict the first one cached."""
    import mlflow

    from pipeline.config import PrepareConfig
    from pipeline.run import runners

    data = runners.run_prepare(PrepareConfig(source="digits", image_size=8, samples_per_class=30))
    cfg = TrainConfig(data=data, epochs=2, batch_size=32, augment="basic", device="cpu", precision="auto")
    losses, verdicts = [], []
    for _ in range(2):
        run_id = runners.run_train(cfg, "pretrain")
        history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "train_loss")
        losses.append([m.value for m in sorted(history, key=lambda m: m.step)])
        verdicts.append(mlflow.get_run(run_id).data.params["precision_resolved"])
    printed = capsys.readouterr().out
    assert "measured:" in printed and "cached:" in printed  # one run of each kind
    assert verdicts[0] == verdicts[1] and len(losses[0]) == 2
    assert losses[0] == losses[1]
