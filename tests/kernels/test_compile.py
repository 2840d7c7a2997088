"""The fused ops under torch.compile: no graph breaks, each fused op one opaque node, compiled == eager.

The micro MAE and CA-MAE train steps (forward, masked loss, backward) with the C++ CPU backends (and the micro MAE
with the Triton kernels in the interpreter) are compiled with an aot_autograd backend that records the forward and
backward graphs; Dynamo's counters must show one graph and no break, the graphs must hold the fused torch ops
(mae_fast::masked_patchify, unshuffle + its backward, masked_mae_loss), and loss and every parameter gradient must
equal the eager step's (float32). `torch.library.opcheck` checks schema, fake implementation, autograd
registration and AOT tracing with dynamic shapes of every registered op: the C++ primitive ops, and the fused ops
with each kernel (the reference, the C++ kernels, the Triton kernels in Triton's CPU interpreter: TRITON_INTERPRET=1,
set by the repo conftest without CUDA), on small fresh random inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func
from torch.library import opcheck

from mae_fast import ops
from mae_fast.ops import implementation
from mae_fast.models import create_model
from mae_fast.optim import Lion
from tests.helpers import ROOT

pytest.importorskip("mae_fast._C", reason="C++ extension not built (python setup.py build_ext --inplace)")

IMG = 64
PRESETS = ["mae_vit_micro_patch16_256", "camae_vit_micro_patch16_256"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """Default dispatch (C++ on CPU), Dynamo's caches and counters cleared around each test, and the dispatcher's
    record of the last backend per op as a fresh process has it (no call yet), whatever ran before."""
    monkeypatch.delenv("MAE_FAST_IMPL", raising=False)
    monkeypatch.setattr(implementation, "_last_impl", dict.fromkeys(implementation._last_impl))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class GraphRecorder:
    """An aot_autograd backend (eager execution, like "aot_eager") that keeps the forward and backward graphs."""

    def __init__(self):
        self.graphs: dict[str, list[torch.fx.GraphModule]] = {"forward": [], "backward": []}
        self.backend = aot_autograd(fw_compiler=self._keep("forward"), bw_compiler=self._keep("backward"))

    def _keep(self, kind):
        def compiler(gm, example_inputs):
            self.graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def op_names(self, kind: str) -> set[str]:
        return {str(n.target) for gm in self.graphs[kind] for n in gm.graph.nodes if n.op == "call_function"}


def _dynamo_summary() -> tuple[int, int, list[str]]:
    breaks = counters["graph_break"]
    return int(counters["stats"].get("unique_graphs", 0)), int(sum(breaks.values())), [k[:300] for k in breaks]


def test_dynamo_counters_see_a_planted_graph_break():
    """The no-break assertions below rely on Dynamo's counters: they must see a break that is certainly there (a
    torch version that stopped counting would otherwise pass every test), and the backend must see both graphs."""
    recorder = GraphRecorder()

    def broken(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    torch.compile(broken, backend=recorder.backend)(torch.randn(4, requires_grad=True)).sum().backward()
    graphs, breaks, reasons = _dynamo_summary()
    assert graphs == 2 and breaks >= 1, (graphs, breaks, reasons)
    assert len(recorder.graphs["forward"]) == 2


def _model_and_images(name, img_size=IMG):
    torch.manual_seed(0)
    model = create_model(name, img_size=img_size).train()
    images = torch.randint(0, 65536, (2, model.cfg.in_chans, img_size, img_size), generator=_gen(1),
                           dtype=torch.int32).to(torch.uint16)
    return model, images


def _step(model, loss_fn, images, seed):
    """Loss and parameter gradients of one train step; the seed fixes masking and stochastic depth draws."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(images)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _use_backend(backend, monkeypatch):
    """"cpp": the default dispatch on CPU tensors; "triton": the interpreted Triton kernels (forced by name)."""
    if backend == "triton":
        from mae_fast.kernels._common import interpreting

        if "triton" not in ops.available_impls("unshuffle") or not interpreting():
            pytest.skip("Triton backends need TRITON_INTERPRET=1 on a CPU (tests/gpu covers CUDA)")
        monkeypatch.setenv("MAE_FAST_IMPL", "triton")


