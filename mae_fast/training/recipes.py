"""The optimiser recipe of every preset: which optimiser trains it, and with what numbers.

The model configs (`mae_fast.models`) hold the architecture only; how a model is trained lives here, on the
training side. A run's `lr`, `weight_decay`, `betas`, `momentum` and `nesterov` (TrainConfig) default to its
preset's recipe (`optimizer_recipe`); the schedule is the trainer's one-cycle cosine for every recipe.

    MAE / CA-MAE   Lion, lr 1e-4 (micro .. base) or 3e-5 (large), wd 0.05, betas (0.9, 0.95) (Kraus et al.)
    WSL            SGD, lr 0.1 per 256 crops scaled linearly with the global batch (1.6 at 4,096), Nesterov
                   momentum 0.9, wd 1e-4 (DenseNet's recipe: the seed's tuned values are unpublished; see
                   mae_fast.models.wsl)
    MU-Net         AdamW, lr 1e-3 at any batch, betas (0.9, 0.95), wd 0.05 (seed appendix A.1.2)

Weight decay applies to weights (matrices, convolutions, tokens: `mae_fast.optim.lion_param_groups` and
`param_groups`), never to norms and biases. `register_recipe` gives a preset of your own its recipe (others get
their family's).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from mae_fast.models import model_config

OPTIMIZERS = {"mae": ("lion",), "wsl": ("sgd", "adamw"), "munet": ("sgd", "adamw")}  # what each family can train with


@dataclass(frozen=True)
class OptimizerRecipe:
    name: str                                  # "lion" (MAE), "sgd" or "adamw" (baselines)
    lr: float                                  # peak lr (of the one-cycle schedule) for `lr_batch` crops per step
    weight_decay: float
    lr_batch: int = 0                          # linear scaling: lr * global_batch / lr_batch; 0 = the same at any batch
    betas: tuple[float, float] | None = None   # Lion, AdamW
    momentum: float | None = None              # SGD
    nesterov: bool = False                     # SGD

    def __post_init__(self):
        if self.name not in ("lion", "sgd", "adamw"):
            raise ValueError(f"optimizer must be one of lion, sgd, adamw, got {self.name!r}")
        if not self.lr > 0 or not self.weight_decay >= 0 or self.lr_batch < 0:
            raise ValueError(f"recipe needs lr > 0, weight_decay >= 0 and lr_batch >= 0, got lr {self.lr}, "
                             f"weight_decay {self.weight_decay}, lr_batch {self.lr_batch}")
        if (self.name == "sgd") != (self.betas is None) or (self.name == "sgd") != (self.momentum is not None):
            raise ValueError(f"a {self.name} recipe needs " + ("momentum and no betas" if self.name == "sgd" else
                                                               "betas and no momentum"))
        if self.nesterov and self.name != "sgd":
            raise ValueError(f"nesterov is SGD's; this recipe is {self.name}")

    def peak_lr(self, global_batch: int) -> float:
        """The peak lr for `global_batch` crops per step: linear scaling from `lr_batch` (0: no scaling)."""
        return self.lr * global_batch / self.lr_batch if self.lr_batch else self.lr


LION = OptimizerRecipe("lion", lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
SGD_NESTEROV = OptimizerRecipe("sgd", lr=0.1, lr_batch=256, weight_decay=1e-4, momentum=0.9, nesterov=True)
ADAMW = OptimizerRecipe("adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
FAMILY_RECIPES = {"mae": LION, "wsl": SGD_NESTEROV, "munet": ADAMW}  # a preset without its own recipe gets these

# the papers' Lion lr per ViT size (micro: not in the paper, CPU demo and tests)
MAE_LR = {"micro": 1e-4, "tiny": 1e-4, "small": 1e-4, "base": 1e-4, "large": 3e-5}

_PRESET_RECIPES: dict[str, OptimizerRecipe] = {
    f"{kind}_vit_{size}_patch{patch}_256": replace(LION, lr=lr)
    for size, lr in MAE_LR.items() for kind in ("mae", "camae") for patch in (8, 16)
}


def _family(cfg) -> str:
    return getattr(cfg, "family", "mae")


def register_recipe(preset: str, recipe: OptimizerRecipe) -> OptimizerRecipe:
    """Give a registered preset (`mae_fast.models.register_model`) its own optimiser recipe."""
    family = _family(model_config(preset))
    if recipe.name not in OPTIMIZERS[family]:
        raise ValueError(f"preset {preset!r} ({family}) trains with {' or '.join(OPTIMIZERS[family])}, not "
                         f"{recipe.name}")
    _PRESET_RECIPES[preset] = recipe
    return recipe


def optimizer_recipe(preset_or_cfg) -> OptimizerRecipe:
    """The recipe of a preset name or of a model config (looked up by its name, which a preset with overrides
    keeps; a config of no preset gets its family's recipe)."""
    cfg = model_config(preset_or_cfg) if isinstance(preset_or_cfg, str) else preset_or_cfg
    recipe = _PRESET_RECIPES.get(cfg.name)
    if recipe is None or recipe.name not in OPTIMIZERS[_family(cfg)]:
        return FAMILY_RECIPES[_family(cfg)]
    return recipe


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """A baseline's groups: weight decay on conv and linear weights only (not on norms and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: OptimizerRecipe | None = None, *, lr: float | None = None,
                    global_batch: int | None = None) -> torch.optim.Optimizer:
    """A baseline's optimiser from `recipe` (default: its preset's): SGD (WSL) or AdamW (MU-Net). lr: given, else
    `recipe.peak_lr(global_batch)`, else `recipe.lr`. The schedule is the trainer's; the MAE's Lion is built by the
    trainer (`mae_fast.training.loop.make_optimizer`: its groups are decided on the unwrapped model)."""
    recipe = recipe or optimizer_recipe(model.cfg)
    if lr is None:
        lr = recipe.peak_lr(global_batch) if global_batch else recipe.lr
    groups = param_groups(model, recipe.weight_decay)
    if recipe.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                               weight_decay=recipe.weight_decay)
    if recipe.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)
    raise ValueError(f"build_optimizer builds the baselines' SGD / AdamW; {recipe.name} is the trainer's")
