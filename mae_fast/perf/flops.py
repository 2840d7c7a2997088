"""FLOPs accounting for MAE / CA-MAE ViTs, two ways.

Exact method (`forward_flops`, `training_flops_per_crop`, `inference_flops_per_crop`): every matrix product of the
model as `mae_fast.models` runs it, 2*m*n*k FLOPs each (one multiply + one add), and softmax attention as
4*n*m*d per layer (QK^T and AV, n queries, m keys, d = all heads together), for the actual mask ratio, channel count
and token layout. Elementwise work (LayerNorm, GELU, softmax, residuals, the loss) is not counted: it is memory-bound
and a few percent of the arithmetic at most. Training = 3x forward (backward = 2x forward: one product for the input
gradient and one for the weight gradient of every matmul), the usual convention for MFU.

Paper method (`paper_flops_per_crop`): Kraus et al. 2023 (appendix "Calculation of FLOps") take the ViT-S/B/L/16
counts at 224x224x3 from Touvron et al. 2022 (DeiT III, Table 1), multiply by 1.69 for 256x256 crops and by 16 for
patch 8, then by the crops seen. Those table values are fvcore-style counts (one multiply-add counted once; timm calls
the same numbers GMACs), the encoder only, without masking and without the backward pass, so they are not comparable
one-to-one with the exact training count; `mae-fast flops` prints both.

MFU = achieved FLOP/s (exact training count x crops/s) / the measured bf16 matmul ceiling of the same device.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

from mae_fast.models import MAEConfig, model_config

# --------------------------------------------------------------------------------------------------------------
# Exact count
# --------------------------------------------------------------------------------------------------------------


def matmul_flops(m: int, n: int, k: int) -> int:
    """(m, k) @ (k, n): m*n dot products of length k, 2 FLOPs per multiply-add."""
    return 2 * m * n * k


def attention_flops(n_queries: int, n_keys: int, dim: int) -> int:
    """Softmax attention summed over heads (dim = heads * head_dim): QK^T and AV, 2*n*m*dim each."""
    return 4 * n_queries * n_keys * dim


def _encoder_block(tokens: int, dim: int, hidden: int) -> tuple[int, int]:
    """Parallel scaling block on `tokens` tokens -> (matmul FLOPs, attention FLOPs).
    One input projection D -> [mlp hidden | q | k | v], attention out D -> D, MLP out hidden -> D."""
    mm = (matmul_flops(tokens, hidden + 3 * dim, dim) + matmul_flops(tokens, dim, dim)
          + matmul_flops(tokens, dim, hidden))
    return mm, attention_flops(tokens, tokens, dim)


def _decoder_block(tokens: int, dim: int, hidden: int) -> tuple[int, int]:
    """Standard pre-norm block: qkv D -> 3D, proj D -> D, fc1 D -> hidden, fc2 hidden -> D."""
    mm = (matmul_flops(tokens, 3 * dim, dim) + matmul_flops(tokens, dim, dim)
          + matmul_flops(tokens, hidden, dim) + matmul_flops(tokens, dim, hidden))
    return mm, attention_flops(tokens, tokens, dim)


def _cross_attention(n_queries: int, n_context: int, dim: int) -> tuple[int, int]:
    """q from the queries, k and v from the context (no bias), output projection on the queries."""
    mm = (matmul_flops(n_queries, dim, dim) + matmul_flops(n_context, 2 * dim, dim)
          + matmul_flops(n_queries, dim, dim))
    return mm, attention_flops(n_queries, n_context, dim)


def num_visible_tokens(cfg: MAEConfig, mask_ratio: float | None = None, in_chans: int | None = None) -> int:
    """Tokens the encoder sees in training (class token excluded): int(L * (1 - r)) as in the masking op."""
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    return int(cfg.tokens(in_chans) * (1 - ratio))


def forward_flops(cfg: MAEConfig, mask_ratio: float | None = None, in_chans: int | None = None) -> dict[str, int]:
    """FLOPs of one training forward pass per crop, by part. Keys: patch_embed, encoder_matmul, encoder_attention,
    encoder_decoder_proj, decoder_matmul, decoder_attention, decoder_pred, total."""
    C = in_chans or cfg.in_chans
    D, Dd = cfg.embed_dim, cfg.decoder_dim
    hidden, dec_hidden = int(D * cfg.mlp_ratio), int(Dd * cfg.mlp_ratio)
    L = cfg.tokens(C)                         # all tokens (C*N for CA-MAE)
    K = num_visible_tokens(cfg, mask_ratio, C)
    enc_mm, enc_attn = _encoder_block(K + 1, D, hidden)
    parts = {
        "patch_embed": matmul_flops(K, D, cfg.token_dim if not cfg.channel_agnostic else cfg.patch_size**2),
        "encoder_matmul": cfg.depth * enc_mm,
        "encoder_attention": cfg.depth * enc_attn,
        "encoder_decoder_proj": matmul_flops(K + 1, Dd, D),
    }
    if cfg.channel_agnostic:
        # CA decoder: the shared cross-attention with the queries of all channels at once (each channel's N tokens
        # attend to all C*N; the k/v projection of the context is computed once) and the shared MLP on the C*N
        # tokens, then each channel's own stack of blocks on its N tokens. No class token in the decoder.
        N = cfg.num_patches
        x_mm, x_attn = _cross_attention(L, L, Dd)
        mlp = matmul_flops(L, dec_hidden, Dd) + matmul_flops(L, Dd, dec_hidden)
        blk_mm, blk_attn = _decoder_block(N, Dd, dec_hidden)
        parts["decoder_matmul"] = x_mm + mlp + C * cfg.decoder_depth * blk_mm
        parts["decoder_attention"] = x_attn + C * cfg.decoder_depth * blk_attn
        parts["decoder_pred"] = matmul_flops(L, cfg.patch_size**2, Dd)
    else:
        blk_mm, blk_attn = _decoder_block(L + 1, Dd, dec_hidden)  # mask tokens restored, class token kept
        parts["decoder_matmul"] = cfg.decoder_depth * blk_mm
        parts["decoder_attention"] = cfg.decoder_depth * blk_attn
        parts["decoder_pred"] = matmul_flops(L, cfg.token_dim, Dd)  # class token dropped before the prediction
    parts["total"] = sum(parts.values())
    return parts


def training_flops_per_crop(cfg: MAEConfig, mask_ratio: float | None = None, in_chans: int | None = None) -> int:
    """Forward + backward = 3x the forward count."""
    return 3 * forward_flops(cfg, mask_ratio, in_chans)["total"]


def inference_flops_per_crop(cfg: MAEConfig, in_chans: int | None = None) -> int:
    """Embedding: patch projection and the encoder on every token (+ class token), no decoder, no masking."""
    C = in_chans or cfg.in_chans
    T = cfg.tokens(C)
    D = cfg.embed_dim
    P = cfg.patch_size**2 if cfg.channel_agnostic else cfg.patch_size**2 * C
    mm, attn = _encoder_block(T + 1, D, int(D * cfg.mlp_ratio))
    return matmul_flops(T, D, P) + cfg.depth * (mm + attn)


# --------------------------------------------------------------------------------------------------------------
# Paper method (Kraus et al. 2023, appendix A.3)
# --------------------------------------------------------------------------------------------------------------

# Touvron et al. 2022 (DeiT III), Table 1: GFLOPs of ViT-S/B/L/16 at 224x224 (multiply-adds, as fvcore counts them;
# the same values appear as GMACs on timm's deit3_*_patch16_224 model cards).
TOUVRON_GFLOPS_224 = {"small": 4.6, "base": 17.6, "large": 61.6}
CROP_FACTOR_256 = 1.69   # the paper's factor for 256^2 crops (its formula ((16*16)/(14*14))^2 evaluates to 1.71)
PATCH8_FACTOR = 16       # the paper's factor for patch 8 (4x tokens, "quadratic" attention)

A100_BF16_PEAK = 312e12  # datasheet dense bf16 FLOP/s of the A100 the paper trained on
PAPER_VIT_L8_RUN = {      # the paper's largest run: ViT-L/8+ on RPI-93M
    "name": "ViT-L/8+ (RPI-93M)",
    "preset": "mae_vit_large_patch8_256",
    "crops": 3.5e9,          # "over 3.5 billion image crops"
    "gpu_hours": 20_000,     # "over 20,000 GPU hours" on 80GB A100s
    "peak_flops": A100_BF16_PEAK,
}

# The ViT encoders of the paper's Table 1 (MAE, mask ratio 0.75, 6 channels, 256^2 crops).
PAPER_MODELS = [
    ("ViT-S/16", "mae_vit_small_patch16_256"),
    ("ViT-B/16", "mae_vit_base_patch16_256"),
    ("ViT-B/8", "mae_vit_base_patch8_256"),
    ("ViT-L/16", "mae_vit_large_patch16_256"),
    ("ViT-L/8", "mae_vit_large_patch8_256"),
]

_SIZE_OF_DIM = {384: "small", 768: "base", 1024: "large"}


def paper_flops_per_crop(size: str, patch_size: int) -> float:
    """The paper's per-crop FLOPs for a ViT size ("small", "base", "large") and patch size 8 or 16."""
    if size not in TOUVRON_GFLOPS_224:
        raise ValueError(f"the paper's method covers sizes {sorted(TOUVRON_GFLOPS_224)}, got {size!r}")
    if patch_size not in (8, 16):
        raise ValueError(f"the paper's method covers patch sizes 8 and 16, got {patch_size}")
    return TOUVRON_GFLOPS_224[size] * 1e9 * CROP_FACTOR_256 * (PATCH8_FACTOR if patch_size == 8 else 1)


