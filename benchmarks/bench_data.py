"""Data-loader throughput on this machine's CPU: crops/s of each path.

Paths: torch DataLoader workers (PIL/imagecodecs decode), the DALI CPU pipeline (device_id=None), and the torch
path reading a `mae-fast pack` folder. Sources: 512² and 2048² six-channel sites, as 16-bit PNG (RxRx3-like) and
8-bit JPEG (quality 90), with 1 crop per decoded site and k per site (k = 4 for 512², 16 for 2048²).

pytest-benchmark suite (small: 512² only; --bench-toy: four 256² sites):
    .venv/bin/python -m pytest benchmarks/bench_data.py --benchmark-only
Full table (512² and 2048², every path; writes JSON with provenance):
    .venv/bin/python benchmarks/bench_data.py --workers 2 --out benchmarks/results/data_cpu.json

Pixels: cell-like blobs (Gaussian spots, background ~200 counts) plus Poisson-like noise, so PNG compresses like a
real 16-bit fluorescence image (about 1.5x) rather than like a constant or pure-noise image.

The loader-vs-step measurement of benchmarks/headline.py (train stage) uses `synthetic_pack`, `train_stream` and
`time_batches`: the synthetic screen packed uncompressed, read by the stream `mae-fast train` builds.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mae_fast.io import atomic_write_json  # noqa: E402
from mae_fast.data.dali import dali_available  # noqa: E402
from mae_fast.data.index import SiteIndex  # noqa: E402
from mae_fast.data.loader import make_train_loader  # noqa: E402
from mae_fast.data.pack import pack_index  # noqa: E402
from mae_fast.device import synchronize  # noqa: E402
from mae_fast.perf.provenance import dist_version, provenance  # noqa: E402

CHANNELS = 6
CROP = 256


# --------------------------------------------------------------------------- synthetic sources

def _blob_plane(size: int, rng: np.random.Generator) -> np.ndarray:
    """Background + Gaussian cell-like spots (float, counts), made by FFT convolution of a point field."""
    points = np.zeros((size, size), np.float32)
    n = size * size // 3000
    points[rng.integers(0, size, n), rng.integers(0, size, n)] = rng.uniform(500, 4000, n)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    sigma = 8.0
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))
    blobs = np.fft.irfft2(np.fft.rfft2(points) * kernel, s=(size, size)) * (2 * np.pi * sigma ** 2) / 4
    return 200.0 + blobs.astype(np.float32)


def write_sources(root: str, size: int, n_sites: int, seed: int = 0) -> dict[str, SiteIndex]:
    """n_sites six-channel sites as 16-bit PNG and 8-bit JPEG, in the RxRx3 layout; returns {format: index}."""
    import imagecodecs

    rng = np.random.default_rng(seed)
    base = [_blob_plane(size, rng) for _ in range(CHANNELS)]
    noise = [rng.normal(0, 14, (size, size)).astype(np.float32) for _ in range(CHANNELS)]
    out = {}
    for fmt in ("png16", "jpeg8"):
        folder = os.path.join(root, fmt, "images", "bench", "Plate1")
        os.makedirs(folder, exist_ok=True)
        for i in range(n_sites):
            address = f"{'ABCDEFGHIJKLMNOP'[i // 24]}{i % 24 + 1:02d}"
            shift = tuple(int(v) for v in rng.integers(0, size, 4))
            for c in range(CHANNELS):
                plane = np.roll(base[c], shift[:2], (0, 1)) + np.roll(noise[c], shift[2:], (0, 1))
                path = os.path.join(folder, f"{address}_s1_w{c + 1}")
                if fmt == "png16":
                    data = imagecodecs.png_encode(np.clip(plane, 0, 65535).astype(np.uint16))
                    ext = ".png"
                else:
                    data = imagecodecs.jpeg8_encode(np.clip(plane / 16, 0, 255).astype(np.uint8), level=90)
                    ext = ".jpg"
                with open(path + ext, "wb") as f:
                    f.write(data)
        out[fmt] = SiteIndex.from_rxrx(os.path.join(root, fmt))
    return out


# --------------------------------------------------------------------------- the training stream over a packed screen

def synthetic_pack(root: str, site_size: int, channels: int = CHANNELS, unique_sites: int = 16,
                   workers: int | None = None) -> str:
    """A small synthetic screen (`mae_fast.data.synthetic`: 1 plate, `unique_sites` wells of site_size²) packed
    with the uncompressed codec ("raw": decodes without blosc2/imagecodecs, so on any machine); returns the pack
    folder (under `root`)."""
    from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen

    if unique_sites < 4:
        raise ValueError(f"unique_sites must be >= 4 (two complexes of two genes, plus controls), got {unique_sites}")
    # wells = complexes x 2 genes + singletons + empty + CRISPR controls; the controls take the remainder
    n_complexes = max(1, min(3, (unique_sites - 2) // 2))
    controls = unique_sites - 2 * n_complexes
    cfg = SyntheticScreenConfig(n_experiments=1, n_plates=1, n_complexes=n_complexes, complex_size=2,
                                n_singletons=0, n_empty_controls=controls - controls // 2,
                                n_crispr_controls=controls // 2, site_size=site_size, channels=channels,
                                complex_source="builtin", seed=0)
    screen = make_synthetic_screen(os.path.join(root, "screen"), cfg, workers=workers)
    pack_dir = os.path.join(root, "packed")
    pack_index(SiteIndex.from_rxrx(screen.root), pack_dir, codec="raw", num_workers=0)
    return pack_dir


def repeat_sites(index: SiteIndex, times: int) -> SiteIndex:
    """Every site `times` over as sites 1..times of its well (distinct keys, so each copy gets its own crops and
    flips), reading the same pixels: a long epoch from a few generated sites."""
    sites = [dataclasses.replace(s, site=r + 1) for s in index for r in range(times)]
    return SiteIndex(sites, index.summary.copy(), f"{index.description}, each site x{times}", index.dtype)


def train_stream(pack_dir: str, preset: str, batch: int, device, epoch_crops: int = 0):
    """The crop stream `mae-fast train` reads on one device (data shard 0 of 1) from a pack folder:
    `build_site_index` and `make_shard_streams` with the data config's defaults (crops per site, shuffle window,
    workers, backend; pinned host batches copied to a CUDA device), at the preset's crop size ("name" or
    "name:img_size=64", as bench takes it) and micro-batch `batch`. With `epoch_crops` the index repeats its sites
    (`repeat_sites`) until one epoch holds that many crops. Returns (stream, index, its loader)."""
    from mae_fast.data.loader import default_crops_per_image
    from mae_fast.perf.stacks import parse_preset
    from mae_fast.training.config import DataConfig, TrainConfig, validate
    from mae_fast.training.data import build_site_index, make_shard_streams

    name = preset.partition(":")[0].strip()
    model_cfg = parse_preset(preset)
    cfg = TrainConfig(preset=name, model={"img_size": model_cfg.img_size}, data=DataConfig(root=pack_dir),
                      micro_batch=batch, global_batch=batch, steps=1, out_dir=os.path.join(pack_dir, "unused-run"))
    plan = validate(cfg)
    index = build_site_index(cfg.data)
    k = cfg.data.crops_per_image or default_crops_per_image(index, model_cfg.img_size)
    times = -(-epoch_crops // (len(index) * k))
    if times > 1:
        index = repeat_sites(index, times)
    stream = make_shard_streams(index, cfg, plan, 0, torch.device(device))[0]
    return stream, index, stream.loader


# --------------------------------------------------------------------------- measurement

def time_batches(batches, device=None, max_batches: int | None = None, min_seconds: float | None = None,
                 min_batches: int = 3) -> dict:
    """Crops/s of an iterable of batches, over the whole run (worker start-up and the first window included) and
    in steady state (from the first batch to the last). Batches on a CUDA `device` are waited for, so the
    host-to-device copy counts. Stops at the end of `batches`, after `max_batches` batches, or at the first batch
    that ends `min_seconds` after the first one with at least `min_batches` batches after it."""
    device = torch.device(device if device is not None else "cpu")
    n, n_first, t_first, count = 0, 0, None, 0
    start = time.perf_counter()
    for batch in batches:
        n += len(batch)
        count += 1
        if t_first is None:
            synchronize(device)
            t_first, n_first = time.perf_counter(), n
        elif (min_seconds is not None and count - 1 >= min_batches
              and time.perf_counter() - t_first >= min_seconds):
            break
        if max_batches is not None and count >= max_batches:
            break
    if t_first is None:
        raise ValueError("time_batches: no batch to time")
    synchronize(device)
    end = time.perf_counter()
    steady = (n - n_first) / (end - t_first) if n > n_first and end > t_first else float("nan")
    return {"crops_per_s": n / (end - start), "steady_crops_per_s": steady, "crops": n, "batches": count,
            "seconds": end - start, "first_batch_s": t_first - start}


def crops_per_second(index: SiteIndex, k: int, backend: str, workers: int, batch_size: int, max_batches: int | None = None,
                     dali_threads: int | None = None) -> dict:
    """One epoch (or max_batches) of the train loader, timed by `time_batches`."""
    loader = make_train_loader(index, crop_size=CROP, batch_size=batch_size, crops_per_image=k, seed=0,
                               backend=backend, num_workers=workers, dali_threads=dali_threads)
    return time_batches(loader, max_batches=max_batches)


def decode_ms_per_channel(index: SiteIndex, repeats: int = 3) -> float:
    from mae_fast.data.decode import read_image

    paths = [p for s in index.sites[:repeats] for p in s.sources[:2]]
    start = time.perf_counter()
    for p in paths:
        read_image(p)
    return (time.perf_counter() - start) / len(paths) * 1000


# --------------------------------------------------------------------------- pytest-benchmark (small)

@pytest.fixture(scope="module")
def small_sources(tmp_path_factory, bench_toy):
    """16 sites of 512² (--bench-toy: 4 sites of 256², one crop each)."""
    root = str(tmp_path_factory.mktemp("bench_data"))
    sources = write_sources(root, 256, 4) if bench_toy else write_sources(root, 512, 16)
    pack_dir = os.path.join(root, "packed")
    pack_index(sources["png16"], pack_dir, num_workers=0)
    sources["packed"] = SiteIndex.from_pack(pack_dir)
    return sources


PATHS = [("png16", "torch"), ("jpeg8", "torch"), ("png16", "dali"), ("jpeg8", "dali"), ("packed", "torch")]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("source, backend", PATHS)
def test_bench_train_loader_512(benchmark, small_sources, source, backend, k, bench_toy):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia-dali not installed")
    index = small_sources[source]
    workers, batch = (0, 4) if bench_toy else (2, 16)  # toy: in this process, one batch an epoch
    result = benchmark.pedantic(crops_per_second, args=(index, k, backend, workers, batch), rounds=1, iterations=1)
    benchmark.extra_info.update({**result, "source": f"{256 if bench_toy else 512}² {source}", "k": k})


# --------------------------------------------------------------------------- full table (script)

def data_provenance() -> dict:
    """The common provenance (`mae_fast.perf.provenance`) plus the decoders' versions."""
    return dict(provenance(torch.device("cpu")), numpy=np.__version__, imagecodecs=dist_version("imagecodecs"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers / DALI threads")
    parser.add_argument("--sites-512", type=int, default=48)
    parser.add_argument("--sites-2048", type=int, default=16)
    parser.add_argument("--data-dir", default=None, help="where to write the sources (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.data_dir) as root:
        for size, n_sites, k_many in ((512, args.sites_512, 4), (2048, args.sites_2048, 16)):
            t0 = time.perf_counter()
            sources = write_sources(os.path.join(root, str(size)), size, n_sites)
            pack_dir = os.path.join(root, str(size), "packed")
            t1 = time.perf_counter()
            pack_index(sources["png16"], pack_dir, num_workers=args.workers)
            pack_s = time.perf_counter() - t1
            sources["packed"] = SiteIndex.from_pack(pack_dir)
            png_bytes = sum(os.path.getsize(p) for s in sources["png16"] for p in s.sources)
            pack_bytes = sum(os.path.getsize(os.path.join(pack_dir, f)) for f in os.listdir(pack_dir) if f.endswith(".bin"))
            print(f"{size}²: {n_sites} sites written in {t1 - t0:.1f}s; PNG {png_bytes / 2**20:.1f} MiB, pack "
                  f"{pack_bytes / 2**20:.1f} MiB (packed in {pack_s:.1f}s with {args.workers} workers)", flush=True)
            for fmt in ("png16", "jpeg8"):
                ms = decode_ms_per_channel(sources[fmt])
                print(f"  decode one {size}² {fmt} channel: {ms:.1f} ms (1 core)", flush=True)
                rows.append({"source": f"{size}² {fmt}", "path": "decode 1 channel, 1 core", "k": None, "ms": ms})
            for source, backend in PATHS:
                if backend == "dali" and not dali_available():
                    continue
                for k in (1, k_many):
                    batch = min(16 if k == 1 else 64, len(sources[source]) * k // 4)  # >= 4 batches an epoch
                    r = crops_per_second(sources[source], k, backend, args.workers, batch, dali_threads=args.workers)
                    label = {"torch": f"torch DataLoader, {args.workers} workers",
                             "dali": f"DALI CPU pipeline, {args.workers} threads"}[backend]
                    if source == "packed":
                        label = f"pack (blosc2 tiles), torch DataLoader, {args.workers} workers"
                    print(f"  {size}² {source:7s} k={k:2d} {label}: {r['steady_crops_per_s']:7.1f} crops/s steady, "
                          f"{r['crops_per_s']:7.1f} overall ({r['crops']} crops in {r['seconds']:.1f}s)", flush=True)
                    rows.append({"source": f"{size}² {source}", "path": label, "k": k, **r})
    result = {"benchmark": "bench_data", "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "provenance": data_provenance(), "crop": CROP, "channels": CHANNELS, "rows": rows}
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
