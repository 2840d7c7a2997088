"""A small Cell-Painting-like CRISPR screen generated on the fly, written exactly like RxRx3.

Each site is a 6-channel image of cell-like objects (Recursion's channel order: w1 nuclei/DNA, w2 ER,
w3 actin, w4 nucleoli/RNA, w5 mitochondria, w6 Golgi/plasma membrane). Every gene knockout shifts a vector of
morphology parameters; genes of one planted complex share that shift, negative controls have none, each
chromosome arm adds a small shared shift (the CRISPR arm bias) and each plate adds its own per-channel gain and
offset (the batch effect).

Files written under `root`:
    images/{experiment}/Plate{plate}/{address}_s1_w{c}.png    c = 1..C, 8-bit (default) or 16-bit PNG
    metadata.csv                                               RxRx3 columns (well_id, experiment_name, plate, ...)
    relationships/synthetic_complexes.csv                      entity1,entity2 for every planted pair
    gene_arms.csv                                              gene, chromosome_arm, expressed

Everything is a function of the seed.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass, field

import numpy as np

CHANNEL_NAMES = ("DNA", "ER", "Actin", "RNA", "Mito", "Golgi")
METADATA_COLUMNS = (
    "well_id", "experiment_name", "plate", "address", "gene", "treatment",
    "SMILES", "concentration", "perturbation_type", "cell_type",
)
NEGATIVE_CONTROLS = ("EMPTY_control", "CRISPR_control")
# Morphology parameters a knockout can shift (one entry of the phenotype vector each).
PHENOTYPE_AXES = (
    "nucleus_size", "cell_size", "elongation", "density",
    "dna_gain", "er_gain", "actin_gain", "rna_gain", "mito_gain", "golgi_gain",
    "mito_texture", "er_texture",
)


@dataclass
class SyntheticScreenConfig:
    n_experiments: int = 2
    n_plates: int = 2                 # per experiment
    n_complexes: int = 8
    complex_size: int = 4
    n_singletons: int = 16
    n_empty_controls: int = 8         # wells per plate
    n_crispr_controls: int = 4        # wells per plate
    site_size: int = 512
    channels: int = 6
    bit_depth: int = 8                # 8 (RxRx1, RxRx3-core) or 16 (RxRx3)
    cells_per_site: int = 36
    n_arms: int = 6
    effect_size: float = 1.0          # scale of the knockout phenotypes
    arm_effect: float = 0.25          # scale of the per-arm shift
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.channels <= len(CHANNEL_NAMES):
            raise ValueError(f"channels must be in 1..{len(CHANNEL_NAMES)}, got {self.channels}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if self.site_size < 64:
            raise ValueError(f"site_size must be >= 64, got {self.site_size}")


@dataclass
class SyntheticScreen:
    root: str
    config: SyntheticScreenConfig
    metadata_csv: str
    relationships_csv: str
    arms_csv: str
    genes: list[str]
    complexes: list[list[str]]
    phenotypes: dict[str, np.ndarray] = field(repr=False)

    @property
    def images_dir(self) -> str:
        return os.path.join(self.root, "images")


def _gene_names(cfg: SyntheticScreenConfig) -> tuple[list[list[str]], list[str]]:
    complexes = [[f"CPX{k + 1}S{j + 1}" for j in range(cfg.complex_size)] for k in range(cfg.n_complexes)]
    singletons = [f"SOLO{i + 1:02d}" for i in range(cfg.n_singletons)]
    return complexes, singletons


def plan_screen(cfg: SyntheticScreenConfig):
    """Genes, complexes, per-gene phenotype vectors and arm table (no pixels)."""
    rng = np.random.default_rng(cfg.seed)
    complexes, singletons = _gene_names(cfg)
    genes = [g for c in complexes for g in c] + singletons
    k = len(PHENOTYPE_AXES)
    arms = [f"chr{i // 2 + 1}{'pq'[i % 2]}" for i in range(cfg.n_arms)]
    arm_shift = {a: cfg.arm_effect * rng.standard_normal(k) for a in arms}
    gene_arm = {g: arms[i] for g, i in zip(genes, rng.integers(0, cfg.n_arms, len(genes)))}
    expressed = {g: bool(e) for g, e in zip(genes, rng.random(len(genes)) < 0.6)}
    phenotypes: dict[str, np.ndarray] = {}
    for members in complexes:
        shared = rng.standard_normal(k)
        shared *= cfg.effect_size * 1.5 / np.linalg.norm(shared) * np.sqrt(k) / 2
        for g in members:
            phenotypes[g] = shared + 0.15 * cfg.effect_size * rng.standard_normal(k)
    for g in singletons:
        own = rng.standard_normal(k)
        phenotypes[g] = own * cfg.effect_size * 1.5 / np.linalg.norm(own) * np.sqrt(k) / 2
    for g in genes:
        # The arm bias acts on every knocked-out gene of the arm; unexpressed genes carry only this shift.
        if not expressed[g]:
            phenotypes[g] = 0.1 * phenotypes[g]
        phenotypes[g] = phenotypes[g] + arm_shift[gene_arm[g]]
    for c in NEGATIVE_CONTROLS:
        phenotypes[c] = np.zeros(k)
    return complexes, genes, phenotypes, gene_arm, expressed


def _band_noise(rng: np.random.Generator, size: int, freq: float) -> np.ndarray:
    """Unit-variance noise whose spectrum is a ring at `freq` cycles/pixel (an organelle texture)."""
    white = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    ring = np.exp(-0.5 * ((radius - freq) / (0.35 * freq)) ** 2)
    out = np.fft.irfft2(np.fft.rfft2(white) * ring, s=(size, size))
    return out / (out.std() + 1e-8)


def render_site(
    phenotype: np.ndarray,
    rng: np.random.Generator,
    size: int = 512,
    channels: int = 6,
    cells: int = 36,
    plate_gain: np.ndarray | None = None,
    plate_offset: np.ndarray | None = None,
) -> np.ndarray:
    """Render one site as float32 (C, size, size) in [0, 1]."""
    z = dict(zip(PHENOTYPE_AXES, np.tanh(phenotype / 2.0)))  # bounded shifts in (-1, 1)
    scale = size / 512.0
    n_cells = max(1, int(round(cells * scale**2 * (1 + 0.4 * z["density"]))))
    r_nuc = 10.0 * scale * (1 + 0.35 * z["nucleus_size"])
    r_cell = 2.3 * r_nuc * (1 + 0.3 * z["cell_size"])
    elong = 1 + 0.6 * (z["elongation"] + 1) / 2

    nucleus = np.zeros((size, size), np.float32)
    cyto = np.zeros((size, size), np.float32)
    membrane = np.zeros((size, size), np.float32)
    golgi = np.zeros((size, size), np.float32)
    half = int(np.ceil(r_cell * elong * 1.3)) + 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    for _ in range(n_cells):
        cy, cx = rng.uniform(0, size, 2)
        theta = rng.uniform(0, np.pi)
        jitter = rng.uniform(0.85, 1.15)
        c, s = np.cos(theta), np.sin(theta)
        dy, dx = yy - (cy % 1), xx - (cx % 1)
        u = (c * dx + s * dy) / elong
        v = -s * dx + c * dy
        d = np.sqrt(u**2 + v**2)
        nuc = 1 / (1 + np.exp((d - r_nuc * jitter) * 1.2))
        cell = 1 / (1 + np.exp((d - r_cell * jitter) * 0.6))
        ring = np.exp(-0.5 * ((d - r_cell * jitter) / (1.5 * scale + 0.5)) ** 2)
        gdy, gdx = dy - 0.6 * r_nuc * s, dx - 0.6 * r_nuc * c
        gol = np.exp(-0.5 * (gdx**2 + gdy**2) / (0.45 * r_nuc) ** 2)
        y0, x0 = int(cy) - half, int(cx) - half
        ys = slice(max(y0, 0), min(y0 + 2 * half + 1, size))
        xs = slice(max(x0, 0), min(x0 + 2 * half + 1, size))
        ly = slice(ys.start - y0, ys.stop - y0)
        lx = slice(xs.start - x0, xs.stop - x0)
        np.maximum(nucleus[ys, xs], nuc[ly, lx], out=nucleus[ys, xs])
        np.maximum(cyto[ys, xs], cell[ly, lx], out=cyto[ys, xs])
        np.maximum(membrane[ys, xs], ring[ly, lx], out=membrane[ys, xs])
        np.maximum(golgi[ys, xs], gol[ly, lx], out=golgi[ys, xs])

    mito_tex = _band_noise(rng, size, 0.12 * (1 + 0.5 * z["mito_texture"]))
    er_tex = _band_noise(rng, size, 0.05 * (1 + 0.5 * z["er_texture"]))
    spots = np.clip(_band_noise(rng, size, 0.2), 0, None)
    cyto_only = np.clip(cyto - nucleus, 0, 1)
    gains = 1 + 0.45 * np.array([z["dna_gain"], z["er_gain"], z["actin_gain"], z["rna_gain"], z["mito_gain"], z["golgi_gain"]])
    planes = [
        nucleus * (0.85 + 0.15 * er_tex),
        cyto_only * np.clip(0.6 + 0.35 * er_tex, 0, None),
        membrane * 0.8 + 0.15 * cyto,
        nucleus * np.clip(0.3 + 0.5 * spots, 0, None) + 0.25 * cyto_only,
        cyto_only * np.clip(0.4 + 0.6 * mito_tex, 0, None),
        0.6 * golgi * cyto + 0.35 * membrane,
    ]
    img = np.stack(planes[:channels]).astype(np.float32) * gains[:channels, None, None].astype(np.float32) * 0.55
    if plate_gain is not None:
        img *= plate_gain[:channels, None, None]
    background = 0.04 if plate_offset is None else plate_offset[:channels, None, None]
    img += background
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _addresses(rng: np.random.Generator, n: int) -> list[str]:
    all_addresses = [f"{r}{c:02d}" for r, c in itertools.product("ABCDEFGHIJKLMNOP", range(1, 25))]
    if n > len(all_addresses):
        raise ValueError(f"{n} wells do not fit a 384-well plate")
    picked = rng.choice(len(all_addresses), n, replace=False)
    return sorted(all_addresses[i] for i in picked)


def _to_png_array(plane: np.ndarray, bit_depth: int) -> np.ndarray:
    if bit_depth == 8:
        return np.round(plane * 255).astype(np.uint8)
    return np.round(plane * 65535).astype(np.uint16)


def write_png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(array)  # uint16 -> mode "I;16", uint8 -> "L"
    if array.dtype == np.uint16 and image.mode != "I;16":
        raise RuntimeError(f"Pillow stored a uint16 plane as mode {image.mode}, not I;16")
    image.save(path, compress_level=1)  # fast writes; the noise barely compresses anyway


def make_synthetic_screen(root: str, config: SyntheticScreenConfig | None = None, **overrides) -> SyntheticScreen:
    """Generate the screen under `root` (created) and return where everything is."""
    import pandas as pd

    cfg = config or SyntheticScreenConfig()
    if overrides:
        cfg = SyntheticScreenConfig(**{**asdict(cfg), **overrides})
    complexes, genes, phenotypes, gene_arm, expressed = plan_screen(cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    rows = []
    for e in range(cfg.n_experiments):
        experiment = f"synth-{e + 1:03d}"
        for p in range(1, cfg.n_plates + 1):
            plate_gain = rng.uniform(0.75, 1.25, cfg.channels).astype(np.float32)
            plate_offset = rng.uniform(0.01, 0.08, cfg.channels).astype(np.float32)
            wells = list(genes) + ["EMPTY_control"] * cfg.n_empty_controls + ["CRISPR_control"] * cfg.n_crispr_controls
            order = rng.permutation(len(wells))
            addresses = _addresses(rng, len(wells))
            plate_dir = os.path.join(root, "images", experiment, f"Plate{p}")
            os.makedirs(plate_dir, exist_ok=True)
            guide = (e * cfg.n_plates + p - 1) % 6 + 1
            for address, w in zip(addresses, order):
                gene = wells[w]
                image = render_site(phenotypes[gene], rng, cfg.site_size, cfg.channels, cfg.cells_per_site, plate_gain, plate_offset)
                for c in range(cfg.channels):
                    write_png(os.path.join(plate_dir, f"{address}_s1_w{c + 1}.png"), _to_png_array(image[c], cfg.bit_depth))
                treatment = "EMPTY_control" if gene == "EMPTY_control" else f"{gene}_guide_{guide}"
                rows.append({
                    "well_id": f"{experiment}_{p}_{address}", "experiment_name": experiment, "plate": p,
                    "address": address, "gene": gene, "treatment": treatment, "SMILES": "",
                    "concentration": np.nan, "perturbation_type": "CRISPR", "cell_type": "HUVEC",
                })
    os.makedirs(os.path.join(root, "relationships"), exist_ok=True)
    metadata_csv = os.path.join(root, "metadata.csv")
    pd.DataFrame(rows, columns=list(METADATA_COLUMNS)).to_csv(metadata_csv, index=False)
    pairs = [(a, b) for members in complexes for a, b in itertools.combinations(sorted(members), 2)]
    relationships_csv = os.path.join(root, "relationships", "synthetic_complexes.csv")
    pd.DataFrame(pairs, columns=["entity1", "entity2"]).to_csv(relationships_csv, index=False)
    arms_csv = os.path.join(root, "gene_arms.csv")
    pd.DataFrame(
        {"gene": genes, "chromosome_arm": [gene_arm[g] for g in genes], "expressed": [expressed[g] for g in genes]}
    ).to_csv(arms_csv, index=False)
    return SyntheticScreen(root, cfg, metadata_csv, relationships_csv, arms_csv, genes, complexes, phenotypes)
