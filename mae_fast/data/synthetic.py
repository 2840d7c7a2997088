"""A Cell-Painting-like CRISPR screen of real protein complexes, generated on the fly and written like RxRx3.

Design and reasons: docs/SYNTHETIC_SCREEN.md (written before any model was run on this screen). In short:

* genes and complexes are real: CORUM complexes read from the `efaar-benchmarking` package's CORUM_clusters.tsv
  when that package is installed (located with importlib, never imported), else a built-in list of textbook
  complexes (`BUILTIN_COMPLEXES`); `screen.json` says which;
* each complex gets one phenotype class (`PHENOTYPE_CLASSES`): intensity, size/count, shape, texture,
  localisation; texture and localisation leave every channel's pixel histogram unchanged (rank-matched to a
  control twin rendered from the same seed, see `render_site`);
* nuisances: plate gain/offset, illumination vignetting, focus blur, cell-density variation, guide efficacy,
  chromosome-arm bias, shot/read noise; each can be switched off in `SyntheticScreenConfig`.

Each site is a 6-channel image (Recursion's channel order: w1 DNA, w2 ER, w3 actin, w4 RNA/nucleoli,
w5 mitochondria, w6 Golgi/plasma membrane). Files written under `root`:
    images/{experiment}/Plate{plate}/{address}_s1_w{c}.png    c = 1..C, 8-bit (default) or 16-bit PNG
    metadata.csv                                               RxRx3 columns (well_id, experiment_name, plate, ...)
    relationships/planted_complexes.csv                        entity1,entity2 for every planted pair
    relationships/planted_{class}.csv                          the same, one file per phenotype class
    gene_arms.csv                                              gene, chromosome_arm, expressed
    genes.csv                                                  gene, complex, phenotype_class, expressed
    guides.csv                                                 gene, guide, efficacy
    screen.json                                                complex source, class mix, configuration

Everything is a function of the seed.

One file on purpose: the screen is one design (docs/SYNTHETIC_SCREEN.md) -- genes and classes, the cells drawn per
site, the nuisances, the files written -- and every part is tuned against the others (histogram invariance).
"""
from __future__ import annotations

import itertools
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from mae_fast.evaluation.databases import corum_complexes, efaar_annotations_dir
from mae_fast.evaluation.table import EvaluationInputError
from mae_fast.processes import default_workers, map_in_processes, worker_state

CHANNEL_NAMES = ("DNA", "ER", "Actin", "RNA", "Mito", "Golgi")
METADATA_COLUMNS = (
    "well_id", "experiment_name", "plate", "address", "gene", "treatment",
    "SMILES", "concentration", "perturbation_type", "cell_type",
)
NEGATIVE_CONTROLS = ("EMPTY_control", "CRISPR_control")

# Phenotype classes and the morphology axes each one moves (docs/SYNTHETIC_SCREEN.md has the table).
PHENOTYPE_CLASSES: dict[str, tuple[str, ...]] = {
    "intensity": ("dna_stain", "er_stain", "actin_stain", "rna_stain", "mito_stain", "golgi_stain"),
    "size_count": ("density", "nucleus_size", "cell_size"),
    "shape": ("elongation", "nuclear_irregularity"),
    "texture": ("mito_fragmentation", "er_texture", "chromatin_texture"),
    "localisation": ("mito_perinuclear", "er_perinuclear", "rna_nuclear"),
}
PHENOTYPE_AXES = tuple(axis for axes in PHENOTYPE_CLASSES.values() for axis in axes)
AXIS = {axis: i for i, axis in enumerate(PHENOTYPE_AXES)}
HISTOGRAM_INVARIANT_CLASSES = ("texture", "localisation")
_INVARIANT_AXES = np.array([AXIS[a] for c in HISTOGRAM_INVARIANT_CLASSES for a in PHENOTYPE_CLASSES[c]])
# A Cas9 cut on an arm causes DNA damage / arm loss: a proliferation-like shift shared by the arm's genes.
ARM_AXES = ("density", "nucleus_size", "cell_size", "dna_stain")
MAX_COMPLEX_MEMBERS = 20          # larger CORUM entries are assemblies of several complexes, not one complex

