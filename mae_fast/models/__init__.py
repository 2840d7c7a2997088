"""The models: the MAE / CA-MAE ViTs of the papers and the CNN baselines, one registry and constructor for all.

    mae.py              MAEConfig, MaskedAutoencoder (encoder, decoders, loss) -- one readable file
    wsl.py, munet.py    the CNN baselines of Kraus et al. 2023 (WSL DenseNet-161 +/- AdaBN; MU-Net-M / -L)
    baseline_common.py  what the two CNN baselines share (config checks, input checks)
    registry.py         every preset by name: register_model, create_model, model_config, list_models

The configs hold the architecture only; each preset's optimiser recipe is `mae_fast.training.recipes`.

    from mae_fast.models import create_model
    model = create_model("mae_vit_large_patch8_256")
"""
from mae_fast.models.mae import (
    LN_EPS,
    POOLINGS,
    MAEConfig,
    MAEOutput,
    MaskedAutoencoder,
    count_parameters,
    sincos_pos_embed,
)
from mae_fast.models.registry import (
    BaselineConfig,
    ModelConfig,
    config_from_dict,
    create_model,
    list_models,
    list_presets,
    model_config,
    register_model,
)

from mae_fast import hub as _hub  # noqa: E402,F401 - binds MaskedAutoencoder.from_pretrained / save_pretrained / push_to_hub

__all__ = [
    "LN_EPS", "POOLINGS", "BaselineConfig", "MAEConfig", "MAEOutput", "MaskedAutoencoder", "ModelConfig",
    "config_from_dict", "count_parameters", "create_model", "list_models", "list_presets", "model_config",
    "register_model", "sincos_pos_embed",
]