def paper_size(cfg: MAEConfig) -> str | None:
    """"small"/"base"/"large" when `cfg` is one of the paper's encoder shapes, else None."""
    size = _SIZE_OF_DIM.get(cfg.embed_dim)
    expected_depth = {"small": 12, "base": 12, "large": 24}
    if size is None or cfg.depth != expected_depth[size] or cfg.patch_size not in (8, 16):
        return None
    return size


def paper_training_flops(cfg: MAEConfig, crops: float) -> float | None:
    size = paper_size(cfg)
    return None if size is None else paper_flops_per_crop(size, cfg.patch_size) * crops


def implied_mfu(flops_per_crop: float, crops: float, gpu_hours: float, peak_flops: float) -> float:
    """Fraction of the peak that a run of `crops` crops in `gpu_hours` GPU-hours sustained."""
    return flops_per_crop * crops / (gpu_hours * 3600.0 * peak_flops)


def gpu_hours_for(crops: float, crops_per_s: float) -> float:
    return crops / crops_per_s / 3600.0


@dataclass(frozen=True)
class ModelFlops:
    label: str
    preset: str
    paper_per_crop: float | None
    forward_per_crop: int
    training_per_crop: int
    inference_per_crop: int


def model_flops(label: str, cfg: MAEConfig, mask_ratio: float | None = None,
                in_chans: int | None = None) -> ModelFlops:
    size = paper_size(cfg)
    return ModelFlops(
        label=label,
        preset=cfg.name,
        paper_per_crop=None if size is None else paper_flops_per_crop(size, cfg.patch_size),
        forward_per_crop=forward_flops(cfg, mask_ratio, in_chans)["total"],
        training_per_crop=training_flops_per_crop(cfg, mask_ratio, in_chans),
        inference_per_crop=inference_flops_per_crop(cfg, in_chans),
    )


