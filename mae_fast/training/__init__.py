"""The parts of `mae-fast train` (the command line is `mae_fast.train`, which re-exports these names):

    config         DataConfig / TrainConfig, typed keys from files and --set, validation into a RunPlan
    data           the site index, per-shard crop streams, AdaBN single-plate streams, WSL labels
    distributed    torchrun rank facts, collectives, CPU threads, DDP / FSDP wrapping
    checkpointing  checkpoint folders, RNG and optimiser state, loading pre-trained weights, the output folder
    loop           train(): the optimiser steps, metrics, checkpoints, figures, TrainResult
"""
