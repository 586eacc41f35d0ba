"""Optical flow computed offline (``vidssl flow``) and read back per clip, frame-aligned with RGB.

One uint8 ``.npy`` per video (x/y clipped to +-20 px and quantised), memory-mapped on read so a
clip costs only its frames; a JSON manifest records how the flow was made.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vidssl.data.decoding import resized_size

__all__ = [
    "FLOW_BOUND",
    "FLOW_METHODS",
    "FlowMissingError",
    "FlowResult",
    "quantize_flow",
    "dequantize_flow",
    "flow_path",
    "flow_estimator",
    "compute_flow",
    "compute_flow_file",
    "flow_dataset",
    "find_flow_sources",
    "read_flow",
    "missing_flow",
    "flow_relative_paths",
    "load_flow_manifest",
    "summarize",
]

log = logging.getLogger(__name__)

#: Flow components are clipped to ``[-FLOW_BOUND, FLOW_BOUND]`` pixels per frame before storage.
FLOW_BOUND = 20.0
#: ``tvl1``: OpenCV's Dual TV-L1 (accurate, slow; what SLIC and TSN used); ``dis``: DIS at its
#: "medium" preset (tens of times faster); ``farneback``: Farneback's polynomial expansion.
FLOW_METHODS = ("tvl1", "dis", "farneback")
#: Name of the manifest in the flow folder.
MANIFEST = "flow_manifest.json"
_SUFFIX = ".npy"
_VERSION = 1


class FlowMissingError(FileNotFoundError):
    """Stored flow was asked for a video that has none (run ``vidssl flow`` on it)."""


@dataclass(frozen=True)
class FlowResult:
    """Outcome of one video: ``frames`` stored, or ``error`` ("" on success, "skipped")."""

    video: str
    rel: str
    frames: int
    error: str = ""


# ---------------------------------------------------------------------------- storage
def quantize_flow(flow: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """Map flow in pixels to uint8: ``q = round((clip(f, -B, B) + B) * 255 / (2B))``."""
    f = np.clip(np.asarray(flow, np.float32), -bound, bound)
    return np.rint((f + bound) * (255.0 / (2 * bound))).astype(np.uint8)


def dequantize_flow(q: np.ndarray, bound: float = FLOW_BOUND, dtype=np.float16) -> np.ndarray:
    """Inverse of :func:`quantize_flow`: ``f = q * 2B / 255 - B`` (step 0.157 px at B = 20).

    Zero flow comes back as ``+0.078`` px (``q = 128``), half a step: 255 levels have no centre.
    """
    return (np.asarray(q, np.float32) * (2 * bound / 255.0) - bound).astype(dtype)


def flow_path(dst: str | os.PathLike, rel_video: str | os.PathLike) -> Path:
    """Where the flow of ``rel_video`` lives: ``dst/<rel_video without its extension>.npy``.

    ``rel_video`` is the video's path relative to the SRC of ``vidssl flow``
    (``Class/v_x.avi`` -> ``dst/Class/v_x.npy``).
    """
    rel = Path(rel_video)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"rel_video must be relative to the flow source folder, got {rel}.")
    return Path(dst) / rel.with_suffix(_SUFFIX)


def _temp_path(out: Path) -> Path:
    # Hidden and not ending in .npy: neither flow_path, the manifest nor a re-run match it.
    return out.with_name(f".{out.name}.tmp{os.getpid()}")


def _resize_field(field: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``T x H x W x 2`` float flow to ``size = (W', H')``, vectors scaled."""
    t, h, w, _ = field.shape
    nw, nh = size
    ys = np.clip((np.arange(nh) + 0.5) * h / nh - 0.5, 0, h - 1)
    xs = np.clip((np.arange(nw) + 0.5) * w / nw - 0.5, 0, w - 1)
    y0, x0 = ys.astype(int), xs.astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    f = field.astype(np.float32)
    top = f[:, y0][:, :, x0] * (1 - fx) + f[:, y0][:, :, x1] * fx
    bottom = f[:, y1][:, :, x0] * (1 - fx) + f[:, y1][:, :, x1] * fx
    out = top * (1 - fy) + bottom * fy
    out[..., 0] *= nw / w
    out[..., 1] *= nh / h
    return out