def paper_run_summary(run: dict = PAPER_VIT_L8_RUN) -> dict:
    """Both totals for the paper's ViT-L/8+ run and the MFU each implies on its A100s."""
    cfg = model_config(run["preset"])
    exact = training_flops_per_crop(cfg)
    paper = paper_flops_per_crop("large", 8)
    return {
        "name": run["name"],
        "crops": run["crops"],
        "gpu_hours": run["gpu_hours"],
        "exact_training_flops_per_crop": exact,
        "paper_flops_per_crop": paper,
        "exact_total_training_flops": exact * run["crops"],
        "paper_total_training_flops": paper * run["crops"],
        "implied_mfu_exact": implied_mfu(exact, run["crops"], run["gpu_hours"], run["peak_flops"]),
        "implied_mfu_paper_method": implied_mfu(paper, run["crops"], run["gpu_hours"], run["peak_flops"]),
        "implied_crops_per_gpu_s": run["crops"] / (run["gpu_hours"] * 3600.0),
    }


# --------------------------------------------------------------------------------------------------------------
# Recorded metrics for the scaling plot
# --------------------------------------------------------------------------------------------------------------

@dataclass
class RunPoint:
    label: str
    exact_training_flops: float
    paper_training_flops: float | None
    metric: float | None


def _resolve_config(model: str) -> MAEConfig:
    """A preset name, or the paper's short names ("ViT-L/8", "ViT-B/16")."""
    short = {label.lower(): preset for label, preset in PAPER_MODELS}
    key = model.strip().lower().rstrip("+")
    return model_config(short.get(key, model.strip()))


