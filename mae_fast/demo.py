"""`mae-fast demo`: generate the built-in synthetic screen, train a small MAE on it for a bounded time, and write
a loss curve and a reconstruction figure."""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
import torch

from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from mae_fast.models import create_model, list_presets
from mae_fast.optim import Lion, lion_param_groups, one_cycle_cosine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    p.add_argument("--preset", default="mae_vit_micro_patch16_256", help=f"model preset ({', '.join(list_presets())})")
    p.add_argument("--seconds", type=float, default=120.0, help="training time budget in seconds (default 120)")
    p.add_argument("--max-steps", type=int, default=400, help="upper bound on training steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak Lion learning rate of the demo (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="a very small screen and run (for tests)")


def _read_sites(screen_root: str, limit: int | None = None) -> np.ndarray:
    """All sites of the screen as one uint16 array (S, C, H, W) (the demo's screen fits in memory)."""
    from PIL import Image

    first = sorted(glob.glob(os.path.join(screen_root, "images", "*", "Plate*", "*_s1_w1.png")))[:limit]
    sites = []
    for path in first:
        channels = []
        c = 1
        while os.path.exists(path.replace("_w1.png", f"_w{c}.png")):
            channels.append(np.asarray(Image.open(path.replace("_w1.png", f"_w{c}.png")), dtype=np.uint16))
            c += 1
        sites.append(np.stack(channels))
    return np.stack(sites)


def random_crops(sites: np.ndarray, batch: int, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """A batch of random crop x crop windows with random horizontal/vertical flips, kept as integers."""
    S, C, H, W = sites.shape
    out = np.empty((batch, C, crop, crop), sites.dtype)
    for i in range(batch):
        s, y, x = rng.integers(S), rng.integers(H - crop + 1), rng.integers(W - crop + 1)
        window = sites[s, :, y:y + crop, x:x + crop]
        if rng.random() < 0.5:
            window = window[:, :, ::-1]
        if rng.random() < 0.5:
            window = window[:, ::-1, :]
        out[i] = window
    return torch.from_numpy(out.astype(np.int32)).to(torch.uint16) if out.dtype == np.uint16 else torch.from_numpy(out)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def plot_loss(losses: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, alpha=0.5, label="step")
    k = max(1, len(losses) // 20)
    if len(losses) >= 2 * k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(losses) + 1), smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (0.99 MSE + 0.01 Fourier)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reconstruction(model, images: torch.Tensor, path: str, seed: int = 0) -> None:
    """Rows: channels; columns: input / masked input / reconstruction (all self-standardised)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    x, masked, recon = (t[0].float().cpu().numpy() for t in model.reconstruct(images[:1], generator=gen))
    C = x.shape[0]
    fig, axes = plt.subplots(C, 3, figsize=(6, 2 * C), squeeze=False)
    for c in range(C):
        lo, hi = np.percentile(x[c], [1, 99])
        for j, (img, title) in enumerate(((x, "input"), (masked, "masked"), (recon, "reconstruction"))):
            axes[c, j].imshow(img[c], cmap="gray", vmin=lo, vmax=hi)
            axes[c, j].set_xticks([]), axes[c, j].set_yticks([])
            if c == 0:
                axes[c, j].set_title(title)
        axes[c, 0].set_ylabel(f"w{c + 1}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    device = _pick_device(args.device)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    screen_cfg = (SyntheticScreenConfig(n_experiments=1, n_plates=2, n_complexes=3, complex_size=3, n_singletons=2,
                                        n_empty_controls=2, n_crispr_controls=1, site_size=256, seed=args.seed)
                  if args.tiny else SyntheticScreenConfig(seed=args.seed))
    t0 = time.time()
    screen = make_synthetic_screen(os.path.join(out, "screen"), screen_cfg)
    print(f"synthetic screen: {screen.root} ({len(screen.genes)} genes, {time.time() - t0:.1f} s)")

    model = create_model(args.preset).to(device)
    sites = _read_sites(screen.root)
    crop = model.cfg.img_size
    rng = np.random.default_rng(args.seed)
    val_batch = random_crops(sites, 4, crop, np.random.default_rng(args.seed + 10_000)).to(device)
    opt = Lion(lion_param_groups(model, model.cfg.weight_decay), lr=args.lr, betas=model.cfg.betas)

    losses: list[float] = []
    seen = 0
    start = time.time()
    bar = tqdm(total=args.max_steps, desc="demo train", unit="step", dynamic_ncols=True)
    model.train()
    step = 0
    while step < args.max_steps and time.time() - start < args.seconds:
        # the schedule spans the step budget the time allows, estimated after the first steps
        elapsed = time.time() - start
        expected = args.max_steps if step < 5 else min(args.max_steps, int(step * args.seconds / max(elapsed, 1e-6)))
        for g in opt.param_groups:
            g["lr"] = one_cycle_cosine(step, max(expected, step + 1), args.lr)
        images = random_crops(sites, args.batch_size, crop, rng).to(device)
        loss = model(images).loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        seen += images.shape[0]
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", crops_s=f"{seen / (time.time() - start):.1f}")
    bar.close()
    wall = time.time() - start

    loss_png, recon_png = os.path.join(out, "loss_curve.png"), os.path.join(out, "reconstruction.png")
    plot_loss(losses, loss_png)
    plot_reconstruction(model, val_batch, recon_png, seed=args.seed)
    k = max(1, min(10, len(losses) // 4))
    summary = {
        "preset": args.preset, "steps": len(losses), "crops": seen, "train_seconds": round(wall, 2),
        "crops_per_second": round(seen / wall, 2), "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])), "device": str(device), "losses": losses,
    }
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"trained {args.preset} for {len(losses)} steps ({seen} crops, {seen / wall:.1f} crops/s) on {device}: "
          f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}")
    print(f"loss curve:      {loss_png}")
    print(f"reconstruction:  {recon_png}")
    print(f"summary:         {os.path.join(out, 'demo_summary.json')}")
    return 0
