"""The models: the MAE / CA-MAE ViTs of the papers and the CNN baselines, one constructor for all.

    mae.py              MAEConfig, its presets, MaskedAutoencoder (encoder, decoders, loss) -- one readable file
    wsl.py, munet.py    the CNN baselines of Kraus et al. 2023 (WSL DenseNet-161 +/- AdaBN; MU-Net-M / -L)
    baseline_common.py  what the two CNN baselines share (input checks, optimiser)
    registry.py         every preset by name: create_model, model_config, list_models

    from mae_fast.models import create_model
    model = create_model("mae_vit_large_patch8_256")
"""
from mae_fast.models.mae import (
    LN_EPS,
    POOLINGS,
    PRESETS,
    MAEConfig,
    MAEOutput,
    MaskedAutoencoder,
    count_parameters,
    get_config,
    list_presets,
    sincos_pos_embed,
)
from mae_fast.models.registry import (
    BASELINE_PRESETS,
    BaselineConfig,
    config_from_dict,
    create_baseline,
    create_model,
    get_baseline_config,
    is_baseline,
    list_baselines,
    list_models,
    model_config,
)

from mae_fast import hub as _hub  # noqa: E402,F401 - binds MaskedAutoencoder.from_pretrained / save_pretrained / push_to_hub

__all__ = [
    "BASELINE_PRESETS", "LN_EPS", "POOLINGS", "PRESETS", "BaselineConfig", "MAEConfig", "MAEOutput", "MaskedAutoencoder",
    "config_from_dict", "count_parameters", "create_baseline", "create_model", "get_baseline_config", "get_config",
    "is_baseline", "list_baselines", "list_models", "list_presets", "model_config", "sincos_pos_embed",
]
