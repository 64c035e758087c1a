"""Each arch's training recipe: the values its recipe-dependent options take when left at `auto`.

A TrainConfig field declared with `recipe_opt` defaults to None ("auto" on the command line and in
the MLproject); TrainConfig.resolved() fills it from the arch's recipe before training, so an
explicit value always wins and the run logs the values it trained with. Torch-free, like all config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

AUTO = "auto"  # what the command line and the MLproject pass for "the arch's recipe"


@dataclass(frozen=True)
class Recipe:
    lr: float
    batch_size: int
    weight_decay: float
    label_smoothing: float
    schedule: str
    warmup_epochs: float  # fixed epochs of warm-up ...
    tta: bool
    warmup_share: float = 0.0  # ... plus this share of the run's epochs (airnet: the peak at 23% of the steps)

    def value(self, name: str, epochs: int):
        if name == "warmup_epochs":
            return self.warmup_epochs + self.warmup_share * epochs
        return getattr(self, name)


RECIPE_FIELDS = tuple(f.name for f in fields(Recipe) if f.name != "warmup_share")

# The ResNets' recipe (every arch not in RECIPES trains with it: resnet*, mobilenet_v3_*, vgg11_bn).
STANDARD = Recipe(lr=0.05, batch_size=128, weight_decay=5e-4, label_smoothing=0.0, schedule="cosine",
                  warmup_epochs=0.0, tta=False)
# airbench94's (Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU") moved to this pipeline's
# mean loss and Nesterov momentum 0.9. airbench sums the loss over its 1024-image batch and divides its lr 11.5
# and weight decay 0.0153 (both "per 1024 examples") by K = 1024 * (1 + 1/(1 - 0.85)), at momentum 0.85:
#   lr: mean-loss lr 11.5 / (1 + 1/0.15) = 1.5, steady-state step lr / (1 - momentum) = 10; at 0.9: lr 1.0.
#   (airbench's formula with 0.9 put in, 11.5 / (1 + 1/0.1) = 1.05, would take a 4.5% larger step.)
#   weight decay: 0.0153 * 1024 / K = 0.0020 of the weights per step, 0.0133 after momentum (/ 0.15);
#   here lr * weight_decay / 0.1 = 0.0133 at lr 1.0 gives weight_decay 0.00133 (= 0.0153 / 11.5).
# Schedule: airbench's, 0.2 x lr rising to lr at 23% of the steps, down to 0.07 x lr at the last.
AIRNET = Recipe(lr=1.0, batch_size=1024, weight_decay=0.00133, label_smoothing=0.2, schedule="triangle",
                warmup_epochs=0.0, warmup_share=0.23, tta=True)
RECIPES: dict[str, Recipe] = {"airnet": AIRNET}


def recipe_of(arch: str) -> Recipe:
    return RECIPES.get(arch, STANDARD)


def recipe_opt(name: str, kind: type, help: str):
    """A recipe-dependent config field: None (auto: the arch's recipe) unless given. `kind` is the type
    of a given value, what the command line parses; the help lists the recipes' values."""
    def shown(recipe: Recipe) -> str:
        if name == "warmup_epochs" and recipe.warmup_share:
            return f"{recipe.warmup_share:g} x epochs"
        value = recipe.value(name, 0)
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:g}" if isinstance(value, float) else str(value)

    values = ", ".join(f"{arch} {shown(recipe)}" for arch, recipe in RECIPES.items())
    help = f"{help}; auto = the arch's recipe: {values}, others {shown(STANDARD)}"
    return field(default=None, metadata={"help": help, "recipe": kind})
