"""precision=auto on CPU: time the run's network in fp32 and in bf16 autocast, keep the faster.

CPU flags are a poor guide to bf16 speed: AVX512-BF16 made a small-stem ResNet-18 1.88x faster than
fp32 on one AMD EPYC and slower than fp32 on a Xeon with the same flag, and CPUs without any bf16
instruction emulate it slowly. So the choice is measured: a few forward+backward passes of the
chosen network at the run's image size, fp32 and bf16 steps alternated (a burst of background load
hits both), the best step of each kept. bf16 wins only when clearly faster (BF16_MIN_SPEEDUP).

The verdict is cached per CPU model, torch version, architecture and image size in the user's cache
directory ($PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/mlflow-optuna-pipeline, else
~/.cache/mlflow-optuna-pipeline), so repeated runs and tune trials pay the ~1 s once.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.models import create_model

BF16_MIN_SPEEDUP = 1.2  # bf16 must be this much faster: below it, fp32's exactness is worth more
TIMING_PIXELS = 8 * 32 * 32  # images x pixels per timed step: ~0.15 s fp32 for a small-stem ResNet-18 on 2 cores
WARMUP_STEPS = 1  # per precision; oneDNN picks and caches its kernels on first use
# Timed steps alternate fp32/bf16 and the fastest of each counts: on a busy machine most steps are
# slowed by other work, the fastest least. At least MIN_TIMED_PAIRS, then more until MEASURE_SECONDS
# of timed steps or MAX_TIMED_PAIRS (a verdict from 2 pairs on a 2-core box at load 6 chose fp32 wrongly).
MIN_TIMED_PAIRS = 3
MAX_TIMED_PAIRS = 8
MEASURE_SECONDS = 0.6
# A busy machine slows every step: past this many seconds of timed steps one pair is enough to decide.
MAX_MEASURE_SECONDS = 3.0
CACHE_ENV = "PIPELINE_CACHE_DIR"
CACHE_SUBDIR = "mlflow-optuna-pipeline"
CACHE_FILE = "cpu_precision.json"
CACHE_VERSION = 2  # bump when the measurement changes, so old verdicts are measured again


@dataclass(frozen=True)
class PrecisionVerdict:
    """What precision=auto chose on this CPU, and the measurement behind it."""

    choice: str  # "bf16" | "fp32"
    ratio: float  # bf16 img/s / fp32 img/s
    fp32_img_s: float  # forward+backward images per second, fp32
    bf16_img_s: float  # the same under bf16 autocast
    cpu: str  # the CPU model name the verdict belongs to
    batch_size: int  # images per timed step
    cached: bool = False  # True when read from the cache instead of measured now

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.choice == "bf16" else None

    def describe(self) -> str:
        source = "cached" if self.cached else "measured"
        return (f"precision=auto on {self.cpu}: {self.choice} (bf16 {self.ratio:.2f}x fp32, {source}: "
                f"{self.fp32_img_s:.1f} vs {self.bf16_img_s:.1f} img/s)")


# (fp32 img/s, bf16 img/s) for (arch, image_size, batch_size, num_classes); tests pass their own.
Timer = Callable[[str, int, int, int], tuple[float, float]]


def choose_precision(fp32_img_s: float, bf16_img_s: float) -> str:
    return "bf16" if bf16_img_s >= BF16_MIN_SPEEDUP * fp32_img_s else "fp32"


def timing_batch_size(batch_size: int, image_size: int) -> int:
    """The run's batch, capped so a timed step costs about the same at any image size."""
    return max(1, min(batch_size, TIMING_PIXELS // (image_size * image_size)))


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype: torch.dtype | None) -> float:
    """Seconds for one forward+backward pass, as fit() runs it (autocast around forward and loss)."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = F.cross_entropy(net(x), y)
    net.zero_grad(set_to_none=True)
    loss.backward()
    return time.perf_counter() - t0


def time_fp32_and_bf16(arch: str, image_size: int, batch_size: int, num_classes: int) -> tuple[float, float]:
    """(fp32, bf16) forward+backward img/s of `arch`, channels_last, on random inputs."""
    gen = torch.Generator().manual_seed(0)
    net = create_model(arch, num_classes).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch_size, 3, image_size, image_size, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    dtypes = (None, torch.bfloat16)
    for dtype in dtypes:
        for _ in range(WARMUP_STEPS):
            _train_step(net, x, y, dtype)
    best, spent = {dtype: float("inf") for dtype in dtypes}, 0.0
    for pair in range(MAX_TIMED_PAIRS):
        if (pair >= MIN_TIMED_PAIRS and spent >= MEASURE_SECONDS) or spent >= MAX_MEASURE_SECONDS:
            break
        for dtype in dtypes:
            seconds = _train_step(net, x, y, dtype)
            best[dtype], spent = min(best[dtype], seconds), spent + seconds
    return batch_size / best[None], batch_size / best[torch.bfloat16]


def measure_cpu_bf16(
    arch: str, image_size: int, batch_size: int, num_classes: int, *, timer: Timer | None = None
) -> PrecisionVerdict:
    """Time `arch` at `image_size` in fp32 and bf16 autocast on this CPU (~1 s) and choose."""
    batch = timing_batch_size(batch_size, image_size)
    fp32, bf16 = (timer or time_fp32_and_bf16)(arch, image_size, batch, num_classes)
    return PrecisionVerdict(choose_precision(fp32, bf16), bf16 / fp32, fp32, bf16, cpu_model_name(), batch)


def resolve_cpu_amp_dtype(
    arch: str, image_size: int, batch_size: int, num_classes: int, *, timer: Timer | None = None
) -> tuple[torch.dtype | None, PrecisionVerdict]:
    """precision=auto on CPU: (autocast dtype or None for fp32, the verdict), cached per CPU and net."""
    cpu = cpu_model_name()
    key = f"v{CACHE_VERSION}|{cpu}|torch {torch.__version__}|{arch}|{image_size}px"
    verdicts = read_cache()
    if key in verdicts:
        verdict = replace(verdicts[key], cached=True)
    elif key in _MEASURED_HERE:  # measured by this process while busy: a tune worker's trials measure once
        verdict = replace(_MEASURED_HERE[key], cached=True)
    else:
        verdict = measure_cpu_bf16(arch, image_size, batch_size, num_classes, timer=timer)
        _MEASURED_HERE[key] = verdict
        if not machine_is_busy():
            write_cache({**verdicts, key: verdict})
    return verdict.amp_dtype, verdict


_MEASURED_HERE: dict[str, PrecisionVerdict] = {}


def machine_is_busy() -> bool:
    """More runnable work than cores: a verdict timed now holds for this run, not for the cache
    (at load 5-9 on 2 cores bf16 measured 0.67-0.83x fp32; idle, 1.65-1.96x)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / CACHE_SUBDIR / CACHE_FILE


_warned = False


def _warn_once(message: str) -> None:
    """The cache only saves time: a broken one costs a re-measurement, so say so once, not per trial."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def read_cache() -> dict[str, PrecisionVerdict]:
    path = cache_path()
    try:
        raw = json.loads(path.read_text())
        return {key: PrecisionVerdict(**{**fields, "cached": False}) for key, fields in raw.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        _warn_once(f"ignoring the unreadable precision cache {path} ({type(exc).__name__}); measuring again")
        return {}


def write_cache(verdicts: dict[str, PrecisionVerdict]) -> None:
    """Replace the cache file atomically: a concurrent reader sees the old file or the new, never half."""
    path = cache_path()
    text = json.dumps({key: {k: v for k, v in asdict(vd).items() if k != "cached"} for key, vd in verdicts.items()},
                      indent=1, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cpu_precision-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        _warn_once(f"cannot write the precision cache {path} ({exc.strerror or exc}); the next run measures again")
