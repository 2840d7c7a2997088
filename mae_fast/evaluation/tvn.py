"""Typical variation normalisation (TVN) fitted on negative controls, in two named variants.

Steps (all statistics from control wells only, in float64; mean and sd are population statistics, cov has ddof 1):
    1. centre and scale every feature on all controls            Z = (X - mu) / sd
    2. PCA fitted on the controls (full rotation, D components)  P = Z @ V
    3. centre and scale again on the controls:
         "batchwise" (default): per batch b, on that batch's controls        Q = (P - m_b) / s_b
         "efaar1.0":            on all controls (one m, one s)               Q = (P - m) / s
    4. per batch, whiten with W_b = (cov(Q of the controls of b) + shrinkage * I)^(-1/2)   out = Q @ W_b

"efaar1.0" is EFAAR 1.0's `tvn_on_controls` as published (efaar-benchmarking 1.0): centre-scale on all controls,
PCA on the controls, centre-scale on all controls again, then per batch only the covariance alignment (the batch's
controls' covariance is computed around their own mean, but the batch is not re-centred, so a per-batch offset
that survives step 3 stays in the data). "batchwise" centre-scales per batch in step 3, as the RxRx3-core
notebook's `pca_centerscale_on_controls` does, which removes per-batch offsets; with it, recall equals EFAAR's
`tvn_on_controls` given per-batch centring after its PCA. The default is "batchwise": batch offsets are the main
nuisance TVN exists to remove, and it is what the newer benchmark code computes. (EFAAR's sklearn `PCA()` keeps
min(n_controls, D) components; both variants here keep all D, identical whenever n_controls >= D.)

All four steps are affine, so each batch's TVN is one map X @ A_b + c_b; `TVNTransform.apply` runs one float32
matmul per batch. In "batchwise", steps 3-4 make each batch's controls mean-zero, which removes per-batch offsets. With shrinkage
0 the controls of every batch end with identity covariance; with the default 0.5 their covariance is
C_b (C_b + 0.5 I)^(-1) (eigenvalues lambda / (lambda + 0.5), C_b = covariance of Q's controls), which damps
directions where controls barely vary instead of blowing them up.

Fewer controls than dimensions: the controls then span at most n_controls - 1 directions. Directions in which the
controls do not vary (variance <= `null_rtol` x the largest) have nothing to be normalised by, so they are left
unscaled (scale 1) instead of being divided by a near-zero spread; PCA still keeps all D directions, so no signal
is dropped, and the shrinkage keeps the whitening well conditioned. The number of such directions is reported.
Deterministic: eigenvectors get a fixed sign (largest-magnitude entry positive).

Cost: one D x D eigendecomposition (the PCA); per batch with n_b <= D controls only an (n_b, n_b) one, since
(C_b + s I)^(-1/2) = s^(-1/2) I + V diag((sigma^2 + s)^(-1/2) - s^(-1/2)) V^T with C_b = V diag(sigma^2) V^T.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .table import EvaluationInputError, name_some

TVN_VARIANTS = ("batchwise", "efaar1.0")
NULL_RTOL = 1e-10   # variance below this fraction of the largest counts as "controls do not vary here"
FEATURE_RTOL = 1e-7  # a feature whose control sd is below this fraction of the largest sd is treated as constant


@dataclass
class TVNTransform:
    """Per-batch affine maps: out = X @ linear[b] + offset[b]."""

    linear: np.ndarray          # (n_batches, D, D) float32
    offset: np.ndarray          # (n_batches, D) float32
    batch_names: list[str]
    controls_per_batch: np.ndarray  # (n_batches,) int
    n_constant_features: int        # features with no spread in the controls (left unscaled in step 1)
    n_null_directions: int          # PCA directions without control variance (left unscaled)
    shrinkage: float
    variant: str = "batchwise"

    def apply(self, features: np.ndarray, batch_codes: np.ndarray) -> np.ndarray:
        """(N, D) float32 -> (N, D) float32, each row by its batch's map."""
        source = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        out = torch.empty(source.shape, dtype=torch.float32)
        for b in range(len(self.batch_names)):
            rows = torch.from_numpy(np.flatnonzero(batch_codes == b))
            if rows.numel():
                out[rows] = torch.addmm(torch.from_numpy(self.offset[b]), source[rows], torch.from_numpy(self.linear[b]))
        return out.numpy()

    def summary(self) -> dict:
        return {
            "batches": len(self.batch_names),
            "controls_per_batch_min": int(self.controls_per_batch.min()),
            "controls_per_batch_max": int(self.controls_per_batch.max()),
            "constant_features": self.n_constant_features,
            "null_directions": self.n_null_directions,
            "shrinkage": self.shrinkage,
            "variant": self.variant,
        }


