"""EFAAR's published relationship databases, read from an installed `efaar-benchmarking` without importing it.

The registry package `efaar-benchmarking` (1.0) ships, as package data under
`efaar_benchmarking/benchmark_annotations/`, the five databases of the EFAAR benchmark as CSV files with the header
`entity1,entity2` (gene symbols, mostly both orientations): CORUM.txt, HuMAP.txt, Reactome.txt, SIGNOR.txt,
StringDB.txt, and CORUM_clusters.tsv (one complex per line: name<TAB>space-separated genes, no header).
Licences (the package's LICENSE file): CORUM and SIGNOR CC-BY-NC 4.0, HuMAP and StringDB CC-BY 4.0, Reactome CC0 1.0.
None of this data is copied into mae_fast; it is read where pip put it.

Importing `efaar_benchmarking` pulls scvi-tools, scikit-learn and more, so the package is only *located*
(`importlib.util.find_spec` reads no module code) and its files are read directly. Install it without its
dependencies:  pip install --no-deps efaar-benchmarking==1.0

    databases = efaar_relationships(["CORUM", "StringDB"])       # {name: RelationshipSet}
    complexes = corum_complexes()                                 # {complex name: [genes]}
    parse_relationship_args(["efaar:all", "mine=pairs.csv"])      # the CLI's --relationships
"""
from __future__ import annotations

import importlib.util
import os

from .recall import RelationshipSet, load_relationships
from .table import EvaluationInputError

EFAAR_PACKAGE = "efaar_benchmarking"
EFAAR_INSTALL = "pip install --no-deps efaar-benchmarking==1.0"
EFAAR_DATABASES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
EFAAR_PREFIX = "efaar:"
ANNOTATIONS_FOLDER = "benchmark_annotations"


def efaar_annotations_dir(package: str = EFAAR_PACKAGE) -> str:
    """Folder of the installed package's annotation files (the package is located, never imported)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = os.path.join(location, ANNOTATIONS_FOLDER)
        if os.path.isdir(folder):
            return folder
    if spec is None:
        raise EvaluationInputError(
            f"efaar:* relationships need the package efaar-benchmarking, which is not installed; install its data "
            f"without its heavy dependencies: {EFAAR_INSTALL}"
        )
    raise EvaluationInputError(
        f"efaar-benchmarking is installed ({', '.join(locations) or spec.origin}) but has no {ANNOTATIONS_FOLDER}/ "
        f"folder; reinstall it: {EFAAR_INSTALL}"
    )


def canonical_database(name: str) -> str:
    """'corum' -> 'CORUM', 'stringdb' -> 'StringDB' (case-insensitive); unknown names are an error listing the five."""
    by_lower = {db.lower(): db for db in EFAAR_DATABASES}
    found = by_lower.get(name.strip().lower())
    if found is None:
        raise EvaluationInputError(
            f"unknown EFAAR database {name!r}; choose from {', '.join(EFAAR_DATABASES)} or 'all'"
        )
    return found


def efaar_database_path(name: str, folder: str | None = None) -> str:
    folder = folder or efaar_annotations_dir()
    path = os.path.join(folder, f"{canonical_database(name)}.txt")
    if not os.path.isfile(path):
        raise EvaluationInputError(f"{path}: EFAAR database file missing from the installed package; {EFAAR_INSTALL}")
    return path


def efaar_relationships(names=("all",), folder: str | None = None) -> dict[str, RelationshipSet]:
    """{canonical name: RelationshipSet} for the named databases ('all' = the five), in EFAAR's order."""
    if isinstance(names, str):
        names = [names]
    wanted: list[str] = []
    for name in names:
        for db in (EFAAR_DATABASES if name.strip().lower() == "all" else [canonical_database(name)]):
            if db not in wanted:
                wanted.append(db)
    folder = folder or efaar_annotations_dir()
    return {db: load_relationships(efaar_database_path(db, folder), db) for db in wanted}


def corum_complexes(folder: str | None = None, min_size: int = 2) -> dict[str, list[str]]:
    """CORUM complexes from the package's CORUM_clusters.tsv: {complex name: genes (file order, unique)}.

    Lines are `name<TAB>gene gene ...`; complexes with fewer than `min_size` distinct genes are left out. A line
    without a tab is an error naming it.
    """
    path = os.path.join(folder or efaar_annotations_dir(), "CORUM_clusters.tsv")
    if not os.path.isfile(path):
        raise EvaluationInputError(f"{path}: CORUM_clusters.tsv missing from the installed package; {EFAAR_INSTALL}")
    complexes: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "\t" not in line:
                raise EvaluationInputError(f"{path}:{number}: expected 'complex<TAB>genes', found {line[:80]!r}")
            name, genes = line.split("\t", 1)
            members = list(dict.fromkeys(g for g in genes.split() if g))
            if len(members) >= min_size:
                complexes[name.strip()] = members
    return complexes


def parse_relationship_args(values, folder: str | None = None) -> dict:
    """The CLI's --relationships: `efaar:NAME` / `efaar:all` (installed EFAAR databases), `NAME=FILE` or `FILE`.

    Returns {name: RelationshipSet or path}; a name given twice is an error.
    """
    out: dict = {}

    def put(name, value):
        if name in out:
            raise EvaluationInputError(f"two relationship sources are both named {name!r}; use NAME=FILE")
        out[name] = value

    for value in values:
        if value.lower().startswith(EFAAR_PREFIX):
            for name, rel in efaar_relationships([value[len(EFAAR_PREFIX):]], folder).items():
                put(name, rel)
            continue
        name, path = (value.split("=", 1) if "=" in value and not os.path.exists(value) else (None, value))
        put(name or os.path.splitext(os.path.basename(path))[0], path)
    return out
