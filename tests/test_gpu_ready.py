"""What the CUDA path relies on, checked on the CPU: per-epoch seeding (a checkpoint from another
device kind resumes), checkpoints by time and on interruption, no per-step host syncs (cached
normalization constants, the device-side EMA), bf16 only where a GPU has it natively, fixed batch
shapes under torch.compile, cuda:K devices, fp32 scoring, and the core importing without
mlflow/optuna."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline.train.checkpoint as checkpoint
import pipeline.train.loop as train
from pipeline.config import EvaluateConfig, TrainConfig, TuneConfig
from pipeline.data import loader
from pipeline.distributed import derive_seed
from pipeline.errors import PipelineError
from pipeline.evaluate.scoring import score_net
from pipeline.model import device as device_mod
from pipeline.train.ema import WeightEMA
from tests.test_fast_path import NUM_CLASSES, tiny_cfg, tiny_net, tiny_set

ROOT = Path(__file__).resolve().parent.parent


def _fit(cfg, **kw):
    net = tiny_net()
    return net, train.fit(net, tiny_set(), tiny_set(12, seed=1), cfg, NUM_CLASSES, **kw)


def _same_run(a_net, a, b_net, b):
    assert [round(h["val_loss"], 6) for h in a.history] == [round(h["val_loss"], 6) for h in b.history]
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    for k, v in a_net.state_dict().items():
        assert torch.equal(v, b_net.state_dict()[k]), k


class Stop(Exception):
    pass


def _stop_after(epoch_to_stop: int, exc: type[BaseException] = Stop):
    def on_epoch(epoch, _metrics):
        if epoch == epoch_to_stop:
            raise exc
    return on_epoch


CFG = dict(epochs=3, augment="basic", dropout=0.2, ema=0.9)  # every random draw: shuffle, crop/flip, dropout


def test_a_checkpoint_holding_another_devices_generator_state_resumes_equal(tmp_path):
    """A GPU run's checkpoint holds a CUDA generator state (another size than a CPU one's): it is
    ignored, since every epoch's draws are seeded from (seed, epoch)."""
    cfg = tiny_cfg(checkpoint_every=0, **CFG)
    full_net, full = _fit(cfg)
    ckpt = tmp_path / "last.pt"
    with pytest.raises(Stop):
        _fit(cfg, on_epoch=_stop_after(1), checkpoint_path=str(ckpt))
    state = torch.load(ckpt, weights_only=True)
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # a Philox (CUDA) state: 16 bytes, not 5056
    state["torch_rng"] = torch.get_rng_state()
    torch.manual_seed(123)  # whatever the global RNG holds at resume, the epochs draw the same
    resumed_net, resumed = _fit(cfg, resume_state=state)
    _same_run(full_net, full, resumed_net, resumed)


