"""mae_fast.attention: the order FA4 -> classic flash-attn -> SDPA (with fakes of the FlashAttention packages, run on
a CPU), a package that refuses a shape, the measured per-shape SDPA backend cache (fake and real timers), the forced
backends, and every path's output and gradients against the explicit softmax(q kᵀ/√d) v."""
import math

import pytest
import torch

from mae_fast import attention


def _math(q, k, v):
    """The oracle, written out here: float64 softmax attention."""
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (s.softmax(-1) @ v.double()).to(q.dtype)


def _qkv(B=2, H=3, N=7, M=5, d=16, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g).to(dtype).requires_grad_(grad) for n in (N, M, M)]


class FakeFlash:
    """A FlashAttention package: takes (B, N, H, d), computes exactly, records the shapes it saw; `refuse` head
    dims raise as an unsupported configuration would. FA4 returns (out, lse), the classic package out alone."""

    def __init__(self, returns_tuple: bool, refuse=()):
        self.returns_tuple, self.refuse, self.calls = returns_tuple, set(refuse), []

    def __call__(self, q, k, v):
        self.calls.append(tuple(q.shape))
        if q.shape[-1] in self.refuse:
            raise AssertionError(f"head_dim {q.shape[-1]} not supported")
        out = _math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return (out, None) if self.returns_tuple else out


