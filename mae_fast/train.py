"""`mae-fast train`: pre-train an MAE / CA-MAE, or train a baseline of the seed paper (WSL DenseNet-161 with or without
AdaBN, MU-Net-M/L; `mae_fast.models`), on a screen, on one device or many (torchrun).

Configuration = a preset name + an optional YAML/TOML file + command-line overrides (`--set key=value`, dotted keys
for the nested sections: `model.img_size=128`, `data.root=/data/rxrx3`). Everything is validated before any work
starts; unknown presets and keys are errors that list the valid ones.

    mae-fast train --preset mae_vit_small_patch16_256 --data /data/rxrx3 --out runs/s16 --steps 20000
    torchrun --nproc_per_node 8 -m mae_fast.cli train --config run.yaml --set global_batch=16384
    mae-fast train --out runs/s16 --resume                       # continue exactly where the last checkpoint was

Training: Lion (paper lr per size: 1e-4 S/B, 3e-5 L; wd 0.05; betas 0.9/0.95), one-cycle cosine with 10% warm-up,
bf16 autocast on GPUs with fp32 master weights, gradient accumulation up to the global batch, optional activation
checkpointing and torch.compile, DDP (or FSDP for the largest models): nccl on GPUs, gloo on CPUs.

Baselines (`--preset wsl_densenet161_256`, `wsl_densenet161_adabn_256`, `munet_m_256`, `munet_l_256`, or their
micro versions) go through the same loop, schedule, checkpoints and resume; what differs:
    optimiser      the preset's: SGD with Nesterov momentum (WSL; lr 0.1 per 256 crops, scaled linearly with
                   global_batch) or AdamW (MU-Net; lr 1e-3), with the same one-cycle cosine schedule
    model keys     `model.*` keys are the baseline config's (WSLConfig / MUNetConfig); MAE-only keys, Lion's
                   optimizer_impl, activation checkpointing and FSDP are refused (DDP works)
    WSL labels     only sites with a perturbation label are trained on; the classes (sorted perturbation names)
                   are stored in every checkpoint (`classes` in config.json and train_state.pt); model.num_classes
                   is set from them; each micro-batch's labels come from its crops' sites
    AdaBN          every micro-batch is from one plate: per data shard, one crop loader per plate, and a
                   PlateBatchSampler that chooses which plate gives the next micro-batch (plates in proportion to
                   their crops, order seeded per epoch); resumable (sampler position + every plate loader's state);
                   model.virtual_batch_size must be <= micro_batch
    figures        reconstructions only for models that reconstruct (MAE, MU-Net); MFU is n/a (no FLOP count)

Data and determinism. The global batch of a step is `global_batch / micro_batch` micro-batches j = 0, 1, ...;
micro-batch j comes from *data shard* j % S (S = `data.shards`, default the world size) and runs on rank j % W.
Each data shard is one crop loader (`make_train_loader(rank=s, world_size=S)`). Before micro-batch j of step t the
global RNG is seeded from (seed, t, j), so masking and stochastic depth depend only on (t, j). Hence a run with W
ranks and a single-process run with the same S and global batch see the same crops, masks and drop-path draws, and
a resumed run continues bit for bit (on CPU) once weights, optimiser, schedule and loader positions are restored.

Output folder:
    train_config.json                  the resolved configuration
    metrics.jsonl                      one JSON line per logged step (loss, lr, crops/s, MFU) and events
    checkpoints/step_XXXXXXXX/         model.safetensors + config.json (loadable with checkpoint.load_model) +
                                       train_state.pt (optimiser, schedule, loader positions, RNG; weights_only)
    recon/step_XXXXXXXX.png            reconstructions of a fixed validation batch
    model/                             the final weights (`mae-fast embed --checkpoint OUT/model`)
    loss_curve.png, train_summary.json
    .mae_fast.lock                     while the run is going: who writes here (one writer; mae_fast.io)

Failures: a checkpoint is published only with finite weights, so a diverged run names a good one to go on from;
`--resume` continues from the newest checkpoint that reads back intact (saying which one it used) and first removes
what killed runs left (temporaries, half-deleted step folders). `--resume --out DIR` reads DIR/train_config.json
(the run's settings; the one-shot flags --overwrite/--resume are never stored).
"""
from __future__ import annotations

import argparse
import json
import sys

