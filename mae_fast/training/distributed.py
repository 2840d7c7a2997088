"""Distributed helpers: rank facts from torchrun, the process group, collectives that keep ranks in step, CPU threads,
and wrapping the model in DDP / FSDP2."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from mae_fast.compiling import repeated_blocks
from mae_fast.training.config import TrainConfig, model_family


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    created_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> DistInfo:
    """Rank facts from torchrun's environment (or an existing process group)."""
    if dist.is_available() and dist.is_initialized():
        ws, rank = dist.get_world_size(), dist.get_rank()
    else:
        ws, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    return DistInfo(rank, ws, int(os.environ.get("LOCAL_RANK", str(rank))),
                    int(os.environ.get("LOCAL_WORLD_SIZE", str(ws))))


def init_distributed(info: DistInfo, device: torch.device) -> DistInfo:
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info.created_group = True
    return info


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.active:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class PeerRankError(ValueError):
    """Another rank's preparation failed (this rank's own was fine): every rank stops with one line."""


def agree(fn, info: DistInfo):
    """Run a preparation step on every rank; if it fails on any rank, raise on all (no rank left waiting)."""
    err = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below on every rank
        err = e
    if info.active:
        errors = all_gather_objects(None if err is None else f"{type(err).__name__}: {err}", info)
        if err is None and any(errors):
            first = next((r, e) for r, e in enumerate(errors) if e)
            raise PeerRankError(f"rank {first[0]} failed: {first[1]}")
    if err is not None:
        raise err
    return result


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU thread count set to n (> 0) for the block, then restored."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0:
            torch.set_num_threads(before)


def _clean_name(name: str) -> str:
    for token in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(token, "")
    return name


def shard_model(core: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """FSDP2 (`fully_shard`): every transformer block is its own communication unit (its parameters gathered just
    before it runs, freed after), then the root takes the rest. Parameters become DTensors sharded on dim 0 over
    the ranks; fp32 master weights stay fp32 (bf16 comes from autocast); gradients are averaged, as DDP's.
    Returns `core` itself, now an FSDPModule."""
    mesh = init_device_mesh(device.type, (info.world_size,))
    for block in repeated_blocks(core):
        fully_shard(block, mesh=mesh)
    fully_shard(core, mesh=mesh)
    return core


def wrap_model(core: torch.nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device) -> torch.nn.Module:
    if not info.active:
        return core
    if model_family(core.cfg) != "mae":  # batch norm running statistics: rank 0's are broadcast at each forward
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(core, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.distributed == "fsdp":
        return shard_model(core, info, device)
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # the only buffers are the fixed sin-cos positions, identical on every rank: no syncing at each forward
    params = inspect.signature(DDP.__init__).parameters
    new_api = "forward_sync_buffers" in params
    no_sync_buffers = {"forward_sync_buffers": False} if new_api else {"broadcast_buffers": False}
    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=core.cfg.fc_norm, **no_sync_buffers)  # fc_norm is used by embed() only
