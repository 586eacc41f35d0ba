"""GPU video decoding (NVDEC through torchcodec) behind the decoder interface of ``decoding.py``.

``build_decoder("torchcodec", device="cuda")`` returns a :class:`TorchCodecDecoder`; its
:meth:`~TorchCodecDecoder.read_tensor` keeps the frames on the GPU.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "TorchCodecDecoder",
    "torchcodec_available",
    "nvdec_library",
    "ffmpeg_library_dir",
]

#: FFmpeg libraries torchcodec links against (it needs their plain sonames, e.g. libavutil.so.60).
_FFMPEG_LIBS = ("avutil", "avcodec", "avformat", "avdevice", "avfilter", "swscale", "swresample")
_VALID = "decord, pyav, torchcodec"


def torchcodec_available() -> bool:
    """Return True when ``torchcodec`` imports (its libraries found FFmpeg 4-8)."""
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError when FFmpeg is missing
        return False
    return True


def nvdec_library() -> str | None:
    """Return the NVDEC driver library's name if it loads (``libnvcuvid.so.1``), else ``None``.

    It ships with the NVIDIA driver, not with CUDA; containers expose it only with the ``video``
    driver capability. Without it torchcodec decodes on the CPU (its "CPU fallback").
    """
    for name in ("libnvcuvid.so.1", "libnvcuvid.so"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    return None


def ffmpeg_library_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Make a folder of links with plain FFmpeg sonames to the FFmpeg that PyAV's wheel bundles.

    torchcodec needs FFmpeg's shared libraries under their plain names (``libavcodec.so.62``);
    PyAV's wheel carries the same libraries renamed (``av.libs/libavcodec-5e6b81c2.so.62...``).
    Put the returned folder on ``LD_LIBRARY_PATH`` *before* Python starts (the loader reads it
    once) on machines without a system FFmpeg, as ``tools/gpu_check.sh`` does. Returns ``None``
    when PyAV or its bundled libraries are absent.
    """
    try:
        import av
    except ImportError:
        return None
    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    if not libs.is_dir():
        return None
    base = Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    out = base / "vidssl" / f"ffmpeg-from-pyav-{av.__version__}"
    out.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^lib({'|'.join(_FFMPEG_LIBS)})-[0-9a-f]+\.so\.(\d+)")
    found = 0
    for lib in sorted(libs.iterdir()):
        # Every bundled library under its own name too: the FFmpeg libraries find their
        # dependencies through $ORIGIN, which is this folder when they load through a link.
        names = [lib.name]
        m = pattern.match(lib.name)
        if m:
            names.append(f"lib{m.group(1)}.so.{m.group(2)}")
            found += 1
        for name in names:
            link = out / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(lib)
    return out if found else None


