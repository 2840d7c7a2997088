"""`mae-fast demo` end to end on a tiny configuration: screen -> train -> embed -> evaluate."""
import itertools
import json
import os
import re

import pandas as pd
import pytest

from mae_fast.cli import main
from mae_fast.data.synthetic import PHENOTYPE_CLASSES
from mae_fast.evaluation import cellprofiler
from mae_fast.evaluation.databases import EFAAR_DATABASES, efaar_annotations_dir
from mae_fast.evaluation.table import EvaluationInputError

RECALL = r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]"                    # recall [95% bootstrap interval]
RANDOM_RECALL = r"\d\.\d{3} ± \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]"   # mean ± sd over seeds [interval]
MAP = r"\d\.\d{3} \(\d+%\)"                                        # mAP (fraction retrieved)


def efaar_installed() -> bool:
    try:
        return bool(efaar_annotations_dir())
    except EvaluationInputError:
        return False


def markdown_rows(lines: list[str], header_start: str) -> list[list[str]]:
    """The cells of the printed markdown table whose header starts with `header_start` (header row first)."""
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = itertools.takewhile(lambda line: line.startswith("|"), lines[first:])
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows if not row.startswith("|---")]


def expected_sources(models: list[str]) -> list[str]:
    return models + ["random", "pixel-stats"] + ([] if cellprofiler.missing_packages() else ["cellprofiler"])


