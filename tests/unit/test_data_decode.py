"""Decoding every supported format exactly, and the image-level bad inputs: corrupt/truncated files, wrong bit
depth, colour images, channels of different sizes, images smaller than the crop; `index.check()`."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from mae_fast.data.decode import decode, probe, read_bytes, read_image, sniff_format
from mae_fast.data.errors import DataError
from mae_fast.data.index import SiteIndex
from mae_fast.data.loading import load_site

RNG = np.random.default_rng(12)
A8 = RNG.integers(0, 256, (37, 29), dtype=np.uint8)
A16 = RNG.integers(256, 65536, (37, 29), dtype=np.uint16)


def pil_bytes(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def optional(module: str):
    """An optional codec package, or skip the calling test with the reason (the GPU image has neither)."""
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install {module})")


def tiff_bytes(array, **kw):
    buf = io.BytesIO()
    optional("tifffile").imwrite(buf, array, **kw)
    return buf.getvalue()


LOSSLESS = {
    "png8": (lambda: pil_bytes(A8, "PNG"), A8),
    "png16": (lambda: pil_bytes(A16, "PNG"), A16),
    "jp2_8": (lambda: pil_bytes(A8, "JPEG2000", irreversible=False), A8),
    "jp2_16": (lambda: optional("imagecodecs").jpeg2k_encode(A16, level=0), A16),
    "tiff8": (lambda: tiff_bytes(A8), A8),
    "tiff16": (lambda: tiff_bytes(A16), A16),
    "tiff16_bigendian_deflate": (lambda: tiff_bytes(A16.astype(">u2"), compression="zlib"), A16),
}


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_formats_decode_exactly(name):
    make, want = LOSSLESS[name]
    data = make()
    info = probe(data)
    assert (info.height, info.width, info.dtype) == (37, 29, want.dtype)
    got = decode(data, info)
    assert got.dtype == want.dtype and got.dtype.isnative and np.array_equal(got, want)


def test_jpeg_decodes_like_pil():
    data = pil_bytes(A8, "JPEG", quality=90)
    assert sniff_format(data) == "jpeg"
    assert np.array_equal(decode(data), np.asarray(Image.open(io.BytesIO(data))))


def test_format_from_content_not_extension(tmp_path):
    path = tmp_path / "B02_s1_w1.tif"
    path.write_bytes(pil_bytes(A16, "PNG"))
    assert np.array_equal(read_image(str(path)), A16)


@pytest.mark.parametrize("name", ["png16", "jp2_8", "tiff16", "jpeg"])
def test_truncated_files_are_corrupt(name):
    data = pil_bytes(A8, "JPEG", quality=90) if name == "jpeg" else LOSSLESS[name][0]()
    with pytest.raises(DataError) as err:
        decode(data[: len(data) * 2 // 3], well="w1", name="x.img")
    assert err.value.reason == "corrupt_image" and err.value.well == "w1" and err.value.file == "x.img"


@pytest.mark.parametrize("data", [b"", b"hello world, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_corrupt(tmp_path, data):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        read_image(str(path), well="w9")
    assert err.value.reason == "corrupt_image" and str(path) in str(err.value) and "w9" in str(err.value)


def test_missing_file():
    with pytest.raises(DataError) as err:
        read_bytes("/nonexistent/B02_s1_w1.png", well="w1")
    assert err.value.reason == "missing_file"


@pytest.mark.parametrize("data, reason", [
    (lambda: tiff_bytes(A16.astype(np.float32)), "bit_depth"),
    (lambda: tiff_bytes(A16.astype(np.int32)), "bit_depth"),
    (lambda: tiff_bytes(A16.astype(np.int16)), "bit_depth"),
    (lambda: pil_bytes(A8 > 100, "PNG"), "bit_depth"),
    (lambda: pil_bytes(np.stack([A8] * 3, -1), "PNG"), "not_grayscale"),
    (lambda: pil_bytes(np.stack([A8] * 3, -1), "JPEG"), "not_grayscale"),
    (lambda: tiff_bytes(np.stack([A16, A16])), "not_grayscale"),
])
def test_wrong_bit_depth_and_colour(data, reason):
    with pytest.raises(DataError) as err:
        probe(data(), well="w2", name="f")
    assert err.value.reason == reason


# -- site-level checks ------------------------------------------------------------------------------------------


def write_site(folder, address, planes):
    os.makedirs(folder, exist_ok=True)
    for c, plane in enumerate(planes, 1):
        Image.fromarray(plane).save(os.path.join(folder, f"{address}_s1_w{c}.png"))


@pytest.fixture()
def bad_screen(tmp_path):
    """Seven sites: four good 16-bit ones and one of each site-level problem."""
    folder = str(tmp_path / "images" / "exp" / "Plate1")
    good = lambda: [RNG.integers(0, 65535, (40, 44), dtype=np.uint16) for _ in range(3)]  # noqa: E731
    for address in ("B02", "B03", "B04", "B05"):
        write_site(folder, address, good())
    planes = good()
    planes[2] = planes[2][:, :40]
    write_site(folder, "C02", planes)  # channels of different sizes
    write_site(folder, "C03", [p[:20, :20] for p in good()])  # smaller than the crop
    planes = good()
    planes[1] = (planes[1] >> 8).astype(np.uint8)
    write_site(folder, "C04", planes)  # one 8-bit channel in a 16-bit dataset
    with open(os.path.join(folder, "B05_s1_w2.png"), "r+b") as f:
        f.truncate(200)  # corrupt pixels (header readable)
    return SiteIndex.from_rxrx(str(tmp_path))


EXPECTED = {"exp_1_C02": ("size_mismatch", "C02_s1_w3.png"), "exp_1_C03": ("too_small", "C03_s1_w1.png"),
            "exp_1_C04": ("bit_depth", "C04_s1_w2.png"), "exp_1_B05": ("corrupt_image", "B05_s1_w2.png")}


def test_site_level_errors_name_reason_well_and_file(bad_screen):
    assert bad_screen.dtype == np.uint16
    for site in bad_screen:
        if site.well_id not in EXPECTED:
            assert load_site(site, dtype=np.uint16, min_size=32).shape == (3, 40, 44)
            continue
        reason, fname = EXPECTED[site.well_id]
        with pytest.raises(DataError) as err:
            load_site(site, dtype=np.uint16, min_size=32)
        assert err.value.reason == reason and err.value.well == site.well_id
        assert err.value.file.endswith(fname), (site.well_id, str(err.value))


def test_check_finds_header_problems_up_front(bad_screen):
    with pytest.raises(DataError):
        bad_screen.check(min_size=32)
    good = bad_screen.check(min_size=32, on_error="skip")
    # the truncated file's header is intact: only decoding finds it, the other three are header problems
    assert [s.address for s in good] == ["B02", "B03", "B04", "B05"]
    assert dict(good.summary.counts) == {"size_mismatch": 1, "too_small": 1, "bit_depth": 1}