def _resize_nhwc(frames, size: tuple[int, int]):
    """Resize uint8 ``N x H x W x 3`` frames to ``(width, height)`` (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    w, h = int(size[0]), int(size[1])
    if frames.shape[1] == h and frames.shape[2] == w:
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    down = h < frames.shape[1] or w < frames.shape[2]
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class TorchCodecDecoder:
    """Decode with torchcodec: NVDEC on ``device="cuda[:N]"``, FFmpeg on ``"cpu"``.

    Every file is opened in torchcodec's ``"exact"`` seek mode (a scan of the packet
    timestamps), so frame ``k`` is the ``k``-th frame in presentation order; ``exact`` flags
    change nothing here. Frame accuracy on B-frame files (MPEG-4 Part 2 in AVI as UCF101 ships,
    H.264) is checked on the GPU by ``benchmarks/gpu.py`` with the same frame barcodes as the
    CPU tests. Resizing runs after decoding, on the decode device (bilinear, antialiased), so
    pixels differ slightly from PyAV's swscale output.

    Decoding on CUDA in a DataLoader worker needs workers started with ``spawn`` (CUDA cannot be
    used in a forked child of a process that already uses it) or ``num_workers=0``.

    Args:
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        num_threads: FFmpeg threads for CPU decoding (no effect on NVDEC).
        allow_cpu_fallback: on CUDA, accept torchcodec's silent CPU decoding when NVDEC is
            unavailable or does not support the file; ``False`` (default) raises instead, so
            "GPU decoding" never means the CPU without saying so.
    """

    def __init__(
        self, device: str = "cuda", num_threads: int = 1, allow_cpu_fallback: bool = False
    ) -> None:
        import torch

        if not (device == "cpu" or re.fullmatch(r"cuda(:\d+)?", device)):
            raise ValueError(f"Unknown decode device {device!r}; use 'cpu' or 'cuda[:N]'.")
        try:
            import torchcodec.decoders  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(
                f"backend='torchcodec' cannot load torchcodec ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Install torchcodec>=0.15 "
                "with FFmpeg 4-8 shared libraries (see vidssl.data.gpu_decode."
                f"ffmpeg_library_dir), or pick another backend: {_VALID}."
            ) from exc
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"decode_device={device!r} but no CUDA device is visible; use "
                    f"decode_device='cpu' or another backend ({_VALID})."
                )
            if torch.cuda._is_in_bad_fork():
                raise RuntimeError(
                    f"decode_device={device!r} in a forked DataLoader worker of a process that "
                    "already uses CUDA; use num_workers=0 or multiprocessing_context='spawn'."
                )
        self.device = device
        self.num_threads = num_threads
        self.allow_cpu_fallback = allow_cpu_fallback

    def _open(self, path: str):
        from torchcodec.decoders import VideoDecoder

        decoder = VideoDecoder(
            path,
            device=self.device,
            seek_mode="exact",
            dimension_order="NHWC",
            num_ffmpeg_threads=self.num_threads,
        )
        if self.device.startswith("cuda") and not self.allow_cpu_fallback:
            status = decoder.cpu_fallback
            if status:
                raise RuntimeError(
                    f"{path}: torchcodec would decode on the CPU, not with NVDEC ({status}; "
                    "NVDEC library: "
                    f"{nvdec_library() or 'libnvcuvid.so.1 not found'}). Pass "
                    "allow_cpu_fallback=True to accept that, or use decode_device='cpu'."
                )
        return decoder

    def read_tensor(
        self,
        path: str,
        indices: Sequence[int] | np.ndarray,
        size: tuple[int, int] | None = None,
        exact: bool = False,
    ):
        """Decode ``indices`` of ``path`` into a uint8 ``N x H x W x 3`` tensor on the device.

        Same arguments and frame order as :meth:`vidssl.data.decoding.VideoDecoder.read`.
        """
        import torch

        idx = np.asarray(indices, dtype=np.int64)
        unique = np.unique(idx)
        if unique.size == 0:
            raise ValueError("No frame indices requested.")
        decoder = self._open(str(path))
        n = len(decoder)
        if unique[0] < 0 or unique[-1] >= n:
            raise IndexError(
                f"{path} has {n} frames but frames {unique[0]}..{unique[-1]} were requested "
                "(the probed frame count may be stale: delete the manifest cache)."
            )
        frames = decoder.get_frames_at(unique.tolist()).data
        if size is not None:
            frames = _resize_nhwc(frames, size)
        if len(unique) == len(idx) and np.array_equal(unique, idx):
            return frames
        pos = torch.from_numpy(np.searchsorted(unique, idx)).to(frames.device)
        return frames[pos]

    def read(
        self,
        path: str,
        indices: Sequence[int] | np.ndarray,
        size: tuple[int, int] | None = None,
        exact: bool = False,
    ) -> np.ndarray:
        """Decode ``indices`` of ``path`` (see :meth:`VideoDecoder.read`); a host copy.

        What ``VideoDataset`` calls; :meth:`read_tensor` avoids the copy to the host.
        """
        return self.read_tensor(path, indices, size, exact).cpu().numpy()