def read_flow(
    dst: str | os.PathLike,
    rel_video: str | os.PathLike,
    frame_indices: Sequence[int] | np.ndarray,
    size: tuple[int, int] | None = None,
    quantized: bool = False,
    bound: float = FLOW_BOUND,
) -> np.ndarray:
    """Read the stored flow of frames ``frame_indices`` of one video.

    The file is memory-mapped: only the requested frames are read from disk. Flow frame ``t``
    is the motion from RGB frame ``t`` to ``t + 1`` (the last frame repeats the one before), so
    the result aligns frame-by-frame with an RGB clip of the same indices.

    Args:
        dst: the flow folder (``-o`` of ``vidssl flow``).
        rel_video: the video's path relative to the flow source folder (see :func:`flow_path`).
        frame_indices: 0-based frame indices (any order, repeats allowed).
        size: ``(width, height)`` of the RGB decode; when it differs from the stored size the
            flow is resized bilinearly and its vectors scaled by the same factors.
        quantized: return the stored uint8 codes (:func:`dequantize_flow` maps them to pixels)
            instead of float16 pixels per frame.
        bound: the clipping bound the flow was stored with.

    Returns:
        ``T x H x W x 2`` (x then y, ``+x`` right, ``+y`` down): float16 pixels per frame, or
        uint8 codes with ``quantized``.

    Raises:
        FlowMissingError: no flow stored for this video (the message names it).
        IndexError: a frame index beyond the stored frames.
    """
    path = flow_path(dst, rel_video)
    try:
        stored = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise FlowMissingError(
            f"No optical flow for {rel_video} in {dst} (expected {path}); compute it with "
            f"`vidssl flow SRC -o {dst}`."
        ) from None
    idx = np.asarray(frame_indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(stored)):
        raise IndexError(
            f"{path} holds flow for {len(stored)} frames of {rel_video} but frames "
            f"{idx.min()}..{idx.max()} were requested."
        )
    codes = np.asarray(stored[idx])
    if size is not None and tuple(size) != (codes.shape[2], codes.shape[1]):
        pixels = _resize_field(dequantize_flow(codes, bound, np.float32), tuple(size))
        return quantize_flow(pixels, bound) if quantized else pixels.astype(np.float16)
    return codes if quantized else dequantize_flow(codes, bound)


# ---------------------------------------------------------------------------- computing
def flow_estimator(method: str):
    """Return ``f(prev, next) -> H x W x 2`` float32 flow for ``method`` (grey uint8 images).

    OpenCV runs single-threaded here: ``vidssl flow`` parallelises over videos instead.
    """
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "Optical flow needs OpenCV with its contrib modules: pip install "
            "'vidssl[flow]' (opencv-contrib-python-headless)."
        ) from exc
    cv2.setNumThreads(1)  # parallelism is over videos (--workers), not inside one
    if method == "tvl1":
        if not hasattr(cv2, "optflow"):
            raise ImportError(
                "TV-L1 needs OpenCV's contrib modules (cv2.optflow): pip install "
                "opencv-contrib-python-headless (instead of opencv-python)."
            )
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
        return lambda a, b: tvl1.calc(a, b, None)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return lambda a, b: dis.calc(a, b, None)
    if method == "farneback":
        return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    raise ValueError(f"Unknown flow method {method!r}; choose one of {', '.join(FLOW_METHODS)}.")


