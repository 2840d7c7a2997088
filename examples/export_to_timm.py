"""Export a trained mae_fast encoder to timm's VisionTransformer, check that both compute the same embedding, and
save it as a timm state dict (safetensors) that timm, or `mae-fast embed --preset`, loads again.

    python examples/export_to_timm.py --checkpoint runs/s16/model --out timm_vit
    python examples/export_to_timm.py --toy --out /tmp/example_timm      # seconds: a random micro MAE

The standard encoder's parameter names already follow timm's VisionTransformer with ParallelScalingBlock,
QK-norm, no qkv bias and LayerScale (`mae_fast.interop.timm_vit_kwargs` builds it); the fixed sin-cos position
embedding is written into `pos_embed`. The channel-agnostic CA-MAE encoder has no timm counterpart. timm models
take standardised input: apply `mae_fast.ops.self_standardize` (per crop and channel) to raw pixels first, as
`MaskedAutoencoder.embed` does. Then, in any program with timm:

    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer
    from mae_fast.interop import timm_vit_kwargs
    from mae_fast.models import model_config
    vit = VisionTransformer(**timm_vit_kwargs(model_config(PRESET)))
    vit.load_state_dict(load_file("timm_vit/model.safetensors"))
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from mae_fast import ops
from mae_fast.checkpoint import save_model
from mae_fast.interop import load_any, timm_vit_kwargs, to_timm_state_dict
from mae_fast.io import atomic_write, atomic_write_json
from mae_fast.models import create_model


def export(model, out: str) -> str:
    """Write out/model.safetensors (timm's parameter names) and out/config.json (how to rebuild it)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in to_timm_state_dict(model).items()}
    path = os.path.join(out, "model.safetensors")
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    kwargs = {k: v for k, v in timm_vit_kwargs(model.cfg).items() if isinstance(v, (int, float, str, bool))}
    atomic_write_json(os.path.join(out, "config.json"), {
        "architecture": "timm.models.vision_transformer.VisionTransformer",
        "mae_fast_preset": model.cfg.name, "timm_kwargs": kwargs,
        "block_fn": "timm.models.vision_transformer.ParallelScalingBlock", "norm_layer": "LayerNorm(eps=1e-6)",
        "input": "raw pixels -> mae_fast.ops.self_standardize (per crop and channel)",
    })
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="our checkpoint folder (model.safetensors + config.json)")
    parser.add_argument("--out", required=True, help="folder for the timm state dict")
    parser.add_argument("--toy", action="store_true", help="export a random micro MAE (saved first like a checkpoint)")
    args = parser.parse_args(argv)
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        print("this example needs timm: pip install timm", file=sys.stderr)
        return 2
    if args.toy:
        torch.manual_seed(0)
        args.checkpoint = save_model(create_model("mae_vit_micro_patch16_256"), os.path.join(args.out, "ours"))
    elif not args.checkpoint:
        parser.error("give --checkpoint or --toy")
    model = load_any(args.checkpoint).eval()
    path = export(model, args.out)

    # the same function in timm: its pooled features equal our embedding on the same (standardised) crops
    from safetensors.torch import load_file

    vit = VisionTransformer(**timm_vit_kwargs(model.cfg)).eval()
    vit.load_state_dict(load_file(path))
    cfg = model.cfg
    crops = torch.randint(0, 65535, (2, cfg.in_chans, cfg.img_size, cfg.img_size), dtype=torch.int32).to(torch.uint16)
    with torch.no_grad():
        ours = model.embed(crops)
        theirs = vit(ops.self_standardize(crops))
    gap = (ours - theirs).abs().max().item()
    print(f"exported {cfg.name} ({sum(v.numel() for v in vit.state_dict().values()):,} numbers) -> {path}")
    print(f"embedding of 2 random crops: mae_fast vs timm, largest difference {gap:.2e}")
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        print("the timm model computes another function; not exported correctly", file=sys.stderr)
        return 1
    print(f"embed a screen with it: mae-fast embed --checkpoint {path} --preset {cfg.name} --data SCREEN --out emb.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
