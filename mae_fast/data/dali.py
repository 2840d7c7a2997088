"""NVIDIA DALI backend: decode a window's channel files in one DALI pipeline run, then cut the planned crops.

The pipeline is `fn.external_source` (the encoded channel files of every site in the window, C per site, in
channel order) -> `fn.decoders.image(output_type=GRAY, dtype=UINT8|UINT16)`, built with `device_id=None` on a
machine without CUDA (CPU decoding) and with `device="mixed"` on a GPU, where DALI decodes JPEG and JPEG 2000 on the
GPU (nvJPEG / nvJPEG2000) and PNG / TIFF on its CPU threads, delivering GPU tensors either way.

Channel alignment and crop equality with the torch path come from not letting DALI choose anything: the headers are
probed in Python first (so sizes, bit depth and the bad-input errors are the same as the torch path's), the crop
boxes come from `crops.sample_boxes`, and the crops are cut from DALI's decoded planes with `crops.cut_torch`.

Facts checked on DALI 2.4 (CPU): 8- and 16-bit PNG, 8-bit JPEG, 8/16-bit JPEG 2000 and 16-bit TIFF decode
bit-exactly like imagecodecs/PIL with output_type=GRAY and the matching dtype; output_type=ANY_DATA crashes the
process on grayscale JPEG, hence GRAY (colour inputs are rejected by the probe before DALI sees them). A dtype
different from the file's is silently rescaled, hence the probe's bit-depth check. After a decoding error the
pipeline object is unusable, so it is rebuilt, and the window is decoded file by file in Python to name the bad
file (and keep the good sites).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .crops import SiteCrops, center_boxes, cut_numpy, cut_torch, sample_boxes
from .decode import decode
from .errors import DataError
from .loading import SiteImage, probe_site

logger = logging.getLogger(__name__)

INSTALL_HINT = ("NVIDIA DALI is not installed: `pip install 'mae_fast[dali]'` (nvidia-dali-cuda130), or use "
                "backend='torch' (same crops, decoded by PIL/imagecodecs in DataLoader workers)")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali():
    try:
        import nvidia.dali as dali
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return dali


class DaliDecodeError(RuntimeError):
    """DALI failed on a batch (it does not say which sample); the caller decodes the files one by one."""


class DaliDecoder:
    """Decode batches of encoded single-plane images with a DALI pipeline (CPU, or mixed on `device_id`)."""

    def __init__(self, max_batch: int, dtype, device_id: int | None = None, num_threads: int | None = None):
        require_dali()
        self.max_batch = max(1, int(max_batch))
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ValueError(f"DALI decoding supports uint8 and uint16 images, got {self.dtype}")
        self.device_id = device_id
        self.num_threads = num_threads or max(1, os.cpu_count() or 1)
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        out_type = types.UINT16 if self.dtype == np.uint16 else types.UINT8
        device = "mixed" if self.device_id is not None else "cpu"

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                      exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
        def decode_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device=device, output_type=types.GRAY, dtype=out_type)

        pipe = decode_pipeline()
        pipe.build()
        return pipe

    def check(self) -> None:
        """Build the pipeline now (raises if DALI or its GPU decoders cannot start on this machine)."""
        if self._pipe is None:
            self._pipe = self._build()

    def _torch_dtype(self):
        return torch.uint16 if self.dtype == np.uint16 else torch.uint8

    def _to_torch(self, sample) -> torch.Tensor:
        """A decoded (H, W, 1) DALI sample as an owned (H, W) torch tensor on the pipeline's device."""
        shape = tuple(sample.shape())
        if self.device_id is None:
            return torch.from_numpy(np.array(sample)).reshape(shape[:2])
        out = torch.empty(shape, dtype=self._torch_dtype(), device=torch.device("cuda", self.device_id))
        stream = torch.cuda.current_stream(out.device)
        sample.copy_to_external(out.data_ptr(), stream.cuda_stream, non_blocking=True)
        return out[..., 0]

    def decode(self, blobs: list[bytes]) -> list[torch.Tensor]:
        """One (H, W) tensor per blob, in order."""
        if self._pipe is None:
            self._pipe = self._build()
        planes: list[torch.Tensor] = []
        for start in range(0, len(blobs), self.max_batch):
            chunk = [np.frombuffer(b, np.uint8) for b in blobs[start:start + self.max_batch]]
            try:
                self._pipe.feed_input("encoded", chunk)
                (out,) = self._pipe.run()
            except RuntimeError as err:
                self._pipe = None  # a DALI pipeline is unusable after an error: rebuild on the next call
                raise DaliDecodeError(str(err).splitlines()[0] if str(err) else "DALI decoding failed") from None
            planes.extend(self._to_torch(out[i]) for i in range(len(chunk)))
        return planes


