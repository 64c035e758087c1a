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

from pipeline.checkpoint import save_atomic
from pipeline.config import TrainConfig
from pipeline.data.imageset import ImageSet
from pipeline.data.loader import iter_eval_batches, iter_train_batches
from pipeline.distributed import (
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
from pipeline.metrics import summary_metrics
from pipeline.models import set_train_mode

VAL_KEYS = ("val_accuracy", "val_precision_macro", "val_recall_macro", "val_f1_macro")
EVAL_BATCH = 512
CUDA_FINITE_CHECK_EVERY = 20  # steps; each check is a host sync on GPUs (free on CPU)


class NonFiniteLossError(PipelineError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PipelineError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
        return torch.device("cuda")
    return torch.device("cpu")


def _cpu_has_fast_bf16() -> bool:
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
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_has_fast_bf16() else None


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
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
        with _autocast(images.device, amp_dtype):
            logits = net(x).float()
            if tta:  # horizontal-flip test-time augmentation: average both views
                logits = (logits + net(x.flip(3)).float()) / 2
        out.append(logits)
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_split(net, images, labels, amp_dtype, num_classes, tta=False, world: World = SINGLE) -> dict[str, float]:
    """Validation metrics. Several processes: each scores its shard_range rows, and the logits are
    gathered back in order on every rank, so the metrics equal one process's and agree on all ranks."""
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


def _make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedulers (cosine, onecycle); plateau steps per epoch on the monitored metric."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "plateau":
        mode = "min" if cfg.monitor == "val_loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.2, patience=2)
    return None


def _better(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


EpochCallback = Callable[[int, dict[str, float]], None]


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
) -> FitResult:
    """Train `net` in place and leave it holding the best epoch's weights.

    on_epoch(epoch, metrics) is called after each epoch (epochs count from 1); it may raise to
    stop training (Optuna pruning does). With checkpoint_path, a resumable checkpoint is written
    atomically after every epoch; resume_state (a loaded checkpoint) continues from it.

    With world.size > 1 (torchrun, process group joined) every rank calls fit() on the same data:
    cfg.batch_size stays the global batch, each rank trains on its shard of every global batch
    under DistributedDataParallel, and every rank gets the same metrics. Callers pass on_epoch and
    checkpoint_path on rank 0 only.
    """
    distributed = world.size > 1
    if len(val) == 0:
        raise mark_raised_on_every_rank(PipelineError("the dataset has no validation images; re-run prepare_data with val_fraction > 0"))
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp_dtype(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    net.to(device, memory_format=torch.channels_last)
    train_x = torch.from_numpy(train.images).to(device)
    train_y = torch.from_numpy(train.labels).to(device)
    val_x = torch.from_numpy(val.images).to(device)
    val_y = torch.from_numpy(val.labels).to(device)

    params = [p for p in net.parameters() if p.requires_grad]
    opt = _make_optimizer(params, cfg)
    steps_per_epoch, epoch_images = count_epoch(len(train), cfg.batch_size, world.size)
    if steps_per_epoch == 0:
        raise mark_raised_on_every_rank(PipelineError(
            f"the training split has {len(train)} image(s); training on {world.size} process(es) needs at least {world.size}"
        ))
    sched = _make_scheduler(opt, cfg, steps_per_epoch)
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema), use_buffers=True
        )
    model = net
    if distributed:
        # BatchNorm stays per process (no SyncBatchNorm): each rank normalizes over its own
        # batch_size / world_size images, as in most data-parallel recipes, instead of paying two
        # extra all-reduces per BN layer and step (slow on CPU/gloo). Running statistics are synced
        # at construction but not every step (forward_sync_buffers=False); rank 0's are broadcast
        # before each validation, so every rank scores, saves and logs the same weights.
        model = DistributedDataParallel(
            net, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None, forward_sync_buffers=False
        )
    step_fn = torch.compile(model) if cfg.compile else model
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device) if distributed else gen

    start_epoch, best, best_state, history, stale = 1, None, None, [], 0
    if resume_state is not None:
        net.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        if sched is not None and resume_state.get("scheduler"):
            sched.load_state_dict(resume_state["scheduler"])
        if ema is not None and resume_state.get("ema"):
            ema.load_state_dict(resume_state["ema"])
        gen.set_state(resume_state["generator"].to(gen.get_state().device))
        torch.set_rng_state(resume_state["torch_rng"])
        start_epoch = resume_state["epoch"] + 1
        best, best_state = resume_state["best_value"], resume_state["best_model"]
        history, stale = list(resume_state["history"]), resume_state["stale_epochs"]
    best_epoch = max((h["epoch"] for h in history if h.get("is_best")), default=0)

    frozen_depth = cfg.frozen_layers
    show_bar = sys.stderr.isatty() and world.is_main
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        set_train_mode(net, frozen_depth)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        t0 = time.perf_counter()
        if distributed:
            # The same permutation on every rank (each then takes its shard of every global batch);
            # per-rank augmentation and dropout draws. Seeded per epoch, so resuming draws the same.
            gen.manual_seed(derive_seed(cfg.seed, epoch))
            aug_gen.manual_seed(derive_seed(cfg.seed, epoch, world.rank))
            torch.manual_seed(derive_seed(cfg.seed, epoch, world.rank))
        batches = iter_train_batches(train_x, train_y, cfg.batch_size, cfg.augment, gen, aug_gen, (world.rank, world.size))
        bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not show_bar)
        for step, (x, y) in enumerate(bar, 1):
            with _autocast(device, amp_dtype):
                logits = step_fn(x)
                if distributed:
                    # The shard's summed loss, scaled so that DDP's mean of the ranks' gradients is the
                    # gradient of the global batch's mean loss (also for an uneven last batch).
                    batch_n = min(cfg.batch_size, len(train) - (step - 1) * cfg.batch_size)
                    shard_sum = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing, reduction="sum")
                    loss = shard_sum * (world.size / batch_n)
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if device.type == "cpu" or step % CUDA_FINITE_CHECK_EVERY == 0:
                # Several processes: the global batch's loss, so every rank stops at the same step.
                checked = sum_across(shard_sum.detach().clone(), world) / batch_n if distributed else loss
                if not torch.isfinite(checked).item():
                    raise mark_raised_on_every_rank(NonFiniteLossError(
                        f"training loss became {checked.item()} at epoch {epoch} step {step}; "
                        f"lower lr (now {cfg.lr}) or use precision=fp32"
                    ))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None and cfg.schedule != "plateau":
                sched.step()
            if ema is not None:
                ema.update_parameters(net)
            if distributed:
                loss_sum += shard_sum.detach().float()
            else:
                loss_sum += loss.detach().float() * len(y)
            correct += (logits.argmax(1) == y).sum()
        if distributed:
            totals = sum_across(torch.stack([loss_sum.double(), correct.double()]), world)
            loss_sum, correct = totals[0], totals[1].long()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0
        train_loss = loss_sum.item() / epoch_images
        if not math.isfinite(train_loss):
            raise mark_raised_on_every_rank(NonFiniteLossError(
                f"training loss became {train_loss} during epoch {epoch}; lower lr (now {cfg.lr}) or use precision=fp32"
            ))
        scored = ema.module if ema is not None else net
        broadcast_buffers(scored, world)
        metrics = {
            "train_loss": train_loss,
            "train_accuracy": correct.item() / epoch_images,
            **evaluate_split(scored, val_x, val_y, amp_dtype, num_classes, cfg.tta, world=world),
            "lr": opt.param_groups[0]["lr"],
            "images_per_sec": epoch_images / train_time,
        }
        if sched is not None and cfg.schedule == "plateau":
            sched.step(metrics[cfg.monitor])
        improved = _better(metrics[cfg.monitor], best, cfg.monitor)
        if improved:
            best, best_epoch, stale = metrics[cfg.monitor], epoch, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in scored.state_dict().items()}
        else:
            stale += 1
        history.append({"epoch": epoch, "is_best": improved, **metrics})
        if checkpoint_path:
            save_atomic(
                {
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "best_value": best,
                    "best_model": best_state,
                    "history": history,
                    "stale_epochs": stale,
                },
                checkpoint_path,
            )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if cfg.patience and stale >= cfg.patience:
            stopped_early = True
            break

    net.load_state_dict(best_state)
    best_metrics = next(h for h in history if h["epoch"] == best_epoch)
    return FitResult(best_epoch, {k: v for k, v in best_metrics.items() if k not in ("epoch", "is_best")}, history, stopped_early)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
