"""Figures shared by the trainer and the demo: the loss curve and the reconstruction grid."""
from __future__ import annotations

import numpy as np
import torch


LOSS_LABELS = {"mae": "loss (0.99 MSE + 0.01 Fourier)", "wsl": "cross-entropy", "munet": "MSE of the hidden pixels"}


def plot_loss(losses: list[float], path: str, ylabel: str = LOSS_LABELS["mae"]) -> None:
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
    ax.set_ylabel(ylabel)
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
