"""Data: the built-in synthetic screen, dataset readers, crop pipelines (torch and DALI), tiling and packing."""
from .dali import dali_available
from .decode import read_image
from .errors import REASONS, DataError, ErrorSummary
from .index import SiteIndex
from .sites import Site
from .sources import JUMP_CHANNELS
from .loader import CropInfo, CropLoader, make_train_loader, make_val_loader
from .pack import pack_index
from .samplers import PlateBatchSampler, balanced_batch_sizes
from .tiling import TileIterator, iter_tiles, tile_grid

__all__ = [
    "REASONS", "DataError", "ErrorSummary", "JUMP_CHANNELS", "Site", "SiteIndex", "CropInfo", "CropLoader",
    "make_train_loader", "make_val_loader", "TileIterator", "iter_tiles", "tile_grid", "pack_index",
    "dali_available", "read_image", "PlateBatchSampler", "balanced_batch_sizes",
]
