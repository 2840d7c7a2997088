"""`mae-fast ARGS` as torchrun's script, with test probes switched on by environment variables (for
tests/integration/test_recipes.py; nothing here is part of mae_fast):

    MAE_FAST_TEST_KILL_AFTER_CHECKPOINT=N  every rank SIGKILLs itself as soon as checkpoint N is published (a crash
                                           mid-run at a known point; --resume must continue exactly)
    MAE_FAST_TEST_DIE_AT_STEP=N:R          rank R SIGKILLs itself before optimiser step N (the others must stop too)
    MAE_FAST_TEST_SITE_TRACE=DIR           each rank appends "epoch<TAB>site" for every training site it decodes to
                                           DIR/rank<R>.txt
"""
from __future__ import annotations

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _install_probes() -> None:
    rank = int(os.environ.get("RANK", "0"))
    kill_after = os.environ.get("MAE_FAST_TEST_KILL_AFTER_CHECKPOINT")
    if kill_after:
        from mae_fast.training.checkpointer import Checkpointer

        save = Checkpointer.save

        def save_then_die(self, step, *args, **kwargs):
            result = save(self, step, *args, **kwargs)  # returns after every rank passed the publishing barrier
            if step == int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        Checkpointer.save = save_then_die
    die_at = os.environ.get("MAE_FAST_TEST_DIE_AT_STEP")
    if die_at:
        step_number, dying_rank = (int(x) for x in die_at.split(":"))
        from mae_fast.training.step import TrainStep

        call = TrainStep.__call__

        def call_or_die(self, step, *args, **kwargs):
            if rank == dying_rank and step + 1 == step_number:
                os.kill(os.getpid(), signal.SIGKILL)
            return call(self, step, *args, **kwargs)

        TrainStep.__call__ = call_or_die
    trace = os.environ.get("MAE_FAST_TEST_SITE_TRACE")
    if trace:
        from mae_fast.data import crops

        site_crops = crops.site_crops

        def traced(index, plan, window, member, *args, **kwargs):
            out = site_crops(index, plan, window, member, *args, **kwargs)
            center = args[-1] if args else kwargs.get("center", False)
            if not center:  # training crops (the validation batch takes centre crops)
                site = index[int(window.members[member])]
                with open(os.path.join(trace, f"rank{rank}.txt"), "a") as f:
                    f.write(f"{plan.epoch}\t{site.plate}/{site.address}/s{site.site}\n")
            return out

        crops.site_crops = traced


if __name__ == "__main__":
    _install_probes()
    from mae_fast.cli import main

    sys.exit(main(sys.argv[1:]))
