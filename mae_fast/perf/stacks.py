"""The stacks a benchmark compares, and the runners that time one train step or one embedding batch of a stack.

A *stack* is one way of running the same MAE train step (forward, backward, Lion step):

    reference           the ops' plain-PyTorch references (use_impl("reference")), SDPA attention, foreach Lion, eager
    reference_compiled  the same under torch.compile
    fused               mae_fast's default dispatch (by device: Triton on CUDA, C++ on CPU where built), eager
    fused_compiled      the same under torch.compile
    peer                what a user would write from public code instead (`mae_fast.peer`: timm ViT, FAIR-MAE
                        masking after the patch projection, torch.fft loss, timm's Lion), eager; needs timm
    peer_compiled       the same under torch.compile

The peer starts from the same weights as mae_fast's stacks (copied over) and sees the same crops; its FLOPs are
counted as mae_fast's (the useful work), so its extra work (projecting the 75% of tokens it drops) shows as lower
throughput, not as higher FLOP/s.

All stacks of one preset are built from the same seed and timed in interleaved rounds (A B C D A B C D ...), so their
ratios are measured side by side under the same conditions. Throughput is turned into achieved FLOP/s with the exact
count of `mae_fast.flops` and into MFU against the device's matmul ceiling measured in the same run (CUDA: a large
bf16 matmul timed with CUDA events; CPU: an fp32 matmul). Results are JSON with provenance (device, driver, library
versions, git commit, date, command); `benchmarks/render_results.py` turns them into the README table.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mae_fast import attention as attention_mod
from mae_fast import ops
from mae_fast.compiling import compile_blocks
from mae_fast.device import synchronize
from mae_fast.models import MAEConfig, MaskedAutoencoder, model_config
from mae_fast.optim import Lion, lion_param_groups
from mae_fast.perf import flops as flops_mod
from mae_fast.perf import peer as peer_mod
from mae_fast.training.recipes import optimizer_recipe

FUSED_OPS = ("masked_patchify", "unshuffle", "masked_mae_loss", "lion_update")  # what a train step runs

@dataclass(frozen=True)
class Stack:
    name: str
    ops_impl: str         # the ops' implementation while the stack runs (ops.use_impl): "reference" or "auto"
    optimizer_impl: str   # Lion(impl=...)
    compiled: bool
    allow_flash_attn: bool  # attention: use_backend("auto") (FlashAttention / fastest SDPA backend), else "sdpa"
    peer: bool = False    # mae_fast.peer's model and timm's Lion instead of MaskedAutoencoder and mae_fast's Lion


STACKS: dict[str, Stack] = {
    "reference": Stack("reference", "reference", "foreach", False, False),
    "reference_compiled": Stack("reference_compiled", "reference", "foreach", True, False),
    "fused": Stack("fused", "auto", "auto", False, True),
    "fused_compiled": Stack("fused_compiled", "auto", "auto", True, True),
    "peer": Stack("peer", "reference", "timm", False, False, peer=True),
    "peer_compiled": Stack("peer_compiled", "reference", "timm", True, False, peer=True),
}


def default_stacks() -> list[str]:
    """Every stack; the peer's only where timm is installed."""
    return [name for name, stack in STACKS.items() if not stack.peer or peer_mod.timm_available()]


@contextlib.contextmanager
def stack_context(stack: Stack):
    """Select the stack's op implementations (`ops.use_impl`) and attention: mae_fast's choice (FlashAttention when
    installed, else the SDPA backend measured fastest per shape) or, for the reference, plain SDPA."""
    with ops.use_impl(stack.ops_impl), attention_mod.use_backend("auto" if stack.allow_flash_attn else "sdpa"):
        yield


def parse_preset(spec: str) -> MAEConfig:
    """A preset name with optional field overrides: "camae_vit_micro_patch16_256:img_size=128,in_chans=3"."""
    name, _, rest = spec.partition(":")
    overrides = {}
    fields = MAEConfig.__dataclass_fields__
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"bad override {item!r} in preset {spec!r}: use key=value with a MAEConfig field")
        kind = type(fields[key].default)
        if kind is bool:
            overrides[key] = value.lower() in ("1", "true", "yes")
        elif kind in (int, float):
            overrides[key] = kind(value)
        else:
            raise ValueError(f"override {key!r} in preset {spec!r} is not a number or flag")
    return model_config(name.strip(), **overrides)


def parse_stacks(text: str) -> list[Stack]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in STACKS]
    if bad or not names:
        raise ValueError(f"unknown stack(s) {bad}; choose from {', '.join(STACKS)}")
    return [STACKS[n] for n in names]


