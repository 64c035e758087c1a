"""Where the network runs, in what precision, and inference with it.

Training (pipeline.train.loop), evaluation, the registry and tuning share these; none of them needs the
epoch loop to score a network.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import EVAL_BATCH
from pipeline.data.loader import iter_eval_batches
from pipeline.errors import PipelineError

__all__ = ["EVAL_BATCH", "autocast", "cpu_has_fast_bf16", "cuda_has_native_bf16", "predict_logits",
           "resolve_amp_dtype", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:K` -> the device to use; cuda without a visible GPU, or a
    K beyond the visible GPUs, is a user error."""
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PipelineError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
        if name.startswith("cuda:"):
            return _indexed_gpu(name)
        return torch.device("cuda")
    return torch.device("cpu")


def _indexed_gpu(name: str) -> torch.device:
    index, count = int(name.split(":", 1)[1]), torch.cuda.device_count()
    if index >= count:
        raise PipelineError(f"device={name} but {count} GPU(s) are visible (cuda:0 to cuda:{count - 1}); "
                            f"use one of those, or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    # Only AMX makes bf16 convolutions fast; AVX512-BF16 alone measured slower than fp32 here.
    return "amx_bf16" in flags


def resolve_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it fast (AMX CPUs, bf16 GPUs), else fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return _cuda_amp_dtype(precision, device)
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True where the GPU computes in bf16 natively (Ampere, compute capability 8.0, and later).

    torch.cuda.is_bf16_supported() alone also says True where bf16 is only emulated (V100, T4),
    which trains slower than fp32 there."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before the including_emulation argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def _cuda_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if cuda_has_native_bf16(device):
        return torch.bfloat16
    if precision == "bf16":
        major, minor = torch.cuda.get_device_capability(device)
        raise PipelineError(f"precision=bf16 but this GPU (compute capability {major}.{minor}) has no native bf16; "
                            f"use precision=fp32 or auto (fp32 here)")
    return None


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast for amp_dtype; amp_dtype None (fp32) is a disabled one, so callers need no branch."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


@torch.no_grad()
def predict_logits(
    net: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None, tta: bool = False, batch_size: int = EVAL_BATCH
) -> torch.Tensor:
    """Float32 logits for uint8 NHWC images already on the model's device (eval mode)."""
    was_training = net.training
    net.eval()
    out = []
    for x in iter_eval_batches(images, batch_size):
        with autocast(images.device, amp_dtype):
            logits = net(x).float()
            if tta:  # horizontal-flip test-time augmentation: average both views
                logits = (logits + net(x.flip(3)).float()) / 2
        out.append(logits)
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