def test_an_interruption_mid_epoch_writes_the_last_finished_epoch_and_resumes_equal(tmp_path, monkeypatch):
    cfg = tiny_cfg(checkpoint_every=3600, **CFG)  # no write by time during this test
    full_net, full = _fit(cfg)
    ckpt = tmp_path / "last.pt"
    real_step, steps = train._train_step, []

    def interrupted_step(setup, state, x, y, epoch, step):
        if epoch == 3 and step == 2:  # Ctrl-C / SIGTERM in the middle of epoch 3
            raise KeyboardInterrupt
        steps.append(epoch)
        return real_step(setup, state, x, y, epoch, step)

    monkeypatch.setattr(train, "_train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        _fit(cfg, checkpoint_path=str(ckpt))
    monkeypatch.setattr(train, "_train_step", real_step)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2 and steps[-1] == 3  # epoch 3 had taken a step: the file is epoch 2's end
    resumed_net, resumed = _fit(cfg, resume_state=state)
    _same_run(full_net, full, resumed_net, resumed)


def test_checkpoints_are_written_by_time_and_always_after_the_last_epoch(monkeypatch):
    written = []
    monkeypatch.setattr(checkpoint, "save_atomic", lambda ckpt, path: written.append(ckpt["epoch"]))
    _fit(tiny_cfg(epochs=3, checkpoint_every=3600), checkpoint_path="unused.pt")
    assert written == [3]
    written.clear()
    _fit(tiny_cfg(epochs=3, checkpoint_every=0), checkpoint_path="unused.pt")
    assert written == [1, 2, 3]

    monkeypatch.setattr(checkpoint, "checkpoint_state", lambda loop: {"epoch": loop.epoch})
    now = [0.0]
    schedule = checkpoint.CheckpointSchedule("unused.pt", 30, clock=lambda: now[0])
    written.clear()
    for epoch, t in enumerate([10, 25, 31, 40, 70], 1):  # seconds since training started
        now[0] = t
        schedule.after_epoch(train.LoopState(None, None, None, None, epoch=epoch), final=False)
    assert written == [3, 5]


def test_the_last_epoch_is_written_only_when_read_or_when_training_is_stopped(monkeypatch):
    """final_checkpoint() False (a trial whose checkpoint is deleted once fit() returns): no write after
    the last epoch; but when on_epoch raises at that epoch the last finished epoch still goes on disk."""
    written = []
    monkeypatch.setattr(checkpoint, "save_atomic", lambda ckpt, path: written.append(ckpt["epoch"]))
    _fit(tiny_cfg(epochs=3, checkpoint_every=3600), checkpoint_path="unused.pt", final_checkpoint=lambda: False)
    assert written == []

    def lose_server_at_the_end(epoch, metrics):
        if epoch == 3:
            raise ConnectionError("tracking server lost")

    with pytest.raises(ConnectionError):
        _fit(tiny_cfg(epochs=3, checkpoint_every=3600), on_epoch=lose_server_at_the_end,
             checkpoint_path="unused.pt", final_checkpoint=lambda: False)
    assert written == [3]


def test_one_process_and_rank_0_draw_the_same_epoch_on_the_cpu():
    """Shuffle order drawn by a CPU generator seeded from (seed, epoch): what every rank and every
    resumed process draws, whatever device the images are on."""
    data = tiny_set(20)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    gen = torch.Generator().manual_seed(derive_seed(0, 2))
    got = torch.cat([y for _, y in loader.iter_train_batches(images, labels, 8, "none", gen)])
    order = torch.randperm(20, generator=torch.Generator().manual_seed(derive_seed(0, 2)))
    assert torch.equal(got, labels[order])


def test_normalize_builds_its_constants_once_per_device():
    loader._STATS.clear()
    x = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    first = loader.normalize(x)
    cached = loader._STATS[(torch.device("cpu"), torch.float32)]
    loader.normalize(x)
    assert loader._STATS[(torch.device("cpu"), torch.float32)][0] is cached[0] and len(loader._STATS) == 1
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    assert torch.equal(first, ((x.float() - mean) / std).permute(0, 3, 1, 2))


def test_weight_ema_is_the_averaged_model_it_replaces():
    net = tiny_net()
    reference = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = WeightEMA(net, 0.9)
    direct = None
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 3, 8, 8))  # moves the BatchNorm running statistics
        ema.update_parameters(net)
        reference.update_parameters(net)
        now = {k: v.clone() for k, v in net.state_dict().items()}
        direct = now if direct is None else {k: 0.9 * direct[k] + 0.1 * now[k] if v.is_floating_point() else v
                                             for k, v in now.items()}
    assert ema.state_dict().keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v), k
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, direct[k], rtol=1e-5, atol=1e-6)
    restored = WeightEMA(tiny_net(seed=1), 0.9)
    restored.load_state_dict(reference.state_dict())  # an AveragedModel checkpoint resumes
    assert restored._started and int(restored.n_averaged) == 4


def _fake_gpu(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    def is_bf16_supported(including_emulation=True):
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize("capability, native, expected", [((7, 0), False, None), ((8, 0), True, torch.bfloat16)])
def test_auto_precision_picks_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, native, expected):
    _fake_gpu(monkeypatch, capability, native)
    gpu = torch.device("cuda")
    assert device_mod.resolve_amp_dtype("auto", gpu) is expected
    assert device_mod.resolve_amp_dtype("fp32", gpu) is None


