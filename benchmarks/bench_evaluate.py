"""Evaluation benchmarks: TVN, pairwise similarities, exact null percentiles, the whole `evaluate`.

pytest-benchmark suite (small sizes, CPU; --bench-toy: a tenth of them):
    .venv/bin/python -m pytest benchmarks/bench_evaluate.py --benchmark-only
Whole-genome scale run (17,063 perturbations x 1,024 dims, four databases; wall time and peak memory of a fresh
process that loads the parquet and runs TVN -> activity mAP -> spherical means -> null percentiles -> recall with
bootstrap intervals -> consistency mAP):
    .venv/bin/python benchmarks/bench_evaluate.py [--perturbations 17063] [--dims 1024] [--replicates 4] [--no-map]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mae_fast.evaluation import EvalConfig, PairwiseSimilarities, evaluate, fit_tvn, unit_rows, well_table_from_frame


# --------------------------------------------------------------------------- synthetic inputs

def screen_frame(n_genes: int, dims: int, replicates: int, n_batches: int, controls_per_batch: int,
                 group_size: tuple[int, int] = (3, 8), planted_fraction: float = 0.2, seed: int = 0):
    """Wells with planted groups (shared directions), per-batch offsets; returns (frame, genes, groups)."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"GENE{i:05d}" for i in range(n_genes)], dtype=object)
    phenotype = rng.standard_normal((n_genes, dims), dtype=np.float32)
    groups, start = [], 0
    while start < int(planted_fraction * n_genes):
        size = int(rng.integers(group_size[0], group_size[1] + 1))
        members = np.arange(start, min(start + size, n_genes))
        phenotype[members] += 2.0 * rng.standard_normal(dims, dtype=np.float32)
        groups.append(members)
        start += size
    well_gene = np.tile(np.arange(n_genes), replicates)
    n_treated = well_gene.size
    batch = np.concatenate([rng.integers(0, n_batches, n_treated), np.repeat(np.arange(n_batches), controls_per_batch)])
    offsets = 3.0 * rng.standard_normal((n_batches, dims), dtype=np.float32)
    features = rng.standard_normal((batch.size, dims), dtype=np.float32)
    features[:n_treated] += phenotype[well_gene]
    features += offsets[batch]
    labels = np.concatenate([genes[well_gene], np.full(batch.size - n_treated, "EMPTY_control", dtype=object)])
    frame = pd.DataFrame(features, columns=[f"feature_{k}" for k in range(dims)])
    frame.insert(0, "gene", labels)
    frame.insert(0, "experiment_name", np.char.add("exp", batch.astype(str)))
    frame.insert(0, "well_id", [f"w{i}" for i in range(batch.size)])
    return frame, genes, groups


def relationship_frames(genes: np.ndarray, groups: list[np.ndarray], seed: int = 1,
                        scale: float = 1.0) -> dict[str, pd.DataFrame]:
    """Four databases sized like the filtered public ones (times `scale`); both orientations, some absent genes."""
    rng = np.random.default_rng(seed)
    within = np.array([(a, b) for g in groups for a in g for b in g if a < b])

    def random_pairs(n):
        return rng.integers(0, genes.size, (int(n * scale), 2))

    def frame(index_pairs, n_absent):
        n_absent = int(n_absent * scale)
        first, second = genes[index_pairs[:, 0]], genes[index_pairs[:, 1]]
        flip = rng.random(first.size) < 0.5                                  # both orientations occur
        first, second = np.where(flip, second, first), np.where(flip, first, second)
        absent = np.array([f"ABSENT{i}" for i in range(n_absent)], dtype=object)
        return pd.DataFrame({"entity1": np.concatenate([first, absent]),
                             "entity2": np.concatenate([second, rng.choice(genes, n_absent)])})

    return {
        "CORUM": frame(within, 500),
        "hu.MAP": frame(np.concatenate([within[::2], random_pairs(40_000)]), 1_000),
        "Reactome": frame(random_pairs(500_000), 5_000),
        "StringDB": frame(np.concatenate([within, random_pairs(120_000)]), 2_000),
    }


# --------------------------------------------------------------------------- pytest-benchmark suite

@pytest.fixture(scope="module")
def small_screen(bench_toy):
    """1,500 genes x 256 dims (--bench-toy: 150 x 32, relationship tables a tenth of the size)."""
    if bench_toy:
        frame, genes, groups = screen_frame(n_genes=150, dims=32, replicates=3, n_batches=3, controls_per_batch=20)
        return frame, relationship_frames(genes, groups, scale=0.1)
    frame, genes, groups = screen_frame(n_genes=1_500, dims=256, replicates=3, n_batches=6, controls_per_batch=80)
    return frame, relationship_frames(genes, groups)


