"""`mae-fast export`: a training checkpoint -> the single-file model folder (model.safetensors + config.json) that
`mae-fast embed`, `checkpoint.load_model` and `from_pretrained` read. Sharded checkpoints (FSDP runs) are gathered
here, in one process, from the shards every rank wrote.

    mae-fast export runs/vitl8 --out vitl8_model                 # the run's newest checkpoint
    mae-fast export runs/vitl8/checkpoints/step_00020000 --out vitl8_step20k
"""
from __future__ import annotations

import argparse
import os
import sys

from mae_fast.checkpoint import CheckpointError
from mae_fast.cli.common import run_command
from mae_fast.io import OutputLock, folder_lock_path
from mae_fast.training.checkpointer import export_checkpoint
from mae_fast.training.checkpointing import STEP_DIR_RE, list_checkpoints


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a training run folder (its newest checkpoint) or one checkpoints/step_N folder")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace the model files in an existing --out")


def checkpoint_of(source: str) -> str:
    """The checkpoint folder a source names: itself, or a run folder's newest checkpoint."""
    if STEP_DIR_RE.match(os.path.basename(os.path.normpath(source))) and os.path.isdir(source):
        return source
    checkpoints = list_checkpoints(source)
    if not checkpoints:
        raise CheckpointError(f"{source} is neither a checkpoint folder (checkpoints/step_N) nor a training run "
                              "folder with a complete checkpoint")
    return checkpoints[-1][1]


def run(args) -> int:
    path = checkpoint_of(args.source)
    out = args.out
    if os.path.abspath(out).startswith(os.path.abspath(path) + os.sep) or os.path.abspath(out) == os.path.abspath(path):
        raise CheckpointError(f"--out {out} lies inside the checkpoint {path} it reads; choose another folder")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise CheckpointError(f"output folder {out} exists and is not empty; pass --overwrite to replace its model")
    os.makedirs(out, exist_ok=True)
    lock = OutputLock(folder_lock_path(out), f"model folder {out}")
    try:
        export_checkpoint(path, out)
    finally:
        lock.release()
    print(f"model:       {out} (from {path})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mae-fast export", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv), "mae-fast export")


if __name__ == "__main__":
    sys.exit(main())
