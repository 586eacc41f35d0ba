"""Video decoding backends behind one small interface: decode these frame indices of this file.

decord for random access where it is exact, PyAV sequential decoding where decord's seeking is
not (B-frames in AVI), resizing on decode to a short side.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Literal, Protocol, Sequence

import numpy as np

__all__ = [
    "VideoDecoder",
    "DecordDecoder",
    "PyAVDecoder",
    "build_decoder",
    "resized_size",
    "decord_available",
    "scan_video",
    "quiet_ffmpeg_log",
]

DecodeBackend = Literal["decord", "pyav", "torchcodec"]
_BACKENDS = ("decord", "pyav", "torchcodec")  # torchcodec: vidssl/data/gpu_decode.py (NVDEC)


def decord_available() -> bool:
    """Return True when the ``decord`` package can be imported."""
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def resized_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Return ``(width, height)`` scaled so the shorter side is ``short_side`` (aspect kept).

    ``None`` or ``0`` keeps the native size. Sizes are rounded to the nearest integer.
    """
    if not short_side:
        return width, height
    if width <= height:
        return short_side, max(1, int(round(height * short_side / width)))
    return max(1, int(round(width * short_side / height))), short_side


class VideoDecoder(Protocol):
    """What a decoding backend provides."""

    def read(
        self,
        path: str,
        indices: Sequence[int] | np.ndarray,
        size: tuple[int, int] | None = None,
        exact: bool = False,
    ) -> np.ndarray:
        """Decode frames ``indices`` (any order, repeats allowed) of ``path``.

        Args:
            path: the video file.
            indices: 0-based frame indices in presentation order.
            size: ``(width, height)`` to resize to while decoding, ``None`` for native.
            exact: the file needs sequential decoding to be frame-accurate.

        Returns:
            uint8 ``len(indices) x H x W x 3`` RGB frames, in the order of ``indices``.
        """
        ...


