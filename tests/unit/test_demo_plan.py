"""The demo's schedule planning: steps that fill the time budget at the step time a probe run measured."""
import json

import pytest

from mae_fast.cli.demo_plan import MIN_STEPS, PLAN_MARGIN, plan_steps, probe_step_seconds


def test_plan_fills_the_budget_at_the_median_step_time():
    assert plan_steps(120.0, [0.2, 0.25, 0.3]) == int(PLAN_MARGIN * 120.0 / 0.25)   # 480
    assert plan_steps(120.0, [0.25, 0.25, 9.0]) == plan_steps(120.0, [0.25])          # one stall does not count
    assert plan_steps(600.0, [0.25]) == 5 * plan_steps(120.0, [0.25])                  # linear in the budget
    assert plan_steps(100.0, [0.1], margin=1.0) == 1000


def test_plan_has_a_floor_and_refuses_bad_times():
    assert plan_steps(1.0, [10.0]) == MIN_STEPS          # a slow machine still gets a schedule to anneal
    assert plan_steps(-5.0, [0.1]) == MIN_STEPS          # the probe ate the budget
    assert plan_steps(10.0, [1.0], minimum=3, margin=0.9) == 9
    for times in ([], [0.0, 0.1], [-1.0]):
        with pytest.raises(ValueError, match="positive step times"):
            plan_steps(10.0, times)


def test_probe_step_seconds_leaves_out_the_warm_up_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    stamps = [100.0, 103.0, 103.5, 104.25, 104.75]   # step 1 ends at 100 s (its warm-up is not in the diffs)
    lines = [{"event": "start", "time": 90.0}] + [{"step": i + 1, "loss": 1.0, "time": t} for i, t in enumerate(stamps)]
    lines.append({"event": "finished", "step": 5, "time": 106.0})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert probe_step_seconds(str(path)) == [3.0, 0.5, 0.75, 0.5]
