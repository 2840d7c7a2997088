"""End-to-end embedding throughput of `mae-fast embed` (`mae_fast.inference.embed.embed_dataset`): PNG decode, tiling, the
encoder (bf16 on GPU, fp32 on CPU), per-site/per-well averaging and the parquet writes, in tiles (crops) per second.

    pytest benchmarks/bench_embed.py --benchmark-only                       # CPU: micro and small presets
    pytest benchmarks/bench_embed.py --benchmark-disable --bench-toy        # micro, four 256² sites, once
    python benchmarks/bench_embed.py --preset mae_vit_large_patch8_256 --sites 96 --site-size 2048 --bit-depth 16
                                                                           # the GPU run (target >= 650 crops/s)

The screen is the built-in synthetic one (written like RxRx3: one 6-channel PNG site per well); a 512² site gives
4 tiles of 256², a 2048² site 64. Untrained weights: throughput does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import pytest

from mae_fast.checkpoint import save_model
from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from mae_fast.inference.embed import embed_dataset
from mae_fast.models import create_model

CPU_PRESETS = ("mae_vit_micro_patch16_256", "mae_vit_small_patch16_256")


def screen_config(sites: int, site_size: int, bit_depth: int) -> SyntheticScreenConfig:
    """One plate of `sites` wells (at least 2 genes; the rest split over controls)."""
    genes = max(2, sites - 2)
    return SyntheticScreenConfig(n_experiments=1, n_plates=1, n_complexes=0, complex_size=2, n_singletons=genes,
                                 n_empty_controls=max(0, sites - genes), n_crispr_controls=0, site_size=site_size,
                                 bit_depth=bit_depth, seed=0)


def make_checkpoint(preset: str, folder: str) -> str:
    path = os.path.join(folder, preset)
    if not os.path.exists(os.path.join(path, "config.json")):
        save_model(create_model(preset), path)
    return path


def embed_once(checkpoint: str, screen_root: str, out: str, device: str, batch_size: int, num_workers: int | None):
    t0 = time.perf_counter()
    result = embed_dataset(checkpoint, screen_root, out, device=device, batch_size=batch_size, overwrite=True,
                           progress=False, num_workers=num_workers, backend="auto")
    return result, time.perf_counter() - t0


TOY_PRESETS = ("mae_vit_micro_patch16_256",)


def pytest_generate_tests(metafunc):
    if "embed_preset" in metafunc.fixturenames:
        toy = metafunc.config.getoption("--bench-toy", default=False)
        metafunc.parametrize("embed_preset", TOY_PRESETS if toy else CPU_PRESETS)


def _screen_shape(toy: bool) -> tuple[int, int]:
    """(wells, site size): 16 sites of 512² (4 tiles each); --bench-toy: 4 sites of 256² (one tile each)."""
    return (4, 256) if toy else (16, 512)


@pytest.fixture(scope="module")
def bench_screen(tmp_path_factory, bench_toy):
    sites, size = _screen_shape(bench_toy)
    return make_synthetic_screen(str(tmp_path_factory.mktemp("screen")), screen_config(sites, size, 8))


def test_embed_throughput(benchmark, bench_screen, embed_preset, tmp_path, pytestconfig, bench_toy):
    device = pytestconfig.getoption("--bench-device", default="auto") or "auto"
    checkpoint = make_checkpoint(embed_preset, str(tmp_path))
    out = str(tmp_path / "emb.parquet")
    runs = []
    benchmark.pedantic(lambda: runs.append(embed_once(checkpoint, bench_screen.root, out, device, 64, None)),
                       rounds=1 if bench_toy else 2, iterations=1, warmup_rounds=0 if bench_toy else 1)
    result, seconds = runs[-1]
    sites, size = _screen_shape(bench_toy)
    assert result.n_wells == sites and result.n_tiles == sites * (size // 256) ** 2
    benchmark.extra_info.update({"preset": embed_preset, "tiles": result.n_tiles,
                                 "crops_per_s_model_loop": result.tiles_per_second,
                                 "crops_per_s_end_to_end": result.n_tiles / seconds})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mae_vit_large_patch8_256")
    p.add_argument("--sites", type=int, default=64)
    p.add_argument("--site-size", type=int, default=2048)
    p.add_argument("--bit-depth", type=int, default=16, choices=(8, 16))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", default=None, help="where the screen and outputs go (default: a temp folder)")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.workdir:
        return _measure(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as work:  # a 64-site 2048² screen: gigabytes
        return _measure(args, work)


def _measure(args: argparse.Namespace, work: str) -> int:
    from mae_fast.device import resolve_device
    from mae_fast.perf.provenance import provenance

    screen_root = os.path.join(work, f"screen_{args.sites}x{args.site_size}_{args.bit_depth}bit")
    if not os.path.exists(os.path.join(screen_root, "metadata.csv")):
        t0 = time.perf_counter()
        make_synthetic_screen(screen_root, screen_config(args.sites, args.site_size, args.bit_depth))
        print(f"screen: {args.sites} sites of {args.site_size}² ({time.perf_counter() - t0:.0f} s to generate)")
    checkpoint = make_checkpoint(args.preset, work)
    out = os.path.join(work, "emb.parquet")
    embed_once(checkpoint, screen_root, out, args.device, args.batch_size, args.num_workers)  # warm-up
    result, seconds = embed_once(checkpoint, screen_root, out, args.device, args.batch_size, args.num_workers)
    device = resolve_device(args.device)
    record = {"preset": args.preset, "sites": args.sites, "site_size": args.site_size, "bit_depth": args.bit_depth,
              "tiles": result.n_tiles, "seconds": seconds, "crops_per_s_end_to_end": result.n_tiles / seconds,
              "crops_per_s_model_loop": result.tiles_per_second, "provenance": provenance(device)}
    print(json.dumps({k: v for k, v in record.items() if k != "provenance"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