def test_demo_runs_end_to_end_and_loss_goes_down(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--tiny", "--out", str(out), "--max-steps", "30", "--batch-size", "8", "--minutes", "600"])
    assert rc == 0
    printed = capsys.readouterr().out
    expected = {
        "loss curve": out / "train" / "loss_curve.png",
        "reconstruction": out / "train" / "recon" / "step_00000030.png",
        "embeddings": out / "embeddings.parquet",
        "curve": out / "evaluation" / "recall_curve.png",
        "heatmap": out / "evaluation" / "similarity_heatmap.png",
        "markdown": out / "evaluation" / "recall.md",
        "summary": out / "demo_summary.json",
    }
    for label, path in expected.items():
        assert os.path.getsize(path) > 100, label
        assert re.search(rf"{label}:\s+{re.escape(str(path))}", printed), label  # the demo says where it is
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["steps"] == 30 and len(summary["losses"]) == 30
    assert summary["planned_steps"] == 30 and summary["plan"] == {"source": "--max-steps"}  # no probe: as asked
    assert summary["crops"] == 30 * 8 and re.search(r"^trained on:\s+240 crops \(30 steps of 8\)$", printed, re.M)
    assert summary["loss_last"] < summary["loss_first"]
    # the models train from a raw pack of the screen (no PNG decoding per crop); embedding reads the screen itself
    run_config = json.loads((out / "train" / "train_config.json").read_text())
    assert run_config["data"]["root"] == str(out / "screen_pack") and (out / "screen_pack" / "pack.json").exists()
    assert summary["seconds"]["pack"] >= 0 and re.search(r"^packed the screen for training: ", printed, re.M)
    table = pd.read_parquet(out / "embeddings.parquet")
    depth = 4  # the micro ViT's blocks, each embedded (`block` column)
    assert len(table) == 2 * (5 * 3 + 2 + 3 + 1) * depth  # every well of the two plates, at every block
    assert sorted(table["block"].unique()) == [1, 2, 3, 4]
    choice = summary["block_choice"]   # headlined by activity mAP, printed beside the last block
    assert choice["last_block"] == depth and choice["last_row"] == "model" and "activity mAP" in choice["criterion"]
    assert re.search(rf"^model: headline block {choice['block']} of 4 by .*; planted recall \d\.\d{{3}} \(last "
                     r"block \d\.\d{3}\)$", printed, re.M), printed
    sources = expected_sources(["model"] + ([choice["row"]] if choice["block"] != depth else []))
    assert set(summary["recall"]) == set(sources)
    lines = printed.splitlines()
    databases = ["planted"] + (list(EFAAR_DATABASES) if efaar_installed() else [])
    recall = markdown_rows(lines, "| source | planted")     # overall recall: sources x databases
    assert [row[0] for row in recall] == ["source"] + sources
    assert [re.sub(r" \(n=\d+\)$", "", h) for h in recall[0][1:]] == databases, recall[0]
    assert all(re.fullmatch(r"\S+ \(n=[1-9]\d*\)", h) for h in recall[0][1:]), recall[0]  # every database's pairs
    for row in recall[1:]:
        assert all(re.fullmatch(RANDOM_RECALL if row[0] == "random" else RECALL, c) for c in row[1:]), row
    mean_ap = markdown_rows(lines, "| source | activity")   # JUMP's mAP: activity, consistency per database
    assert mean_ap[0][1:] == ["activity"] + [f"consistency {db}" for db in databases]
    assert [row[0] for row in mean_ap[1:]] == sources
    assert all(re.fullmatch(MAP, c) for row in mean_ap[1:] for c in row[1:]), mean_ap
    per_class = markdown_rows(lines, "| source | database |")   # recall per phenotype class, every database
    assert set(PHENOTYPE_CLASSES) <= set(per_class[0][2:]), per_class[0]
    assert [(row[0], row[1]) for row in per_class[1:]] == [(s, db) for s in sources for db in databases]
    for row in per_class[1:]:
        planted = dict(zip(per_class[0][2:], row[2:]))
        if row[1] == "planted":   # every class has one planted complex of 3 genes: 3 pairs each
            pattern = (RANDOM_RECALL if row[0] == "random" else RECALL) + r" \(n=3\)"
            assert all(re.fullmatch(pattern, planted[c]) for c in PHENOTYPE_CLASSES), row
    rows = summary["table"]                                 # the table's numbers, one row per source/database/class
    assert {(r["source"], r["database"]) for r in rows} == {(s, db) for s in sources for db in databases}
    for r in rows:
        if r["n_pairs"]:
            assert r["recall_low"] <= r["recall"] <= r["recall_high"], r
    overall = [r for r in rows if r["phenotype_class"] == "all"]
    assert all(r["activity_map"] is not None and r["consistency_map"] is not None for r in overall)
    assert {r["phenotype_class"] for r in rows} >= {"all", *PHENOTYPE_CLASSES}
    assert next(r for r in overall if r["source"] == "random")["seeds"] > 1
    assert summary["screen"]["genes"] == 17 and summary["wall_seconds"] > 0
    assert set(summary["seconds"]) >= {"screen", "train_mae_vit_micro_patch16_256",
                                       "embed_mae_vit_micro_patch16_256", "cellprofiler", "evaluation"}
    if "cellprofiler" in sources:   # the line under the table says how the row was measured (8 cells per site)
        note = re.search(r"^cellprofiler: at most 8 segmented cells of each site, drawn by seed \(median (\d+) cells "
                         r"per well measured\); 42 wells in \d+ s, \d+ ms per well$", printed, re.MULTILINE)
        assert note and 1 <= int(note.group(1)) <= 8, printed
        assert note.group(0) in (out / "recall.md").read_text()
        assert summary["cellprofiler"]["cells_per_site"] == 8 and summary["cellprofiler"]["seconds_per_well"] > 0


def test_demo_compares_models_side_by_side(tmp_path, capsys):
    out = tmp_path / "demo"
    models = ["mae_vit_micro_patch16_256", "wsl_densenet_micro_256", "munet_micro_256"]
    rc = main(["demo", "--tiny", "--out", str(out), "--models", ",".join(models), "--max-steps", "2",
               "--batch-size", "4", "--seconds", "36000"])
    assert rc == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    summary = json.loads((out / "demo_summary.json").read_text())
    chosen = summary["models"][models[0]]["block_choice"]   # the MAE's headline block beside its last
    sources = expected_sources(models[:1] + ([chosen["row"]] if chosen["block"] != chosen["last_block"] else [])
                               + models[1:])
    assert all(summary["models"][m]["block_choice"] is None for m in models[1:])  # CNNs: no blocks
    recall = markdown_rows(lines, "| source | planted")
    assert [row[0] for row in recall] == ["source"] + sources   # one table, every model side by side
    assert all(re.fullmatch(RANDOM_RECALL if row[0] == "random" else RECALL, row[1]) for row in recall[1:]), recall
    mean_ap = markdown_rows(lines, "| source | activity")
    assert [row[0] for row in mean_ap[1:]] == sources and all(re.fullmatch(MAP, row[1]) for row in mean_ap[1:])
    for name in models:  # each model's own run and table under OUT/<model>/
        table = pd.read_parquet(out / name / "embeddings.parquet")
        assert len(table) == 42 * (4 if name == models[0] else 1) and re.search(rf"embeddings:\s+{re.escape(str(out / name / 'embeddings.parquet'))}",
                                              printed)
        assert os.path.getsize(out / name / "train" / "loss_curve.png") > 100
    assert (out / "munet_micro_256" / "train" / "recon" / "step_00000002.png").exists()
    assert not (out / "wsl_densenet_micro_256" / "train" / "recon").exists()  # a classifier does not reconstruct
    combined = (out / "recall.md").read_text()
    assert all(f"| {name} |" in combined for name in sources)
    assert re.search(rf"recall table:\s+{re.escape(str(out / 'recall.md'))}", printed)
    assert list(summary["models"]) == models and set(summary["recall"]) == set(sources)
    assert summary["models"]["wsl_densenet_micro_256"]["steps"] == 2


def test_demo_refuses_unknown_models(tmp_path, capsys):
    rc = main(["demo", "--tiny", "--out", str(tmp_path / "d"), "--models", "mae_vit_micro_patch16_256,resnet50"])
    assert rc == 2 and "unknown model preset(s) resnet50" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_checks_every_option_before_generating_anything(tmp_path, capsys):
    # bounds on single numbers are argparse's (usage + one line, exit 2); the rest the demo's own check (one line)
    for argv, message in ((["--minutes", "0"], "argument --minutes: must be > 0"),
                          (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
                          (["--max-steps", "-3"], "argument --max-steps: must be >= 1"),
                          (["--lr", "-1"], "argument --lr: must be > 0"),
                          (["--cellprofiler-cells", "-1"], "argument --cellprofiler-cells: must be >= 0")):
        with pytest.raises(SystemExit) as exited:
            main(["demo", "--tiny", "--out", str(tmp_path / "d")] + argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err, argv
        assert not (tmp_path / "d").exists()
    rc = main(["demo", "--tiny", "--out", str(tmp_path / "d"), "--device", "tpu"])
    assert rc == 2 and "--device must be auto, cpu or cuda" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_says_which_optional_parts_it_leaves_out(monkeypatch, tmp_path):
    """Without cp-measure the CellProfiler-style baseline is left out with a line naming the package; without
    efaar-benchmarking the table keeps the planted complexes and says why EFAAR's databases are missing."""
    from types import SimpleNamespace

    from mae_fast.cli import demo
    from mae_fast.evaluation import databases

    real_find_spec = cellprofiler.importlib.util.find_spec
    monkeypatch.setattr(cellprofiler.importlib.util, "find_spec",
                        lambda name, *a: None if name == "cp_measure" else real_find_spec(name, *a))
    assert cellprofiler.missing_packages() == ["cp-measure"]
    baselines, note = demo.demo_baselines()
    assert baselines == ("random", "pixel-stats") and "needs cp-measure (pip install cp-measure)" in note
    monkeypatch.setattr(databases.importlib.util, "find_spec", lambda name, *a: None)
    screen = SimpleNamespace(relationships_csv=str(tmp_path / "planted.csv"))
    relationships, note = demo.demo_relationships(screen)
    assert relationships == {"planted": screen.relationships_csv}
    assert note.startswith("EFAAR databases left out:") and "pip install --no-deps efaar-benchmarking" in note


def test_demo_plans_its_schedule_from_a_probe_run(tmp_path):
    """Without --max-steps a short probe run of the same training measures the step time and the schedule fills
    what is left of the budget at that speed (the probe folder is removed); with --max-steps nothing is probed."""
    import argparse

    from mae_fast.cli import demo, demo_plan
    from mae_fast.data.synthetic import make_synthetic_screen

    screen = make_synthetic_screen(str(tmp_path / "screen"), demo.screen_config(True, 0))
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--batch-size", "2", "--seconds", "60", "--amp", "fp32"])
    steps, plan = demo.planned_steps(demo.check_models([args.preset])[0], screen.root, str(tmp_path), args, 60.0)
    assert plan["source"] == "probe" and plan["probe_steps"] == demo_plan.PROBE_STEPS
    assert plan["budget_left_seconds"] == pytest.approx(60.0 - plan["probe_seconds"])
    assert steps == demo_plan.plan_steps(plan["budget_left_seconds"], [plan["step_seconds"]])
    assert steps >= demo_plan.MIN_STEPS and not (tmp_path / "probe").exists()
    fixed = parser.parse_args(["--tiny", "--max-steps", "7"])
    assert demo.planned_steps(fixed.preset, screen.root, str(tmp_path), fixed, 60.0) == (7, {"source": "--max-steps"})
    assert not (tmp_path / "probe").exists()