def load_runs(path: str, metric: str | None = None) -> tuple[list[RunPoint], str]:
    """Runs from a CSV or JSON file (a list of objects, or {"runs": [...]}). Each row: `model` (a preset or a paper
    name such as ViT-L/8), `crops` (crops seen in training) and a metric column; optional `mask_ratio`, `in_chans`,
    `label`. `metric`: the column to plot (default: the only numeric column besides crops/mask_ratio/in_chans)."""
    if path.lower().endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        rows = data["runs"] if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a list of runs or {{'runs': [...]}}")
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no runs")
    reserved = {"model", "crops", "mask_ratio", "in_chans", "label"}
    if metric is None:
        numeric = [k for k in rows[0] if k not in reserved and _is_number(rows[0][k])]
        if len(numeric) != 1:
            raise ValueError(f"{path}: name the metric to plot with --metric (numeric columns: {numeric})")
        metric = numeric[0]
    points = []
    for i, row in enumerate(rows, start=2 if not path.lower().endswith(".json") else 0):
        where = f"{path} {'entry' if path.lower().endswith('.json') else 'row'} {i}"
        for key in ("model", "crops", metric):
            if key not in row or row[key] in (None, ""):
                raise ValueError(f"{where}: missing {key!r}")
        try:
            cfg = _resolve_config(str(row["model"]))
        except KeyError as err:
            raise ValueError(f"{where}: {err}") from None
        try:
            crops, value = float(row["crops"]), float(row[metric])
            mask_ratio = float(row["mask_ratio"]) if row.get("mask_ratio") not in (None, "") else None
            in_chans = int(row["in_chans"]) if row.get("in_chans") not in (None, "") else None
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        points.append(RunPoint(
            label=str(row.get("label") or row["model"]),
            exact_training_flops=training_flops_per_crop(cfg, mask_ratio, in_chans) * crops,
            paper_training_flops=paper_training_flops(cfg, crops),
            metric=value,
        ))
    return points, metric


def _is_number(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def plot_scaling(points: list[RunPoint], path: str, metric: str | None, title: str | None = None) -> None:
    """Training FLOPs (log x) against the metric, exact and paper-method counts; without a metric, one row per
    model showing both counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if metric is None:
        ys = list(range(len(points)))
        ax.scatter([p.exact_training_flops for p in points], ys, marker="o", label="exact (3x masked forward)")
        paper = [(p.paper_training_flops, y) for p, y in zip(points, ys) if p.paper_training_flops]
        if paper:
            ax.scatter(*zip(*paper), marker="s", label="paper method (Touvron x1.69 x16)")
        ax.set_yticks(ys, [p.label for p in points])
        ax.set_ylabel("model")
    else:
        order = sorted(points, key=lambda p: p.exact_training_flops)
        ax.plot([p.exact_training_flops for p in order], [p.metric for p in order], "o-", label="exact count")
        paper = sorted((p.paper_training_flops, p.metric) for p in points if p.paper_training_flops)
        if paper:
            ax.plot(*zip(*paper), "s--", alpha=0.7, label="paper method")
        for p in points:
            ax.annotate(p.label, (p.exact_training_flops, p.metric), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_ylabel(metric)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# `mae-fast flops`
# --------------------------------------------------------------------------------------------------------------