@pytest.fixture
def fakes(monkeypatch):
    """Both FlashAttention packages faked and allowed on CPU tensors; a fresh refusal memory."""
    fa4, fa2 = FakeFlash(returns_tuple=True), FakeFlash(returns_tuple=False)
    monkeypatch.setattr(attention, "_fa4_func", fa4)
    monkeypatch.setattr(attention, "_flash_attn_func", fa2)
    monkeypatch.setattr(attention, "FLASH_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "_flash_refused", set())
    return fa4, fa2


def test_fa4_runs_first_then_the_classic_package_then_sdpa(fakes, monkeypatch):
    fa4, fa2 = fakes
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    out.copy_(attention.attention(q, k, v))
    assert attention.last_backend() == "flash_attn_4" and fa4.calls == [(2, 7, 3, 16)] and not fa2.calls
    torch.testing.assert_close(out, _math(q, k, v))
    assert attention.flash_attn_available()
    monkeypatch.setattr(attention, "_fa4_func", None)
    torch.testing.assert_close(attention.attention(q, k, v), _math(q, k, v))
    assert attention.last_backend() == "flash_attn" and fa2.calls == [(2, 7, 3, 16)]
    monkeypatch.setattr(attention, "_flash_attn_func", None)
    assert not attention.flash_attn_available()
    torch.testing.assert_close(attention.attention(q, k, v), _math(q, k, v), rtol=2e-2, atol=2e-2)
    assert attention.last_backend() == "sdpa"  # CPU: SDPA's own choice, nothing measured


def test_flash_packages_only_take_half_precision(fakes):
    fa4, _ = fakes
    attention.attention(*_qkv(dtype=torch.float32))
    assert attention.last_backend() == "sdpa" and not fa4.calls


def test_a_refused_shape_falls_through_once_and_is_remembered(fakes):
    fa4, fa2 = fakes
    fa4.refuse = {8}
    q, k, v = _qkv(d=8, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="flash_attn_4 refused q \\(2, 3, 7, 8\\)"):
        out = attention.attention(q, k, v)
    assert attention.last_backend() == "flash_attn"
    torch.testing.assert_close(out, _math(q, k, v))
    attention.attention(q, k, v)  # not asked again for this shape
    assert fa4.calls == [(2, 7, 3, 8)] and len(fa2.calls) == 2
    attention.attention(*_qkv(d=16, dtype=torch.bfloat16))  # other shapes still go to FA4
    assert attention.last_backend() == "flash_attn_4"


def test_forced_backends(fakes):
    fa4, _ = fakes
    q, k, v = _qkv(dtype=torch.bfloat16)
    with attention.use_backend("sdpa"):
        attention.attention(q, k, v)
        assert attention.last_backend() == "sdpa" and not fa4.calls
    with attention.use_backend("math"):
        torch.testing.assert_close(attention.attention(q, k, v), _math(q, k, v), rtol=2e-2, atol=2e-2)
        assert attention.last_backend() == "math" and not fa4.calls
    attention.attention(q, k, v)
    assert attention.last_backend() == "flash_attn_4"
    with pytest.raises(ValueError, match="attention backend must be one of"):
        with attention.use_backend("flash"):
            pass


class FakeTimer:
    """Runs each candidate once (so a refusing backend raises as it would) and returns the next planned time."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, fn, device):
        fn()
        self.calls += 1
        return self.times.pop(0)


def test_cache_keeps_the_fastest_per_shape_and_measures_once():
    timer = FakeTimer([3.0, 1.0, 0.5, 2.0, 4.0, 1.0])
    cache = attention.SDPABackendCache(candidates=("flash", "math"), measured_device_types=("cpu",), timer=timer)
    q, k, v = _qkv()
    assert cache.choose(q, k, v) == "math" and timer.calls == 2
    assert cache.choose(q, k, v) == "math" and timer.calls == 2  # cached
    assert cache.choose(*_qkv(N=9)) == "flash" and timer.calls == 4  # another shape: measured
    assert cache.choose(*_qkv(grad=True)) == "math" and timer.calls == 6  # a backward follows: another key
    assert len(cache.choices) == 3
    key = attention.shape_key(q, k, v)
    assert cache.timings[key] == {"flash": 3.0, "math": 1.0}
    cache.clear()
    assert not cache.choices and not cache.timings


def test_cache_leaves_out_refusing_and_out_of_memory_candidates():
    # on a CPU, cuDNN and memory-efficient SDPA have no kernel: they raise, and are recorded as unavailable
    timer = FakeTimer([2.0, 1.0])
    cache = attention.SDPABackendCache(measured_device_types=("cpu",), timer=timer)
    q, k, v = _qkv()
    assert cache.choose(q, k, v) == "math"
    timings = cache.timings[attention.shape_key(q, k, v)]
    assert timings["flash"] == 2.0 and timings["math"] == 1.0
    assert timings["cudnn"].startswith("unavailable") and timings["efficient"].startswith("unavailable")

    def oom_for_flash(fn, device):
        if not oom_for_flash.raised:
            oom_for_flash.raised = True
            raise torch.OutOfMemoryError("fake: out of memory")
        fn()
        return 1.0
    oom_for_flash.raised = False
    cache = attention.SDPABackendCache(candidates=("flash", "math"), measured_device_types=("cpu",),
                                       timer=oom_for_flash)
    assert cache.choose(q, k, v) == "math"
    assert cache.timings[attention.shape_key(q, k, v)]["flash"] == "out of memory"
    nothing = attention.SDPABackendCache(candidates=("cudnn", "efficient"), measured_device_types=("cpu",),
                                         timer=FakeTimer([]))
    assert nothing.choose(q, k, v) is None  # no candidate ran: SDPA's own choice


def test_cache_is_trivial_where_nothing_is_measured():
    timer = FakeTimer([])
    cache = attention.SDPABackendCache(timer=timer)  # measures on CUDA only
    assert cache.choose(*_qkv()) is None and timer.calls == 0 and not cache.choices


@pytest.mark.parametrize("preferred", ["flash", "math"])
def test_attention_runs_the_cached_backend_and_equals_math(monkeypatch, preferred):
    times = [1.0, 2.0] if preferred == "flash" else [2.0, 1.0]
    cache = attention.SDPABackendCache(candidates=("flash", "math"), measured_device_types=("cpu",),
                                       timer=FakeTimer(times))
    monkeypatch.setattr(attention, "sdpa_cache", cache)
    q, k, v = _qkv(N=11, M=13, d=8, grad=True, dtype=torch.float64)
    out = attention.attention(q, k, v)
    assert attention.last_backend() == "sdpa_" + preferred
    grads = torch.autograd.grad((out * out.detach()).sum(), (q, k, v))
    ref = _math(q, k, v)
    ref_grads = torch.autograd.grad((ref * ref.detach()).sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    with attention.use_backend("sdpa"):  # the reference stack: SDPA's own choice, cache unused
        attention.attention(q, k, v)
        assert attention.last_backend() == "sdpa"


def test_real_measurement_on_cpu_leaves_inputs_and_rng_alone():
    cache = attention.SDPABackendCache(measured_device_types=("cpu",),
                                       timer=lambda fn, dev: attention.time_backend(fn, dev, repeats=1))
    q, k, v = _qkv(grad=True)
    rng = torch.random.get_rng_state()
    with torch.enable_grad():
        choice = cache.choose(q, k, v)
    assert choice in ("flash", "math")
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert q.grad is None and k.grad is None and v.grad is None
    timings = cache.timings[attention.shape_key(q, k, v)]
    assert isinstance(timings["math"], float) and timings["math"] > 0


def test_nothing_is_measured_while_compiling(monkeypatch):
    timer = FakeTimer([])  # any measurement would fail: no planned times
    cache = attention.SDPABackendCache(measured_device_types=("cpu",), timer=timer)
    monkeypatch.setattr(attention, "sdpa_cache", cache)
    q, k, v = _qkv()
    torch._dynamo.reset()
    compiled = torch.compile(attention.attention, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), _math(q, k, v))
    assert timer.calls == 0 and not cache.choices
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(4, 16, 257, 257, 64), (2, 16, 1025, 1025, 32), (3, 16, 256, 1536, 16)],
                         ids=["vit_l8_encoder", "mae_decoder", "camae_stack"])
def test_cuda_choice_runs_and_equals_math(shape, monkeypatch):
    """On a GPU: the default path (FlashAttention if installed, else the measured SDPA backend) in bf16, forward and
    backward, against float64 math; the cache holds one measured entry per shape."""
    monkeypatch.setattr(attention, "sdpa_cache", attention.SDPABackendCache())
    B, H, N, M, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for n in (N, M, M))
    out = attention.attention(q, k, v)
    ran = attention.last_backend()
    assert ran in ("flash_attn_4", "flash_attn") or ran.startswith("sdpa_"), ran
    if ran.startswith("sdpa_"):
        (entry,) = attention.sdpa_cache.report()
        assert entry["chosen"] == ran[len("sdpa_"):] and entry["backward"] is True
        assert isinstance(entry["seconds"][entry["chosen"]], float)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = _math(q.double(), k.double(), v.double())
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for got, want in zip((out,) + grads, (ref,) + ref_grads):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=2e-2 * scale)
