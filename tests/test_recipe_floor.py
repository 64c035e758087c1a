"""The default recipe keeps its accuracy on real images (issue 27).

Between 3df18da and 9dbff25 the README's recipe lost 14 points at seed 0. Per-epoch seeding had
changed every random draw, and that recipe (peak learning rate from the first of 23 steps an
epoch) lets the draws move accuracy by several points: its epoch-1 loss followed the shuffle order
(3.6 with 9dbff25's, 2.8 with another), and over three seeds the fixed code is level with 3df18da.
The defect found on the way, one seed for the shuffle and the augmentation, has its own tests in
test_train and test_distributed. This test trains a fixed small recipe on the shared JPEG archive
and holds it to a floor under its measured seed spread: it catches training that stops learning
(chance is 10%), not a difference within seed noise.
"""

import math

import numpy as np
import pytest

from pipeline.config import PrepareConfig, TrainConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.model.models import create_model
from pipeline.train.loop import fit, seed_everything
from tests.conftest import SHARED_ARCHIVE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_ARCHIVE.exists(),
                       reason=f"the shared CIFAR-10 JPEG archive is not at {SHARED_ARCHIVE}"),
]

EPOCHS = 4
# Best validation accuracy of this recipe (ResNet-18 at its defaults, 100 training images per class
# at 32 px, 4 epochs, fp32, 1,000 validation images) on a 2-core Xeon, one thread: 24.9%, 21.3% and
# 23.7% for seeds 0, 1, 2 on the fixed code (9dbff25 gave 26.3% and 26.7% for seeds 0 and 1: at this
# size the versions differ by less than the seeds). The floor sits 3 points under the lowest seed.
FLOOR = 0.18


@pytest.fixture(scope="module")
def small_cifar():
    cfg = PrepareConfig(source=str(SHARED_ARCHIVE), samples_per_class=100, val_fraction=0.02, test_fraction=0.0,
                        seed=0)
    ds, _ = prepare_dataset(cfg)
    return ds.splits["train"], ds.splits["val"]


def test_the_default_recipe_keeps_its_accuracy_on_real_images(small_cifar):
    train, val = small_cifar
    cfg = TrainConfig(data="jpeg", epochs=EPOCHS, seed=0, precision="fp32", device="cpu")
    seed_everything(cfg.seed)
    net = create_model(cfg.arch, 10)
    history = fit(net, train, val, cfg, 10).history
    accuracies = [h["val_accuracy"] for h in history]
    assert all(math.isfinite(h["train_loss"]) for h in history)
    assert max(accuracies) >= FLOOR, f"val accuracy per epoch {np.round(accuracies, 4).tolist()} under {FLOOR}"
