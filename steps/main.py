"""main: prepare_data -> pretrain -> finetune -> evaluate under one parent run.

Reuses any FINISHED step run whose parameters, upstream run ids and code version match, and
prints which steps it reused.
"""

import click
import mlflow

from pipeline.chain import ChainConfig, run_chain
from pipeline.config import PrepareConfig, TrainConfig
from pipeline.registry import register_evaluated
from steps._cli import handle_errors


@click.command()
@click.option("--source", default="cifar10", show_default=True, help="cifar10 | digits | image folder or archive path")
@click.option("--data-dir", default="data", show_default=True, help="download cache for CIFAR-10")
@click.option("--image-size", default=32, show_default=True, help="pixels (square)")
@click.option("--val-fraction", default=0.1, show_default=True, help="share of training images held out for validation")
@click.option("--test-fraction", default=0.1, show_default=True, help="share held out for test when the source has none")
@click.option("--classes", default="", show_default=True, help="comma-separated class subset (empty = all)")
@click.option("--samples-per-class", default=0, show_default=True, help="cap on training images per class (0 = all)")
@click.option("--arch", default="resnet18", show_default=True, help="resnet18 | resnet34 | resnet50 | resnet9")
@click.option("--weights", default="none", show_default=True, help="pretrain start: none | imagenet")
@click.option("--pretrain-epochs", default=10, show_default=True, help="epochs of pretraining")
@click.option("--finetune-epochs", default=5, show_default=True, help="epochs of fine-tuning")
@click.option("--batch-size", default=128, show_default=True, help="images per step (both training steps)")
@click.option("--pretrain-lr", default=0.05, show_default=True, help="peak learning rate of pretrain")
@click.option("--finetune-lr", default=0.01, show_default=True, help="peak learning rate of finetune")
@click.option("--augment", default="basic", show_default=True, help="none | basic (crop + flip) | strong (+ rotation, scale)")
@click.option("--frozen-layers", default=3, show_default=True, help="finetune: freeze the first k stages (0-5)")
@click.option("--precision", default="auto", show_default=True, help="auto | bf16 | fp32")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--seed", default=0, show_default=True, help="seed for splits, init, shuffling, augmentation")
@click.option("--register-as", default="", show_default=True,
              help="registered model name for the fine-tuned model, described with its test metrics (alias `champion` moves on better test macro-F1); empty = do not register")
@click.option("--system-metrics", type=click.BOOL, default=True, show_default=True,
              help="training runs log CPU/memory (and GPU with pynvml) as system/* metrics; false = off")
@handle_errors
def main(source, data_dir, image_size, val_fraction, test_fraction, classes, samples_per_class, arch, weights,
         pretrain_epochs, finetune_epochs, batch_size, pretrain_lr, finetune_lr, augment, frozen_layers, precision, device, seed,
         register_as, system_metrics):
    shared = dict(arch=arch, batch_size=batch_size, augment=augment, precision=precision, device=device, seed=seed,
                  system_metrics=system_metrics)
    cfg = ChainConfig(
        prepare=PrepareConfig(source=source, data_dir=data_dir, image_size=image_size, val_fraction=val_fraction,
                              test_fraction=test_fraction, classes=classes, samples_per_class=samples_per_class, seed=seed),
        pretrain=TrainConfig(epochs=pretrain_epochs, lr=pretrain_lr, weights=weights, **shared),
        finetune=TrainConfig(epochs=finetune_epochs, lr=finetune_lr, frozen_layers=frozen_layers, pretrained="(from pretrain)", **shared),
    )
    ids = run_chain(cfg)
    for step, run_id in ids.items():
        click.echo(f"{step:>12}: {run_id}")
    if register_as:
        test_images = int(mlflow.get_run(ids["prepare_data"]).data.metrics.get("test_images", 0))
        register_evaluated(ids["finetune"], ids["evaluate"], register_as, test_images)


if __name__ == "__main__":
    main()