# (preset, backend, image size): the Triton case runs 32^2 crops, the interpreter takes ~1 s per million elements
TRAIN_CASES = [(PRESETS[0], "cpp", IMG), (PRESETS[1], "cpp", IMG), (PRESETS[0], "triton", 32)]


@pytest.mark.parametrize("name,backend,img_size", TRAIN_CASES)
def test_compiled_train_step_has_no_graph_breaks_and_matches_eager(name, backend, img_size, monkeypatch):
    _use_backend(backend, monkeypatch)
    model, images = _model_and_images(name, img_size)
    eager_loss, eager_grads = _step(model, lambda x: model(x).loss, images, seed=5)
    assert {ops.last_impl(op) for op in ("masked_patchify", "unshuffle", "masked_mae_loss")} == {backend}

    torch._dynamo.reset()
    counters.clear()
    recorder = GraphRecorder()
    compiled = torch.compile(lambda x: model(x).loss, backend=recorder.backend, dynamic=False)
    loss, grads = _step(model, compiled, images, seed=5)

    graphs, breaks, reasons = _dynamo_summary()
    assert (graphs, breaks) == (1, 0), f"{graphs} graphs, {breaks} graph breaks: {reasons}"
    assert len(recorder.graphs["forward"]) == 1  # seen by the backend too, whatever Dynamo's counters count
    forward, backward = recorder.op_names("forward"), recorder.op_names("backward")
    for op in ("masked_patchify", "unshuffle", "masked_mae_loss"):  # one op each, whichever kernel computes it
        assert f"mae_fast.{op}.default" in forward, sorted(forward)
    assert "mae_fast.unshuffle_backward.default" in backward, sorted(backward)

    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    assert grads.keys() == eager_grads.keys() and len(grads) > 10
    for key, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


FIRST_CALL_COMPILED = """
import json, torch
from torch._dynamo.utils import counters
from mae_fast.models import create_model
model = create_model("mae_vit_micro_patch16_256", img_size=64).train()
images = torch.randint(0, 256, (2, model.cfg.in_chans, 64, 64), dtype=torch.uint8)
torch.compile(lambda x: model(x).loss, backend="eager", dynamic=False)(images)
print(json.dumps({"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
                  "reasons": [k[:300] for k in counters["graph_break"]]}))
"""


def test_first_call_of_the_process_compiles_without_breaks():
    """A fresh process whose first call of the fused ops is traced: no registration or first-call work may break the
    graph."""
    root = ROOT
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MAE_FAST_IMPL", None)
    run = subprocess.run([sys.executable, "-c", FIRST_CALL_COMPILED], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["graphs"], result["breaks"]) == (1, 0), result["reasons"]


def test_compiled_second_step_reuses_the_graph():
    """A new batch and new masking draw run the same compiled code (no recompilation, no guard on data)."""
    model, images = _model_and_images(PRESETS[0], img_size=32)
    compiled = torch.compile(lambda x: model(x).loss, backend="aot_eager", dynamic=False)
    first, _ = _step(model, compiled, images, seed=1)
    second, _ = _step(model, compiled, images.flip(0).contiguous(), seed=2)
    assert first != second
    graphs, breaks, reasons = _dynamo_summary()
    assert (graphs, breaks) == (1, 0), reasons


