"""Motion vectors read from the compressed stream on the fly: a dense motion field per frame.

No pre-computation: PyAV decodes the frames up to the last one asked for with FFmpeg's
``export_mvs`` (without their pixels, MPEG-family streams at 1/8 size; where the stream has no
B-frames, only the clip's frames or from the keyframe before the clip) and each block's vector
is painted over its block, at the RGB decode size.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from vidssl.data.flow import quantize_flow

__all__ = ["MV_CODECS", "read_motion_vectors", "rasterize_motion_vectors"]

#: FFmpeg decoders that export motion vectors (``flags2=+export_mvs``): the MPEG video family
#: (MPEG-1/2, MPEG-4 Part 2 incl. DivX/Xvid, MS-MPEG4, H.263, FLV1) and H.264. Other codecs
#: (HEVC, VP8/9, AV1, MJPEG, Cinepak, ...) decode without them: every field is zero.
MV_CODECS: frozenset[str] = frozenset(
    {"mpeg1video", "mpeg2video", "mpeg4", "msmpeg4v1", "msmpeg4v2", "msmpeg4", "msmpeg4v3",
     "h263", "h263p", "flv1", "h264"}
)

_I_FRAME, _P_FRAME, _B_FRAME = 1, 2, 3  # AVPictureType
_CELL = 4  # coded pixels per rasterisation cell
#: Decoder options: vectors are bitstream syntax, so FFmpeg may skip the pixel work (inverse
#: transform and motion compensation, deblocking); the exported vectors are the same (tested).
_MV_OPTIONS = {"flags2": "+export_mvs", "skip_idct": "all", "skip_loop_filter": "all"}
#: FFmpeg's ``lowres`` (decode at 1/2**_LOWRES the size) for the MPEG video family decoders
#: (their largest ``max_lowres``): the vectors are parsed and exported at the coded size, the
#: same records (tested); only the motion compensation of the unused pixels gets cheaper.
_LOWRES = 3
_LOWRES_DECODERS = frozenset(
    {"mpeg1video", "mpeg2video", "mpeg4", "msmpeg4v1", "msmpeg4v2", "msmpeg4", "h263", "h263p",
     "flv"}
)


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
    return _rasterize_frames([mvs], [distances], coded_size, size, np.float32)[0]


def _rasterize_frames(
    records: list[np.ndarray],
    distances: list[tuple[int, int]],
    coded_size: tuple[int, int],
    size: tuple[int, int],
    dtype: type = np.float16,
    quantized: bool = False,
    select: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`rasterize_motion_vectors` of several frames at once: ``F x H x W x 2`` of ``dtype``.

    One scatter and one gather for all frames (no per-block Python). With ``quantized``, the
    uint8 codes of :func:`vidssl.data.flow.quantize_flow` of that field instead. With
    ``select`` (indices into ``records``), the fields of ``records[select]``: each record is
    painted once however often it is selected.
    """
    width, height = size
    sx, sy = width / coded_size[0], height / coded_size[1]
    counts = np.array([len(m) for m in records])
    out_dtype = np.uint8 if quantized else dtype
    if counts.sum() == 0:
        n = len(records) if select is None else len(select)
        zero = np.zeros((n, height, width, 2), dtype)
        return quantize_flow(zero) if quantized else zero
    present = [m for m in records if len(m)]
    # One buffer: np.concatenate of structured arrays re-checks their fields each call.
    mvs = np.frombuffer(
        b"".join(m if m.flags.c_contiguous else m.tobytes() for m in present), present[0].dtype)
    frame = np.repeat(np.arange(len(records)), counts)
    per_frame = np.asarray(distances, np.float64).reshape(-1, 2).T
    past, future = np.repeat(per_frame[0], counts), np.repeat(per_frame[1], counts)
    source = mvs["source"].astype(np.float64)
    scale = np.maximum(mvs["motion_scale"].astype(np.float64), 1.0)
    sign = np.sign(source) / np.where(source < 0, past, future)
    vx = sign * mvs["motion_x"] / scale * sx
    vy = sign * mvs["motion_y"] / scale * sy
    # Paint on a grid of square cells that every block edge lies on: 4 coded pixels (H.264's
    # smallest block is 4x4), 8 or 16 when all blocks are aligned so (MPEG-4: 16x16 or 8x8).
    # Each block is spread over the cells it covers and every cell gets the mean of its blocks'
    # vectors (one bincount per channel for all frames); a nearest lookup maps output pixels
    # onto the grid. The cell size changes nothing but the cost.
    half_w, half_h = mvs["w"].astype(np.int64) // 2, mvs["h"].astype(np.int64) // 2
    dst_x, dst_y = mvs["dst_x"].astype(np.int64), mvs["dst_y"].astype(np.int64)
    # All edges are multiples of a power of two c when their bitwise OR is (two's complement).
    edges = np.bitwise_or.reduce(
        (dst_x - half_w) | (dst_y - half_h) | (dst_x + half_w) | (dst_y + half_h))
    cell = next(c for c in (16, 8, _CELL) if c == _CELL or not edges & (c - 1))
    gw, gh = -(-coded_size[0] // cell), -(-coded_size[1] // cell)
    x0 = np.clip((dst_x - half_w) // cell, 0, gw - 1)
    y0 = np.clip((dst_y - half_h) // cell, 0, gh - 1)
    nx = np.clip(-(-(dst_x + half_w) // cell), x0 + 1, gw) - x0
    ny = np.clip(-(-(dst_y + half_h) // cell), y0 + 1, gh) - y0
    cells = nx * ny
    if np.all(cells == 1):  # every block one cell (MPEG-4 without 8x8 blocks): no spreading
        block, at = slice(None), (frame * gh + y0) * gw + x0
    else:
        block = np.repeat(np.arange(len(mvs)), cells)
        local = np.arange(len(block)) - np.repeat(np.cumsum(cells) - cells, cells)
        at = (frame[block] * gh + y0[block] + local // nx[block]) * gw + x0[block] + local % nx[
            block]
    n_all = len(records) * gh * gw
    count = np.maximum(np.bincount(at, minlength=n_all), 1)
    grid = np.empty((len(records), gh, gw, 2), dtype)
    for k, v in enumerate((vx, vy)):
        grid[..., k] = (np.bincount(at, v[block], minlength=n_all) / count).reshape(
            len(records), gh, gw)
    if quantized:  # on the grid: the same codes as on the field, for a fraction of the work
        grid = quantize_flow(grid)
    gx = np.minimum(((np.arange(width) + 0.5) / sx / cell).astype(np.int64), gw - 1)
    gy = np.minimum(((np.arange(height) + 0.5) / sy / cell).astype(np.int64), gh - 1)
    # (x, y) pairs viewed as single integers of twice the item size; columns first on the small
    # grid, then whole rows.
    pairs = np.ascontiguousarray(grid).view(f"u{2 * grid.itemsize}")[..., 0]
    if select is not None:
        pairs = pairs[select]
    out = pairs.take(gx, axis=2).take(gy, axis=1)
    return out[..., None].view(grid.dtype).astype(out_dtype, copy=False)


def _anchor_distances(types: list[int], k: int) -> tuple[int, int]:
    """Frames from ``k`` back to the last non-B frame before it and on to the next one after it.

    The reference of a P-frame is the previous I/P frame in display order, those of a B-frame the
    I/P frames around it (exact for MPEG-1/2/4; H.264 may use other references, see docs).
    """
    past = next((k - j for j in range(k - 1, -1, -1) if types[j] != _B_FRAME), 1)
    future = next((j - k for j in range(k + 1, len(types)) if types[j] != _B_FRAME), 1)
    return past, future


#: Decoders whose P-frame vectors are coded from the frame alone (each predicted from its
#: neighbours in the same frame; tested against the sequential decode): in a stream without
#: B-frames only the wanted frames need decoding.
_FRAME_BY_FRAME = frozenset({"mpeg4", "msmpeg4"})


#: FFmpeg's ``AVMotionVector`` as PyAV's ``MotionVectors.to_ndarray`` lays it out (which builds
#: this dtype anew on every call).
_AV_MOTION_VECTOR = np.dtype(
    [("source", "int32"), ("w", "uint8"), ("h", "uint8"), ("src_x", "int16"), ("src_y", "int16"),
     ("dst_x", "int16"), ("dst_y", "int16"), ("flags", "uint64"), ("motion_x", "int32"),
     ("motion_y", "int32"), ("motion_scale", "uint16")],
    align=True,
)


def _records(side) -> np.ndarray:
    """``side.to_ndarray()`` of PyAV motion-vector side data, without rebuilding its dtype."""
    return np.frombuffer(bytes(side), _AV_MOTION_VECTOR)


class _JumpFailed(Exception):
    """Decoding from a later keyframe would not number the frames as a sequential decode does."""


class _LowresFailed(Exception):
    """A ``lowres`` decode gave frames whose size does not tell the coded size."""


def _coded_size(decoded: tuple[int, int], ctx, lowres: bool) -> tuple[int, int]:
    """Return the coded ``(width, height)`` the vectors refer to, from frames of ``decoded`` size.

    Without ``lowres`` that is the frame's size; with it, the decoder's coded size, which must
    shrink to the frame's size (FFmpeg rounds up) or :class:`_LowresFailed` is raised.
    """
    if not lowres:
        return decoded
    coded = (int(ctx.coded_width), int(ctx.coded_height))
    if tuple(-(-c >> _LOWRES) for c in coded) != tuple(decoded) or min(coded) <= 0:
        raise _LowresFailed
    return coded


def _packets_from_keyframe(packets, start: int) -> tuple[list, int]:
    """Read (not decode) the packets up to frame ``start``: ``(packets to decode, key)``.

    The packets to decode are packet 0 and those from ``key``, the last keyframe at or before
    ``start``, on.
    """
    first, tail, key = None, [], 0
    for n, packet in enumerate(packets):
        if packet.size == 0:  # a dropped frame, or the end of the stream: do not guess
            raise _JumpFailed
        if n == 0:
            first = packet
        elif packet.is_keyframe:
            tail, key = [], n
        if n:
            tail.append(packet)
        if n == start:
            return ([first, *tail] if first is not None else tail), key
    raise _JumpFailed


def _decode_wanted(packets, wanted: set[int], last: int):
    """``_decode_vectors`` of a stream without B-frames of a :data:`_FRAME_BY_FRAME` decoder.

    Packet ``n`` is frame ``n``; only packet 0 (it may carry the stream's headers) and the wanted
    ones are decoded, each of which must give exactly one frame, never a B-frame. Frames not
    decoded are reported as P-frames: with no B-frame, every past reference is 1 frame back.
    """
    types = [_P_FRAME] * (last + 1)
    vectors: dict[int, np.ndarray] = {}
    coded = None
    for n, packet in enumerate(packets):
        if packet.size == 0:  # a dropped frame, or the end of the stream: do not guess
            raise _JumpFailed
        if n and n not in wanted:
            continue
        frames = packet.decode()
        types[n] = int(frames[0].pict_type) if len(frames) == 1 else _B_FRAME
        if types[n] == _B_FRAME:  # or not one frame
            raise _JumpFailed
        coded = coded or (frames[0].width, frames[0].height)
        side = frames[0].side_data.get("MOTION_VECTORS") if n in wanted else None
        if side is not None:
            vectors[n] = _records(side)
        if n >= last:
            return types, vectors, coded
    raise _JumpFailed


def _decode_vectors(
    path: str, wanted: set[int], last: int, jump: bool, lowres: bool = True
) -> tuple[list[int], dict[int, np.ndarray], tuple[int, int] | None]:
    """Picture types of frames ``0..last`` (and on to the next non-B frame), vectors of ``wanted``.

    With ``jump``, in a stream without B-frames (the decoder outputs packet ``k`` as frame
    ``k``): for :data:`_FRAME_BY_FRAME` decoders only frame 0 and the wanted frames are decoded
    (:func:`_decode_wanted`); for others the packets between frame 0 and the last keyframe at or
    before the first wanted frame are read but not decoded (frame 0 is: it may carry the
    stream's headers), their types reported as P, which no distance search reaches (the
    keyframe stops it). With ``lowres``, decoders of :data:`_LOWRES_DECODERS` decode at
    1/2**:data:`_LOWRES` the size (the same vectors); the coded size comes from the decoder.
    """
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        low = lowres and ctx.name in _LOWRES_DECODERS
        ctx.options = {**_MV_OPTIONS, "lowres": str(_LOWRES)} if low else dict(_MV_OPTIONS)
        ctx.thread_count = 1  # frame threads change some H.264 vectors
        stream.thread_type = "SLICE"
        types, vectors, decoded = _decode_stream(container.demux(stream), ctx, wanted, last, jump)
        return types, vectors, decoded and _coded_size(decoded, ctx, low)


def _decode_stream(packets, ctx, wanted: set[int], last: int, jump: bool):
    """:func:`_decode_vectors` of an opened stream, with the decoded frames' size.

    That size is the coded size unless the decoder runs at a lower resolution.
    """
    types: list[int] = []
    vectors: dict[int, np.ndarray] = {}
    decoded = None
    key = 0
    queue: list = []
    if jump and not ctx.has_b_frames and ctx.name in _FRAME_BY_FRAME:
        return _decode_wanted(packets, wanted, last)
    if jump and not ctx.has_b_frames and min(wanted) > 0:
        queue, key = _packets_from_keyframe(packets, min(wanted))
    for packet in itertools.chain(queue, packets):
        for frame in packet.decode():
            decoded = decoded or (frame.width, frame.height)
            if len(types) == 1 and key:
                types.extend([_P_FRAME] * (key - 1))
                if int(frame.pict_type) != _I_FRAME:
                    raise _JumpFailed
            k = len(types)
            types.append(int(frame.pict_type))
            if key and types[-1] == _B_FRAME:
                raise _JumpFailed
            # FFmpeg's MPEG-4 Part 2 decoder exports a zero vector for every block of a
            # B-frame (any encoder): no information, so no vectors.
            if k in wanted and not (types[-1] == _B_FRAME and ctx.name == "mpeg4"):
                side = frame.side_data.get("MOTION_VECTORS")
                if side is not None:
                    vectors[k] = _records(side)
            # A B-frame also needs the distance to the next I/P frame: decode on to it.
            if k >= last and types[-1] != _B_FRAME:
                return types, vectors, decoded
    return types, vectors, decoded


def read_motion_vectors(
    path: str,
    indices: Sequence[int] | np.ndarray,
    size: tuple[int, int] | None = None,
    num_threads: int = 1,
    with_flags: bool = False,
    quantized: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Decode the motion vectors of frames ``indices`` of ``path`` into dense fields.

    Frame ``k`` is the ``k``-th frame the decoder outputs (presentation order), the same frame
    :class:`vidssl.data.decoding.PyAVDecoder` returns for ``k``, so the fields align
    frame-by-frame with an RGB clip of the same indices. Frames are decoded without their pixels
    (FFmpeg's ``skip_idct`` and ``skip_loop_filter``; the MPEG video family also at 1/8 size,
    ``lowres``: the vectors are the same) and never converted to RGB, on one thread, up to the
    last requested frame (plus the few frames up to the next I/P frame, to know a B-frame's
    reference distance). Which frames are decoded
    depends on the stream; the fields are the same either way (each shortcut checks the frames
    it gets and falls back to decoding from frame 0):

    - without B-frames, MPEG-4 Part 2 and MS-MPEG4 (whose P-frame vectors depend on nothing
      else): frame 0 (the stream's headers) and the requested frames only;
    - without B-frames, other codecs: from the last keyframe at or before the first requested
      frame on (the packets before it are only read);
    - with B-frames: every frame from frame 0.

    Args:
        path: the video file.
        indices: 0-based frame indices (any order, repeats allowed).
        size: ``(width, height)`` of the output, the RGB decode size (e.g.
            :func:`vidssl.data.decoding.resized_size`); ``None`` keeps the coded size.
        num_threads: ignored (kept for callers that pass their decoding threads): the vectors
            are decoded on one thread, as FFmpeg's frame threads change some H.264 vectors.
        with_flags: also return which frames carried vectors.
        quantized: return the uint8 codes of :func:`vidssl.data.flow.quantize_flow` of the field
            (what a training batch carries) instead of the field: the same codes, cheaper.

    Returns:
        float16 ``T x H x W x 2``: the displacement from the previous frame to this one in
        output pixels per frame (see :func:`rasterize_motion_vectors`). With ``with_flags``,
        ``(field, has_vectors)`` where the bool ``T`` array is False for frames that carried no
        vectors (I-frames; every frame of a codec outside :data:`MV_CODECS`): their field is
        zero, which the flag tells apart from vectors that say "nothing moved". With
        ``quantized``, uint8 codes in place of the field.
    """
    del num_threads
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("No frame indices requested.")
    if indices.min() < 0:
        raise IndexError(f"Negative frame index {indices.min()} requested from {path}.")
    last = int(indices.max())
    wanted = set(indices.tolist())
    jump, lowres = True, True
    while True:  # each shortcut that fails is dropped, down to the plain sequential decode
        try:
            types, vectors, coded = _decode_vectors(path, wanted, last, jump, lowres)
            break
        except _JumpFailed:
            if not jump:
                raise
            jump = False
        except _LowresFailed:
            if not lowres:
                raise
            lowres = False
    if len(types) <= last:
        raise IndexError(
            f"{path} has only {len(types)} decodable frames but frame {last} was requested."
        )
    size = tuple(size) if size is not None else coded
    # Each distinct frame painted once on the small grid (the views of a sample share frames),
    # then spread to the requested order by the gather onto the output pixels.
    requested = indices.tolist()
    order = sorted(wanted)
    position = {k: j for j, k in enumerate(order)}
    select = np.array([position[k] for k in requested], np.int64)
    empty = np.zeros(0, np.dtype([("source", "<i4")]))
    fields = _rasterize_frames(
        [vectors.get(k, empty) for k in order],
        [_anchor_distances(types, k) if k in vectors else (1, 1) for k in order],
        coded, size, quantized=quantized, select=select,
    )
    has = np.array([k in vectors for k in requested], bool)
    return (fields, has) if with_flags else fields
