"""Read and decode one channel file (PNG, JPEG, JPEG 2000, TIFF) into a 2-D uint8/uint16 numpy array.

Every file is first *probed* (header only, via PIL's lazy open) so that the cheap checks -- format, grayscale,
bit depth, size -- run before any pixel is decoded and name the file and the well when they fail. Pixels are then
decoded with imagecodecs when it is installed (faster PNG and JPEG 2000), else PIL; JPEG always with PIL because
libjpeg-turbo through imagecodecs accepts a truncated stream without an error; TIFF with tifffile.
"""
from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

import numpy as np

from .errors import DataError

try:  # optional: faster PNG / JPEG 2000 decoding
    import imagecodecs
except ImportError:  # pragma: no cover - exercised only where imagecodecs is absent
    imagecodecs = None

FORMATS = ("png", "jpeg", "jp2", "tiff")
# PIL modes of single-plane 8- and 16-bit images.
_GRAY_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I;16N": np.uint16}
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "LA", "La", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclass(frozen=True)
class BlobRef:
    """One encoded image stored in a parquet file (RxRx3-core): read lazily, row group by row group."""

    path: str
    row_group: int
    row: int
    column: str = "jp2"

    def __str__(self) -> str:
        return f"{self.path}[row_group={self.row_group}, row={self.row}]"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    height: int
    width: int
    dtype: np.dtype


@functools.lru_cache(maxsize=4)
def _parquet_row_group(path: str, row_group: int, column: str) -> list:
    """The encoded images of one row group (cached: consecutive channels and sites share a row group)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(row_group, columns=[column])
    return table.column(column).to_pylist()


def read_bytes(source, well: str | None = None, name: str | None = None) -> bytes:
    """The encoded bytes of one channel: a file path, an in-memory blob or a parquet BlobRef."""
    name = name or str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, BlobRef):
        try:
            data = _parquet_row_group(source.path, source.row_group, source.column)[source.row]
        except FileNotFoundError as err:
            raise DataError("missing_file", f"parquet file not found: {err}", well, name) from None
        except (OSError, IndexError, KeyError, ValueError) as err:
            raise DataError("corrupt_image", f"cannot read the blob from parquet: {err}", well, name) from None
        if data is None:
            raise DataError("missing_file", "the parquet row holds no image bytes", well, name)
    else:
        try:
            with open(os.fspath(source), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError("missing_file", "file not found", well, name) from None
        except OSError as err:
            raise DataError("corrupt_image", f"cannot read the file: {err}", well, name) from None
    if not data:
        raise DataError("corrupt_image", "file is empty", well, name)
    return data


def sniff_format(data: bytes) -> str | None:
    """Format from the magic bytes (file extensions are not trusted)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or data[:4] == b"\xff\x4f\xff\x51":
        return "jp2"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


def probe(data: bytes, well: str | None = None, name: str | None = None) -> ImageInfo:
    """Format, size and dtype from the header; raises DataError for anything that is not an 8/16-bit gray plane."""
    from PIL import Image, UnidentifiedImageError

    fmt = sniff_format(data)
    if fmt is None:
        raise DataError("corrupt_image", f"not a PNG/JPEG/JPEG 2000/TIFF file (starts with {data[:8]!r})", well, name)
    try:
        with Image.open(io.BytesIO(data)) as img:
            mode, (width, height) = img.mode, img.size
            frames = getattr(img, "n_frames", 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        why = "PIL cannot identify it" if isinstance(err, UnidentifiedImageError) else str(err)
        raise DataError("corrupt_image", f"unreadable {fmt} header ({why})", well, name) from None
    if frames != 1:
        raise DataError("not_grayscale", f"{fmt} file holds {frames} planes; one plane per channel file is expected", well, name)
    if mode in _COLOUR_MODES:
        raise DataError("not_grayscale", f"{fmt} image has colour mode {mode}; one grayscale plane is expected", well, name)
    if mode not in _GRAY_MODES:
        raise DataError("bit_depth", f"{fmt} image has mode {mode}; only 8-bit (L) and 16-bit unsigned gray are supported", well, name)
    return ImageInfo(fmt, int(height), int(width), np.dtype(_GRAY_MODES[mode]))


def _decode_pil(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


def _decode_pixels(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "png" and imagecodecs is not None:
        return imagecodecs.png_decode(data)
    if fmt == "jp2" and imagecodecs is not None:
        return imagecodecs.jpeg2k_decode(data)
    if fmt == "tiff":
        import tifffile

        return tifffile.imread(io.BytesIO(data))
    return _decode_pil(data)


def decode(data: bytes, info: ImageInfo | None = None, well: str | None = None, name: str | None = None) -> np.ndarray:
    """Decode one probed channel file to a C-contiguous (H, W) uint8/uint16 array in native byte order."""
    info = info or probe(data, well, name)
    try:
        pixels = np.asarray(_decode_pixels(data, info.format))
    except Exception as err:  # noqa: BLE001 - every codec raises its own exception type
        raise DataError("corrupt_image", f"cannot decode {info.format}: {type(err).__name__}: {err}", well, name) from None
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    elif pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.shape != (info.height, info.width):
        raise DataError("corrupt_image", f"decoded shape {pixels.shape} differs from the header's {(info.height, info.width)}", well, name)
    if pixels.dtype.kind != "u" or pixels.dtype.itemsize != info.dtype.itemsize:
        raise DataError("bit_depth", f"decoded dtype {pixels.dtype} differs from the header's {info.dtype}", well, name)
    return np.ascontiguousarray(pixels, dtype=info.dtype)  # also converts big-endian 16-bit to native


def read_image(source, well: str | None = None, name: str | None = None) -> np.ndarray:
    """read_bytes + probe + decode: one channel file as a (H, W) array."""
    name = name or (str(source) if not isinstance(source, (bytes, bytearray, memoryview)) else f"<{len(source)} bytes>")
    data = read_bytes(source, well, name)
    return decode(data, probe(data, well, name), well, name)
