"""Re-encode videos to H.264 MP4 with a short keyframe interval, for fast exact random access.

AVI files with B-frames (UCF101, HMDB51) need vidssl's sequential exact path; transcoded copies
take decord's fast random-access path. Frame count and frame order are preserved.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vidssl.data.decoding import resized_size
from vidssl.data.index import VIDEO_EXTENSIONS

__all__ = ["TranscodeResult", "transcode_video", "transcode_dataset"]

log = logging.getLogger(__name__)

#: Non-video files copied along (split lists, class indexes, manifests).
_SIDE_FILES = (".txt", ".csv", ".json")


@dataclass(frozen=True)
class TranscodeResult:
    """Outcome of one file: ``frames`` written, or ``error`` ("" on success, "skipped")."""

    src: str
    dst: str
    frames: int
    error: str = ""


def _even(x: int) -> int:
    return max(2, x - x % 2)


def transcode_video(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    short_side: int | None = None,
    crf: int = 20,
    keyframe_interval: int = 16,
    preset: str = "veryfast",
    threads: int = 1,
) -> int:
    """Re-encode one video to H.264 in MP4, every decoded frame kept, in order.

    Frames are decoded sequentially (exact even for AVI with B-frames) and re-timed at the
    source's average frame rate, so frame ``k`` of the copy is frame ``k`` of the original.

    Args:
        src: input video.
        dst: output ``.mp4`` path (written to a temporary name, then renamed).
        short_side: resize so the shorter side has this many pixels (aspect kept, even sizes);
            ``None`` keeps the size (rounded down to even).
        crf: x264 constant rate factor (lower is better quality; 18-23 is visually lossless to
            good).
        keyframe_interval: frames between keyframes (``g``); short intervals make random access
            cheap (a seek decodes at most this many frames).
        preset: x264 speed preset.
        threads: encoder threads.

    Returns:
        The number of frames written.
    """
    import av

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}.mp4")
    written = 0
    try:
        with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
            vin = inp.streams.video[0]
            ctx = vin.codec_context
            width, height = resized_size(ctx.width, ctx.height, short_side)
            width, height = _even(width), _even(height)
            rate = vin.average_rate or vin.guessed_rate or 25
            vout = out.add_stream("libx264", rate=rate)
            vout.width, vout.height, vout.pix_fmt = width, height, "yuv420p"
            vout.codec_context.gop_size = keyframe_interval
            vout.codec_context.thread_count = threads
            # No B-frames: the copy decodes in order with any decoder (decord is exact on H.264
            # B-frames in MP4 too, but other readers may not be).
            vout.options = {
                "crf": str(crf),
                "preset": preset,
                "bf": "0",
                "keyint_min": str(keyframe_interval),
                "sc_threshold": "0",
            }
            for frame in inp.decode(vin):
                img = frame.reformat(width=width, height=height, format="yuv420p")
                img.pts = written
                img.time_base = 1 / rate
                for packet in vout.encode(img):
                    out.mux(packet)
                written += 1
            for packet in vout.encode():
                out.mux(packet)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _one(job: tuple[str, str, dict]) -> TranscodeResult:
    src, dst, kwargs = job
    try:
        return TranscodeResult(src, dst, transcode_video(src, dst, **kwargs))
    except Exception as exc:  # noqa: BLE001 - report per file, keep going
        return TranscodeResult(src, dst, 0, f"{type(exc).__name__}: {exc}")


def transcode_dataset(
    src_root: str | os.PathLike,
    dst_root: str | os.PathLike,
    short_side: int | None = None,
    crf: int = 20,
    keyframe_interval: int = 16,
    preset: str = "veryfast",
    num_workers: int = 4,
    overwrite: bool = False,
    progress: bool | None = None,
) -> list[TranscodeResult]:
    """Re-encode every video under ``src_root`` into ``dst_root`` as ``.mp4``, in parallel.

    The folder structure is kept (``a/b/v.avi`` -> ``a/b/v.mp4``) and split lists and manifests
    (``.txt``, ``.csv``, ``.json``) are copied, so the UCF101 / HMDB51 readers work on
    ``dst_root`` unchanged: they resolve a listed ``v.avi`` to ``v.mp4`` when only that exists.
    Existing outputs are skipped unless ``overwrite``; failures are logged and returned.

    Args:
        src_root: folder of videos.
        dst_root: output folder.
        short_side: shorter side of the output (aspect kept); ``None`` keeps the size. Decoding
            at a modest size is the largest speed-up for training (e.g. 128 or 160).
        crf: x264 quality (see :func:`transcode_video`).
        keyframe_interval: frames between keyframes.
        preset: x264 speed preset.
        num_workers: encoder processes.
        overwrite: re-encode files that already exist in ``dst_root``.
        progress: show a tqdm bar (default: more than 20 files).

    Returns:
        One :class:`TranscodeResult` per video (``error="skipped"`` for existing outputs).
    """
    src_root, dst_root = Path(src_root).resolve(), Path(dst_root).resolve()
    if not src_root.is_dir():
        raise FileNotFoundError(f"{src_root} is not a folder of videos.")
    if dst_root == src_root or src_root in dst_root.parents:
        raise ValueError(f"dst_root {dst_root} must be outside src_root {src_root}.")
    kwargs = dict(
        short_side=short_side, crf=crf, keyframe_interval=keyframe_interval, preset=preset
    )
    jobs, results = [], []
    for p in sorted(src_root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(src_root)
        suffix = p.suffix.lower()
        if suffix in _SIDE_FILES:
            (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst_root / rel)
        elif suffix in VIDEO_EXTENSIONS:
            dst = dst_root / rel.with_suffix(".mp4")
            if dst.exists() and not overwrite:
                results.append(TranscodeResult(str(p), str(dst), 0, "skipped"))
            else:
                jobs.append((str(p), str(dst), kwargs))
    show = progress if progress is not None else len(jobs) > 20
    if num_workers <= 1:
        done: Iterable[TranscodeResult] = map(_one, jobs)
        pool = None
    else:
        # Spawned, not forked: a forked child can hang in FFmpeg on locks the parent's threads
        # held at the fork.
        pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
        done = pool.map(_one, jobs, chunksize=4)
    try:
        if show:
            from tqdm.auto import tqdm

            done = tqdm(done, total=len(jobs), desc="transcoding", unit="video")
        for r in done:
            if r.error:
                log.warning("Could not transcode %s: %s", r.src, r.error)
            results.append(r)
    finally:
        if pool is not None:
            pool.shutdown()
    return results
