"""fit(): the epoch loop, top to bottom.

The whole training split lives as one uint8 tensor on the device; batches are gathered,
augmented and normalized there (pipeline.data.loader). The loop reports each epoch through a
callback, which is how MLflow tracking and Optuna pruning plug in without this module
importing either.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.loader import iter_train_batches
from pipeline.distributed import (
    AUGMENT_STREAM,
    DROPOUT_STREAM,
    SHUFFLE_STREAM,
    SINGLE,
    World,
    broadcast_buffers,
    count_epoch,
    derive_seed,
    gather_rows,
    mark_raised_on_every_rank,
    shard_range,
    sum_across,
)
from pipeline.errors import PipelineError
from pipeline.evaluate.metrics import summary_metrics
from pipeline.model.device import autocast, predict_logits, resolve_amp_dtype, resolve_device
from pipeline.model.models import hold_fixed, set_train_mode
from pipeline.train.checkpoint import CheckpointSchedule, restore_state
from pipeline.train.optim import create_ema, create_optimizer, create_scheduler, parameter_groups
from pipeline.train.state import LoopState

VAL_KEYS = ("val_accuracy", "val_precision_macro", "val_recall_macro", "val_f1_macro")
CUDA_FINITE_CHECK_EVERY = 20  # steps; each check is a host sync on GPUs (free on CPU)


class NonFiniteLossError(PipelineError):
    pass


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class Setup:
    """What fit() fixes before the first epoch and never changes: where, how, and on what it trains."""

    cfg: TrainConfig
    world: World
    device: torch.device
    amp_dtype: torch.dtype | None
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    model: nn.Module  # what a training step calls: the net, under DDP and torch.compile where asked
    steps_per_epoch: int
    epoch_images: int  # images trained on per epoch, over all processes
    shuffle_gen: torch.Generator  # on the CPU: the epoch's order, alike on every rank and GPU model
    aug_gen: torch.Generator  # on the device: the augmentation draws of this rank
    drop_last: bool = False  # compiling: every batch the same shape, so torch.compile never recompiles


def fit(
    net: nn.Module,
    train: ImageSet,
    val: ImageSet,
    cfg: TrainConfig,
    num_classes: int,
    on_epoch: EpochCallback | None = None,
    checkpoint_path: str | None = None,
    resume_state: dict | None = None,
    world: World = SINGLE,
    final_checkpoint: Callable[[], bool] | None = None,
) -> FitResult:
    """Train `net` in place and leave it holding the best epoch's weights.

    on_epoch(epoch, metrics) is called after each epoch (epochs count from 1); it may raise to
    stop training (Optuna pruning does). With checkpoint_path, a resumable checkpoint is written
    atomically at most every cfg.checkpoint_every seconds (0: after every epoch), always after the
    last epoch (unless final_checkpoint() says no one will read it), and when interrupted (Ctrl-C,
    SIGTERM) or stopped by on_epoch the last finished epoch's; resume_state (a loaded checkpoint)
    continues from it.

    With world.size > 1 (torchrun, process group joined) every rank calls fit() on the same data:
    cfg.batch_size stays the global batch, each rank trains on its shard of every global batch
    under DistributedDataParallel, and every rank gets the same metrics. Callers pass on_epoch and
    checkpoint_path on rank 0 only.
    """
    cfg = cfg.resolved()  # recipe options left at auto: the arch's recipe (a no-op for a run's resolved config)
    setup, state = set_up(net, train, val, cfg, world)
    if resume_state is not None:
        restore_state(state, resume_state)
    checkpoints = CheckpointSchedule(checkpoint_path, cfg.checkpoint_every, final_needed=final_checkpoint)
    try:
        stopped_early = run_epochs(setup, state, num_classes, on_epoch, checkpoints)
    except BaseException as exc:
        # Interrupted (Ctrl-C, SIGTERM) or stopped from on_epoch (a tracking server lost mid-run): the last
        # finished epoch goes on disk for resume. Not for our own errors (a diverged loss is not worth resuming).
        if not isinstance(exc, PipelineError):
            checkpoints.write_pending()
        raise
    net.load_state_dict(state.best_model)
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    best_metrics = {k: v for k, v in best.items() if k not in ("epoch", "is_best")}
    return FitResult(state.best_epoch, best_metrics, state.history, stopped_early)


def run_epochs(setup: Setup, state: LoopState, num_classes: int, on_epoch: EpochCallback | None,
               checkpoints: CheckpointSchedule) -> bool:
    """The epochs after state.epoch up to cfg.epochs; True when early stopping ended them."""
    cfg, world = setup.cfg, setup.world
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        trained = train_one_epoch(setup, state, epoch)
        broadcast_buffers(state.scored, world)
        metrics = {
            "train_loss": trained["train_loss"],
            "train_accuracy": trained["train_accuracy"],
            **validate(state.scored, setup.val_x, setup.val_y, setup.amp_dtype, num_classes, cfg.tta, world=world),
            "lr": state.optimizer.param_groups[0]["lr"],
            "images_per_sec": trained["images_per_sec"],
        }
        if state.scheduler is not None and cfg.schedule == "plateau":
            state.scheduler.step(metrics[cfg.monitor])
        keep_the_best(state, epoch, metrics, cfg.monitor)
        stopping = bool(cfg.patience and state.stale_epochs >= cfg.patience)
        checkpoints.after_epoch(state, final=stopping or epoch == cfg.epochs)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stopping:
            return True
    return False


def set_up(net: nn.Module, train: ImageSet, val: ImageSet, cfg: TrainConfig, world: World) -> tuple[Setup, LoopState]:
    """Move the net and the data to the device; build the optimizer, schedule, EMA, DDP wrapper and
    generators. Refuses (on every rank alike) data that cannot be trained or validated on."""
    if len(val) == 0:
        message = "the dataset has no validation images; re-run prepare_data with val_fraction > 0"
        raise mark_raised_on_every_rank(PipelineError(message))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net.to(device, memory_format=torch.channels_last)
    # Compiling: a short last batch would be a new shape, hence a recompile, every epoch; leave it out.
    drop_last = cfg.compile and len(train) >= cfg.batch_size
    steps_per_epoch, epoch_images = count_epoch(len(train), cfg.batch_size, world.size, drop_last)
    if steps_per_epoch == 0:
        raise mark_raised_on_every_rank(PipelineError(
            f"the training split has {len(train)} image(s); training on {world.size} process(es) "
            f"needs at least {world.size}"
        ))
    hold_fixed(net)  # pruning may have made them anew, trainable
    optimizer = create_optimizer(parameter_groups(net, cfg), cfg)
    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch)
    ema = create_ema(net, cfg.ema)
    model = _wrap_for_steps(net, device, world, cfg.compile)
    tensors = [torch.from_numpy(a).to(device) for a in (train.images, train.labels, val.images, val.labels)]
    setup = Setup(cfg, world, device, resolve_amp_dtype(cfg.precision, device), *tensors, model,
                  steps_per_epoch, epoch_images, torch.Generator(), torch.Generator(device=device), drop_last)
    return setup, LoopState(net, optimizer, scheduler, ema)


def _wrap_for_steps(net: nn.Module, device: torch.device, world: World, compile: bool) -> nn.Module:
    """The module a training step calls: the net, under DDP with several processes, compiled if asked."""
    model = net
    if world.size > 1:
        # BatchNorm stays per process (no SyncBatchNorm): each rank normalizes over its own
        # batch_size / world_size images, as in most data-parallel recipes, instead of paying two
        # extra all-reduces per BN layer and step (slow on CPU/gloo). Running statistics are synced
        # at construction but not every step (forward_sync_buffers=False); rank 0's are broadcast
        # before each validation, so every rank scores, saves and logs the same weights.
        device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        model = DistributedDataParallel(net, device_ids=device_ids, forward_sync_buffers=False)
    return torch.compile(model) if compile else model


def train_one_epoch(setup: Setup, state: LoopState, epoch: int) -> dict[str, float]:
    """One pass over the training split: train_loss, train_accuracy (all processes' images), images_per_sec."""
    cfg, world, device = setup.cfg, setup.world, setup.device
    set_train_mode(state.net)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    t0 = time.perf_counter()
    _seed_epoch(setup, cfg.seed, epoch, world)
    batches = iter_train_batches(setup.train_x, setup.train_y, cfg.batch_size, cfg.augment, setup.shuffle_gen,
                                 setup.aug_gen, (world.rank, world.size), setup.drop_last)
    bar = tqdm(batches, total=setup.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
               disable=not (sys.stderr.isatty() and world.is_main))
    for step, (x, y) in enumerate(bar, 1):
        logits, summed = _train_step(setup, state, x, y, epoch, step)
        loss_sum += summed
        correct += (logits.argmax(1) == y).sum()
    loss_total, correct_total = sum_across(torch.stack([loss_sum.double(), correct.double()]), world).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t0
    train_loss = loss_total / setup.epoch_images
    if not math.isfinite(train_loss):
        raise mark_raised_on_every_rank(NonFiniteLossError(
            f"training loss became {train_loss} during epoch {epoch}; lower lr (now {cfg.lr}) or use precision=fp32"
        ))
    return {"train_loss": train_loss, "train_accuracy": correct_total / setup.epoch_images,
            "images_per_sec": setup.epoch_images / train_time}


def _seed_epoch(setup: Setup, seed: int, epoch: int, world: World) -> None:
    """Every epoch's draws are a function of (seed, epoch[, rank]), for one process (rank 0 of 1)
    and for several alike: the same permutation on every rank (each then takes its shard of every
    global batch), per-rank augmentation and dropout draws. So a checkpoint needs no generator
    state, and one written on a GPU resumes on a CPU (their generator states differ in size)."""
    setup.shuffle_gen.manual_seed(derive_seed(seed, epoch, SHUFFLE_STREAM))
    setup.aug_gen.manual_seed(derive_seed(seed, epoch, AUGMENT_STREAM, world.rank))
    torch.manual_seed(derive_seed(seed, epoch, DROPOUT_STREAM, world.rank))  # dropout, on every device


def _train_step(setup: Setup, state: LoopState, x: torch.Tensor, y: torch.Tensor, epoch: int,
                step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch: (its logits, this process's summed loss over its images)."""
    cfg = setup.cfg
    batch_n = min(cfg.batch_size, len(setup.train_x) - (step - 1) * cfg.batch_size)  # the global batch's images
    with autocast(setup.device, setup.amp_dtype):
        logits = setup.model(x)
        loss, summed = scaled_loss(logits, y, cfg.label_smoothing, batch_n, setup.world)
    if setup.device.type == "cpu" or step % CUDA_FINITE_CHECK_EVERY == 0:
        # Several processes: the global batch's loss, so every rank stops at the same step.
        checked = sum_across(summed.clone(), setup.world) / batch_n if setup.world.size > 1 else loss
        if not torch.isfinite(checked).item():
            raise mark_raised_on_every_rank(NonFiniteLossError(
                f"training loss became {checked.item()} at epoch {epoch} step {step}; "
                f"lower lr (now {cfg.lr}) or use precision=fp32"
            ))
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    if state.scheduler is not None and cfg.schedule != "plateau":
        state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(state.net)
    return logits, summed


def scaled_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float, batch_n: int,
                world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to backpropagate, this process's summed loss over its images, detached).

    One process: the batch's mean loss. Several: the shard's summed loss scaled by world.size /
    batch_n (batch_n = the global batch's images), so that DDP's mean of the ranks' gradients is
    the gradient of the global batch's mean loss, also for an uneven last batch.
    """
    if world.size == 1:
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, loss.detach().float() * len(y)
    shard_sum = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="sum")
    return shard_sum * (world.size / batch_n), shard_sum.detach().float()


def validate(net, images, labels, amp_dtype, num_classes, tta=False, world: World = SINGLE) -> dict[str, float]:
    """Validation metrics (val_loss and VAL_KEYS). Several processes: each scores its shard_range rows,
    and the logits are gathered back in order on every rank, so the metrics equal one process's and
    agree on all ranks."""
    if world.size > 1:
        start, stop = shard_range(len(images), world.rank, world.size)
        local = predict_logits(net, images[start:stop], amp_dtype, tta).reshape(stop - start, num_classes)
        logits = gather_rows(local.to(images.device), len(images), world)
    else:
        logits = predict_logits(net, images, amp_dtype, tta)
    loss = F.cross_entropy(logits, labels).item()
    pred = logits.argmax(1).cpu().numpy()
    metrics = summary_metrics(labels.cpu().numpy(), pred, num_classes, "val")
    return {"val_loss": loss, **{k: metrics[k] for k in VAL_KEYS}}


def keep_the_best(state: LoopState, epoch: int, metrics: dict[str, float], monitor: str) -> None:
    """Record the epoch in the history; on an improvement of `monitor`, keep a CPU copy of the scored
    weights, else count a stale epoch (early stopping)."""
    value, best = metrics[monitor], state.best_value
    improved = best is None or (value < best if monitor == "val_loss" else value > best)
    if improved:
        state.best_value, state.best_epoch, state.stale_epochs = value, epoch, 0
        state.best_model = {k: v.detach().to("cpu", copy=True) for k, v in state.scored.state_dict().items()}
    else:
        state.stale_epochs += 1
    state.history.append({"epoch": epoch, "is_best": improved, **metrics})
    state.epoch = epoch


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