def test_bench_tvn_fit_apply(benchmark, small_screen, bench_toy):
    table = well_table_from_frame(small_screen[0])

    def run():
        transform = fit_tvn(table.features, table.batch_codes, table.is_control, table.batch_names)
        return transform.apply(table.features, table.batch_codes)

    out = benchmark.pedantic(run, rounds=1 if bench_toy else 3, iterations=1)
    assert out.shape == table.features.shape


def test_bench_similarities_and_exact_percentiles(benchmark, bench_toy):
    rng = np.random.default_rng(0)
    unit = unit_rows(rng.standard_normal((301, 32) if bench_toy else (3_001, 256), dtype=np.float32))

    def run():
        return PairwiseSimilarities(unit).percentiles([1, 5, 10, 90, 95, 99])

    values = benchmark.pedantic(run, rounds=1 if bench_toy else 3, iterations=1)
    assert np.all(np.diff(values) > 0)


def test_bench_evaluate_small(benchmark, small_screen, bench_toy):
    frame, relationships = small_screen
    result = benchmark.pedantic(lambda: evaluate(frame, relationships, baselines=("random",)),
                                rounds=1 if bench_toy else 2, iterations=1)
    model = result.recall_table()
    assert model.loc["model", "CORUM"] > 0.5 > model.loc["random", "CORUM"]


# --------------------------------------------------------------------------- whole-genome scale run

def _generate(folder: str, args) -> dict:
    frame, genes, groups = screen_frame(args.perturbations, args.dims, args.replicates, args.batches,
                                        args.controls_per_batch)
    frame.to_parquet(os.path.join(folder, "embeddings.parquet"), index=False)
    paths = {}
    for name, rel in relationship_frames(genes, groups).items():
        paths[name] = os.path.join(folder, f"{name}.csv")
        rel.to_csv(paths[name], index=False)
    return {"wells": int(len(frame)), "relationships": paths}


def _run(folder: str, relationships: dict, baselines: tuple, map_metrics: bool = True) -> dict:
    """Runs in a fresh process: its peak RSS is the evaluation's (plus the interpreter, numpy, torch)."""
    start = time.perf_counter()
    result = evaluate(os.path.join(folder, "embeddings.parquet"), relationships, baselines=baselines,
                      config=EvalConfig(map_metrics=map_metrics))
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_gib = usage.ru_maxrss / 2**20                                        # ru_maxrss is KiB on Linux
    return {
        "wall_s": round(wall, 2),
        "cpu_s_whole_process": round(usage.ru_utime + usage.ru_stime, 1),     # incl. imports; less load-sensitive
        "peak_rss_gib": round(peak_gib, 3),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "stages_s": {name: s.report["seconds"] for name, s in result.sources.items()},
        "stages_cpu_s": {name: s.report["cpu_seconds"] for name, s in result.sources.items()},
        "map_perturbations": {name: s.n_perturbations for name, s in result.sources.items()},
        "null_pairs": next(iter(result.sources.values())).n_null_pairs,
        "pairs": {db: r.n_pairs for db, r in next(iter(result.sources.values())).databases.items()},
        "recall_at_5": result.recall_table().round(4).to_dict(orient="index"),
        "table": result.table().round(4).to_dict(orient="records"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--perturbations", type=int, default=17_063)
    parser.add_argument("--dims", type=int, default=1_024)
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--controls-per-batch", type=int, default=100)
    parser.add_argument("--baselines", default="", help="e.g. random")
    parser.add_argument("--no-map", action="store_true", help="recall only (no activity / consistency mAP)")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    baselines = tuple(b for b in args.baselines.split(",") if b)

    if args._run:                                          # child process
        spec = json.loads(args._run)
        print(json.dumps(_run(spec["folder"], spec["relationships"], baselines, not args.no_map)))
        return 0

    load_before = [round(x, 2) for x in os.getloadavg()]                  # other processes sharing the cores
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        generated = _generate(folder, args)
        generate_s = time.perf_counter() - start
        spec = json.dumps({"folder": folder, "relationships": generated["relationships"]})
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--_run", spec, "--baselines",
                                args.baselines] + (["--no-map"] if args.no_map else []),
                               capture_output=True, text=True, check=False)
        if child.returncode:
            sys.stderr.write(child.stderr)
            return child.returncode
        numbers = json.loads(child.stdout.strip().splitlines()[-1])
    numbers = {
        "what": "mae_fast.evaluation on a parquet of wells: load, TVN, activity mAP, spherical means, exact null "
                "percentiles, recall with bootstrap intervals and consistency mAP for 4 databases"
                + (" (mAP off)" if args.no_map else ""),
        "perturbations": args.perturbations, "dims": args.dims, "replicates": args.replicates,
        "wells": generated["wells"], "batches": args.batches, "baselines": list(baselines),
        "input_generation_s": round(generate_s, 1), "load_average_before": load_before, **numbers,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "torch": __import__("torch").__version__,
                    "torch_threads": __import__("torch").get_num_threads()},
    }
    text = json.dumps(numbers, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