def random_images(cfg: MAEConfig, batch: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Raw uint8 crops (B, C, H, W), uniformly random (never zeros: they hide indexing errors and time faster)."""
    return torch.randint(0, 256, (batch, cfg.in_chans, cfg.img_size, cfg.img_size), dtype=torch.uint8,
                         device=device, generator=generator)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)


def compile_fn(fn, backend: str):
    """torch.compile with static shapes (a training loop has one shape; automatic dynamic shapes would retrace
    the same code for every preset, and fail on the masking's torch.rand with a symbolic size)."""
    return torch.compile(fn, backend=backend, dynamic=False)


COMPILE_MODES = ("regional", "model")


def compiled_call(model: torch.nn.Module, fn, stack: Stack, backend: str, mode: str = "regional"):
    """`fn` as the stack runs it: eager; or, for a compiled stack, with every transformer block compiled
    (mode "regional": compile time per block type, `mae_fast.compiling`) or the whole call compiled ("model")."""
    if not stack.compiled:
        return fn
    if mode == "regional":
        compile_blocks(model, backend)
        return fn
    if mode == "model":
        return compile_fn(fn, backend)
    raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")


def reset_compiled() -> None:
    """Forget compiled code of earlier runners: Dynamo keeps a few entries per code object and silently falls back
    to eager beyond its limit, which would mislabel a compiled stack."""
    import torch._dynamo

    torch._dynamo.reset()


def dynamo_counts() -> dict:
    """Graphs compiled and graph breaks since the last reset of Dynamo's counters."""
    try:
        from torch._dynamo.utils import counters

        return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
                "graph_breaks": int(sum(counters["graph_break"].values()))}
    except Exception:  # noqa: BLE001 - diagnostics only
        return {}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_model(cfg: MAEConfig, stack: Stack, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The stack's model with the weights every stack of the run shares (seeded; the peer gets them copied)."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds instead of a minute for ViT-L on a CPU
        model = MaskedAutoencoder(cfg)
        if stack.peer:
            model = peer_mod.PeerMAE(cfg).load_from(model)
    return model


class TrainRunner:
    """One train step (forward + masked loss, backward, Lion step) of `cfg` on random crops, run with `stack`."""

    def __init__(self, cfg: MAEConfig, stack: Stack, batch: int, device: torch.device,
                 amp: torch.dtype | None = None, compile_backend: str = "inductor", seed: int = 0,
                 compile_mode: str = "regional"):
        self.cfg, self.stack, self.batch, self.device, self.amp = cfg, stack, batch, device, amp
        self.compile_backend = compile_backend if stack.compiled else None
        self.model = build_model(cfg, stack, device, seed).train()
        if stack.peer:
            self.optimizer = peer_mod.peer_optimizer(self.model)
        else:
            recipe = optimizer_recipe(cfg)  # the preset's Lion settings
            self.optimizer = Lion(lion_param_groups(self.model, recipe.weight_decay), lr=recipe.lr, betas=recipe.betas,
                                  impl=stack.optimizer_impl)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.images = [random_images(cfg, batch, device, gen) for _ in range(2)]  # rotated between steps
        self.loss_fn = compiled_call(self.model, self._loss, stack, compile_backend, compile_mode)
        self.steps = 0
        self.last_loss: torch.Tensor | None = None

    def _loss(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out if self.stack.peer else out.loss

    def step(self, images: torch.Tensor | None = None) -> None:
        if images is None:
            images = self.images[self.steps % len(self.images)]
        with stack_context(self.stack):
            self.optimizer.zero_grad(set_to_none=True)
            with _autocast(self.device, self.amp):
                loss = self.loss_fn(images)
            loss.backward()
            self.optimizer.step()
        self.steps += 1
        self.last_loss = loss.detach()

    def step_synced(self) -> None:
        self.step()
        synchronize(self.device)

    def persistent_bytes(self) -> int:
        """Parameters and optimiser state: what the stack holds between steps."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return _tensor_bytes(self.model.parameters()) + _tensor_bytes(state)

    def flops_per_crop(self) -> int:
        return flops_mod.training_flops_per_crop(self.cfg)


class InferenceRunner:
    """Embedding crops (no masking, encoder on every token, mean of the patch tokens)."""

    def __init__(self, cfg: MAEConfig, stack: Stack, batch: int, device: torch.device,
                 amp: torch.dtype | None = None, compile_backend: str = "inductor", seed: int = 0,
                 compile_mode: str = "regional"):
        self.cfg, self.stack, self.batch, self.device, self.amp = cfg, stack, batch, device, amp
        self.compile_backend = compile_backend if stack.compiled else None
        self.model = build_model(cfg, stack, device, seed).eval()
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.images = [random_images(cfg, batch, device, gen) for _ in range(2)]
        self.embed_fn = compiled_call(self.model, self.model.embed, stack, compile_backend, compile_mode)
        self.steps = 0
        self.last_loss = None
        self.last_output: torch.Tensor | None = None

    def step(self, images: torch.Tensor | None = None) -> None:
        if images is None:
            images = self.images[self.steps % len(self.images)]
        with stack_context(self.stack), torch.no_grad(), _autocast(self.device, self.amp):
            self.last_output = self.embed_fn(images)
        self.steps += 1

    def step_synced(self) -> None:
        self.step()
        synchronize(self.device)

    def persistent_bytes(self) -> int:
        return _tensor_bytes(self.model.parameters())

    def flops_per_crop(self) -> int:
        return flops_mod.inference_flops_per_crop(self.cfg)


def impls_that_ran() -> dict:
    """The implementation each fused op and the attention used on their latest call."""
    out = {op: ops.last_impl(op) for op in FUSED_OPS}
    out["attention"] = attention_mod.last_backend()
    return out