def _gather(unique: np.ndarray, frames: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Map decoded unique sorted frames back to the requested order (repeats allowed)."""
    if len(unique) == len(indices) and np.array_equal(unique, indices):
        return frames  # already in order: skip a copy of every frame
    return frames[np.searchsorted(unique, indices)]


_quiet_lock = threading.Lock()
_quiet_state: dict = {"users": 0, "level": None, "skip_repeated": True, "sink": None}


@contextlib.contextmanager
def quiet_ffmpeg_log() -> Iterator[None]:
    """Record FFmpeg's (PyAV's) error messages without letting any of them reach the terminal.

    Inside, PyAV's log level is at least ``ERROR``, so errors reach PyAV: its exceptions quote
    them and an ``av.logging.Capture(local=True)`` collects a thread's own. Messages of threads
    without a capture of their own go to a discarded global capture instead of Python's logging,
    whose last-resort handler prints them to stderr (into progress bars: "moov atom not found").
    PyAV's skipping of repeated messages is off inside, so that two files failing the same way
    each get their message. Safe to nest and to enter from several threads at once: the level
    is set by the first to enter and restored by the last to leave, so one thread never turns
    another's logging off mid-decode. Does not touch decord, which has its own FFmpeg
    (``decord.logging.set_level``).
    """
    import av.logging

    with _quiet_lock:
        if _quiet_state["users"] == 0:
            level = av.logging.get_level()
            _quiet_state["level"] = level
            if level is None or level < av.logging.ERROR:
                av.logging.set_level(av.logging.ERROR)
            _quiet_state["skip_repeated"] = av.logging.get_skip_repeated()
            av.logging.set_skip_repeated(False)
            sink = av.logging.Capture(local=False)
            sink.__enter__()
            _quiet_state["sink"] = sink
        _quiet_state["users"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_state["users"] -= 1
            if _quiet_state["users"] == 0:
                _quiet_state["sink"].__exit__(None, None, None)
                _quiet_state["sink"] = None
                av.logging.set_skip_repeated(_quiet_state["skip_repeated"])
                av.logging.set_level(_quiet_state["level"])


def scan_video(path: str, max_messages: int = 5) -> tuple[int, int, list[str]]:
    """Decode every frame of ``path`` and report what the decoder complained about.

    A stream can be damaged yet decode without an exception: FFmpeg conceals broken macroblocks
    and only logs an error. PyAV (13 and later) silences FFmpeg's log by default, so this scan
    runs under :func:`quiet_ffmpeg_log` (errors recorded, nothing printed) and collects its own
    thread's errors.

    Returns:
        ``(frames, errors, messages)``: frames decoded, error messages logged by the demuxer and
        decoder, and the first ``max_messages`` of them. Raises what PyAV raises on files it
        cannot open or decode at all.
    """
    import av
    import av.logging

    frames = 0
    # local=True: only this thread's messages, so parallel scans do not mix their logs.
    with quiet_ffmpeg_log(), av.logging.Capture(local=True) as logs:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # messages come from this thread
            for _ in container.decode(stream):
                frames += 1
    errors = [f"{name}: {msg.strip()}" for lvl, name, msg in logs if lvl <= av.logging.ERROR]
    return frames, len(errors), errors[:max_messages]


class PyAVDecoder:
    """Decode with PyAV, sequentially from the start of the file: exact for every file.

    Decoding stops after the last requested frame and only requested frames are converted to
    RGB (and resized by swscale). Frame ``k`` is the ``k``-th frame the decoder outputs, which is
    presentation order regardless of what timestamps the container stores.

    Args:
        num_threads: FFmpeg decoding threads per video (0 lets FFmpeg choose; keep it small when
            DataLoader workers already use every core).
    """

    def __init__(self, num_threads: int = 1) -> None:
        self.num_threads = num_threads

    def read(
        self,
        path: str,
        indices: Sequence[int] | np.ndarray,
        size: tuple[int, int] | None = None,
        exact: bool = True,
    ) -> np.ndarray:
        """Decode ``indices`` of ``path`` (see :meth:`VideoDecoder.read`)."""
        import av

        indices = np.asarray(indices, dtype=np.int64)
        unique = np.unique(indices)
        if unique.size == 0:
            raise ValueError("No frame indices requested.")
        if unique[0] < 0:
            raise IndexError(f"Negative frame index {unique[0]} requested from {path}.")
        kwargs = {"format": "rgb24"}
        if size is not None:
            kwargs.update(width=int(size[0]), height=int(size[1]))
        out: list[np.ndarray] = []
        want = iter(unique.tolist())
        target = next(want)
        decoded = 0
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = self.num_threads
            stream.thread_type = "AUTO" if self.num_threads != 1 else "SLICE"
            for frame in container.decode(stream):
                decoded += 1
                if decoded - 1 == target:
                    out.append(frame.to_ndarray(**kwargs))
                    target = next(want, None)
                    if target is None:
                        break
        if len(out) < len(unique):
            raise IndexError(
                f"{path} has only {decoded} decodable frames but frame "
                f"{unique[len(out)]} was requested (the probed frame count may be stale: delete "
                "the manifest cache to re-probe)."
            )
        return _gather(unique, np.stack(out), indices)


class DecordDecoder:
    """Decode with decord's random access (``get_batch``); exact files go to PyAV.

    A ``VideoReader`` is opened per call, inside the worker, never before the DataLoader forks
    (a reader shared across a fork corrupts decoder state). decord resizes while decoding.

    Args:
        num_threads: decoder threads per reader (decord's default, 0, spawns one per core in
            every worker; 1 keeps ``num_workers`` processes from oversubscribing the CPU).
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:N"`` for NVDEC; needs decord built with CUDA.
        exact_fallback: decoder for files flagged ``exact`` (default :class:`PyAVDecoder`).
    """

    def __init__(
        self,
        num_threads: int = 1,
        device: str = "cpu",
        exact_fallback: VideoDecoder | None = None,
    ) -> None:
        import decord

        self.num_threads = num_threads
        self.device = device
        self.exact_fallback = exact_fallback or PyAVDecoder(num_threads=num_threads)
        if device.startswith("cuda"):
            ordinal = int(device.split(":")[1]) if ":" in device else 0
            try:
                decord.gpu(ordinal)
                # decord.gpu() succeeds without CUDA support; opening a reader is what fails.
                _check_decord_cuda(ordinal)
            except Exception as exc:  # noqa: BLE001
                raise RuntimeError(
                    f"decode_device={device!r} needs decord built with CUDA (NVDEC), but this "
                    f"decord cannot use it ({exc}). Build decord with -DUSE_CUDA=ON, or use "
                    "decode_device='cpu'."
                ) from exc
        elif device != "cpu":
            raise ValueError(f"Unknown decode device {device!r}; use 'cpu' or 'cuda[:N]'.")

    def _ctx(self):
        import decord

        if self.device == "cpu":
            return decord.cpu(0)
        return decord.gpu(int(self.device.split(":")[1]) if ":" in self.device else 0)

    def read(
        self,
        path: str,
        indices: Sequence[int] | np.ndarray,
        size: tuple[int, int] | None = None,
        exact: bool = False,
    ) -> np.ndarray:
        """Decode ``indices`` of ``path`` (see :meth:`VideoDecoder.read`)."""
        if exact:
            return self.exact_fallback.read(path, indices, size, exact=True)
        import decord

        indices = np.asarray(indices, dtype=np.int64)
        unique = np.unique(indices)
        kwargs = {}
        if size is not None:
            kwargs.update(width=int(size[0]), height=int(size[1]))
        reader = decord.VideoReader(path, ctx=self._ctx(), num_threads=self.num_threads, **kwargs)
        if unique[-1] >= len(reader) or unique[0] < 0:
            raise IndexError(
                f"{path} has {len(reader)} frames but frames {unique[0]}..{unique[-1]} were "
                "requested (the probed frame count may be stale: delete the manifest cache)."
            )
        try:
            frames = reader.get_batch(unique.tolist()).asnumpy()
        except decord.DECORDError as exc:
            # decord 0.6 fails to copy frames resized to some widths (8, 12, 16, 24, 48, 72
            # px: "The size must exactly match"); PyAV decodes the same frames exactly.
            if "size must exactly match" not in str(exc):
                raise
            return self.exact_fallback.read(path, indices, size, exact=True)
        del reader
        return _gather(unique, frames, indices)


def _check_decord_cuda(ordinal: int) -> None:
    """Raise unless decord can create a CUDA decoder (probes with a 2-frame in-memory video)."""
    import tempfile

    import decord

    from vidssl.data.synthetic import write_video

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        write_video(f.name, np.zeros((2, 16, 16, 3), np.uint8), codec="libx264")
        decord.VideoReader(f.name, ctx=decord.gpu(ordinal))


def build_decoder(
    backend: str = "decord", num_threads: int = 1, device: str = "cpu"
) -> VideoDecoder:
    """Build a decoder by name: ``"decord"``, ``"pyav"`` or ``"torchcodec"``.

    ``decord``: random access, exact files via PyAV; falls back to PyAV, with a warning, when
    decord is not installed. ``torchcodec``: NVDEC on ``device="cuda"`` (``gpu_decode.py``).
    """
    if backend not in _BACKENDS:
        raise ValueError(
            f"Unknown decode backend {backend!r}; choose one of {', '.join(_BACKENDS)}."
        )
    if backend == "torchcodec":
        from vidssl.data.gpu_decode import TorchCodecDecoder

        return TorchCodecDecoder(device=device, num_threads=num_threads)
    if backend == "decord":
        if decord_available():
            return DecordDecoder(num_threads=num_threads, device=device)
        import warnings

        warnings.warn("decord is not installed; decoding with PyAV instead.", stacklevel=2)
    if device != "cpu":
        raise ValueError(f"decode_device={device!r} needs backend='decord' built with CUDA.")
    return PyAVDecoder(num_threads=num_threads)
