"""transfer's config: what freezing buys, measured in one command.

Pretrain on a source class set, then on a disjoint target class set with few images per class:
fine-tune the pretrained network at each frozen depth and train the same architecture from scratch
with the same epochs, and score all of them on the target's test split.

Default budget (2 CPU cores; ResNet-18 at 32 px trains at about 50 img/s fp32, about 100 img/s bf16):
pretrain 5 classes x 1,000 images x 8 epochs = 40,000 image-passes; target 5 x 100 = 500 images x
15 epochs x 7 runs (depths 0-5 and scratch) = 52,500 image-passes, the frozen ones cheaper (no
backward pass through frozen stages), about 39,000 full passes' worth. About 79,000 passes: ~26 min
fp32, ~13 min bf16; plus validation after each of the 113 epochs (470 images, forward only, ~4 min),
7 evaluations of 1,500 test images, 8 model logs and two decodes of the archive: an estimated ~35 min
fp32, ~20 min bf16 on 2 otherwise idle cores (docs/fine-tuning.md, "What freezing buys").
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.base import ARCHS, NUM_STAGES, opt, same_as
from pipeline.config.steps import EvaluateConfig, PrepareConfig, TrainConfig
from pipeline.errors import PipelineError

SOURCE_CLASSES = "airplane,automobile,bird,cat,deer"  # CIFAR-10's first five
TARGET_CLASSES = "dog,frog,horse,ship,truck"  # the other five


@dataclass(frozen=True)
class TransferConfig:
    """transfer's options (steps/transfer.py generates its command line from these)."""

    source: str = same_as(PrepareConfig, "source")
    data_dir: str = same_as(PrepareConfig, "data_dir")
    image_size: int = same_as(PrepareConfig, "image_size")
    val_fraction: float = opt(0.02, "share of each class's non-test images held out for validation (picks the best "
                                    "epoch); 0.02 of the JPEG archive = 94 per class")
    test_fraction: float = opt(0.06, "share of each class held out for test, when the source has no test split; "
                                     "0.06 of the JPEG archive = 300 per class")
    source_classes: str = opt(SOURCE_CLASSES, "comma-separated classes to pretrain on")
    target_classes: str = opt(TARGET_CLASSES, "comma-separated classes to fine-tune and test on; none may be a "
                                              "source class")
    source_samples_per_class: int = opt(1000, "training images per source class (0 = all)")
    target_samples_per_class: int = opt(100, "training images per target class: the small budget (e.g. 50, 100, "
                                             "500)")
    arch: str = opt("resnet18", " | ".join(ARCHS))
    weights: str = opt("none", "none | imagenet: the pretrain step's starting weights (torch hub cache); the "
                               "scratch baseline always starts from none")
    pretrain_epochs: int = opt(8, "epochs of pretraining on the source")
    finetune_epochs: int = opt(15, "epochs of each fine-tuning and of the scratch baseline (same compute)")
    batch_size: int = opt(64, "images per optimizer step (every training run)")
    pretrain_lr: float = opt(0.05, "peak learning rate of pretrain")
    finetune_lr: float = opt(0.01, "peak learning rate of each fine-tuning")
    scratch_lr: float = opt(0.05, "peak learning rate of the scratch baseline (a from-scratch rate, like pretrain's)")
    warmup_epochs: float = same_as(TrainConfig, "warmup_epochs", 1.0)
    augment: str = same_as(TrainConfig, "augment")
    frozen_depths: str = opt(",".join(str(k) for k in range(NUM_STAGES + 1)),
                             f"comma-separated frozen depths to fine-tune at, each 0-{NUM_STAGES} "
                             f"(stem, layer1..layer4 frozen in turn; {NUM_STAGES} = head only)")
    precision: str = same_as(TrainConfig, "precision")
    device: str = same_as(TrainConfig, "device")
    seed: int = opt(0, "seed for splits, init, shuffling, augmentation")
    system_metrics: bool = same_as(TrainConfig, "system_metrics")

    def __post_init__(self) -> None:
        source, target = self.source_prepare().class_subset, self.target_prepare().class_subset
        if len(source) < 2 or len(target) < 2:
            raise PipelineError("source_classes and target_classes need at least 2 classes each, e.g. "
                                f"{SOURCE_CLASSES} and {TARGET_CLASSES}")
        shared = sorted(set(source) & set(target))
        if shared:
            raise PipelineError(f"{', '.join(shared)} is in both source_classes and target_classes; the target's test "
                                "images must be unseen in pretraining, so use disjoint class sets")
        self.depths  # noqa: B018 - validates frozen_depths
        self.pretrain()
        self.scratch()
        for k in self.depths:
            self.finetune(k)

    @property
    def depths(self) -> list[int]:
        """frozen_depths as sorted distinct integers."""
        try:
            depths = sorted({int(d) for d in self.frozen_depths.split(",") if d.strip()})
        except ValueError:
            raise PipelineError(f"frozen_depths={self.frozen_depths!r} must be comma-separated integers, "
                                "e.g. 0,1,2,3,4,5") from None
        if not depths or not all(0 <= d <= NUM_STAGES for d in depths):
            raise PipelineError(f"frozen_depths={self.frozen_depths!r} must list depths from 0 to {NUM_STAGES}, "
                                "e.g. 0,1,2,3,4,5")
        return depths

    def _prepare(self, classes: str, samples_per_class: int) -> PrepareConfig:
        return PrepareConfig(source=self.source, data_dir=self.data_dir, image_size=self.image_size,
                             val_fraction=self.val_fraction, test_fraction=self.test_fraction, classes=classes,
                             samples_per_class=samples_per_class, seed=self.seed)

    def source_prepare(self) -> PrepareConfig:
        return self._prepare(self.source_classes, self.source_samples_per_class)

    def target_prepare(self) -> PrepareConfig:
        return self._prepare(self.target_classes, self.target_samples_per_class)

    def _train(self, **kwargs) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, warmup_epochs=self.warmup_epochs, augment=self.augment,
                           precision=self.precision, device=self.device, seed=self.seed,
                           system_metrics=self.system_metrics, **kwargs)

    def pretrain(self, data: str = "") -> TrainConfig:
        return self._train(data=data, arch=self.arch, weights=self.weights, epochs=self.pretrain_epochs,
                           lr=self.pretrain_lr)

    def finetune(self, frozen_layers: int, data: str = "", pretrained: str = "(from pretrain)") -> TrainConfig:
        return self._train(data=data, arch=self.arch, epochs=self.finetune_epochs, lr=self.finetune_lr,
                           pretrained=pretrained, frozen_layers=frozen_layers)

    def scratch(self, data: str = "") -> TrainConfig:
        """The baseline: the same architecture on the target's training images, every layer from random init,
        as many epochs as each fine-tuning."""
        return self._train(data=data, arch=self.arch, weights="none", epochs=self.finetune_epochs, lr=self.scratch_lr)

    def evaluate(self, model: str, data: str) -> EvaluateConfig:
        return EvaluateConfig(model=model, data=data, split="test", device=self.device)