def compute_flow(
    video: str | os.PathLike,
    method: str = "tvl1",
    short_side: int | None = None,
    bound: float = FLOW_BOUND,
) -> tuple[np.ndarray, dict]:
    """Compute the quantised optical flow of every frame of ``video``.

    Frames are decoded sequentially with PyAV (frame ``k`` is the ``k``-th decoded frame, as in
    the RGB path), converted to grey and resized on decode to ``short_side`` (the same
    :func:`~vidssl.data.decoding.resized_size` as the RGB decode). Flow frame ``t`` is the flow
    from frame ``t`` to ``t + 1``; the last frame repeats the flow before it (a one-frame video
    gets zero flow).

    Returns:
        ``(codes, info)``: uint8 ``T x H x W x 2`` (:func:`quantize_flow`) and
        ``{"frames", "width", "height", "fps"}``.
    """
    import av

    estimate = flow_estimator(method)
    codes: list[np.ndarray] = []
    prev = None
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        size = None
        for frame in container.decode(stream):
            size = size or resized_size(frame.width, frame.height, short_side)
            # Rows of PyAV's planes may be padded; OpenCV's flow wants contiguous images.
            gray = np.ascontiguousarray(
                frame.to_ndarray(format="gray", width=size[0], height=size[1])
            )
            if prev is not None:
                codes.append(quantize_flow(estimate(prev, gray), bound))
            prev = gray
    if prev is None:
        raise ValueError(f"{video} has no decodable frames.")
    codes.append(codes[-1] if codes else quantize_flow(np.zeros((*prev.shape, 2)), bound))
    info = {"frames": len(codes), "width": size[0], "height": size[1], "fps": fps}
    return np.stack(codes), info


def compute_flow_file(
    video: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "tvl1",
    short_side: int | None = None,
    bound: float = FLOW_BOUND,
) -> dict:
    """Compute the flow of ``video`` into ``out`` (``.npy``), atomically.

    The array is written under a hidden temporary name and renamed into place when complete,
    so ``out`` either does not exist or holds the whole video's flow, even after a kill.

    Returns:
        The info dict of :func:`compute_flow`.
    """
    out = Path(out)
    codes, info = compute_flow(video, method, short_side, bound)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    tmp = _temp_path(out)
    try:
        with open(tmp, "wb") as f:
            np.save(f, codes)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return info


# ---------------------------------------------------------------------------- a dataset
def find_flow_sources(
    src: str | os.PathLike, root: str | os.PathLike | None = None
) -> tuple[Path, list[str]]:
    """Return ``(root, videos)``: the videos of ``vidssl flow SRC`` and the folder of their paths.

    ``src`` is a folder (every video under it, recursively; ``root`` is ``src``), a CSV manifest
    (:func:`~vidssl.data.index.read_csv`; ``root`` defaults to the CSV's folder) or a text list
    with one video path first on each line, such as a UCF101 ``trainlist01.txt`` (paths are
    relative to ``root``, default the list's folder; ``#`` comments and blank lines skipped).
    Every video must lie under ``root``: its flow is stored at its path relative to ``root``.
    """
    from vidssl.data.index import _resolve, read_csv, read_folder

    src = Path(src).expanduser()
    if src.is_dir():
        base = Path(root or src).expanduser().resolve()
        videos = [str(p) for p in read_folder(src).paths]
    elif not src.exists():
        raise FileNotFoundError(f"{src} does not exist (expected a folder of videos or a list).")
    else:
        base = Path(root or src.parent).expanduser().resolve()
        if src.suffix.lower() == ".csv":
            videos = [str(p) for p in read_csv(src, root=base).paths]
        else:
            lines = [ln.split() for ln in src.read_text().splitlines()]
            names = [ln[0] for ln in lines if ln and not ln[0].startswith("#")]
            videos = [_resolve(base / n) for n in names]
        if not videos:
            raise ValueError(f"The list {src} names no videos.")
    # abspath, not resolve: a symlinked video keeps its place in the tree.
    outside = [v for v in videos if base not in Path(os.path.abspath(v)).parents]
    if outside:
        raise ValueError(
            f"{len(outside)} videos are not under the root {base} (e.g. {outside[0]}); pass "
            "--root, the folder their flow paths are taken relative to."
        )
    return base, videos


def load_flow_manifest(dst: str | os.PathLike) -> dict:
    """Read ``dst/flow_manifest.json`` (``{}`` when there is none yet).

    Keys: ``version``, ``method``, ``bound``, ``short_side``, ``root`` (the absolute source
    folder), ``videos``: ``{rel_video: {"frames", "width", "height", "fps"}}``.
    """
    try:
        return json.loads((Path(dst) / MANIFEST).read_text())
    except FileNotFoundError:
        return {}


