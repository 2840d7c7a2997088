"""Training (`mae-fast train`, `mae_fast.cli.train`): pre-train an MAE / CA-MAE, or train a baseline of the seed paper (WSL DenseNet-161 with or without
AdaBN, MU-Net-M/L; `mae_fast.models`), on a screen, on one device or many (torchrun).

Configuration = a preset name + an optional YAML/TOML file + command-line overrides (`--set key=value`, dotted keys
for the nested sections: `model.img_size=128`, `data.root=/data/rxrx3`). Everything is validated before any work
starts; unknown presets and keys are errors that list the valid ones.

    mae-fast train --preset mae_vit_small_patch16_256 --data /data/rxrx3 --out runs/s16 --steps 20000
    torchrun --nproc_per_node 8 -m mae_fast.cli train --config run.yaml --set global_batch=16384
    mae-fast train --out runs/s16 --resume                       # continue exactly where the last checkpoint was

Training: Lion (paper lr per size: 1e-4 S/B, 3e-5 L; wd 0.05; betas 0.9/0.95), one-cycle cosine with 10% warm-up,
bf16 autocast on GPUs with fp32 master weights, gradient accumulation up to the global batch, optional activation
checkpointing and torch.compile, DDP (or FSDP for the largest models): nccl on GPUs, gloo on CPUs. Each preset's
optimiser recipe is in recipes.py (the model configs hold the architecture only); the top-level keys lr,
weight_decay, betas, momentum and nesterov override it.

Baselines (`--preset wsl_densenet161_256`, `wsl_densenet161_adabn_256`, `munet_m_256`, `munet_l_256`, or their
micro versions) go through the same loop, schedule, checkpoints and resume; what differs:
    optimiser      the preset's: SGD with Nesterov momentum (WSL; lr 0.1 per 256 crops, scaled linearly with
                   global_batch) or AdamW (MU-Net; lr 1e-3), with the same one-cycle cosine schedule
    model keys     `model.*` keys are the baseline config's (WSLConfig / MUNetConfig); MAE-only keys, Lion's
                   optimizer_impl, activation checkpointing and FSDP are refused (DDP works); `momentum` and
                   `nesterov` (SGD) and `betas` (AdamW) are top-level keys like `lr`
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
                                       train_state.pt (optimiser, schedule, loader positions, RNG; weights_only);
                                       under FSDP (checkpoint_format=sharded): sharded/ (every rank's DCP shards of
                                       weights and optimiser) + config.json + train_state.pt; `mae-fast export`
    recon/step_XXXXXXXX.png            reconstructions of a fixed validation batch
    model/                             the final weights (`mae-fast embed --checkpoint OUT/model`)
    loss_curve.png, train_summary.json
    .mae_fast.lock                     while the run is going: who writes here (one writer; mae_fast.io)

Failures: a checkpoint is published only with finite weights, so a diverged run names a good one to go on from;
`--resume` continues from the newest checkpoint that reads back intact (saying which one it used) and first removes
what killed runs left (temporaries, half-deleted step folders). `--resume --out DIR` reads DIR/train_config.json
(the run's settings; the one-shot flags --overwrite/--resume are never stored).

Modules:
    config         DataConfig / TrainConfig, typed keys from files and --set, validation into a RunPlan
    recipes        each preset's optimiser recipe (the model configs hold the architecture only), build_optimizer
    data           the site index, per-shard crop streams, AdaBN single-plate streams, WSL labels
    distributed    torchrun rank facts, collectives, CPU threads, DDP / FSDP wrapping
    step           TrainStep: one optimiser step (micro-batches, gradient sync for DDP / FSDP2, non-finite loss)
    checkpointer   Checkpointer: writing (full or sharded), restoring after wrapping, the full model; export
    checkpointing  the on-disk format: step folders, RNG and optimiser state, the output folder's checks
    pretrained     weights from any source (ours, OpenPhenom, timm, the Hub) for embedding and init_from
    metrics        StepReporter: metrics.jsonl, the progress bar, log lines, MFU
    loop           train(): the parts above put together, in the order a run executes them; TrainResult
"""
