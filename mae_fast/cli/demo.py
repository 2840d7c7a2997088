"""`mae-fast demo`: the whole job on the built-in synthetic screen.

One file on purpose: the demo is the pipeline a newcomer reads first, its stages in the order they run (the
schedule's planning is in demo_plan.py); split further, the order would have to be pieced together again.

0. check every option (nothing is generated or trained when one is wrong);
1. generate the screen (RxRx3 layout, real protein complexes, five phenotype classes; docs/SYNTHETIC_SCREEN.md)
   with `mae_fast.data.synthetic`;
2. train each model on random 256² crops with `mae_fast.training` (data pipeline, fused ops, optimiser, checkpoints):
   by default a small MAE; `--models` compares several, e.g. the MAE with the seed paper's baselines
   (`--models mae_vit_micro_patch16_256,wsl_densenet_micro_256,munet_micro_256`);
3. embed every site tile by tile and average per well with `mae_fast.inference`;
4. score recall with `mae_fast.evaluation`: one table with every model side by side, beside the random and
   pixel-statistics baselines (and the CellProfiler-style one when installed: `--cellprofiler-cells` of each
   site's segmented cells, 8 by default, drawn by the seed; a line under the table says so and what it cost),
   with a 95% bootstrap interval over
   pairs: the planted complexes overall and per phenotype class, and EFAAR's real databases (CORUM, HuMAP,
   Reactome, SIGNOR, StringDB) when the efaar-benchmarking package is installed.

Time: `--minutes` of training per model (default 3: the budget benchmarks/scaling_study.py found best for the micro
MAE on 2 cores, README "What to expect"); the schedule's length follows the budget, so the run trains for its
minutes on any machine and anneals properly: without `--max-steps` a short probe run of the same training
(`PROBE_STEPS` steps, thrown away) measures the seconds per step, the schedule is planned from it
(`demo_plan.plan_steps`), and it runs on the clock (`schedule_clock=time`): a run that steps slower than its probe
(checkpoints, figures, a busier machine) still warms up and anneals within the budget instead of being cut partway
down the decay; with `--max-steps` the schedule is that many steps, whatever the machine (deterministic). The
probe's time counts against the budget. The summary says how many crops each model trained on.

Block-wise (ViT models): every well is embedded at each encoder block (`embed --blocks all`, one table with a
`block` column); the evaluation scores each block and headlines the one with the highest phenotypic activity mAP
(replicate wells vs negative controls: no relationships used). The table shows the model's last block as the
model's row and, beside it, the chosen block when that is another one ("<model> block B (chosen)").

Outputs (OUT = --out): the screen in OUT/screen; per model its training run (OUT/<model>/train) and embeddings
(OUT/<model>/embeddings.parquet) -- a single model keeps the flat layout OUT/train, OUT/embeddings.parquet; the
combined evaluation in OUT/evaluation (evaluation.json, recall.md, recall_curve.png, similarity_heatmap.png), the
recall table again at OUT/recall.md, and OUT/demo_summary.json.

Learning rates: the MAE's Lion --lr (1e-3); the WSL classifier's SGD --wsl-lr (0.05: the preset's linear
scaling, 0.1 per 256 crops, would give ~0.006 at a demo batch of 16, too small to learn in a few hundred steps);
MU-Net's AdamW --munet-lr (1e-3, the paper's). AdaBN models get ghost batches no larger than the batch.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from mae_fast.models import list_models, model_config
from mae_fast.cli.common import number
from mae_fast.cli.demo_plan import MIN_STEPS, PROBE_STEPS, schedule_steps
from mae_fast.evaluation import cellprofiler
from mae_fast.evaluation.databases import parse_relationship_args
from mae_fast.evaluation.table import EvaluationInputError
from mae_fast.models import list_presets

DEFAULT_WSL_LR = 0.05
DEFAULT_MUNET_LR = 1e-3
DEFAULT_MINUTES = 3.0  # from the scaling study: 8-10k crops of the micro MAE on 2 idle cores, near its best (README)
# The CellProfiler-style baseline measures this many of each site's segmented cells (about 22 on the default
# screen), drawn by --seed: measuring a cell costs about 12 ms of CPU, so all of them on 760 sites would take
# about 2.5 minutes of the 2 cores alone (docs/SYNTHETIC_SCREEN.md, "Budget"). The table says so under itself.
DEFAULT_CELLPROFILER_CELLS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    p.add_argument("--preset", default="mae_vit_micro_patch16_256", help=f"model preset ({', '.join(list_presets())})")
    p.add_argument("--models", type=_names,
                   help="comma-separated presets to train, embed and compare (default: --preset alone), e.g. "
                        "mae_vit_micro_patch16_256,wsl_densenet_micro_256,munet_micro_256; baselines: "
                        + ", ".join(list_models("baseline")))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=number(float, above=0),
                        help=f"training time per model in minutes (default {DEFAULT_MINUTES:g})")
    budget.add_argument("--seconds", type=number(float, above=0), help="the same in seconds")
    p.add_argument("--max-steps", type=number(int, minimum=1),
                   help="training steps of the schedule (default: planned from the step time a short probe run "
                        "measures on this machine, to fill the time budget)")
    p.add_argument("--batch-size", type=number(int, minimum=1), default=16)
    p.add_argument("--lr", type=number(float, above=0), default=1e-3, help="peak Lion learning rate of the MAE (default 1e-3)")
    p.add_argument("--wsl-lr", type=number(float, above=0), default=DEFAULT_WSL_LR,
                   help=f"peak SGD learning rate of WSL baselines (default {DEFAULT_WSL_LR})")
    p.add_argument("--munet-lr", type=number(float, above=0), default=DEFAULT_MUNET_LR,
                   help=f"peak AdamW learning rate of MU-Net baselines (default {DEFAULT_MUNET_LR:g})")
    p.add_argument("--cellprofiler-cells", type=number(int, minimum=0), default=DEFAULT_CELLPROFILER_CELLS,
                   help="cells of each site the CellProfiler-style baseline measures, drawn by --seed (default "
                        f"{DEFAULT_CELLPROFILER_CELLS}; 0: every segmented cell). Every cell is segmented either way")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast dtype of training and embedding (default auto: bf16 on GPUs and on CPUs with native "
                        "bf16 units -- AMX / AVX512-BF16 -- fp32 on other CPUs)")
    p.add_argument("--tiny", action="store_true", help="a very small screen and run (for tests)")


def _names(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def screen_config(tiny: bool, seed: int):
    from mae_fast.data.synthetic import SyntheticScreenConfig

    if tiny:
        return SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=5, complex_size=3, n_singletons=2,
                                     n_empty_controls=3, n_crispr_controls=1, site_size=256, seed=seed)
    return SyntheticScreenConfig(seed=seed)


def check_models(names: list[str]) -> list[str]:
    """Known, distinct presets; raises ValueError naming the valid ones."""
    valid = list_models("mae") + list_models("baseline")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown model preset(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or not names:
        raise ValueError(f"--models needs distinct presets, got {', '.join(names) or 'none'}")
    return names


def check_options(args) -> tuple[list[str], float, int | None]:
    """(models, training seconds per model, schedule steps -- None: planned from a probe run) or ValueError naming
    the bad option."""
    models = check_models(args.models or [args.preset])
    seconds = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes is not None
                                                                    else DEFAULT_MINUTES)
    if not seconds > 0:
        given = args.minutes if args.minutes is not None else seconds
        raise ValueError(f"--minutes/--seconds must be > 0, got {given}")
    steps = args.max_steps
    for name, value in (("--max-steps", steps or 1), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("--lr", args.lr), ("--wsl-lr", args.wsl_lr), ("--munet-lr", args.munet_lr)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if args.device not in ("auto", "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {args.device}")
    return models, seconds, steps


def planned_steps(preset: str, screen_root: str, folder: str, args, seconds: float) -> tuple[int, dict]:
    """(schedule steps, how they were planned): `--max-steps`, or from a probe run of the model's training in
    `folder`/probe (`demo_plan.schedule_steps`)."""
    probe = train_config(preset, screen_root, os.path.join(folder, "probe"), args, seconds, PROBE_STEPS)
    return schedule_steps(probe, seconds, args.max_steps)


def demo_baselines() -> tuple[tuple[str, ...], str | None]:
    """(the demo's baselines this installation can run, why the CellProfiler-style one is left out or None)."""
    missing = cellprofiler.missing_packages()
    if missing:
        return ("random", "pixel-stats"), (f"CellProfiler-style baseline left out: it needs {', '.join(missing)} "
                                           f"(pip install {' '.join(missing)})")
    return ("random", "pixel-stats", "cellprofiler"), None


def demo_relationships(screen) -> tuple[dict, str | None]:
    """({name: relationships} of the demo's table, why EFAAR's databases are left out or None): the planted
    complexes and, when efaar-benchmarking is installed, EFAAR's five databases (`efaar:all`)."""
    out: dict = {"planted": screen.relationships_csv}
    try:
        out.update(parse_relationship_args(["efaar:all"]))
    except EvaluationInputError as err:
        return out, f"EFAAR databases left out: {err}"
    return out, None


def cellprofiler_note(table, seconds: float, cells_asked: int) -> str:
    """The line under the table that says how the CellProfiler-style row was measured, and what it cost."""
    wells = len(table)
    sampled = (f"at most {cells_asked} segmented cells of each site, drawn by seed" if cells_asked
               else "every segmented cell")
    return (f"cellprofiler: {sampled} (median {table.attrs['cells_per_well_median']:g} cells per well measured); "
            f"{wells} wells in {seconds:.0f} s, {1000 * seconds / max(wells, 1):.0f} ms per well")


def train_config(preset: str, screen_root: str, out_dir: str, args, seconds: float, steps: int,
                 clock: str = "steps"):
    """The demo's training run of one model: its family's demo lr, one micro-batch per step, the schedule on
    `clock` (TrainConfig.schedule_clock)."""
    from mae_fast.training.config import DataConfig, TrainConfig

    model: dict = {}
    lr = args.lr
    if preset in list_models("baseline"):
        base = model_config(preset)
        lr = args.wsl_lr if base.family == "wsl" else args.munet_lr
        if getattr(base, "adabn", False):  # ghost batches live within one (single-plate) micro-batch
            model["virtual_batch_size"] = min(base.virtual_batch_size, args.batch_size)
    return TrainConfig(
        preset=preset, model=model, data=DataConfig(root=screen_root), out_dir=out_dir, overwrite=True,
        global_batch=args.batch_size, micro_batch=args.batch_size, steps=steps, lr=lr,
        max_seconds=seconds, schedule_clock=clock, seed=args.seed, device=args.device, amp=args.amp,
        checkpoint_every=max(1, steps // 2), log_every=max(1, steps // 20),
    )


def merge_evaluations(results: list, names: list[str]):
    """One EvaluationResult holding the sources `names` (models, then baselines) of several evaluations of the same
    relationships, e.g. one per model embedding table."""
    from mae_fast.evaluation import EvaluationResult

    first = results[0]
    merged = EvaluationResult(sources={}, relationships=first.relationships, config=first.config,
                              relationship_sets=first.relationship_sets)
    for name in names:
        source = next(r for r in results if name in r.sources)
        merged.sources[name] = source.sources[name]
        merged.maps[name] = source.maps[name]
    return merged


def headline_blocks(evaluation, source: str) -> dict | None:
    """A block-wise evaluation of `source` reduced to the demo's rows, in place: the last block as `source` and,
    when the evaluation chose another block to headline, that block as "`source` block B (chosen)". Returns the
    choice with the new row names (None for a model without blocks)."""
    from dataclasses import replace

    choice = evaluation.block_choice
    if choice is None:
        return None
    rows = {choice["last_source"]: source}
    if choice["block"] != choice["last_block"]:
        rows[choice["source"]] = f"{source} block {choice['block']} (chosen)"
    sources, maps = dict(evaluation.sources), dict(evaluation.maps)
    evaluation.sources.clear()
    evaluation.maps.clear()
    for old, new in rows.items():  # the model's rows first, then the baselines in their order
        evaluation.sources[new] = replace(sources[old], name=new)
        evaluation.maps[new] = maps[old]
    for name, result in sources.items():
        if not name.startswith(f"{source} block "):
            evaluation.sources[name], evaluation.maps[name] = result, maps[name]
    evaluation.block_choice = None  # the merged table says it in its own line
    return {**choice, "row": rows[choice["source"]], "last_row": source}


def block_note(choice: dict, recall) -> str:
    """The line under the table: which block the evaluation headlines, why, and its recall beside the last
    block's (the first relationship set, the planted complexes)."""
    database = recall.columns[0]
    scores = choice["activity_map"]

    def cell(block):
        value = scores.get(str(block))
        return "n/a" if value is None else f"{value:.3f}"
    chosen, last = choice["block"], choice["last_block"]
    return (f"{choice['last_row']}: headline block {chosen} of {last} by {choice['criterion']}: activity mAP "
            f"{cell(chosen)} (last block {cell(last)}); {database} recall {recall.loc[choice['row'], database]:.3f} "
            f"(last block {recall.loc[choice['last_row'], database]:.3f})")


def _json_rows(frame) -> list[dict]:
    """A table's rows as JSON-ready dicts (NaN -> null)."""
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v.item() if hasattr(v, "item") else v)
             for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _loss_ends(losses: list[float]) -> tuple[float, float]:
    k = max(1, min(10, len(losses) // 4))
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


DEMO_ENTRIES = {"screen", "screen_pack", "screen_pack.lock", "train", "embeddings.parquet", "embeddings.parquet.lock",
                "embeddings_parts", "evaluation", "recall.md", "demo_summary.json"}


def is_demo_entry(name: str, models: list[str]) -> bool:
    """A name the demo writes in --out (a pack interrupted while writing leaves screen_pack.tmp-PID)."""
    from mae_fast.io import TMP_PREFIX

    return (name in DEMO_ENTRIES or name in models or name.startswith(TMP_PREFIX)
            or name.startswith("screen_pack" + TMP_PREFIX))


def pack_screen(screen_root: str, pack_dir: str):
    """The screen as a pack folder (raw tiles, `mae-fast pack --codec raw`) that the models train from: the crop
    loader then reads tiles instead of decoding six PNGs per crop, which cost ~20% of a micro MAE step on 2 cores
    (0.33 -> 0.27 s per step, the same crops). Embedding and the baselines read the screen itself."""
    from mae_fast.data.index import SiteIndex
    from mae_fast.data.pack import pack_index

    return pack_index(SiteIndex.from_rxrx(screen_root), pack_dir, codec="raw", overwrite=True)


def check_demo_folder(out: str, models: list[str]) -> None:
    """The demo writes (and replaces) its own entries in --out: a folder holding anything else (a dataset, a user's
    files) is refused, so that no foreign file is replaced."""
    from mae_fast.io import OutputPathError

    if not os.path.isdir(out):
        if os.path.exists(out):
            raise OutputPathError(f"--out {out} exists and is not a folder")
        return
    foreign = sorted(n for n in os.listdir(out) if not is_demo_entry(n, models))
    if foreign:
        raise OutputPathError(f"--out {out} holds files the demo did not write ({', '.join(foreign[:5])}); the demo "
                              "replaces its own outputs only: give a new or empty folder")


def run(args) -> int:
    from mae_fast.io import atomic_write, atomic_write_json, write_text
    from mae_fast.data.synthetic import make_synthetic_screen
    from mae_fast.inference.embed import embed_dataset
    from mae_fast.evaluation import evaluate, markdown_table, write_outputs
    from mae_fast.training.config import validate
    from mae_fast.training.loop import train

    models, seconds, steps = check_options(args)  # errors: the CLI's one handler (mae_fast.cli.common.run_command)
    single = len(models) == 1
    out = os.path.abspath(args.out)
    check_demo_folder(out, models)
    for preset in models:  # every training setting checked before the screen is generated
        validate(train_config(preset, os.path.join(out, "screen"), os.path.join(out, preset, "train"), args,
                              seconds, steps or MIN_STEPS))
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    screen = make_synthetic_screen(os.path.join(out, "screen"), screen_config(args.tiny, args.seed))
    screen_seconds = time.time() - t_start
    print(f"synthetic screen: {screen.root} ({len(screen.genes)} genes in {len(screen.complexes)} "
          f"{'CORUM' if screen.source == 'corum' else 'built-in textbook'} complexes, {screen_seconds:.1f} s)")

    stage = time.time()
    pack = pack_screen(screen.root, os.path.join(out, "screen_pack"))
    pack_seconds = time.time() - stage
    print(f"packed the screen for training: {pack.out_dir} ({pack.n_bytes / 2**20:.0f} MiB of raw tiles, "
          f"{pack_seconds:.1f} s)")

    runs: dict[str, dict] = {}
    for preset in models:
        folder = out if single else os.path.join(out, preset)
        model_steps, plan = planned_steps(preset, pack.out_dir, folder, args, seconds)
        if plan["source"] == "probe":
            print(f"planned {model_steps} steps for {preset}: {plan['step_seconds']:.3f} s per step measured over "
                  f"{plan['probe_steps']} probe steps ({plan['probe_seconds']:.0f} s), "
                  f"{plan['budget_left_seconds']:.0f} s of the budget left")
        clock = "time" if plan["source"] == "probe" else "steps"
        result = train(train_config(preset, pack.out_dir, os.path.join(folder, "train"), args,
                                    max(seconds - plan.get("probe_seconds", 0.0), 1.0), model_steps, clock))
        first, last = _loss_ends(result.losses)
        steps_note = (f"{result.steps} steps (planned {model_steps}; the schedule followed the clock)"
                      if clock == "time" else f"{result.steps} of {model_steps} steps")
        print(f"trained {preset} for {steps_note} in {result.seconds:.0f} s ({result.crops} "
              f"crops, {result.crops_per_second:.1f} crops/s): loss {first:.4f} -> {last:.4f}")
        stage = time.time()
        embeddings = embed_dataset(result.model_dir, screen.root, os.path.join(folder, "embeddings.parquet"),
                                   overwrite=True, device=args.device, amp=args.amp, seed=args.seed,
                                   blocks=None if model_config(preset).family != "mae" else "all")
        embed_seconds = time.time() - stage
        print(f"embedded {embeddings.n_wells} wells with {preset} ({embeddings.n_tiles} tiles, "
              f"{embeddings.tiles_per_second:.1f} tiles/s)")
        runs[preset] = {"result": result, "embeddings": embeddings, "loss_first": first, "loss_last": last,
                        "embed_seconds": embed_seconds, "planned_steps": model_steps, "plan": plan}

    # one evaluation per embedding table (the first also scores the baselines), merged into one table
    sources = ["model"] if single else models
    baselines, baseline_note = demo_baselines()
    relationships, efaar_note = demo_relationships(screen)   # EFAAR files read once, for every model
    cp_table, cp_note, cp_seconds = None, None, 0.0
    if "cellprofiler" in baselines:
        stage = time.time()
        cp_table = cellprofiler.cellprofiler_table(screen.root, channels=screen.config.channels,
                                                   cells_per_site=args.cellprofiler_cells or None, seed=args.seed)
        cp_seconds = time.time() - stage
        cp_note = cellprofiler_note(cp_table, cp_seconds, args.cellprofiler_cells)
    stage = time.time()
    evaluations = [evaluate(runs[models[0]]["embeddings"].out, relationships, arms=screen.arms_csv,
                            baselines=baselines, images_root=screen.root, cellprofiler=cp_table,
                            gene_classes=screen.plan.gene_class, name=sources[0])]
    for preset, source in zip(models[1:], sources[1:]):
        evaluations.append(evaluate(runs[preset]["embeddings"].out, relationships, arms=screen.arms_csv,
                                    gene_classes=screen.plan.gene_class, name=source))
    choices = {preset: headline_blocks(e, source) for preset, source, e in zip(models, sources, evaluations)}
    rows = [name for c, source in zip(choices.values(), sources)
            for name in ([source] + ([c["row"]] if c and c["row"] != source else []))]
    evaluation = merge_evaluations(evaluations, rows + list(baselines))
    evaluation_seconds = time.time() - stage
    figures = write_outputs(evaluation, os.path.join(out, "evaluation"), heatmap_relationships="planted")
    recall = evaluation.recall_table()
    block_notes = [block_note(choice, recall) for choice in choices.values() if choice]
    table = markdown_table(evaluation) + "".join(f"\n{note}\n" for note in block_notes + ([cp_note] if cp_note else []))
    table_path = os.path.join(out, "recall.md")
    atomic_write(table_path, lambda tmp: write_text(tmp, table))
    wall = time.time() - t_start
    print(f"\nevaluated in {evaluation_seconds + cp_seconds:.0f} s: {', '.join(sources + list(baselines))} on the synthetic screen "
          f"({len(screen.genes)} genes); the planted complexes overall and per phenotype class"
          f"{'' if efaar_note else ', and EFAAR databases'}")
    for note in (baseline_note, efaar_note):
        if note:
            print(note)
    print()
    print(table)

    per_model = {}
    for preset, source in zip(models, sources):
        r = runs[preset]
        result = r["result"]
        per_model[preset] = {
            "preset": preset, "source": source, "steps": result.steps, "planned_steps": r["planned_steps"],
            "plan": r["plan"], "crops": result.crops, "block_choice": choices[preset],
            "train_seconds": round(result.seconds, 2),
            "crops_per_second": round(result.crops_per_second, 2),
            "loss_first": r["loss_first"], "loss_last": r["loss_last"], "losses": result.losses,
            "train_dir": result.out_dir, "embeddings": r["embeddings"].out,
        }
    summary = {**(per_model[models[0]] if single else {}), "models": per_model,
               "recall": evaluation.recall_table().to_dict(orient="index"),
               "table": _json_rows(evaluation.table()), "recall_table": table_path,
               "seconds": {"screen": round(screen_seconds, 1), "pack": round(pack_seconds, 1),
                           "evaluation": round(evaluation_seconds, 1), "cellprofiler": round(cp_seconds, 1),
                           **{f"train_{p}": round(runs[p]["result"].seconds, 1) for p in models},
                           **{f"embed_{p}": round(runs[p]["embed_seconds"], 1) for p in models}},
               "cellprofiler": None if cp_table is None else {
                   "cells_per_site": args.cellprofiler_cells or None,
                   "cells_per_well_median": cp_table.attrs["cells_per_well_median"],
                   "seconds_per_well": round(cp_seconds / max(len(cp_table), 1), 4), "note": cp_note},
               "screen": {"root": screen.root, "genes": len(screen.genes), "complexes": len(screen.complexes),
                          "complex_source": screen.source, "seconds": round(screen_seconds, 2)},
               "budget_seconds": seconds, "wall_seconds": round(wall, 1)}
    summary_path = atomic_write_json(os.path.join(out, "demo_summary.json"), summary)

    for preset in models:
        result = runs[preset]["result"]
        print(f"\n{preset}:" if not single else "")
        print(f"trained on:      {result.crops} crops ({result.steps} steps of {args.batch_size})")
        print(f"loss curve:      {result.loss_curve_path}")
        for path in result.recon_paths[-1:]:
            print(f"reconstruction:  {path}")
        print(f"embeddings:      {runs[preset]['embeddings'].out}")
    print()
    for key, path in figures.items():
        print(f"{key + ':':16} {path}")
    print(f"recall table:    {table_path}")
    print(f"summary:         {summary_path}")
    print(f"demo wall time:  {wall:.0f} s")
    return 0