def _decode_python(site, probed) -> list[torch.Tensor]:
    """The PIL/imagecodecs decode of one site (used to name the bad file after a DALI failure)."""
    return [torch.from_numpy(decode(data, info, site.well_id, site.source_name(c)))
            for c, (data, info) in enumerate(zip(probed.blobs, probed.infos))]


def dali_window_results(index, plan, windows, crop: int, seed: int, dtype, flips: bool, center: bool,
                        device_id: int | None = None, num_threads: int | None = None, sites_per_run: int = 8):
    """Yield (window, {member: SiteCrops}) like crops.torch_window_results, decoding with DALI, `sites_per_run`
    sites (x C files) per pipeline run; the next window is read and decoded in a background thread while the
    current one is consumed."""
    sites_per_run = max(1, sites_per_run)
    decoder = DaliDecoder(sites_per_run * max(1, len(index.channels)), dtype, device_id, num_threads)
    device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")

    def process(window) -> dict:
        """Read, probe, decode and cut `sites_per_run` sites at a time (bounded memory for 2048² sites)."""
        results: dict[int, SiteCrops] = {}
        members = [int(m) for m in np.unique(window.slot_member)]
        for chunk in range(0, len(members), sites_per_run):
            good = []  # (member, site, probe, boxes, crop_ids)
            for m in members[chunk:chunk + sites_per_run]:
                site = index[int(window.members[m])]
                crop_ids = window.needed(m)
                try:
                    probed = probe_site(site, dtype=dtype, min_size=crop)
                except DataError as err:
                    results[m] = SiteCrops(window.number, m, crop_ids, error=err)
                    continue
                if center:
                    boxes = center_boxes(probed.height, probed.width, crop)
                else:
                    boxes = sample_boxes(seed, plan.epoch, site, plan.k, probed.height, probed.width, crop, flips)
                good.append((m, site, probed, boxes.take(crop_ids), crop_ids))
            if good:
                results.update(decode_and_cut(window, good))
        return results

    def decode_and_cut(window, good) -> dict:
        results = {}
        try:
            planes = decoder.decode([b for _, _, p, _, _ in good for b in p.blobs])
            per_site = [planes[i * len(p.blobs):(i + 1) * len(p.blobs)] for i, (_, _, p, _, _) in enumerate(good)]
        except DaliDecodeError as err:
            logger.warning("DALI could not decode part of window %d (%s); decoding its files one by one", window.number, err)
            per_site = []
            for m, site, probed, _, crop_ids in good:
                try:
                    per_site.append([p.to(device) for p in _decode_python(site, probed)])
                except DataError as derr:
                    per_site.append(derr)
        for (m, site, probed, boxes, crop_ids), site_planes in zip(good, per_site):
            if isinstance(site_planes, DataError):
                results[m] = SiteCrops(window.number, m, crop_ids, error=site_planes)
                continue
            shapes = {tuple(p.shape) for p in site_planes}
            if shapes != {(probed.height, probed.width)}:
                err = DataError("corrupt_image", f"decoded sizes {sorted(shapes)} differ from the headers' "
                                f"{probed.height}x{probed.width}", site.well_id, site.source_name(0))
                results[m] = SiteCrops(window.number, m, crop_ids, error=err)
                continue
            if device.type == "cpu":  # numpy slicing (torch.stack of uint16 is slow on CPU)
                crops = torch.from_numpy(cut_numpy(SiteImage([p.numpy() for p in site_planes]), boxes, crop))
            else:
                crops = cut_torch(site_planes, boxes, crop)
            results[m] = SiteCrops(window.number, m, crop_ids, crops, boxes)
        return results

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(process, windows[0]) if windows else None
        for i, window in enumerate(windows):
            results = pending.result()
            pending = pool.submit(process, windows[i + 1]) if i + 1 < len(windows) else None
            yield window, results
