"""Read one site: probe every channel's header, check the channels agree, decode them.

Shared by the torch loader, the DALI loader (which uses only the probe and decodes on its own), tiling and packing,
so that every path raises the same `DataError` for the same bad input.
"""
from __future__ import annotations

import numpy as np

from .decode import ImageInfo, decode, probe, read_bytes
from .errors import DataError
from .packed import open_packed_site, probe_packed_site
from .sites import Site, SiteProbe




class SiteImage:
    """The decoded channels of one site; `region` cuts (C, h, w) out of them."""

    def __init__(self, planes: list[np.ndarray]):
        self.planes = planes  # C arrays (H, W)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.planes),) + self.planes[0].shape

    @property
    def dtype(self) -> np.dtype:
        return self.planes[0].dtype

    def region(self, y: int, x: int, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
        """(C, h, w) copy of rows y..y+h, columns x..x+w, written into `out` when given (which may be a flipped
        view: the copy then lands flipped, with no second copy)."""
        if out is None:
            out = np.empty((len(self.planes), h, w), self.dtype)
        for c, plane in enumerate(self.planes):
            out[c] = plane[y:y + h, x:x + w]
        return out

    def full(self) -> np.ndarray:
        return np.stack(self.planes)


def check_site_infos(site: Site, infos: list[ImageInfo], dtype=None, min_size: int = 0) -> None:
    """Channels share one size and one dtype (the dataset's, when given) and are at least min_size on a side."""
    first = infos[0]
    if dtype is not None:
        want = np.dtype(dtype)
    else:  # the site's own majority: the odd channel out is the one named, whichever it is
        kinds = [info.dtype for info in infos]
        want = max(kinds, key=lambda k: (kinds.count(k), -kinds.index(k)))
    for c, info in enumerate(infos):
        if info.dtype != want:
            raise DataError("bit_depth", f"{8 * info.dtype.itemsize}-bit image where the dataset is {8 * want.itemsize}-bit",
                            site.well_id, site.source_name(c))
        if (info.height, info.width) != (first.height, first.width):
            raise DataError("size_mismatch", f"channel {site.channels[c]} is {info.height}x{info.width}, channel "
                            f"{site.channels[0]} ({site.source_name(0)}) is {first.height}x{first.width}",
                            site.well_id, site.source_name(c))
    if min(first.height, first.width) < min_size:
        raise DataError("too_small", f"image is {first.height}x{first.width}, smaller than {min_size}x{min_size}",
                        site.well_id, site.source_name(0))


def probe_site(site: Site, dtype=None, min_size: int = 0) -> SiteProbe:
    """Read every channel's bytes and header and check them; raises DataError naming the well and file."""
    if site.packed is not None:
        return probe_packed_site(site, dtype, min_size)
    if not site.sources:
        raise DataError("no_files", "site has no channel files", site.well_id)
    blobs, infos = [], []
    for c, source in enumerate(site.sources):
        name = site.source_name(c)
        data = read_bytes(source, site.well_id, name)
        blobs.append(data)
        infos.append(probe(data, site.well_id, name))
    check_site_infos(site, infos, dtype, min_size)
    return SiteProbe(blobs, infos, infos[0].height, infos[0].width, infos[0].dtype)


def load_site(site: Site, dtype=None, min_size: int = 0):
    """Decode one site: a SiteImage (or a packed site read tile by tile) whose `region(y, x, h, w)` is (C, h, w)."""
    if site.packed is not None:
        return open_packed_site(site, dtype, min_size)
    probed = probe_site(site, dtype, min_size)
    planes = [decode(data, info, site.well_id, site.source_name(c)) for c, (data, info) in enumerate(zip(probed.blobs, probed.infos))]
    return SiteImage(planes)