@contextmanager
def _torch_threads(n: int):
    """Run a block with n torch threads. The fit is many small LAPACK/BLAS calls; with several threads each call
    waits at thread barriers, which on a busy 2-core machine cost more than the arithmetic (measured: 10-20 s
    instead of ~2 s for 20 batches x 1,024 dims)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b through torch: the large products of the pipeline share one thread pool (torch/MKL) instead of also
    waking numpy's BLAS threads, which spin and compete with torch's on a small machine."""
    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float64 matrix (torch LAPACK, same pool)."""
    values, vectors = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(matrix)))
    return values.numpy(), vectors.numpy()


def _fixed_sign(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry is positive (eigh's sign is arbitrary)."""
    pivot = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivot, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def _safe_scale(spread: np.ndarray, rtol: float) -> np.ndarray:
    """1/spread, with 1 where the spread is (relatively) zero: such directions are left as they are."""
    limit = rtol * max(float(spread.max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(spread > limit, 1.0 / np.where(spread > limit, spread, 1.0), 1.0)


def inverse_sqrt(cov: np.ndarray, rtol: float = NULL_RTOL) -> np.ndarray:
    """Symmetric cov^(-1/2) (dense reference); eigenvalues <= rtol x max get factor 1 (only without shrinkage)."""
    values, vectors = np.linalg.eigh(cov)
    factors = _safe_scale(np.sqrt(np.clip(values, 0.0, None)), np.sqrt(rtol))
    return (vectors * factors) @ vectors.T


def whitening_factors(q: np.ndarray, shrinkage: float, rtol: float = NULL_RTOL):
    """(cov(q) + shrinkage * I)^(-1/2) as alpha * I + V diag(e) V^T, without a D x D eigendecomposition when the
    batch has fewer controls than dimensions. q (n, D) is centred (columns mean 0); cov uses ddof = 1.

    n - 1 < D: cov = V diag(sigma^2) V^T has rank < n; every direction outside span(V) has eigenvalue
    `shrinkage`, so it gets the common factor alpha. V comes from the small (n, n) Gram matrix q q^T / (n - 1)
    (V = q^T U / sqrt((n - 1) sigma^2), O(n^2 D)) when shrinkage > 0, which bounds every factor; without
    shrinkage, where tiny sigma get large factors, from the more accurate thin SVD of q. Equals `inverse_sqrt`
    (tested). Returns (alpha, V (D, r), e (r,)).
    """
    n, dims = q.shape
    if n - 1 >= dims:
        values, vectors = _eigh(_matmul(q.T, q) / (n - 1) + shrinkage * np.eye(dims))
        return 0.0, vectors, _safe_scale(np.sqrt(np.clip(values, 0.0, None)), np.sqrt(rtol))
    scaled = q / np.sqrt(n - 1)
    if shrinkage > 0:
        gram_values, u = _eigh(_matmul(scaled, scaled.T))                      # (n,), (n, n)
        keep = gram_values > NULL_RTOL * max(gram_values.max(), np.finfo(np.float64).tiny)
        sigma = np.sqrt(gram_values[keep])
        vt = _matmul((u[:, keep] / sigma).T, scaled)                            # (r, D) orthonormal rows
    else:
        _, sigma, vt = np.linalg.svd(scaled, full_matrices=False)               # vt (n, D)
    values = sigma**2 + shrinkage
    # one scale for all eigenvalues (those of span(V) and `shrinkage` for the rest), as the dense version
    all_roots = np.sqrt(np.concatenate([values, [shrinkage]]))
    factors = _safe_scale(all_roots, np.sqrt(rtol))
    alpha = float(factors[-1])
    return alpha, vt.T, factors[:-1] - alpha


def fit_tvn(
    features: np.ndarray,
    batch_codes: np.ndarray,
    is_control: np.ndarray,
    batch_names: list[str] | None = None,
    shrinkage: float = 0.5,
    null_rtol: float = NULL_RTOL,
    variant: str = "batchwise",
) -> TVNTransform:
    """Fit TVN on the control rows. features (N, D), batch_codes (N,) ints, is_control (N,) bool.
    `variant`: "batchwise" (default) or "efaar1.0" (see the module docstring for both formulas).

    The fit runs single-threaded (see `_torch_threads`); applying it to all wells is one multithreaded matmul.
    """
    with _torch_threads(1):
        return _fit_tvn(features, batch_codes, is_control, batch_names, shrinkage, null_rtol, variant)


def _fit_tvn(features, batch_codes, is_control, batch_names, shrinkage, null_rtol, variant) -> TVNTransform:
    if variant not in TVN_VARIANTS:
        raise EvaluationInputError(f"unknown TVN variant {variant!r}; choose from {', '.join(TVN_VARIANTS)}")
    if shrinkage < 0:
        raise EvaluationInputError(f"TVN shrinkage must be >= 0, got {shrinkage}")
    n_batches = int(batch_codes.max()) + 1
    batch_names = batch_names or [str(b) for b in range(n_batches)]
    controls_per_batch = np.bincount(batch_codes[is_control], minlength=n_batches)
    too_few = [batch_names[b] for b in np.flatnonzero(controls_per_batch < 2)]
    if too_few:
        raise EvaluationInputError(
            f"TVN needs at least 2 negative-control wells per batch; batch(es) {name_some(too_few)} have "
            f"{name_some(controls_per_batch[controls_per_batch < 2])}"
        )

    controls = features[is_control].astype(np.float64)            # (n_c, D)
    control_batches = batch_codes[is_control]

    # 1. centre and scale on all controls.
    mu = controls.mean(axis=0)
    sd = controls.std(axis=0)
    inv_sd = _safe_scale(sd, FEATURE_RTOL)
    z = (controls - mu) * inv_sd

    # 2. PCA fitted on the controls: full rotation onto the eigenvectors of their covariance, largest first.
    cov = _matmul(z.T, z) / z.shape[0]
    values, vectors = _eigh(cov)
    order = np.argsort(values)[::-1]
    values, rotation = values[order], _fixed_sign(vectors[:, order])   # rotation (D, D)
    n_null = int((values <= null_rtol * max(values.max(), np.finfo(np.float64).tiny)).sum())
    projected = _matmul(z, rotation)

    dims = features.shape[1]
    linear = np.empty((n_batches, dims, dims), dtype=np.float32)
    offset = np.empty((n_batches, dims), dtype=np.float32)
    global_linear = rotation * inv_sd[:, None]                     # X @ global_linear - (mu*inv_sd) @ rotation = P
    global_offset = -(mu * inv_sd) @ rotation
    if variant == "efaar1.0":                                      # 3. one centre and scale for all batches
        m_all = projected.mean(axis=0)
        inv_s_all = _safe_scale(projected.std(axis=0), np.sqrt(null_rtol))
    for b in range(n_batches):
        p_b = projected[control_batches == b]
        # 3. centre and scale again, on this batch's controls ("batchwise") or on all controls ("efaar1.0").
        if variant == "efaar1.0":
            m_b, inv_s_b = m_all, inv_s_all
        else:
            m_b = p_b.mean(axis=0)
            inv_s_b = _safe_scale(p_b.std(axis=0), np.sqrt(null_rtol))
        q_b = (p_b - m_b) * inv_s_b
        q_b = q_b - q_b.mean(axis=0)          # the covariance of step 4 is taken around the batch's own mean
        # 4. whiten with W_b = (cov(q_b) + shrinkage I)^(-1/2) = alpha I + V diag(e) V^T.
        alpha, basis, e = whitening_factors(q_b, shrinkage, null_rtol)
        scaled = global_linear * inv_s_b                           # G diag(1/s_b)      (D, D)
        linear[b] = alpha * scaled + _matmul(_matmul(scaled, basis) * e, basis.T)
        h = (global_offset - m_b) * inv_s_b                        # (D,)
        offset[b] = alpha * h + ((h @ basis) * e) @ basis.T
    return TVNTransform(
        linear=linear,
        offset=offset,
        batch_names=list(batch_names),
        controls_per_batch=controls_per_batch,
        n_constant_features=int((sd <= FEATURE_RTOL * sd.max()).sum()),
        n_null_directions=n_null,
        shrinkage=float(shrinkage),
        variant=variant,
    )


def tvn(features, batch_codes, is_control, batch_names=None, shrinkage: float = 0.5,
        variant: str = "batchwise") -> tuple[np.ndarray, TVNTransform]:
    """Fit on the controls and apply to every row. Returns ((N, D) float32, the fitted transform)."""
    transform = fit_tvn(features, batch_codes, is_control, batch_names, shrinkage, variant=variant)
    return transform.apply(features, batch_codes), transform
