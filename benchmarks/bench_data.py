"""Data-loader throughput on this machine's CPU: crops/s of each path.

Paths: torch DataLoader workers (PIL/imagecodecs decode), the DALI CPU pipeline (device_id=None), and the torch
path reading a `mae-fast pack` folder. Sources: 512² and 2048² six-channel sites, as 16-bit PNG (RxRx3-like) and
8-bit JPEG (quality 90), with 1 crop per decoded site and k per site (k = 4 for 512², 16 for 2048²).

pytest-benchmark suite (small: 512² only):
    .venv/bin/python -m pytest benchmarks/bench_data.py --benchmark-only
Full table (512² and 2048², every path; writes JSON with provenance):
    .venv/bin/python benchmarks/bench_data.py --workers 2 --out benchmarks/results/data_cpu.json

Pixels: cell-like blobs (Gaussian spots, background ~200 counts) plus Poisson-like noise, so PNG compresses like a
real 16-bit fluorescence image (about 1.5x) rather than like a constant or pure-noise image.
"""
from __future__ import annotations

import argparse
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


# --------------------------------------------------------------------------- measurement

def crops_per_second(index: SiteIndex, k: int, backend: str, workers: int, batch_size: int, max_batches: int | None = None,
                     dali_threads: int | None = None) -> dict:
    """One epoch (or max_batches) of the train loader: crops/s over the whole run (worker start-up and the first
    window included) and in steady state (from the first batch to the last)."""
    loader = make_train_loader(index, crop_size=CROP, batch_size=batch_size, crops_per_image=k, seed=0,
                               backend=backend, num_workers=workers, dali_threads=dali_threads)
    n, n_first, t_first = 0, 0, None
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        n += len(batch)
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
        if max_batches is not None and i + 1 >= max_batches:
            break
    end = time.perf_counter()
    steady = (n - n_first) / (end - t_first) if n > n_first and end > t_first else float("nan")
    return {"crops_per_s": n / (end - start), "steady_crops_per_s": steady, "crops": n, "seconds": end - start,
            "first_batch_s": t_first - start}


def decode_ms_per_channel(index: SiteIndex, repeats: int = 3) -> float:
    from mae_fast.data.decode import read_image

    paths = [p for s in index.sites[:repeats] for p in s.sources[:2]]
    start = time.perf_counter()
    for p in paths:
        read_image(p)
    return (time.perf_counter() - start) / len(paths) * 1000


# --------------------------------------------------------------------------- pytest-benchmark (small)

@pytest.fixture(scope="module")
def small_sources(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench_data"))
    sources = write_sources(root, 512, 16)
    pack_dir = os.path.join(root, "packed")
    pack_index(sources["png16"], pack_dir, num_workers=0)
    sources["packed"] = SiteIndex.from_pack(pack_dir)
    return sources


PATHS = [("png16", "torch"), ("jpeg8", "torch"), ("png16", "dali"), ("jpeg8", "dali"), ("packed", "torch")]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("source, backend", PATHS)
def test_bench_train_loader_512(benchmark, small_sources, source, backend, k):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia-dali not installed")
    index = small_sources[source]
    result = benchmark.pedantic(crops_per_second, args=(index, k, backend, 2, 16), rounds=1, iterations=1)
    benchmark.extra_info.update({**result, "source": f"512² {source}", "k": k})


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