def _save_manifest(dst: Path, manifest: dict) -> None:
    tmp = dst / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, dst / MANIFEST)  # atomic: a reader sees the old or the new manifest


def _stored_info(path: Path, video: str) -> dict:
    """Manifest entry for a finished file that a killed run did not record."""
    from vidssl.data.index import probe_video

    arr = np.load(path, mmap_mode="r")
    return {"frames": int(arr.shape[0]), "width": int(arr.shape[2]),
            "height": int(arr.shape[1]), "fps": float(probe_video(video).fps)}


def _one(job: tuple[str, str, str, dict]) -> tuple[FlowResult, dict]:
    video, rel, out, kwargs = job
    try:
        info = compute_flow_file(video, out, **kwargs)
        return FlowResult(video, rel, info["frames"]), info
    except Exception as exc:  # noqa: BLE001 - report per file, keep going
        return FlowResult(video, rel, 0, f"{type(exc).__name__}: {exc}"), {}


def flow_dataset(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    method: str = "tvl1",
    short_side: int | None = 128,
    bound: float = FLOW_BOUND,
    root: str | os.PathLike | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
) -> list[FlowResult]:
    """Compute and store the flow of every video of ``src`` in ``dst``, resumably and in parallel.

    Layout: ``dst/<video relative to root, extension replaced by .npy>`` (:func:`flow_path`) and
    ``dst/flow_manifest.json`` (:func:`load_flow_manifest`), rewritten atomically every few
    seconds and at the end. A video whose ``.npy`` exists is finished (files appear only by an
    atomic rename) and is skipped, so a re-run after a kill continues where it stopped.
    Videos that cannot be decoded are logged, left out and returned with their error.

    Args:
        src: folder of videos, CSV manifest or text list (:func:`find_flow_sources`).
        dst: output folder; one source root per folder (another root is refused).
        method: one of :data:`FLOW_METHODS`.
        short_side: decode size of the shorter side (match the RGB ``short_side``); ``None``
            keeps the native size.
        bound: clip flow to ``+-bound`` pixels per frame before quantising.
        root: the folder relative paths are taken from (default: see :func:`find_flow_sources`).
        workers: processes computing flow (one video each at a time).
        overwrite: recompute existing outputs.
        progress: show a tqdm bar (default: more than one video to compute).

    Returns:
        One :class:`FlowResult` per video (``error="skipped"`` for videos already done).
    """
    flow_estimator(method)  # fail now, not once per video, when OpenCV or the method is missing
    base, videos = find_flow_sources(src, root)
    dst = Path(dst).expanduser().resolve()
    dst.mkdir(parents=True, exist_ok=True)
    settings = {"version": _VERSION, "method": method, "bound": float(bound),
                "short_side": short_side}
    manifest = load_flow_manifest(dst)
    made = {k: manifest.get(k) for k in settings}
    if manifest and not overwrite and made != settings:
        raise ValueError(
            f"{dst} holds flow made with {made}, not {settings}: use the same settings, another "
            "output folder, or --overwrite."
        )
    if manifest.get("root") not in (None, str(base)) and not overwrite:
        raise ValueError(
            f"{dst} holds flow of videos under {manifest['root']}, not {base}: pass --root "
            f"{manifest['root']} (paths in DST are relative to it) or use another output folder."
        )
    entries = {} if overwrite else dict(manifest.get("videos", {}))
    manifest = {**settings, "root": str(base), "videos": entries}
    kwargs = {"method": method, "short_side": short_side, "bound": bound}
    jobs, results = [], []
    for video in videos:
        rel = Path(os.path.abspath(video)).relative_to(base).as_posix()
        out = flow_path(dst, rel)
        if out.exists() and not overwrite:
            if rel not in entries:
                entries[rel] = _stored_info(out, video)
            results.append(FlowResult(video, rel, entries[rel]["frames"], "skipped"))
        else:
            entries.pop(rel, None)
            jobs.append((video, rel, str(out), kwargs))
    _save_manifest(dst, manifest)
    show = progress if progress is not None else len(jobs) > 1
    # Spawned, not forked: a forked child inherits FFmpeg's and OpenCV's locks and thread pools
    # in whatever state the parent's threads left them, and can hang in its first decode.
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 1 and len(jobs) > 1 else None)
    done: Iterable[tuple[FlowResult, dict]]
    if pool is None:
        done = map(_one, jobs)
    else:
        done = (f.result() for f in as_completed([pool.submit(_one, j) for j in jobs]))
    saved = time.monotonic()
    try:
        if show:
            from tqdm.auto import tqdm

            done = tqdm(done, total=len(jobs), desc=f"flow ({method})", unit="video")
        for result, info in done:
            results.append(result)
            if result.error:
                log.info("Skipping %s: %s", result.video, result.error)
                continue
            entries[result.rel] = info
            if time.monotonic() - saved > 5:
                _save_manifest(dst, manifest)
                saved = time.monotonic()
    finally:
        _save_manifest(dst, manifest)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results


