"""Class ids of perturbations for the weakly supervised baseline (WSL): one class per gene / treatment / siRNA."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mae_fast.data.sites import natural_key


class PerturbationLabels:
    """Class ids of the sites of a SiteIndex: `classes` (sorted perturbation names, or given), `site_labels`
    (n_sites,) int64. `for_crops(info)` maps a loader's CropInfo (return_info=True) to (B,) labels."""

    def __init__(self, classes: Sequence[str], site_labels: np.ndarray):
        self.classes = tuple(classes)
        self.site_labels = np.asarray(site_labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.classes)

    @classmethod
    def from_index(cls, index, classes: Sequence[str] | None = None) -> "PerturbationLabels":
        """Every site must have a perturbation (gene/treatment/siRNA); select labelled sites first with
        `index.select(where=lambda s: s.perturbation is not None)`. `classes` fixes the class order (e.g. the one
        a checkpoint was trained with); a perturbation outside it is an error."""
        missing = [s for s in index if s.perturbation is None]
        if missing:
            raise ValueError(f"{len(missing)} site(s) have no perturbation label (first: well {missing[0].well_id} "
                             f"site {missing[0].site}); select labelled sites before training a WSL model")
        names = [s.perturbation for s in index]
        if classes is None:
            classes = sorted(set(names), key=natural_key)
        lookup = {c: i for i, c in enumerate(classes)}
        unknown = sorted({n for n in names if n not in lookup})
        if unknown:
            raise ValueError(f"{len(unknown)} perturbation(s) are not among the {len(lookup)} classes "
                             f"(first: {unknown[0]!r})")
        return cls(classes, np.array([lookup[n] for n in names], dtype=np.int64))

    def for_crops(self, info, device=None) -> torch.Tensor:
        """(B,) int64 labels of a batch's crops from its CropInfo (or an array of index positions)."""
        positions = np.asarray(getattr(info, "site_index", info), dtype=np.int64)
        return torch.from_numpy(self.site_labels[positions]).to(device)
