"""A site -- one field of view of one well: C channel images plus the well's metadata row -- and the facts read from
its image headers. The record every reader produces and every loader takes."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .decode import ImageInfo


@dataclass(frozen=True, eq=False)
class Site:
    """One field of view. `sources[i]` is channel `channels[i]`: a file path, encoded bytes or a parquet BlobRef;
    packed sites (`mae-fast pack`) carry `packed` instead and an empty `sources`."""

    well_id: str
    site: int
    experiment: str
    plate: str
    address: str
    perturbation: str | None
    channels: tuple[str, ...]
    sources: tuple = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    packed: Any = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.well_id, self.site)

    def source_name(self, channel: int) -> str:
        """A readable name of one channel's file for error messages."""
        if self.packed is not None:
            return str(self.packed)
        src = self.sources[channel]
        if isinstance(src, (bytes, bytearray, memoryview)):
            return f"<{len(src)} bytes: {self.well_id} s{self.site} {self.channels[channel]}>"
        return str(src)

    def crop_stream(self) -> int:
        """A 63-bit number fixed by (well_id, site): seeds this site's crops independently of order and sharding."""
        digest = hashlib.blake2b(f"{self.well_id}\x1f{self.site}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


def natural_key(value: Any) -> tuple:
    """Sort key comparing runs of digits as numbers ("A2" < "A10", "Plate2" < "Plate10")."""
    parts = re.split(r"(\d+)", str(value))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p != "")


def site_sort_key(site: Site) -> tuple:
    return (natural_key(site.experiment), natural_key(site.plate), natural_key(site.address), site.site, site.well_id)


@dataclass
class SiteProbe:
    """The encoded channels of a site and their (checked, consistent) header facts."""

    blobs: list[bytes]
    infos: list[ImageInfo]
    height: int
    width: int
    dtype: np.dtype