# Textbook complexes, written from biology facts (subunit gene symbols), used when CORUM is not installed.
BUILTIN_COMPLEXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("20S proteasome", tuple(f"PSMA{i}" for i in range(1, 8)) + tuple(f"PSMB{i}" for i in range(1, 8))),
    ("19S proteasome regulatory particle", tuple(f"PSMC{i}" for i in range(1, 7))
     + ("PSMD1", "PSMD2", "PSMD3", "PSMD4", "PSMD6", "PSMD7", "PSMD8", "PSMD11", "PSMD12", "PSMD13", "PSMD14")),
    ("RNA polymerase II", tuple(f"POLR2{c}" for c in "ABCDEFGHIJKL")),
    ("MCM2-7 helicase", tuple(f"MCM{i}" for i in range(2, 8))),
    ("Origin recognition complex", tuple(f"ORC{i}" for i in range(1, 7))),
    ("RNA exosome", tuple(f"EXOSC{i}" for i in range(1, 10)) + ("DIS3",)),
    ("CCT/TRiC chaperonin", ("TCP1", "CCT2", "CCT3", "CCT4", "CCT5", "CCT6A", "CCT7", "CCT8")),
    ("COPI coatomer", ("COPA", "COPB1", "COPB2", "COPG1", "ARCN1", "COPE", "COPZ1")),
    ("COPII coat", ("SEC23A", "SEC24A", "SEC13", "SEC31A", "SAR1A")),
    ("Condensin I", ("SMC2", "SMC4", "NCAPD2", "NCAPG", "NCAPH")),
    ("Arp2/3 complex", ("ACTR2", "ACTR3", "ARPC1B", "ARPC2", "ARPC3", "ARPC4", "ARPC5")),
    ("Dynactin", ("DCTN1", "DCTN2", "DCTN3", "DCTN4", "DCTN5", "DCTN6", "ACTR1A")),
    ("Respiratory complex I (core)", ("NDUFS1", "NDUFS2", "NDUFS3", "NDUFV1", "NDUFV2", "NDUFA9", "NDUFB8")),
    ("Respiratory complex III", ("UQCRC1", "UQCRC2", "UQCRFS1", "UQCRB", "UQCRQ", "UQCRH", "CYC1")),
    ("Cytochrome c oxidase", ("COX4I1", "COX5A", "COX5B", "COX6B1", "COX6C", "COX7C")),
    ("ATP synthase", ("ATP5F1A", "ATP5F1B", "ATP5F1C", "ATP5F1D", "ATP5F1E", "ATP5PO", "ATP5PB")),
    ("TOM complex", ("TOMM40", "TOMM22", "TOMM20", "TOMM70", "TOMM5", "TOMM6", "TOMM7")),
    ("Nup107-160 Y complex", ("NUP107", "NUP160", "NUP133", "NUP98", "NUP85", "NUP43", "NUP37", "SEH1L")),
    ("Anaphase-promoting complex", ("ANAPC1", "ANAPC2", "ANAPC4", "ANAPC5", "ANAPC10", "ANAPC11", "CDC16",
                                    "CDC23", "CDC27")),
    ("BAF (SWI/SNF)", ("SMARCA4", "SMARCB1", "SMARCC1", "SMARCC2", "SMARCD1", "SMARCE1", "ARID1A")),
    ("Ragulator", tuple(f"LAMTOR{i}" for i in range(1, 6))),
    ("mTORC1", ("MTOR", "RPTOR", "MLST8", "AKT1S1", "DEPTOR")),
    ("HOPS tethering complex", ("VPS11", "VPS16", "VPS18", "VPS33A", "VPS39", "VPS41")),
    ("Exocyst", tuple(f"EXOC{i}" for i in range(1, 9))),
    ("BBSome", ("BBS1", "BBS2", "BBS4", "BBS5", "BBS7", "TTC8", "BBS9", "BBIP1")),
    ("eIF3 core", ("EIF3A", "EIF3B", "EIF3C", "EIF3D", "EIF3E", "EIF3F", "EIF3G", "EIF3H", "EIF3I")),
    ("V-ATPase V1 domain", ("ATP6V1A", "ATP6V1B2", "ATP6V1C1", "ATP6V1D", "ATP6V1E1", "ATP6V1F", "ATP6V1G1",
                            "ATP6V1H")),
    ("Oligosaccharyltransferase", ("STT3A", "RPN1", "RPN2", "DDOST", "DAD1", "OSTC", "OST4")),
    ("WAVE regulatory complex", ("WASF2", "CYFIP1", "NCKAP1", "ABI1", "BRK1")),
    ("Fanconi anaemia core complex", ("FANCA", "FANCB", "FANCC", "FANCE", "FANCF", "FANCG", "FANCL", "FAAP100")),
    ("CCR4-NOT", ("CNOT1", "CNOT2", "CNOT3", "CNOT6", "CNOT7", "CNOT9")),
    ("HAUS augmin complex", tuple(f"HAUS{i}" for i in range(1, 9))),
    ("Elongator", tuple(f"ELP{i}" for i in range(1, 7))),
    ("Cohesin", ("SMC1A", "SMC3", "RAD21", "STAG2")),
    ("PRC2", ("EZH2", "EED", "SUZ12", "RBBP4")),
    ("AP-2 adaptor", ("AP2A1", "AP2B1", "AP2M1", "AP2S1")),
    ("Chromosomal passenger complex", ("AURKB", "INCENP", "CDCA8", "BIRC5")),
    ("NDC80 complex", ("NDC80", "NUF2", "SPC24", "SPC25")),
    ("MRN complex", ("MRE11", "RAD50", "NBN")),
    ("Retromer cargo-recognition core", ("VPS35", "VPS29", "VPS26A")),
    ("GATOR1", ("DEPDC5", "NPRL2", "NPRL3")),
    ("TSC complex", ("TSC1", "TSC2", "TBC1D7")),
)


