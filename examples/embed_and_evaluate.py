"""A checkpoint -> embeddings of every well of a screen -> recall of known relationships (EFAAR's databases).

    python examples/embed_and_evaluate.py --checkpoint runs/s16 --data SCREEN --out eval_run
    python examples/embed_and_evaluate.py --checkpoint OpenPhenom/ --data SCREEN --out eval_run  # Recursion's folder
    python examples/embed_and_evaluate.py --checkpoint timm_vit/model.safetensors --preset mae_vit_small_patch16_256 ...
    python examples/embed_and_evaluate.py --toy --out /tmp/example_eval    # seconds: a random model, a tiny screen

--checkpoint takes what `mae-fast embed` takes: our checkpoint or training-run folder, the OpenPhenom folder
(model.safetensors + config.json as downloaded from the Hugging Face Hub), or one weights file -- e.g. an encoder
exported to timm by examples/export_to_timm.py -- with --preset naming its architecture. --data is a screen in the
RxRx layout with its metadata.csv (RxRx3 columns: gene, experiment_name, plate, address, ...).

Relationships: EFAAR's CORUM, HuMAP, Reactome, SIGNOR and StringDB (`efaar:all`) are read from the files of the
package efaar-benchmarking (`pip install --no-deps efaar-benchmarking==1.0`; their licences: DATA_LICENSES.md);
--relationships adds your own CSV files of gene pairs (`name=pairs.csv`, header entity1,entity2).
"""
from __future__ import annotations

import argparse
import os
import sys

from mae_fast.evaluation import evaluate, markdown_table, write_outputs
from mae_fast.evaluation.databases import parse_relationship_args
from mae_fast.evaluation.table import EvaluationInputError
from mae_fast.inference.embed import embed_dataset


def toy_inputs(out: str) -> tuple[str, str, dict]:
    """(checkpoint, screen, extra relationships) for --toy: a random micro MAE and a tiny synthetic screen written
    like RxRx3, whose planted protein complexes are known pairs too."""
    from mae_fast.checkpoint import save_model
    from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
    from mae_fast.models import create_model

    screen = make_synthetic_screen(os.path.join(out, "screen"), SyntheticScreenConfig(
        n_experiments=1, n_plates=2, n_complexes=5, complex_size=3, n_singletons=2, n_empty_controls=3,
        n_crispr_controls=1, site_size=256, seed=0))
    checkpoint = os.path.join(out, "checkpoint")
    save_model(create_model("mae_vit_micro_patch16_256"), checkpoint)
    return checkpoint, screen.root, {"planted": screen.relationships_csv}


def relationship_sources(extra: dict, pairs: list[str]) -> dict:
    """{name: CSV path or table}: EFAAR's databases when installed, the user's pair files, and `extra`."""
    sources = dict(extra)
    try:
        sources.update(parse_relationship_args(["efaar:all"]))
    except EvaluationInputError as why:  # efaar-benchmarking not installed: evaluate on the other sources
        print(f"EFAAR databases left out: {why}")
    sources.update(parse_relationship_args(pairs) if pairs else {})
    if not sources:
        raise SystemExit("no relationships to evaluate: install efaar-benchmarking or pass --relationships name=pairs.csv")
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint folder (ours or OpenPhenom's) or a weights file")
    parser.add_argument("--preset", help="architecture of a single weights file (e.g. a timm-exported encoder)")
    parser.add_argument("--data", help="screen folder (RxRx layout + metadata.csv)")
    parser.add_argument("--out", required=True, help="output folder (embeddings.parquet, evaluation/)")
    parser.add_argument("--relationships", nargs="*", default=[], help="more known pairs: name=pairs.csv ...")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--toy", action="store_true", help="a random micro model on a tiny synthetic screen")
    args = parser.parse_args(argv)
    if args.toy:
        checkpoint, data, extra = toy_inputs(args.out)
    elif args.checkpoint and args.data:
        checkpoint, data, extra = args.checkpoint, args.data, {}
    else:
        parser.error("give --checkpoint and --data, or --toy")

    # 1. every site tiled into 256² crops, embedded, averaged per well: one parquet row per well
    embeddings = embed_dataset(checkpoint, data, os.path.join(args.out, "embeddings.parquet"), preset=args.preset,
                               device=args.device, overwrite=True, progress=not args.toy)
    print(f"embedded {embeddings.n_wells} wells ({embeddings.n_tiles} tiles) -> {embeddings.out}")

    # 2. TVN on the negative controls, spherical means per gene, recall of known pairs in the 5% tails of all
    #    pairwise cosine similarities, beside random embeddings
    result = evaluate(embeddings.out, relationship_sources(extra, args.relationships), baselines=("random",))
    write_outputs(result, os.path.join(args.out, "evaluation"))
    print(markdown_table(result))
    print(f"tables and plots: {os.path.join(args.out, 'evaluation')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
