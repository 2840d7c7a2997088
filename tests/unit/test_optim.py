"""Lion: against a hand-written scalar loop, decoupled weight decay, foreach == single tensor, state_dict resume."""
import copy
import math

import pytest
import torch

from mae_fast.optim import Lion, lion_param_groups, one_cycle_cosine


def _scalar_lion(p, grads, lr, b1, b2, wd):
    """Plain Python floats, one element at a time."""
    p, m = list(p), [0.0] * len(p)
    for g in grads:
        for i in range(len(p)):
            c = b1 * m[i] + (1 - b1) * g[i]
            sign = (c > 0) - (c < 0)
            p[i] = p[i] * (1 - lr * wd) - lr * sign
            m[i] = b2 * m[i] + (1 - b2) * g[i]
    return p


@pytest.mark.parametrize("impl", ["reference", "foreach", "auto"])
def test_lion_matches_scalar_loop(impl):
    torch.manual_seed(0)
    p0 = torch.randn(37)
    grads = [torch.randn(37) for _ in range(5)]
    param = torch.nn.Parameter(p0.clone())
    opt = Lion([param], lr=0.01, betas=(0.9, 0.95), weight_decay=0.05, impl=impl)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = _scalar_lion(p0.tolist(), [g.tolist() for g in grads], 0.01, 0.9, 0.95, 0.05)
    assert param.detach().tolist() == pytest.approx(expected, abs=1e-6)  # float32 arithmetic


def test_sign_zero_leaves_only_weight_decay():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([param], lr=0.1, weight_decay=0.5)
    param.grad = torch.zeros(3)
    opt.step()  # momentum 0 and gradient 0: sign(0) = 0, only the decoupled decay acts
    assert torch.allclose(param.detach(), torch.tensor([1.0, -2.0, 3.0]) * (1 - 0.1 * 0.5))


def test_weight_decay_is_decoupled_from_the_gradient():
    # with a huge gradient the step size is still exactly lr (sign), and decay is p*lr*wd, independent of g
    for scale in (1e-3, 1e3):
        param = torch.nn.Parameter(torch.tensor([2.0]))
        opt = Lion([param], lr=0.01, weight_decay=0.1)
        param.grad = torch.tensor([scale])
        opt.step()
        assert param.item() == pytest.approx(2.0 * (1 - 0.001) - 0.01, abs=1e-7)


def test_foreach_and_reference_agree_exactly_on_a_model():
    from mae_fast.models import create_model

    torch.manual_seed(0)
    base = create_model("mae_vit_micro_patch16_256", img_size=64)
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [Lion(lion_param_groups(m, 0.05), lr=1e-3, impl=i) for m, i in zip(models, ("reference", "foreach"))]
    x = torch.randint(0, 256, (2, 6, 64, 64), dtype=torch.uint8)
    for step in range(3):
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x, generator=torch.Generator().manual_seed(step)).loss.backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_param_groups_and_state_dict_round_trip_resume_identically():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(3))
    opt = Lion([{"params": [w], "weight_decay": 0.05}, {"params": [b], "weight_decay": 0.0}], lr=1e-2)
    grads = [(torch.randn(4, 3), torch.randn(3)) for _ in range(6)]

    def step(o, params, g):
        for p, gg in zip(params, g):
            p.grad = gg.clone()
        o.step()

    for g in grads[:3]:
        step(opt, (w, b), g)
    saved_params = (w.detach().clone(), b.detach().clone())
    saved_state = copy.deepcopy(opt.state_dict())
    for g in grads[3:]:
        step(opt, (w, b), g)

    w2, b2 = torch.nn.Parameter(saved_params[0].clone()), torch.nn.Parameter(saved_params[1].clone())
    opt2 = Lion([{"params": [w2], "weight_decay": 0.05}, {"params": [b2], "weight_decay": 0.0}], lr=1e-2)
    opt2.load_state_dict(saved_state)
    for g in grads[3:]:
        step(opt2, (w2, b2), g)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert opt2.param_groups[1]["weight_decay"] == 0.0


def test_bf16_params_with_fp32_momentum():
    p = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    opt = Lion([p], lr=1e-2, weight_decay=0.05, momentum_dtype=torch.float32)
    p.grad = torch.randn(64).to(torch.bfloat16)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and p.dtype == torch.bfloat16


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="learning rate"):
        Lion(p, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        Lion(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="impl"):
        Lion(p, impl="cuda")


def test_one_cycle_cosine_schedule():
    lrs = [one_cycle_cosine(s, 100, 1e-3) for s in range(101)]
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 10  # 10% warm-up
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-8 and not math.isnan(lrs[-1])


def test_schedule_progress_on_each_clock():
    from mae_fast.training.step import schedule_progress

    assert schedule_progress(30, 100, "steps", 90.0, 60.0) == 0.3          # the steps clock ignores the time
    assert schedule_progress(30, 100, "time", 45.0, 60.0) == 0.75          # behind its plan: the clock leads
    assert schedule_progress(80, 100, "time", 30.0, 60.0) == 0.8           # ahead of it: the steps lead
    # a fractional position on the schedule (where the clock put the step) gives the cosine between the steps
    between = one_cycle_cosine(55.5, 100, 1e-3)
    assert one_cycle_cosine(56, 100, 1e-3) < between < one_cycle_cosine(55, 100, 1e-3)