def test_bf16_on_a_gpu_without_native_bf16_says_so(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5), False)  # a T4: bf16 emulated only
    with pytest.raises(PipelineError, match=r"precision=bf16 but this GPU \(compute capability 7.5\) has no native"):
        device_mod.resolve_amp_dtype("bf16", torch.device("cuda"))


def test_older_torch_without_including_emulation_reads_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # emulation counted as support
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert not device_mod.cuda_has_native_bf16(torch.device("cuda"))


def test_compiling_trains_on_batches_of_one_shape(monkeypatch):
    shapes = []

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            shapes.append(tuple(x.shape))
            return self.inner(x)

    monkeypatch.setattr(torch, "compile", Recorder)
    result = train.fit(tiny_net(), tiny_set(40), tiny_set(12, seed=1), tiny_cfg(epochs=2, compile=True), NUM_CLASSES)
    assert shapes and set(shapes) == {(16, 3, 8, 8)}  # 40 = 16 + 16 + 8: the 8 are left out
    assert len(shapes) == 4 and result.history[-1]["images_per_sec"] > 0
    shapes.clear()
    train.fit(tiny_net(), tiny_set(40), tiny_set(12, seed=1), tiny_cfg(epochs=1), NUM_CLASSES)
    assert shapes == []  # not compiling: no wrapper, the short batch is trained on


def test_cuda_k_devices_are_validated_in_config_and_against_the_visible_gpus(monkeypatch):
    for make in (lambda d: TrainConfig(data="d", device=d), lambda d: EvaluateConfig(model="m", data="d", device=d),
                 lambda d: TuneConfig(data="d", pretrained="p", device=d)):
        assert make("cuda:1").device == "cuda:1"
        with pytest.raises(PipelineError, match="device='gpu1' is not supported; use one of: auto, cpu, cuda, cuda:0"):
            make("gpu1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_mod.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(PipelineError, match=r"device=cuda:2 but 2 GPU\(s\) are visible \(cuda:0 to cuda:1\)"):
        device_mod.resolve_device("cuda:2")


def test_score_net_scores_in_fp32_unless_asked(monkeypatch):
    seen = []
    real = device_mod.resolve_amp_dtype
    import pipeline.evaluate.scoring as evaluation
    monkeypatch.setattr(evaluation, "resolve_amp_dtype", lambda p, d: seen.append(p) or real(p, d))
    data = tiny_set(12)
    score_net(tiny_net(), data.images, data.labels, ["a", "b", "c"], "test", torch.device("cpu"))
    assert seen == ["fp32"]


def test_the_core_imports_without_mlflow_and_optuna():
    code = ("import sys; sys.modules['mlflow'] = None; sys.modules['optuna'] = None; "
            "import pipeline.train.loop, pipeline.data.sources, pipeline.model.models, pipeline.model.device, "
            "pipeline.train.ema, benchmarks.gpu_check")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_gpu_check_runs_tiny_on_the_cpu_without_mlflow_or_optuna(tmp_path):
    """BENCH_TINY=1 bash benchmarks/gpu_check.sh, with mlflow and optuna made unimportable."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['mlflow'] = None\nsys.modules['optuna'] = None\n"
    )
    env = {
        **os.environ,
        "BENCH_TINY": "1",
        "OUT": str(tmp_path / "out"),
        "PY": sys.executable,
        "PYTHONPATH": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + (tmp_path / "out" / "gpu_check.log").read_text()[-2000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["section"] for r in records] == ["system", "warmup", "throughput", "recipe"]
    assert records[2]["classic_img_s"] > 0 and records[2]["pipeline_img_s"] > 0
    assert len(records[3]["epochs"]) == 2 and 0 <= records[3]["best_val_accuracy"] <= 1


def test_gpu_check_stops_when_no_gpu_is_visible(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "BENCH_TINY": "0"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1 and "sees no CUDA GPU" in (tmp_path / "gpu_check.log").read_text()
