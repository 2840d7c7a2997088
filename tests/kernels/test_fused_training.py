"""A few training steps with the fused ops (C++ CPU path) and with the reference ops give the same losses.

Same seeds for initialisation, masking and stochastic depth in both runs; the only difference is the op
implementation (MAE_FAST_IMPL=reference for the reference run). Every fused op must actually have run."""
from __future__ import annotations

import pytest
import torch

from mae_fast import ops
from mae_fast.models import create_model
from mae_fast.optim import Lion, lion_param_groups

pytest.importorskip("mae_fast._C", reason="C++ extension not built (python setup.py build_ext --inplace)")

STEPS = 3


def _train(name, images, monkeypatch, impl_env):
    if impl_env is None:
        monkeypatch.delenv("MAE_FAST_IMPL", raising=False)
    else:
        monkeypatch.setenv("MAE_FAST_IMPL", impl_env)
    torch.manual_seed(0)
    model = create_model(name, img_size=32, in_chans=images.shape[2])
    opt = Lion(lion_param_groups(model, 0.05), lr=1e-3, weight_decay=0.05)
    losses, used = [], {}
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # stochastic depth draws
        out = model(images[step % len(images)], generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        for op in ("masked_patchify", "unshuffle", "masked_mae_loss", "lion_update"):
            used.setdefault(op, set()).add(ops.last_impl(op))
    return torch.tensor(losses, dtype=torch.float64), used


@pytest.mark.parametrize("name,channels", [("mae_vit_micro_patch8_256", 5), ("camae_vit_micro_patch8_256", 3)])
def test_fused_and_reference_training_give_the_same_losses(name, channels, monkeypatch):
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 65536, (2, 3, channels, 32, 32), generator=g, dtype=torch.int32).to(torch.uint16)
    ref_losses, ref_used = _train(name, images, monkeypatch, "reference")
    fused_losses, used = _train(name, images, monkeypatch, None)
    assert all(v == {"reference"} for v in ref_used.values())
    assert all(v == {"cpp"} for v in used.values()), used
    assert torch.isfinite(fused_losses).all()
    assert len(set(fused_losses.tolist())) == STEPS  # the model is learning something, not a constant
    torch.testing.assert_close(fused_losses, ref_losses, rtol=2e-5, atol=0)
