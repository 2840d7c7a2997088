"""Performance: what the benchmarks measure with, and the FLOP counts they turn into MFU.

    flops.py       exact FLOPs per crop (forward, inference, training) and the paper's method; GPU-hours
    peer.py        the peer stack: what a user would write from public code (timm ViT, FAIR-MAE masking, torch.fft
                   loss, timm's Lion), timed beside mae_fast's stacks
    stacks.py      the stacks (reference / fused / peer, eager or compiled) and the runners of one step
    harness.py     interleaved rounds, warm-up, batch sizes from memory, largest-batch search, time budgets, ratios
    timing.py      timing on a device, the measured matmul ceiling, summaries
    provenance.py  device, versions, commit, date, command; results files
    faults.py      injected faults for the GPU script's dry run (MAE_FAST_GPU_FAULT): a raise, a deadline or a SIGTERM
                   at a named stack, op or preset

`mae-fast bench` (mae_fast/cli/bench.py) and the pytest-benchmark suites and GPU script in benchmarks/ use these.
"""
