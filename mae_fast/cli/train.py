"""`mae-fast train`: the command line of `mae_fast.training` (whose package docstring tells the whole story:
configuration, optimiser, baselines, data and determinism, the output folder, failures).

    mae-fast train --preset mae_vit_small_patch16_256 --data /data/rxrx3 --out runs/s16 --steps 20000
    torchrun --nproc_per_node 8 -m mae_fast.cli train --config run.yaml --set global_batch=16384
    mae-fast train --out runs/s16 --resume                       # continue exactly where the last checkpoint was
"""
from __future__ import annotations

import argparse
import json
import sys

from mae_fast.cli.common import number, rank_prefix, run_command
from mae_fast.models import list_models, model_config
from mae_fast.training.config import (
    AMP_MODES,
    ConfigError,
    TrainConfig,
    build_config,
    parse_override,
    set_key,
    validate,
)
from mae_fast.training.checkpointing import read_run_config
from mae_fast.training.distributed import env_world
from mae_fast.training.loop import NonFiniteLossError, train
from mae_fast.training.recipes import optimizer_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"model preset (default {TrainConfig.preset}); see --list-presets")
    p.add_argument("--config", help="YAML or TOML file of config keys (sections `model:` and `data:`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for sections: --set model.img_size=128 --set data.plates=[1,2]")
    p.add_argument("--data", help="dataset root (data.root)")
    p.add_argument("--out", help="output folder (out_dir)")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--crops", type=int, help="crops to train on (instead of --steps)")
    p.add_argument("--global-batch", type=int, help="crops per optimiser step, all ranks together")
    p.add_argument("--micro-batch", type=int, help="crops per forward pass on one device")
    p.add_argument("--lr", type=number(float, above=0), help="peak learning rate (default: the preset's paper value; WSL: 0.1 per 256 "
                                           "crops, scaled with the global batch)")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--amp", choices=AMP_MODES, help="autocast dtype (default auto: bf16 on GPU and on CPUs with "
                                                    "native bf16 units -- AMX / AVX512-BF16 -- fp32 elsewhere)")
    p.add_argument("--bf16", action="store_true", help="same as --amp bf16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (compile_mode=model: the whole model)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of DDP (under torchrun)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations")
    p.add_argument("--seed", type=number(int, minimum=0, maximum=2**63 - 1), help="seed of the weights, crops and masks")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")


def config_from_args(args) -> TrainConfig:
    """The run's configuration: defaults (with --resume: the run's stored configuration) < --config < --preset <
    the flags < --set."""
    if args.resume and not args.out and not args.config:
        raise ConfigError("--resume: give the run folder to continue with --out DIR (its stored configuration is "
                          "read from DIR/train_config.json)")
    base = read_run_config(args.out) if args.resume and args.out else None
    cfg = build_config(None, args.config, None, base)
    if args.preset:
        cfg.preset = args.preset
    shortcuts = {"data.root": args.data, "out_dir": args.out, "steps": args.steps, "crops": args.crops,
                 "global_batch": args.global_batch, "micro_batch": args.micro_batch, "lr": args.lr,
                 "device": args.device, "amp": "bf16" if args.bf16 else args.amp, "seed": args.seed}
    for key, value in shortcuts.items():
        if value is not None:
            set_key(cfg, key, value)
    if args.crops is not None and args.steps is None:
        cfg.steps = 0
    if args.steps is not None and args.crops is None:
        cfg.crops = 0
    for flag, key in ((args.compile, "compile"), (args.activation_checkpointing, "activation_checkpointing"),
                      (args.resume, "resume"), (args.overwrite, "overwrite")):
        if flag:
            set_key(cfg, key, True)
    if args.fsdp:
        cfg.distributed = "fsdp"
    if args.no_progress:
        cfg.progress = False
    for text in args.overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    return cfg


def run(args) -> int:
    if args.list_presets:
        for name in list_models("mae"):
            c, r = model_config(name), optimizer_recipe(name)
            print(f"{name:32s} dim {c.embed_dim:4d} depth {c.depth:2d} heads {c.num_heads:2d} patch {c.patch_size:2d} "
                  f"lr {r.lr:g}{' channel-agnostic' if c.channel_agnostic else ''}")
        for name in list_models("baseline"):
            c, r = model_config(name), optimizer_recipe(name)
            what = ("WSL DenseNet" + (" + AdaBN" if c.adabn else "") if c.family == "wsl"
                    else f"MU-Net widths {'/'.join(map(str, c.widths))}")
            lr = f"lr {r.lr:g}" + (f" per {r.lr_batch} crops" if r.lr_batch else "")
            print(f"{name:32s} {what}, embedding {c.embed_dim}, {r.name} {lr}")
        return 0
    cfg = config_from_args(args)  # errors: the CLI's one handler (mae_fast.cli.common.run_command)
    if args.print_config:
        validate(cfg, env_world().world_size)
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    try:
        result = train(cfg)
    except NonFiniteLossError as err:
        sys.stderr.write(f"{rank_prefix()}mae-fast train: error: {err}\n")  # one write: ranks share the stream
        sys.stderr.flush()
        return 3
    if env_world().is_main:
        print(f"model:       {result.model_dir}")
        print(f"checkpoint:  {result.checkpoint_dir}")
        print(f"metrics:     {result.metrics_path}")
        if result.loss_curve_path:
            print(f"loss curve:  {result.loss_curve_path}")
        if result.recon_paths:
            print(f"recon:       {result.recon_paths[-1]}")
    return 0


def interrupted(args) -> str:
    """What an interrupted run keeps: its last checkpoint, and how to continue from it."""
    from mae_fast.training.checkpointing import list_checkpoints

    out = args.out
    if out is None:
        return "resume with --resume --out RUN_FOLDER"
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        return f"no checkpoint was written in {out} yet: start again (with --overwrite)"
    step, path = checkpoints[-1]
    return f"the last checkpoint is step {step} ({path}); resume with: mae-fast train --resume --out {out}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv), "mae-fast train", interrupted)


if __name__ == "__main__":
    sys.exit(main())
