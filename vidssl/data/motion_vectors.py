"""Motion vectors read from the compressed stream on the fly: a dense motion field per frame.

No pre-computation: PyAV decodes the frames up to the last one asked for with FFmpeg's
``export_mvs`` and each block's vector is painted over its block, at the RGB decode size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["MV_CODECS", "read_motion_vectors", "rasterize_motion_vectors"]

#: FFmpeg decoders that export motion vectors (``flags2=+export_mvs``): the MPEG video family
#: (MPEG-1/2, MPEG-4 Part 2 incl. DivX/Xvid, MS-MPEG4, H.263, FLV1) and H.264. Other codecs
#: (HEVC, VP8/9, AV1, MJPEG, Cinepak, ...) decode without them: every field is zero.
MV_CODECS: frozenset[str] = frozenset(
    {"mpeg1video", "mpeg2video", "mpeg4", "msmpeg4v1", "msmpeg4v2", "msmpeg4", "msmpeg4v3",
     "h263", "h263p", "flv1", "h264"}
)

_B_FRAME = 3  # AVPictureType: 1 I, 2 P, 3 B
_CELL = 4  # coded pixels per rasterisation cell


def rasterize_motion_vectors(
    mvs: np.ndarray,
    coded_size: tuple[int, int],
    size: tuple[int, int],
    distances: tuple[int, int] = (1, 1),
) -> np.ndarray:
    """Paint FFmpeg ``AVMotionVector`` records onto a dense ``H x W x 2`` float32 field.

    Each record's block (``w x h`` around its centre ``dst_x, dst_y`` in the current frame) gets
    its displacement in pixels per frame, ``+x`` right and ``+y`` down, as "where the content
    moved from the previous frame to this one". FFmpeg's ``src = dst + motion / motion_scale``
    is where the block's content sits in the reference frame, so the displacement is
    ``dst - src`` for a past reference (``source < 0``) and ``src - dst`` for a future one
    (``source > 0``: the content will move on to ``src``; constant speed is assumed), divided by
    the reference's distance in frames (``distances = (past, future)``). Blocks referenced twice
    (bi-prediction) get the mean; blocks without a vector (intra-coded) stay zero. The field is
    scaled from ``coded_size`` to ``size`` (both ``(width, height)``): block rectangles
    (nearest neighbour) and vectors alike.

    Args:
        mvs: structured array with fields ``source, w, h, dst_x, dst_y, motion_x, motion_y,
            motion_scale`` (PyAV's ``MotionVectors.to_ndarray()``).
        coded_size: ``(width, height)`` of the decoded frame the vectors refer to.
        size: ``(width, height)`` of the output field.
        distances: frames between this frame and its past and its future reference.
    """
    width, height = size
    sx, sy = width / coded_size[0], height / coded_size[1]
    if len(mvs) == 0:
        return np.zeros((height, width, 2), np.float32)
    source = mvs["source"].astype(np.float32)
    scale = np.maximum(mvs["motion_scale"].astype(np.float32), 1.0)
    dist = np.where(source < 0, distances[0], distances[1]).astype(np.float32)
    sign = np.sign(source) / dist
    vx = sign * mvs["motion_x"] / scale * sx
    vy = sign * mvs["motion_y"] / scale * sy
    # Blocks are aligned to 4 coded pixels (H.264's smallest is 4x4): paint on that grid, with
    # +v at two corners of each rectangle and -v at the other two, then a 2-D cumsum; a nearest
    # lookup maps output pixels onto the grid.
    gw, gh = -(-coded_size[0] // _CELL), -(-coded_size[1] // _CELL)
    half_w, half_h = mvs["w"].astype(np.int64) // 2, mvs["h"].astype(np.int64) // 2
    dst_x, dst_y = mvs["dst_x"].astype(np.int64), mvs["dst_y"].astype(np.int64)
    x0 = np.clip((dst_x - half_w) // _CELL, 0, gw - 1)
    y0 = np.clip((dst_y - half_h) // _CELL, 0, gh - 1)
    x1 = np.clip(-(-(dst_x + half_w) // _CELL), x0 + 1, gw)
    y1 = np.clip(-(-(dst_y + half_h) // _CELL), y0 + 1, gh)
    acc = np.zeros((3, gh + 1, gw + 1), np.float32)
    for k, v in enumerate((vx, vy, np.ones_like(vx))):
        np.add.at(acc[k], (y0, x0), v)
        np.add.at(acc[k], (y0, x1), -v)
        np.add.at(acc[k], (y1, x0), -v)
        np.add.at(acc[k], (y1, x1), v)
    acc = acc.cumsum(axis=1).cumsum(axis=2)[:, :gh, :gw]
    grid = acc[:2] / np.maximum(np.round(acc[2]), 1.0)
    gx = np.minimum(((np.arange(width) + 0.5) / sx / _CELL).astype(np.int64), gw - 1)
    gy = np.minimum(((np.arange(height) + 0.5) / sy / _CELL).astype(np.int64), gh - 1)
    return np.ascontiguousarray(grid[:, gy][:, :, gx].transpose(1, 2, 0))


def _anchor_distances(types: list[int], k: int) -> tuple[int, int]:
    """Frames from ``k`` back to the last non-B frame before it and on to the next one after it.

    The reference of a P-frame is the previous I/P frame in display order, those of a B-frame the
    I/P frames around it (exact for MPEG-1/2/4; H.264 may use other references, see docs).
    """
    past = next((k - j for j in range(k - 1, -1, -1) if types[j] != _B_FRAME), 1)
    future = next((j - k for j in range(k + 1, len(types)) if types[j] != _B_FRAME), 1)
    return past, future


def read_motion_vectors(
    path: str,
    indices: Sequence[int] | np.ndarray,
    size: tuple[int, int] | None = None,
    num_threads: int = 1,
    with_flags: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Decode the motion vectors of frames ``indices`` of ``path`` into dense fields.

    Frame ``k`` is the ``k``-th frame the decoder outputs (presentation order), the same frame
    :class:`vidssl.data.decoding.PyAVDecoder` returns for ``k``, so the fields align
    frame-by-frame with an RGB clip of the same indices. Decoding is sequential from the start
    to the last requested frame (plus the few frames up to the next I/P frame, to know a
    B-frame's reference distance); frames are never converted to RGB.

    Args:
        path: the video file.
        indices: 0-based frame indices (any order, repeats allowed).
        size: ``(width, height)`` of the output, the RGB decode size (e.g.
            :func:`vidssl.data.decoding.resized_size`); ``None`` keeps the coded size.
        num_threads: FFmpeg decoding threads.
        with_flags: also return which frames carried vectors.

    Returns:
        float16 ``T x H x W x 2``: the displacement from the previous frame to this one in
        output pixels per frame (see :func:`rasterize_motion_vectors`). With ``with_flags``,
        ``(field, has_vectors)`` where the bool ``T`` array is False for frames that carried no
        vectors (I-frames; every frame of a codec outside :data:`MV_CODECS`): their field is
        zero, which the flag tells apart from vectors that say "nothing moved".
    """
    import av

    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("No frame indices requested.")
    if indices.min() < 0:
        raise IndexError(f"Negative frame index {indices.min()} requested from {path}.")
    last = int(indices.max())
    wanted = set(indices.tolist())
    types: list[int] = []
    vectors: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        ctx.options = {"flags2": "+export_mvs"}
        ctx.thread_count = num_threads
        stream.thread_type = "AUTO" if num_threads != 1 else "SLICE"
        coded = None
        for k, frame in enumerate(container.decode(stream)):
            coded = coded or (frame.width, frame.height)
            types.append(int(frame.pict_type))
            if k in wanted:
                side = frame.side_data.get("MOTION_VECTORS")
                if side is not None:
                    vectors[k] = side.to_ndarray()
            # A B-frame also needs the distance to the next I/P frame: decode on to it.
            if k >= last and types[-1] != _B_FRAME:
                break
    if len(types) <= last:
        raise IndexError(
            f"{path} has only {len(types)} decodable frames but frame {last} was requested."
        )
    size = tuple(size) if size is not None else coded
    unique = np.unique(indices)
    fields = np.zeros((len(unique), size[1], size[0], 2), np.float16)
    has = np.zeros(len(unique), bool)
    for i, k in enumerate(unique.tolist()):
        if k in vectors:
            fields[i] = rasterize_motion_vectors(
                vectors[k], coded, size, _anchor_distances(types, k)
            )
            has[i] = True
    pos = np.searchsorted(unique, indices)
    return (fields[pos], has[pos]) if with_flags else fields[pos]