@dataclass
class SyntheticScreenConfig:
    n_experiments: int = 2
    n_plates: int = 2                 # per experiment; every gene is in every plate (one guide per plate)
    n_complexes: int = 30
    complex_size: int = 5             # members taken from each chosen complex (uniform: comparable pair counts)
    n_singletons: int = 24            # genes of other complexes, each with its own phenotype
    n_empty_controls: int = 12        # wells per plate
    n_crispr_controls: int = 4        # wells per plate
    site_size: int = 256
    channels: int = 6
    bit_depth: int = 8                # 8 (RxRx1, RxRx3-core) or 16 (RxRx3)
    cells_per_site: float = 20.0      # mean (Poisson) for a control well at 256 px; scales with the site area
    n_arms: int = 6
    n_guides: int = 4
    effect_size: float = 1.0          # scale of the knockout phenotypes
    complex_source: str = "auto"      # "auto" (CORUM if efaar-benchmarking is installed), "corum" or "builtin"
    # nuisances (0 / False switches one off)
    arm_effect: float = 0.25          # scale of the per-arm shift
    plate_gain_spread: float = 0.2    # per plate and channel gain in 1 +- spread; offsets on with it
    vignetting: float = 0.3           # largest fraction of light lost at the corners
    focus_blur: bool = True
    density_cv: float = 0.25          # per-well seeding variation (log-normal sigma)
    guide_efficacy: bool = True       # False: every guide knocks out fully
    noise: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.channels <= len(CHANNEL_NAMES):
            raise ValueError(f"channels must be in 1..{len(CHANNEL_NAMES)}, got {self.channels}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if self.site_size < 64:
            raise ValueError(f"site_size must be >= 64, got {self.site_size}")
        if self.complex_size < 2:
            raise ValueError(f"complex_size must be >= 2, got {self.complex_size}")
        if self.complex_source not in ("auto", "corum", "builtin"):
            raise ValueError(f"complex_source must be auto, corum or builtin, got {self.complex_source!r}")
        if self.n_guides < 1 or self.n_arms < 1:
            raise ValueError(f"n_guides and n_arms must be >= 1, got {self.n_guides} and {self.n_arms}")
        if not 0 <= self.vignetting < 1 or not 0 <= self.plate_gain_spread < 1 or self.density_cv < 0:
            raise ValueError("vignetting and plate_gain_spread must be in [0, 1), density_cv >= 0")


@dataclass
class ScreenPlan:
    """The planted truth of a screen: which genes, which complex and class, which phenotype (no pixels)."""

    source: str                              # "corum" or "builtin"
    source_path: str | None
    complex_names: list[str]
    complexes: list[list[str]]
    complex_classes: list[str]
    singletons: list[str]
    genes: list[str]
    gene_class: dict[str, str]
    gene_complex: dict[str, str]
    knockout: dict[str, np.ndarray]          # full-efficacy knockout phenotype (unexpressed genes: 10%)
    arm_shift: dict[str, np.ndarray]         # the gene's arm shift (every cut on the arm)
    gene_arm: dict[str, str]
    expressed: dict[str, bool]
    guide_efficacy: dict[str, np.ndarray]    # gene -> (n_guides,)

    @property
    def phenotypes(self) -> dict[str, np.ndarray]:
        """Knockout + arm shift at full efficacy, and zeros for the negative controls."""
        out = {g: self.knockout[g] + self.arm_shift[g] for g in self.genes}
        for c in NEGATIVE_CONTROLS:
            out[c] = np.zeros(len(PHENOTYPE_AXES))
        return out

    def well_phenotype(self, gene: str, guide: int) -> np.ndarray:
        """The phenotype of a well of `gene` treated with guide `guide` (1-based)."""
        if gene in NEGATIVE_CONTROLS:
            return np.zeros(len(PHENOTYPE_AXES))
        return self.knockout[gene] * self.guide_efficacy[gene][guide - 1] + self.arm_shift[gene]


@dataclass
class SyntheticScreen:
    root: str
    config: SyntheticScreenConfig
    metadata_csv: str
    relationships_csv: str
    arms_csv: str
    genes_csv: str
    screen_json: str
    class_relationships: dict[str, str]      # phenotype class -> planted pairs of that class
    plan: ScreenPlan = field(repr=False)

    @property
    def images_dir(self) -> str:
        return os.path.join(self.root, "images")

    @property
    def genes(self) -> list[str]:
        return self.plan.genes

    @property
    def complexes(self) -> list[list[str]]:
        return self.plan.complexes

    @property
    def phenotypes(self) -> dict[str, np.ndarray]:
        return self.plan.phenotypes

    @property
    def source(self) -> str:
        return self.plan.source


# --------------------------------------------------------------------------- complexes

def corum_clusters_path() -> str | None:
    """CORUM_clusters.tsv of an installed efaar-benchmarking (located by mae_fast.evaluation.databases), or None."""
    try:
        folder = efaar_annotations_dir()
    except EvaluationInputError:
        return None
    path = os.path.join(folder, "CORUM_clusters.tsv")
    return path if os.path.exists(path) else None


def complex_catalogue(source: str) -> tuple[str, str | None, list[tuple[str, tuple[str, ...]]]]:
    """(source used, file path or None, [(complex name, gene symbols)]) for `source` auto / corum / builtin."""
    path = corum_clusters_path() if source in ("auto", "corum") else None
    if path is not None:
        complexes = corum_complexes(os.path.dirname(path), min_size=1)   # every gene: singletons come from them too
        return "corum", path, [(name, tuple(genes)) for name, genes in complexes.items()]
    if source == "corum":
        raise ValueError("complex_source='corum' needs the efaar-benchmarking package (its CORUM_clusters.tsv): "
                         "pip install --no-deps efaar-benchmarking==1.0")
    return "builtin", None, [(name, genes) for name, genes in BUILTIN_COMPLEXES]


def choose_complexes(catalogue, n: int, size: int, n_singletons: int, rng: np.random.Generator):
    """`n` complexes sharing no gene, `size` members of each, and `n_singletons` genes of no chosen complex."""
    candidates = [(name, sorted(set(genes))) for name, genes in catalogue
                  if size <= len(set(genes)) <= MAX_COMPLEX_MEMBERS]
    used: set[str] = set()
    names, members = [], []
    for i in rng.permutation(len(candidates)):
        name, genes = candidates[i]
        if len(names) == n:
            break
        if used.isdisjoint(genes):
            names.append(name)
            members.append(sorted(rng.choice(genes, size, replace=False).tolist()))
            used.update(genes)  # all members: a singleton is never an unsampled member of a chosen complex
    if len(names) < n:
        raise ValueError(f"only {len(names)} disjoint complexes of {size}..{MAX_COMPLEX_MEMBERS} members in the "
                         f"complex source; ask for fewer (n_complexes={n}) or smaller (complex_size={size})")
    rest = sorted({g for _, genes in catalogue for g in genes} - used)
    if len(rest) < n_singletons:
        raise ValueError(f"the complex source has only {len(rest)} genes left for {n_singletons} singletons")
    singletons = sorted(rng.choice(rest, n_singletons, replace=False).tolist()) if n_singletons else []
    return names, members, singletons


def _class_direction(cls: str, rng: np.random.Generator, norm: float) -> np.ndarray:
    axes = [AXIS[a] for a in PHENOTYPE_CLASSES[cls]]
    direction = rng.standard_normal(len(axes))
    out = np.zeros(len(PHENOTYPE_AXES))
    out[axes] = norm * direction / np.linalg.norm(direction)
    return out


def plan_screen(cfg: SyntheticScreenConfig) -> ScreenPlan:
    """Genes, complexes, classes, per-gene phenotypes, guide efficacies and arm table (no pixels)."""
    rng = np.random.default_rng(cfg.seed)
    source, path, catalogue = complex_catalogue(cfg.complex_source)
    names, complexes, singletons = choose_complexes(catalogue, cfg.n_complexes, cfg.complex_size,
                                                    cfg.n_singletons, rng)
    classes = list(PHENOTYPE_CLASSES)
    complex_classes = [classes[i % len(classes)] for i in range(len(complexes))]  # complexes are in seeded order
    genes = [g for members in complexes for g in members] + singletons
    gene_class, gene_complex, knockout = {}, {}, {}
    for name, cls, members in zip(names, complex_classes, complexes):
        shared = _class_direction(cls, rng, 1.5 * cfg.effect_size)
        axes = [AXIS[a] for a in PHENOTYPE_CLASSES[cls]]
        for g in members:
            own = np.zeros(len(PHENOTYPE_AXES))
            own[axes] = 0.15 * cfg.effect_size * rng.standard_normal(len(axes))
            knockout[g], gene_class[g], gene_complex[g] = shared + own, cls, name
    for g in singletons:
        cls = classes[int(rng.integers(len(classes)))]
        knockout[g], gene_class[g], gene_complex[g] = _class_direction(cls, rng, 1.5 * cfg.effect_size), cls, ""
    expressed = {g: bool(e) for g, e in zip(genes, rng.random(len(genes)) < 0.6)}
    for g in genes:
        if not expressed[g]:
            knockout[g] = 0.1 * knockout[g]
    arms = [f"chr{i // 2 + 1}{'pq'[i % 2]}" for i in range(cfg.n_arms)]
    arm_vectors = {}
    for a in arms:
        arm_vectors[a] = np.zeros(len(PHENOTYPE_AXES))
        arm_vectors[a][[AXIS[x] for x in ARM_AXES]] = cfg.arm_effect * rng.standard_normal(len(ARM_AXES))
    gene_arm = {g: arms[i] for g, i in zip(genes, rng.integers(0, cfg.n_arms, len(genes)))}
    efficacy = rng.beta(4.0, 1.5, (len(genes), cfg.n_guides))
    efficacy[rng.random(efficacy.shape) < 0.1] = 0.1           # some guides barely cut
    if not cfg.guide_efficacy:
        efficacy[:] = 1.0
    return ScreenPlan(
        source=source, source_path=path, complex_names=names, complexes=complexes, complex_classes=complex_classes,
        singletons=singletons, genes=genes, gene_class=gene_class, gene_complex=gene_complex, knockout=knockout,
        arm_shift={g: arm_vectors[gene_arm[g]] for g in genes}, gene_arm=gene_arm, expressed=expressed,
        guide_efficacy={g: efficacy[i] for i, g in enumerate(genes)},
    )


# --------------------------------------------------------------------------- pixels

@dataclass
class SiteNuisance:
    """What the plate, the well and the microscope do to one site (identity = none of it)."""

    gain: np.ndarray                 # (C,) plate gain
    offset: np.ndarray               # (C,) camera offset
    vignetting: np.ndarray           # (C,) fraction of light lost at the corners
    centre: tuple[float, float] = (0.5, 0.5)  # optical centre, fraction of the site
    blur_sigma: float = 0.0          # focus blur, px
    density: float = 1.0             # seeding factor on the number of cells
    noise: bool = True

    @classmethod
    def identity(cls, channels: int, noise: bool = False) -> "SiteNuisance":
        return cls(gain=np.ones(channels), offset=np.full(channels, 0.03), vignetting=np.zeros(channels),
                   noise=noise)


def draw_plate_nuisance(cfg: SyntheticScreenConfig, rng: np.random.Generator) -> dict:
    c = cfg.channels
    s = cfg.plate_gain_spread
    return {
        "gain": rng.uniform(1 - s, 1 + s, c),
        "offset": rng.uniform(0.01, 0.06, c) if s > 0 else np.full(c, 0.03),
        "vignetting": cfg.vignetting * rng.uniform(0.5, 1.0, c),
        "centre": tuple(0.5 + rng.uniform(-0.1, 0.1, 2) * (cfg.vignetting > 0)),
    }


def draw_site_nuisance(cfg: SyntheticScreenConfig, plate: dict, rng: np.random.Generator) -> SiteNuisance:
    blur = min(2.5, 0.3 + rng.exponential(0.5)) if cfg.focus_blur else 0.0
    density = float(np.exp(cfg.density_cv * rng.standard_normal()))
    return SiteNuisance(blur_sigma=blur, density=density, noise=cfg.noise, **plate)


def _band_spectrum(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """(n, size, size // 2 + 1) complex white noise: the spectrum of n independent Gaussian fields."""
    shape = (n, size, size // 2 + 1)
    return rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)


def _band_noise(spectrum: np.ndarray, freqs) -> np.ndarray:
    """(len(freqs), size, size) unit-variance Gaussian fields, field k with its spectrum a ring at freqs[k]
    cycles/pixel (an organelle texture). Drawn directly in the frequency domain (white noise's spectrum is
    complex Gaussian, `_band_spectrum`), so one inverse FFT per field; a site and its control twin share the
    spectrum and differ only in the rings."""
    size = spectrum.shape[1]
    freqs = np.asarray(freqs, dtype=np.float32)[:, None, None]
    radius = np.sqrt(np.fft.rfftfreq(size).astype(np.float32)[None, None, :] ** 2
                     + np.fft.fftfreq(size).astype(np.float32)[None, :, None] ** 2)
    ring = np.exp(-0.5 * ((radius - freqs) / (0.35 * freqs)) ** 2)
    out = np.fft.irfft2(spectrum * ring, s=(size, size))
    return (out / (out.std(axis=(1, 2), keepdims=True) + 1e-8)).astype(np.float32)


def _gaussian_blur(planes: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of (C, H, W): a sampled kernel of radius ceil(3 sigma) along each axis (periodic borders).
    Separable shifted sums: about 3x cheaper than an FFT for the small sigmas of focus blur."""
    if sigma <= 0:
        return planes
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    kernel /= kernel.sum()
    out = planes
    for axis in (1, 2):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="wrap")
        n = planes.shape[axis]
        acc = np.zeros_like(planes)
        for i, weight in enumerate(kernel):
            acc += weight * (padded[:, i:i + n] if axis == 1 else padded[:, :, i:i + n])
        out = acc
    return out


def _rank_match(plane: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`plane`'s spatial order with `reference`'s values: the histogram becomes exactly the reference's."""
    out = np.empty_like(plane)
    out.ravel()[np.argsort(plane, axis=None)] = np.sort(reference, axis=None)
    return out


CELL_CHUNK = 16      # cells rendered as one batch: bounds the batch arrays (16 windows of the largest cell's size)


def _window_offsets(cy: np.ndarray, cx: np.ndarray, half: int):
    """Square windows of half-width `half` around the centres (cy, cx) (n,), each starting at int(centre) - half:
    (dy (n, 2 half + 1, 1), dx (n, 1, 2 half + 1)) as float32 offsets of its pixels from the centre."""
    steps = np.arange(-half, half + 1)
    dy = (np.trunc(cy).astype(np.int64)[:, None] + steps).astype(np.float32) - cy.astype(np.float32)[:, None]
    dx = (np.trunc(cx).astype(np.int64)[:, None] + steps).astype(np.float32) - cx.astype(np.float32)[:, None]
    return dy[:, :, None], dx[:, None, :]


def _column(values: np.ndarray) -> np.ndarray:
    """Per-cell float64 values as float32 (n, 1, 1), to broadcast over a batch of windows."""
    return np.asarray(values).astype(np.float32)[:, None, None]


def _cell_geometry(z: np.ndarray, cell_rng: np.random.Generator, size: int, cells: float) -> tuple[np.ndarray, ...]:
    """The cells' masks, float32 (size, size) each: (nucleus, cell, membrane, golgi, rho = radial position, 0 at
    the nucleus, 1 at the cell edge). Only the size/count and shape axes of `z` move them, so a site and its
    control twin (which differ in texture and localisation axes only) share them.

    Each cell is drawn in three windows around it (body, nucleus, Golgi), clipped to the site. The pixel work is
    done for a batch of cells at once (`CELL_CHUNK`, windows of the batch's largest size, so per-cell Python
    overhead is a few slice assignments); each cell then writes only its own window, into a canvas padded so
    that no window needs clipping. The cells are merged by maximum, and rho comes from the cell on top."""
    area = (size / 256.0) ** 2
    n_cells = max(1, int(cell_rng.poisson(cells * area * (1 + 0.5 * z[AXIS["density"]]))))
    r_nuc = 9.0 * (1 + 0.3 * z[AXIS["nucleus_size"]])
    r_cell = 20.0 * (1 + 0.3 * z[AXIS["cell_size"]])
    aspect = 1.5 * np.exp(0.5 * z[AXIS["elongation"]])
    irregular = 0.12 * (1 + z[AXIS["nuclear_irregularity"]])
    harmonics = np.arange(2, 6)
    draws = []
    for _ in range(n_cells):   # one cell after another from the stream: the cells do not depend on CELL_CHUNK
        cy, cx = cell_rng.uniform(0, size, 2)
        theta, golgi_angle = cell_rng.uniform(0, 2 * np.pi, 2)
        jitter, stretch = cell_rng.uniform(0.85, 1.15, 2)
        coef = cell_rng.standard_normal(len(harmonics)) / harmonics
        phase = cell_rng.uniform(0, 2 * np.pi, len(harmonics))
        draws.append(np.concatenate([[cy, cx, theta, golgi_angle, jitter, stretch], coef, phase]))
    draws = np.array(draws)
    cy, cx, theta, golgi_angle, jitter, stretch = draws[:, :6].T
    coef, phase = draws[:, 6:6 + len(harmonics)], draws[:, 6 + len(harmonics):]
    a = aspect * stretch
    rn, rc = r_nuc * jitter, r_cell * jitter
    gcy, gcx = cy + 1.1 * rn * np.sin(golgi_angle), cx + 1.1 * rn * np.cos(golgi_angle)
    # window half-widths: the body 6 px (body < 0.03) beyond the cell's long axis; the nucleus outline radius
    # rn * (1 + scale * sum_k coef_k cos(k angle + phase_k)) <= rn * (1 + 2 irregular) (Cauchy-Schwarz over the
    # harmonics) and 8 px (nuc < 0.003) beyond; the Golgi blob (sd 0.45 rn) 4 sd
    windows = {
        "body": (cy, cx, np.ceil(rc * np.maximum(a, 1.0)).astype(np.int64) + 6),
        "nucleus": (cy, cx, np.ceil(rn * np.sqrt(np.maximum(a, 1.0)) * (1 + 2 * irregular)).astype(np.int64) + 8),
        "golgi": (gcy, gcx, np.ceil(1.8 * rn).astype(np.int64) + 1),
    }
    pad = 0
    for wy, wx, half in windows.values():
        for centre in (np.trunc(wy).astype(np.int64), np.trunc(wx).astype(np.int64)):
            pad = max(pad, int(np.max(half - centre)), int(np.max(centre + half + 1 - size)))
    canvas = size + 2 * pad
    nucleus, cell, membrane, golgi, rho = (np.zeros((canvas, canvas), np.float32) for _ in range(5))

    def placed(name, k, batch_half):
        """(canvas rows, canvas columns, the cell's own window inside its batch window) of cell k."""
        wy, wx, half = windows[name]
        h, o = int(half[k]), batch_half - int(half[k])
        y0, x0 = int(np.trunc(wy[k])) - h + pad, int(np.trunc(wx[k])) - h + pad
        return slice(y0, y0 + 2 * h + 1), slice(x0, x0 + 2 * h + 1), (slice(o, o + 2 * h + 1), slice(o, o + 2 * h + 1))

    c_all, s_all = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    scale_all = irregular / np.linalg.norm(coef, axis=1)
    for start in range(0, n_cells, CELL_CHUNK):
        batch = slice(start, min(start + CELL_CHUNK, n_cells))
        ids = range(batch.start, batch.stop)
        c, s = c_all[batch, None, None], s_all[batch, None, None]
        # the cell body, membrane and radial position
        half = int(windows["body"][2][batch].max())
        dy, dx = _window_offsets(cy[batch], cx[batch], half)
        u = c * dx + s * dy
        v = -s * dx + c * dy
        d_cell = np.sqrt((u / _column(a[batch])) ** 2 + v**2)
        body = 0.5 - 0.5 * np.tanh((d_cell - _column(rc[batch])) * np.float32(0.3))   # logistic, no overflow
        ring = np.exp(np.float32(-0.5 / 1.5**2) * (d_cell - _column(rc[batch])) ** 2)
        radial = np.clip((d_cell - _column(rn[batch])) / _column(rc[batch] - rn[batch]), 0, 1)
        for j, k in enumerate(ids):
            ys, xs, own = placed("body", k, half)
            on_top = cell[ys, xs]
            mine = body[j][own] > on_top       # where this cell is the one on top
            np.copyto(rho[ys, xs], radial[j][own], where=mine)
            np.maximum(on_top, body[j][own], out=on_top)
            np.maximum(membrane[ys, xs], ring[j][own], out=membrane[ys, xs])
        # the nucleus: a wobbly outline, sum of harmonics 2..5 of the angle
        half = int(windows["nucleus"][2][batch].max())
        dy, dx = _window_offsets(cy[batch], cx[batch], half)
        un = (c * dx + s * dy) / _column(np.sqrt(a[batch]))
        v = -s * dx + c * dy
        d_nuc = np.sqrt(un**2 + v**2)
        cos1 = un / np.maximum(d_nuc, np.float32(1e-3))
        sin1 = v / np.maximum(d_nuc, np.float32(1e-3))
        cos_k, sin_k = cos1 * cos1 - sin1 * sin1, 2 * cos1 * sin1            # angle doubled: harmonic 2
        wobble = np.zeros_like(d_nuc)
        for k in range(len(harmonics)):            # cos(k t + p) = cos(k t) cos p - sin(k t) sin p
            wobble += (_column(coef[batch, k] * np.cos(phase[batch, k])) * cos_k
                       - _column(coef[batch, k] * np.sin(phase[batch, k])) * sin_k)
            if k + 1 < len(harmonics):
                cos_k, sin_k = cos_k * cos1 - sin_k * sin1, sin_k * cos1 + cos_k * sin1
        outline = 1 + _column(scale_all[batch]) * wobble
        nuc = 0.5 - 0.5 * np.tanh((d_nuc - _column(rn[batch]) * outline) * np.float32(0.75))
        # the Golgi: a blob of sd 0.45 rn beside the nucleus
        g_half = int(windows["golgi"][2][batch].max())
        gy, gx = _window_offsets(gcy[batch], gcx[batch], g_half)
        gol = np.exp((gx**2 + gy**2) * _column(-0.5 / (0.45 * rn[batch]) ** 2))
        for j, k in enumerate(ids):
            ys, xs, own = placed("nucleus", k, half)
            np.maximum(nucleus[ys, xs], nuc[j][own], out=nucleus[ys, xs])
            ys, xs, own = placed("golgi", k, g_half)
            np.maximum(golgi[ys, xs], gol[j][own], out=golgi[ys, xs])
    site = (slice(pad, pad + size), slice(pad, pad + size))
    return tuple(np.ascontiguousarray(plane[site]) for plane in (nucleus, cell, membrane, golgi, rho))


def _stain_planes(geometry: tuple[np.ndarray, ...], z: np.ndarray, spectrum: np.ndarray, channels: int) -> np.ndarray:
    """The cells as the stains see them, before optics: float32 (channels, size, size)."""
    nucleus, cell, membrane, golgi, rho = geometry
    z = np.asarray(z, dtype=np.float32)                   # float32 scalars keep every plane float32
    chromatin, er_texture, mito_texture, spots = _band_noise(spectrum, [
        0.10 * (1 + 0.5 * z[AXIS["chromatin_texture"]]),
        0.05 * (1 + 0.5 * z[AXIS["er_texture"]]),
        0.12 * (1 + 0.5 * z[AXIS["mito_fragmentation"]]),
        0.2,
    ])
    spots = np.clip(spots, 0, None)
    cyto = np.clip(cell - nucleus, 0, 1)
    # perinuclear (z > 0) vs peripheral (z < 0) weight along the radial position in the cytoplasm
    er_where = np.exp(np.float32(-2.5) * z[AXIS["er_perinuclear"]] * (rho - np.float32(0.5)))
    mito_where = np.exp(np.float32(-2.5) * z[AXIS["mito_perinuclear"]] * (rho - np.float32(0.5)))
    rna_nuclear = z[AXIS["rna_nuclear"]]
    stains = 1 + np.float32(0.45) * np.array([z[AXIS[a]] for a in PHENOTYPE_CLASSES["intensity"]])
    planes = [
        nucleus * np.clip(0.8 + 0.2 * chromatin, 0, None),
        cyto * er_where * np.clip(0.6 + 0.35 * er_texture, 0, None),
        membrane * 0.8 + 0.15 * cell,
        nucleus * np.clip(0.3 + 0.5 * spots, 0, None) * (1 + 0.6 * rna_nuclear) + 0.25 * cyto * (1 - 0.6 * rna_nuclear),
        cyto * mito_where * np.clip(0.4 + 0.6 * mito_texture, 0, None),
        0.6 * golgi * cell + 0.35 * membrane,
    ]
    return np.stack(planes[:channels]) * (np.float32(0.5) * stains[:channels, None, None])


def _optics(planes: np.ndarray, nuisance: SiteNuisance, channel_index=None) -> np.ndarray:
    """What the microscope does to the stained cells: focus blur, then vignetting (autofluorescence included).
    `channel_index`: which channels `planes` holds (default: the first len(planes))."""
    size = planes.shape[-1]
    channel_index = np.arange(len(planes)) if channel_index is None else np.asarray(channel_index)
    blurred = _gaussian_blur(planes, nuisance.blur_sigma)
    axis = np.linspace(0, 1, size, dtype=np.float32)
    r2 = ((axis[:, None] - np.float32(nuisance.centre[0])) ** 2 + (axis[None, :] - np.float32(nuisance.centre[1])) ** 2)
    falloff = 1 - np.asarray(nuisance.vignetting, np.float32)[channel_index, None, None] * np.minimum(r2 / 0.5, 1.5)
    return (blurred + np.float32(0.02)) * falloff


def render_site(
    phenotype: np.ndarray,
    seed,
    size: int = 256,
    channels: int = 6,
    cells: float = 20.0,
    nuisance: SiteNuisance | None = None,
) -> np.ndarray:
    """Render one site as float32 (C, size, size) in [0, 1]. `seed`: int or sequence of ints (the site's seed).

    Order: cells (stains) -> optics (focus blur, vignetting) -> [texture/localisation: each changed channel
    rank-matched to the control twin, the same site without those axes through the same optics] -> plate gain
    and camera offset -> shot and read noise (same draws for a site and its twin).
    """
    nuisance = nuisance or SiteNuisance.identity(channels)
    phenotype = np.asarray(phenotype, dtype=np.float64)
    z = np.tanh(phenotype)                                   # bounded shifts in (-1, 1)
    cell_rng, texture_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    geometry = _cell_geometry(z, cell_rng, size, cells * nuisance.density)
    spectrum = _band_spectrum(texture_rng, size, 4)
    stained = _stain_planes(geometry, z, spectrum, channels)
    image = _optics(stained, nuisance)
    if np.any(phenotype[_INVARIANT_AXES] != 0):
        control = z.copy()
        control[_INVARIANT_AXES] = 0                         # tanh(0) = 0: the control twin's z
        twin = _stain_planes(geometry, control, spectrum, channels)   # same cells, same texture draws
        changed = [c for c in range(channels) if not np.array_equal(stained[c], twin[c])]
        if changed:
            twin = _optics(twin[changed], nuisance, changed)
            for k, c in enumerate(changed):
                image[c] = _rank_match(image[c], twin[k])
    image = image * np.asarray(nuisance.gain, np.float32)[:channels, None, None]
    image = image + np.asarray(nuisance.offset, np.float32)[:channels, None, None]
    if nuisance.noise:
        noise_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
        sd = np.sqrt(np.clip(image, 0, None) * np.float32(0.02**2) + np.float32(0.004**2))  # shot and read noise
        image = image + sd * noise_rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- files

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


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def write_png(path: str, array: np.ndarray) -> None:
    """A grayscale PNG (uint8 -> 8-bit, uint16 -> 16-bit) written directly from the PNG format: every row with
    the Sub filter (difference to the pixel on the left), then Huffman-only deflate. The camera noise defeats LZ77
    matching anyway; as small as Pillow's adaptive filtering at level 1 and about 1.6x faster."""
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: write_png takes a 2-D uint8 or uint16 array, got {array.dtype} {array.shape}")
    height, width = array.shape
    bpp = array.dtype.itemsize                                   # bytes per pixel
    raw = np.ascontiguousarray(array.astype(array.dtype.newbyteorder(">"))).view(np.uint8).reshape(height, -1)
    rows = np.empty((height, raw.shape[1] + 1), np.uint8)
    rows[:, 0] = 1                                               # filter type 1: Sub
    rows[:, 1:bpp + 1] = raw[:, :bpp]
    np.subtract(raw[:, bpp:], raw[:, :-bpp], out=rows[:, bpp + 1:])   # modulo 256, as the format says
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = deflate.compress(rows.tobytes()) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8 * bpp, 0, 0, 0, 0)   # grayscale, no interlace
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
                + _png_chunk(b"IEND", b""))


def site_seed(cfg: SyntheticScreenConfig, plate_index: int, well_index: int) -> list[int]:
    """The seed of one site: a function of the screen's seed and the site's place only."""
    return [cfg.seed, 2, plate_index, well_index]


def _write_site(cfg: SyntheticScreenConfig, plan: ScreenPlan, plate: dict, plate_index: int, k: int, gene: str,
                guide: int, prefix: str) -> None:
    """Render well `k` of a plate and write its C planes (`prefix` + `_s1_w{c}.png`)."""
    nuisance = draw_site_nuisance(cfg, plate, np.random.default_rng([cfg.seed, 3, plate_index, k]))
    image = render_site(plan.well_phenotype(gene, guide), site_seed(cfg, plate_index, k), cfg.site_size,
                        cfg.channels, cfg.cells_per_site, nuisance)
    for c in range(cfg.channels):
        write_png(f"{prefix}_s1_w{c + 1}.png", _to_png_array(image[c], cfg.bit_depth))


def _write_site_in_worker(job: tuple) -> None:
    _write_site(*worker_state(), *job)


def make_synthetic_screen(root: str, config: SyntheticScreenConfig | None = None, workers: int | None = None,
                          **overrides) -> SyntheticScreen:
    """Generate the screen under `root` (created) and return where everything is. `workers` forked processes
    render sites (default: up to 2; `mae_fast.processes`); the files do not depend on it."""
    import pandas as pd

    cfg = config or SyntheticScreenConfig()
    if overrides:
        cfg = SyntheticScreenConfig(**{**asdict(cfg), **overrides})
    workers = workers or default_workers()
    plan = plan_screen(cfg)
    genes = plan.genes
    wells = list(genes) + ["EMPTY_control"] * cfg.n_empty_controls + ["CRISPR_control"] * cfg.n_crispr_controls
    rows, jobs = [], []
    for e in range(cfg.n_experiments):
        experiment = f"synth-{e + 1:03d}"
        for p in range(1, cfg.n_plates + 1):
            plate_index = e * cfg.n_plates + p - 1
            plate_rng = np.random.default_rng([cfg.seed, 1, plate_index])
            plate = draw_plate_nuisance(cfg, plate_rng)
            order = plate_rng.permutation(len(wells))
            addresses = _addresses(plate_rng, len(wells))
            plate_dir = os.path.join(root, "images", experiment, f"Plate{p}")
            os.makedirs(plate_dir, exist_ok=True)
            guide = plate_index % cfg.n_guides + 1
            for k, (address, w) in enumerate(zip(addresses, order)):
                gene = wells[w]
                jobs.append((plate, plate_index, k, gene, guide, os.path.join(plate_dir, address)))
                treatment = "EMPTY_control" if gene == "EMPTY_control" else f"{gene}_guide_{guide}"
                rows.append({
                    "well_id": f"{experiment}_{p}_{address}", "experiment_name": experiment, "plate": p,
                    "address": address, "gene": gene, "treatment": treatment, "SMILES": "",
                    "concentration": np.nan, "perturbation_type": "CRISPR", "cell_type": "HUVEC",
                })
    map_in_processes(_write_site_in_worker, jobs, workers, state=(cfg, plan))
    os.makedirs(os.path.join(root, "relationships"), exist_ok=True)
    metadata_csv = os.path.join(root, "metadata.csv")
    pd.DataFrame(rows, columns=list(METADATA_COLUMNS)).to_csv(metadata_csv, index=False)

    def pairs_of(members_list):
        pairs = [(a, b) for members in members_list for a, b in itertools.combinations(sorted(members), 2)]
        return pd.DataFrame(pairs, columns=["entity1", "entity2"])

    relationships_csv = os.path.join(root, "relationships", "planted_complexes.csv")
    pairs_of(plan.complexes).to_csv(relationships_csv, index=False)
    class_relationships = {}
    for cls in PHENOTYPE_CLASSES:
        members = [m for m, c in zip(plan.complexes, plan.complex_classes) if c == cls]
        if members:
            class_relationships[cls] = os.path.join(root, "relationships", f"planted_{cls}.csv")
            pairs_of(members).to_csv(class_relationships[cls], index=False)
    arms_csv = os.path.join(root, "gene_arms.csv")
    pd.DataFrame({"gene": genes, "chromosome_arm": [plan.gene_arm[g] for g in genes],
                  "expressed": [plan.expressed[g] for g in genes]}).to_csv(arms_csv, index=False)
    genes_csv = os.path.join(root, "genes.csv")
    pd.DataFrame({"gene": genes, "complex": [plan.gene_complex[g] for g in genes],
                  "phenotype_class": [plan.gene_class[g] for g in genes],
                  "expressed": [plan.expressed[g] for g in genes]}).to_csv(genes_csv, index=False)
    pd.DataFrame([{"gene": g, "guide": k + 1, "efficacy": round(float(e), 4)}
                  for g in genes for k, e in enumerate(plan.guide_efficacy[g])]).to_csv(
        os.path.join(root, "guides.csv"), index=False)
    screen_json = os.path.join(root, "screen.json")
    with open(screen_json, "w") as f:
        json.dump({
            "complex_source": plan.source, "complex_source_path": plan.source_path,
            "complexes": [{"name": n, "phenotype_class": c, "genes": m}
                          for n, c, m in zip(plan.complex_names, plan.complex_classes, plan.complexes)],
            "singletons": [{"gene": g, "phenotype_class": plan.gene_class[g]} for g in plan.singletons],
            "class_mix": {cls: plan.complex_classes.count(cls) for cls in PHENOTYPE_CLASSES},
            "histogram_invariant_classes": list(HISTOGRAM_INVARIANT_CLASSES),
            "config": asdict(cfg),
        }, f, indent=1)
    return SyntheticScreen(root, cfg, metadata_csv, relationships_csv, arms_csv, genes_csv, screen_json,
                           class_relationships, plan)