from mae_fast.models import BASELINE_PRESETS, list_baselines
from mae_fast.cli import number, run_command
from mae_fast.models import PRESETS, list_presets
from mae_fast.training.checkpointing import (
    CHECKPOINT_DIR, RUN_ENTRIES, STATE_NAME, STEP_DIR_RE, build_model, check_output, full_model_state,
    full_optimizer_state, init_weights_from, list_checkpoints, load_optimizer_state, load_pretrained,
    prepare_output, read_run_config, read_state_file, read_train_state, read_weights, step_dir_name,
    write_checkpoint,
)
from mae_fast.training.config import (
    AMP_MODES, CUDA_ONLY_COMPILE_BACKENDS, DATA_FORMATS, DISTRIBUTED_MODES, RESUME_MAY_CHANGE, ConfigError,
    DataConfig, ModelConfig, RunPlan, TrainConfig, _coerce, _model_fields, _toml_reader, all_presets, apply_mapping,
    build_config, check_device_options, model_config_class, model_family, parse_override, read_config_file,
    resolve_amp, resolve_baseline_config, resolve_device, resolve_model_config, set_key, valid_keys, validate,
)
from mae_fast.training.data import (
    PlateShardStream, ShardStream, build_site_index, make_plate_streams, make_shard_streams, plate_key,
    validation_batch, wsl_labels,
)
from mae_fast.training.distributed import (
    DistInfo, agree, all_gather_objects, barrier, env_world, init_distributed, torch_threads, wrap_model,
)
from mae_fast.training.loop import (
    MetricsLog, NonFiniteLossError, TrainResult, decayed_parameter_names, make_baseline_optimizer, make_optimizer,
    matmul_ceiling_tflops, micro_inputs, micro_seed, train, training_flops_per_crop,
)

# the implementation lives in mae_fast.training; every name other modules and tests import stays importable here
__all__ = [
    "AMP_MODES", "CHECKPOINT_DIR", "CUDA_ONLY_COMPILE_BACKENDS", "ConfigError", "DATA_FORMATS", "DISTRIBUTED_MODES",
    "DataConfig", "DistInfo", "MetricsLog", "ModelConfig", "NonFiniteLossError", "PlateShardStream",
    "RESUME_MAY_CHANGE", "RUN_ENTRIES", "RunPlan", "STATE_NAME", "STEP_DIR_RE", "ShardStream", "TrainConfig",
    "TrainResult", "_coerce", "_model_fields", "_toml_reader", "add_arguments", "agree", "all_gather_objects",
    "all_presets", "apply_mapping", "barrier", "build_config", "build_model", "build_site_index",
    "check_device_options", "check_output", "config_from_args", "decayed_parameter_names", "env_world",
    "full_model_state", "full_optimizer_state", "init_distributed", "init_weights_from", "list_checkpoints",
    "load_optimizer_state", "load_pretrained", "main", "make_baseline_optimizer", "make_optimizer",
    "make_plate_streams", "make_shard_streams", "matmul_ceiling_tflops", "micro_inputs", "micro_seed",
    "model_config_class", "model_family", "parse_override", "plate_key", "prepare_output", "read_config_file",
    "read_run_config", "read_state_file", "read_train_state", "read_weights", "resolve_amp", "resolve_baseline_config",
    "resolve_device", "resolve_model_config", "run", "set_key", "step_dir_name", "torch_threads", "train",
    "training_flops_per_crop", "valid_keys", "validate", "validation_batch", "wrap_model", "write_checkpoint",
    "wsl_labels",
]


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

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
    p.add_argument("--amp", choices=AMP_MODES, help="autocast dtype (default auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--bf16", action="store_true", help="same as --amp bf16 (GPU only)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (compile_mode=model: the whole model)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of DDP (under torchrun)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations")
    p.add_argument("--seed", type=int)
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
        for name in list_presets():
            c = PRESETS[name]
            print(f"{name:32s} dim {c.embed_dim:4d} depth {c.depth:2d} heads {c.num_heads:2d} patch {c.patch_size:2d} "
                  f"lr {c.lr:g}{' channel-agnostic' if c.channel_agnostic else ''}")
        for name in list_baselines():
            c = BASELINE_PRESETS[name]
            what = ("WSL DenseNet" + (" + AdaBN" if c.adabn else "") if c.family == "wsl"
                    else f"MU-Net widths {'/'.join(map(str, c.widths))}")
            lr = f"lr {c.lr:g}" + (f" per {c.lr_batch} crops" if c.lr_batch else "")
            print(f"{name:32s} {what}, embedding {c.embed_dim}, {c.optimizer} {lr}")
        return 0
    cfg = config_from_args(args)  # errors: the CLI's one handler (mae_fast.cli.run_command)
    if args.print_config:
        validate(cfg, env_world().world_size)
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    try:
        result = train(cfg)
    except NonFiniteLossError as err:
        print(f"mae-fast train: error: {err}", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv), "mae-fast train")


if __name__ == "__main__":
    sys.exit(main())
