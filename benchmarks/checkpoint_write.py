"""Checkpoint write time and peak host memory of a ViT-L-sized MAE under FSDP on the CPU (2 gloo ranks), both
formats: "full" (rank 0 gathers the whole model and optimiser state, one safetensors + train_state.pt) and
"sharded" (torch.distributed.checkpoint: each rank writes its own shards). Each format runs in its own pair of
processes so that peak RSS (getrusage ru_maxrss) belongs to it alone.

    python benchmarks/checkpoint_write.py [--preset mae_vit_large_patch8_256] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rank(rank: int, world: int, port: int, preset: str, fmt: str, out: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from mae_fast.models import model_config
    from mae_fast.training.checkpointer import Checkpointer
    from mae_fast.training.config import RunPlan, TrainConfig
    from mae_fast.training.distributed import env_world, shard_model
    from mae_fast.training.loop import decayed_parameter_names, make_optimizer
    from mae_fast.models import MaskedAutoencoder

    dist.init_process_group("gloo")
    info = env_world()
    cfg_model = model_config(preset)
    torch.manual_seed(0)
    core = MaskedAutoencoder(cfg_model)
    n_params = sum(p.numel() for p in core.parameters())
    cfg = TrainConfig(preset=preset, out_dir=out, checkpoint_format=fmt, keep_last=1, distributed="fsdp")
    plan = RunPlan(cfg_model, 1, world, world, world, 1e-4, 0.05, (0.9, 0.95))
    decay = decayed_parameter_names(core)
    wrapped = shard_model(core, info, torch.device("cpu"))
    optimizer = make_optimizer(wrapped, decay, plan, "auto")
    for p in wrapped.parameters():  # the optimiser state exists, as after a first step
        optimizer.state[p]["exp_avg"] = torch.zeros_like(p)
    checkpointer = Checkpointer(cfg, plan, info, core, wrapped, optimizer, {}, {})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dist.barrier()
    t = time.perf_counter()
    path, bad = checkpointer.save(1, 0, [])
    dist.barrier()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) if rank == 0 else 0
    with open(f"{result}.rank{rank}.json", "w") as f:
        json.dump({"seconds": seconds, "peak_rss_gib": peak / 2**20, "rss_before_gib": rss_before / 2**20,
                   "params": n_params, "bytes": size}, f)
    dist.destroy_process_group()


def measure(preset: str, fmt: str, world: int = 2) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix=f"ckpt-{fmt}-")
    try:
        result = os.path.join(tmp, "result")
        mp.spawn(_rank, args=(world, port, preset, fmt, os.path.join(tmp, "run"), result), nprocs=world)
        ranks = [json.load(open(f"{result}.rank{r}.json")) for r in range(world)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"format": fmt, "seconds": max(r["seconds"] for r in ranks),
            "peak_rss_gib_per_rank": [round(r["peak_rss_gib"], 2) for r in ranks],
            "rss_before_save_gib_per_rank": [round(r["rss_before_gib"], 2) for r in ranks],
            "params": ranks[0]["params"], "bytes_written": ranks[0]["bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mae_vit_large_patch8_256")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkpoint_write.json"))
    args = parser.parse_args()
    from mae_fast.perf.provenance import provenance

    rows = [measure(args.preset, fmt) for fmt in ("full", "sharded")]
    report = {"preset": args.preset, "world_size": 2, "backend": "gloo", "device": "cpu", "rows": rows,
              "load_average": os.getloadavg(), "provenance": provenance(torch.device("cpu"))}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for r in rows:
        print(f"{r['format']:8s} {r['seconds']:6.2f} s  peak RSS per rank {r['peak_rss_gib_per_rank']} GiB "
              f"(before the save {r['rss_before_save_gib_per_rank']})  {r['bytes_written'] / 2**30:.2f} GiB written")


if __name__ == "__main__":
    main()
