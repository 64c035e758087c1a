"""Structural channel pruning (torch-pruning's DepGraph) and what a network costs to run.

prune_channels removes whole channels from every prunable layer group, so the result is a smaller
dense network (no masks): fewer MACs and parameters, and faster on any device. measure_cost gives the
numbers a pruned and an unpruned model are compared on. Torch-only: the MLflow side is pruning_run.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from pipeline.config import IMPORTANCES
from pipeline.errors import PipelineError
from pipeline.model.models import ImageClassifier

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (normalized float NCHW inputs, int64 labels)
TIMED_BATCHES = (1, 64)  # CPU inference img/s is measured at these batch sizes


def _importance(name: str) -> tp.importance.Importance:
    """How a channel's worth is scored: L2 norm of its weights, |gamma| of its BatchNorm, or
    |weight x gradient| (first-order Taylor estimate of the loss change when it is removed)."""
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    raise PipelineError(f"importance={name!r} is not supported; use one of: {', '.join(IMPORTANCES)}")


def _accumulate_gradients(net: nn.Module, batches: Batches) -> None:
    """Fresh loss gradients on `batches` (normalized inputs, labels): what Taylor importance reads."""
    net.zero_grad()
    for x, y in batches:
        nn.functional.cross_entropy(net(x), y).backward()


def prune_channels(net: nn.Module, image_size: int, pruning_ratio: float, importance: str = "magnitude",
                   iterative_steps: int = 1, gradient_batches: Batches = ()) -> None:
    """Remove `pruning_ratio` of the channels of every prunable layer group of `net` (in place, on the CPU),
    in `iterative_steps` equal steps, re-scoring channels between steps. The class Linear keeps its outputs.

    MACs of a conv layer scale with in x out channels, so a ratio r leaves about (1 - r)^2 of them.
    gradient_batches (normalized float inputs, labels) are needed for importance="taylor" only.
    """
    if importance == "taylor" and not gradient_batches:
        raise PipelineError("importance=taylor needs gradient batches; pass some training images")
    net.cpu().eval()  # eval: the graph-tracing forward passes must not move BatchNorm running statistics
    example = torch.randn(1, 3, image_size, image_size)
    pruner = tp.pruner.MetaPruner(net, example, importance=_importance(importance), pruning_ratio=pruning_ratio,
                                  iterative_steps=iterative_steps, ignored_layers=[net.fc[-1]])
    for _ in range(iterative_steps):
        if importance == "taylor":
            _accumulate_gradients(net, gradient_batches)
        pruner.step()
    net.zero_grad(set_to_none=True)


def count_macs_and_params(net: nn.Module, image_size: int) -> tuple[int, int]:
    """(multiply-accumulates of one image_size x image_size image's forward pass, parameters)."""
    net.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(net, torch.zeros(1, 3, image_size, image_size))
    return int(macs), int(params)


def state_dict_bytes(net: nn.Module) -> int:
    """The model's size on disk: its state dict as the logged model stores it (torch.save)."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _import_timer():
    """torch.utils.benchmark's Timer, imported when first timed: importing it loads cpp_extension, which
    warns "No CUDA runtime is found" on every CPU-only machine with a CUDA toolkit, a line that would
    otherwise stand before the one-line error of every tune or prune command."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        quiet.setLevel(level)
    return Timer


def inference_rate(classifier: ImageClassifier, batch_size: int, min_seconds: float, threads: int = 1) -> float:
    """Images per second the served model (uint8 in, logits out, fp32) predicts on this machine's CPU
    with `threads` torch threads (0 = torch's default): the median of torch.utils.benchmark's blocked runs."""
    size = classifier.image_size
    images = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)
    classifier.cpu().eval()
    with torch.inference_mode():
        classifier(images)  # the first call pays one-off costs (kernel choice, allocations): not timed
    timer_class = _import_timer()
    timer = timer_class("with torch.inference_mode(): model(images)",
                        globals={"model": classifier, "images": images, "torch": torch},
                        num_threads=threads or torch.get_num_threads())
    return batch_size / timer.blocked_autorange(min_run_time=min_seconds).median


def measure_cost(net: nn.Module, image_size: int, timing_seconds: float = 1.0, threads: int = 1) -> dict[str, float]:
    """params, macs, size_bytes and img_per_s_b<batch> for each of TIMED_BATCHES, on the CPU."""
    net.cpu().eval()
    macs, params = count_macs_and_params(net, image_size)
    classifier = ImageClassifier(net, [], image_size)
    cost = {"params": params, "macs": macs, "size_bytes": state_dict_bytes(net)}
    for batch in TIMED_BATCHES:
        cost[f"img_per_s_b{batch}"] = inference_rate(classifier, batch, timing_seconds, threads)
    return cost


def prune_for_trial(net: nn.Module, image_size: int, pruning_ratio: float, timing_seconds: float = 0.0,
                    threads: int = 1) -> dict[str, float]:
    """A tune trial's network: pruned by `pruning_ratio` (0 = left as it is; magnitude importance, one step),
    and what it costs: params, macs and, when timing_seconds > 0, img_per_s_b64 (as measure_cost times it).

    Training changes the weights, not the shapes, so the cost measured here is the trained model's."""
    if pruning_ratio > 0:
        prune_channels(net, image_size, pruning_ratio, "magnitude")
    macs, params = count_macs_and_params(net.cpu(), image_size)
    cost = {"params": params, "macs": macs}
    if timing_seconds > 0:
        batch = TIMED_BATCHES[-1]
        cost[f"img_per_s_b{batch}"] = inference_rate(ImageClassifier(net, [], image_size), batch, timing_seconds,
                                                     threads)
    return cost