def missing_flow(
    dst: str | os.PathLike, videos: Iterable[str], root: str | os.PathLike | None = None
) -> list[str]:
    """Return the videos of ``videos`` that have no stored flow in ``dst``, in their order.

    ``videos`` are paths (absolute, or relative to ``root``; e.g. a
    :class:`~vidssl.data.index.VideoIndex`'s ``paths``); ``root`` defaults to the source folder
    recorded in ``dst``'s manifest.
    """
    base = Path(root or load_flow_manifest(dst).get("root") or ".").resolve()
    out = []
    for v in videos:
        p = Path(v)
        if p.is_absolute() and base not in Path(os.path.abspath(p)).parents:
            raise ValueError(f"{v} is not under the flow source folder {base}; pass root=.")
        rel = Path(os.path.abspath(p)).relative_to(base) if p.is_absolute() else p
        if not flow_path(dst, rel).exists():
            out.append(str(v))
    return out


def flow_relative_paths(
    dst: str | os.PathLike, videos: Iterable[str], root: str | os.PathLike | None = None
) -> list[str]:
    """Each video's path relative to its flow root: what :func:`flow_path` takes.

    The rule a :class:`~vidssl.data.VideoDataModule` uses to find a video's flow: relative to
    the source folder recorded in ``dst``'s manifest (the ``SRC`` / ``--root`` of ``vidssl
    flow``) when the video lies under it, else relative to ``root`` (the data module's source
    folder: a data set moved after its flow was made). ``videos`` are absolute paths, or paths
    relative to that root. ValueError names a video under neither.
    """
    recorded = load_flow_manifest(dst).get("root")
    bases = [Path(b).expanduser().resolve() for b in (recorded, root) if b]
    out = []
    for v in videos:
        p = Path(str(v))
        if not p.is_absolute():
            out.append(p.as_posix())
            continue
        # abspath, not resolve: a symlinked video keeps its place in the tree (find_flow_sources).
        p = Path(os.path.abspath(p))
        base = next((b for b in bases if b in p.parents), None)
        if base is None:  # a video reached through a symlinked folder
            p = p.resolve()
            base = next((b for b in bases if b in p.parents), None)
        if base is None:
            raise ValueError(
                f"{v} is under none of the flow roots ({', '.join(map(str, bases)) or 'none'}): "
                f"its flow in {dst} cannot be found; run `vidssl flow` on its folder."
            )
        out.append(p.relative_to(base).as_posix())
    return out


def summarize(results: Sequence[FlowResult], dst: str | os.PathLike) -> tuple[str, list[str]]:
    """Return the one-line summary of a :func:`flow_dataset` run and one line per failed video."""
    failed = [f"  failed, skipped: {r.video}: {r.error}" for r in results
              if r.error and r.error != "skipped"]
    existed = sum(r.error == "skipped" for r in results)
    done = len(results) - existed - len(failed)
    return (f"flow of {done} videos written to {dst} ({existed} already there, {len(failed)} "
            "failed and skipped)"), failed