def test_masking_validation_is_skipped_only_under_compile():
    """A hand-made masking is validated in eager; under compile the data-dependent check is left out (no break)."""
    images = torch.randint(0, 256, (2, 3, 16, 16), generator=_gen(2), dtype=torch.uint8)
    masking = ops.random_masking(2, 4, 0.5, generator=_gen(3))
    broken = ops.Masking(masking.ids_shuffle, masking.ids_restore.flip(1), masking.mask, masking.len_keep)
    with pytest.raises(ValueError, match="inverse permutation"):
        ops.masked_patchify(images, 8, 0.5, masking=broken)

    def visible(x, ids_shuffle, ids_restore):
        m = ops.Masking(ids_shuffle, ids_restore, masking.mask, masking.len_keep)
        return ops.masked_patchify(x, 8, 0.5, masking=m).visible

    compiled = torch.compile(visible, backend="aot_eager", dynamic=False)
    got = compiled(images, masking.ids_shuffle, masking.ids_restore)
    torch.testing.assert_close(got, ops.masked_patchify(images, 8, 0.5, masking=masking, impl="reference").visible)
    assert _dynamo_summary()[:2] == (1, 0)


def test_float_images_compile_without_breaks():
    """Float pixels are range-checked in eager calls only (the check reads min and max back to the host)."""
    model, _ = _model_and_images(PRESETS[0], img_size=32)
    images = torch.rand(2, model.cfg.in_chans, 32, 32, generator=_gen(6))
    with pytest.raises(ValueError, match="scaled to"):
        model(images * 2)
    compiled = torch.compile(lambda x: model(x).loss, backend="eager", dynamic=False)
    assert torch.isfinite(compiled(images))
    assert _dynamo_summary()[:2] == (1, 0), _dynamo_summary()[2]


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_compiled_lion_step_matches_reference_bitwise(impl):
    if impl not in ops.available_impls("lion_update"):
        pytest.skip(f"no {impl} backend here")
    g = _gen(4)
    params = [torch.randn(17, generator=g, requires_grad=True), torch.randn(5, 3, generator=g, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    for p, r in zip(params, ref):
        p.grad = torch.randn(p.shape, generator=g)
        r.grad = p.grad.clone()
    opt = Lion(params, lr=1e-2, weight_decay=0.1, impl=impl)
    opt_ref = Lion(ref, lr=1e-2, weight_decay=0.1, impl="reference")
    step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(2):
        step()
        assert ops.last_impl("lion_update") == impl
        opt_ref.step()
    assert _dynamo_summary()[1] == 0
    for p, r in zip(params, ref):
        assert torch.equal(p, r)


# --------------------------------------------------------------------------------------------------------------
# opcheck of every registered op
# --------------------------------------------------------------------------------------------------------------

B, C, H, P = 2, 3, 16, 8         # images (B, C, H, H), patch P: L = 4 tokens
K, L_DEC, D = 3, 7, 12           # unshuffle: K visible of L_DEC tokens, width D
N_LOSS = 5                       # loss tokens


def _images():
    return torch.randint(0, 256, (B, C, H, H), generator=_gen(10), dtype=torch.uint8)


def _patchify_args(channel_layout: bool):
    images = _images()
    L = (H // P) ** 2 * (C if channel_layout else 1)
    masking = ops.random_masking(B, L, 0.5, generator=_gen(11))
    return images, masking.ids_restore, masking.len_keep


def _unshuffle_args(requires_grad=True, prefix=0, x_dtype=torch.float32):
    """x (B, prefix + K, D) of x_dtype, float32 mask token and pos (prefix + L_DEC, D), ids (B, L_DEC)."""
    g = _gen(12)
    x = torch.randn(B, 1 + prefix + K, D, generator=g).to(x_dtype)[:, 1:]  # a strided view, as CA-MAE passes it
    token = torch.randn(D, generator=g)
    pos = torch.randn(prefix + L_DEC, D, generator=g)
    ids = torch.argsort(torch.rand(B, L_DEC, generator=g), dim=1)
    if requires_grad:
        x, token, pos = (t.detach().clone().requires_grad_() for t in (x, token, pos))
    return x, token, ids, pos


def _loss_args(layout):
    g = _gen(13)
    width = P * P * (C if layout == "standard" else 1)
    pred = torch.randn(B, N_LOSS, width, generator=g, requires_grad=True)
    target = torch.randn(B, N_LOSS, width, generator=g)
    mask = (torch.rand(B, N_LOSS, generator=g) < 0.6).float()
    return pred, target, mask


def _lion_args():
    g = _gen(14)
    params = [torch.randn(5, generator=g), torch.randn(3, 4, generator=g)]
    return (params, [torch.randn(p.shape, generator=g) for p in params],
            [torch.randn(p.shape, generator=g) for p in params], 1e-2, 0.999, 0.9, 0.1, 0.95, 0.05)


def _op_lion_args():
    params, grads, moms, lr, _, beta1, _, beta2, _ = _lion_args()
    return (params, grads, moms, lr, beta1, beta2, 0.1)


def _cases() -> list[tuple[str, tuple]]:
    """(op name, args) of the fused ops (`_opcheck_all` runs them under the kernel it checks)."""
    cases = []
    for channel in (False, True):
        images, ids, len_keep = _patchify_args(channel)
        mean, rstd = torch.rand(B, C, generator=_gen(15)), torch.rand(B, C, generator=_gen(16)) + 0.5
        cases.append(("masked_patchify", (images, ids, len_keep, P, channel, None, None, torch.float32)))
        cases.append(("masked_patchify", (images, ids, len_keep, P, channel, mean, rstd, torch.bfloat16)))
    x, token, ids, pos = _unshuffle_args()
    cases.append(("unshuffle", (x, token, ids, pos, 0, None)))
    cases.append(("unshuffle", (x, token, ids, None, 0, None)))
    cases.append(("unshuffle", (x, token, ids, pos, 0, torch.bfloat16)))
    # the decoder's call under autocast: bf16 tokens with the class token in place, float32 out
    x, token, ids, pos = _unshuffle_args(prefix=1, x_dtype=torch.bfloat16)
    cases.append(("unshuffle", (x, token, ids, pos, 1, None)))
    cases.append(("unshuffle_backward", (torch.randn(B, L_DEC, D, generator=_gen(17)), ids, K, 0, None)))
    cases.append(("unshuffle_backward", (torch.randn(B, 1 + L_DEC, D, generator=_gen(17)), ids, K, 1,
                                         torch.bfloat16)))
    for layout in ops.LAYOUTS:
        pred, target, mask = _loss_args(layout)
        cases.append(("mae_loss", (pred, target, mask, P, 0.3)))
        cases.append(("mae_loss", (pred, target, None, P, 0.01)))
        full, masking = _full_prediction_args(layout)  # the loss on the full prediction, and its backward
        cases.append(("masked_mae_loss", (full, target, masking.ids_masked.contiguous(), masking.ids_restore, P, 0.3)))
        cases.append(("masked_mae_loss_backward", (target, torch.tensor(1.5), masking.ids_restore)))
    cases.append(("lion_update", _op_lion_args()))
    return cases


def _full_prediction_args(layout):
    """A full prediction (B, L, P) whose masked tokens number N_LOSS, and its masking."""
    g = _gen(19)
    L = 4 * N_LOSS
    masking = ops.random_masking(B, L, 0.25, generator=g)
    assert L - masking.len_keep == N_LOSS
    width = P * P * (C if layout == "standard" else 1)
    return torch.randn(B, L, width, generator=g, requires_grad=True), masking


def _cpp_kernel_cases() -> list[tuple[str, tuple]]:
    """(op name, args) of the C++ ops of csrc/module.cpp."""
    images, ids, len_keep = _patchify_args(False)
    mean, rstd = torch.ops.mae_fast.channel_stats(images, 255.0, ops.STANDARDIZE_EPS)
    visible, target = torch.empty(B, len_keep, P * P * C), torch.empty(B, ids.shape[1] - len_keep, P * P * C)
    x, token, u_ids, pos = _unshuffle_args(requires_grad=False)
    xp, _, _, pos_p = _unshuffle_args(requires_grad=False, prefix=1, x_dtype=torch.bfloat16)
    pred, loss_target, mask = _loss_args("standard")
    weight, _ = ops.token_weights(mask, B, N_LOSS)
    return [
        ("channel_stats", (images, 255.0, ops.STANDARDIZE_EPS)),
        ("masked_patchify_out", (images, mean, rstd, ids, len_keep, P, False, 255.0, visible, target)),
        ("unshuffle_out", (x, token, u_ids, pos, 0, torch.empty(B, L_DEC, D))),
        ("unshuffle_out", (x, token, u_ids, None, 0, torch.empty(B, L_DEC, D))),
        ("unshuffle_out", (xp, token, u_ids, pos_p, 1, torch.empty(B, 1 + L_DEC, D))),  # bf16 in, float32 out
        ("unshuffle_backward_out", (torch.randn(B, L_DEC, D, generator=_gen(18)), u_ids, 0, torch.empty(B, K, D))),
        ("unshuffle_backward_out", (torch.randn(B, 1 + L_DEC, D, generator=_gen(18)), u_ids, 1,
                                    torch.empty(B, 1 + K, D, dtype=torch.bfloat16))),
        ("mae_loss_out", (pred.detach(), loss_target, weight, 0.0, P, C, 0.3, torch.empty_like(pred))),
        ("mae_loss_out", (pred.detach(), loss_target, None, 1.0 / (B * N_LOSS), P, C, 0.01, torch.empty_like(pred))),
        ("lion_update_", _lion_args()),
    ]


def _opcheck_all(cases, kernel: str = "auto"):
    """opcheck of each case with `kernel` computing the fused ops (`ops.use_impl`)."""
    failures = []
    for name, args in cases:
        try:
            with ops.use_impl(kernel):
                opcheck(getattr(torch.ops.mae_fast, name).default, args)
        except Exception as err:  # noqa: BLE001 - collect every failing op, then report them together
            failures.append(f"{name}: {str(err)[:400]}")
    assert not failures, "\n".join(failures)


def test_opcheck_cpp_kernel_ops():
    _opcheck_all(_cpp_kernel_cases())


def test_opcheck_fused_ops_with_the_reference_kernel():
    _opcheck_all(_cases(), "reference")


def test_opcheck_fused_ops_with_the_cpp_kernels():
    _opcheck_all(_cases(), "cpp")


def test_opcheck_triton_ops_in_the_interpreter():
    """opcheck works with the interpreted kernels (CPU tensors); on a CUDA machine the GPU suite covers them."""
    pytest.importorskip("triton")
    from mae_fast.kernels._common import interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (CPU tensors); CUDA runs are covered by tests/gpu")
    if "triton" not in ops.available_impls("unshuffle"):
        pytest.skip("Triton kernels not registered")
    _opcheck_all(_cases(), "triton")


def test_every_fused_torch_op_is_checked():
    """A new op registered under mae_fast:: must be added to the opcheck cases above."""
    checked = {name for name, _ in _cpp_kernel_cases() + _cases()}
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("mae_fast::")}
    assert registered == checked, f"unchecked: {registered - checked}, stale: {checked - registered}"


def test_mae_loss_refuses_a_gradient_of_its_gradient():
    """The fused loss has no second derivative: differentiating its gradient raises instead of dropping the
    Hessian term silently (retain_graph is covered in test_mae_loss)."""
    pred, target, _ = _loss_args("channel")
    loss = ops.mae_loss(pred, target, patch_size=P, layout="channel", impl="cpp")
    scale = torch.tensor(2.0, requires_grad=True)
    (grad,) = torch.autograd.grad(loss, pred, grad_outputs=scale, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
