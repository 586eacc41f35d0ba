"""A small synthetic video collection whose classes differ by motion, not by appearance.

Written with PyAV in the official UCF101 (or HMDB51) layout, for tests, the demo and smoke runs.

Two appearance settings (``write_synthetic_dataset(appearance=...)``):

- ``"per_video"``: every video draws its own texture, background colour and blob size. Two
  clips of one video then share their appearance, which no other video has, so instance
  discrimination (SimCLR, MoCo) is solved by appearance alone and learns nothing about motion:
  measured in docs/data.md ("Synthetic data"), short pretraining does not beat a random backbone
  there.
- ``"shared"``: one texture, background and blob size for the whole collection; videos differ
  only by motion (the class), speed and start position. The only way to tell two videos apart is
  how they move, so a few minutes of self-supervised pretraining learns motion features.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "MOTIONS",
    "Appearance",
    "draw_appearance",
    "render_video",
    "numbered_frames",
    "moving_sprite",
    "read_frame_numbers",
    "write_video",
    "write_synthetic_dataset",
]

#: The motion classes, in label order. Every class draws its appearance (texture, colours,
#: blob size, start position, speed) from the same distribution, so only motion separates them.
MOTIONS: tuple[str, ...] = (
    "MoveLeft",
    "MoveRight",
    "MoveUp",
    "MoveDown",
    "RotateClockwise",
    "ZoomIn",
)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a random smooth colour texture, ``size x size x 3`` uint8."""
    coarse = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
    # Nearest upsampling of a coarse grid plus fine noise: a blob with visible internal structure,
    # so rotation is visible (a flat colour disc would not rotate visibly).
    rep = -(-size // 4)
    tex = np.kron(coarse, np.ones((rep, rep, 1), np.float32))[:size, :size]
    tex += rng.normal(0.0, 20.0, size=tex.shape)
    return np.clip(tex, 0, 255).astype(np.uint8)


#: What a video looks like: the blob's texture (``S x S x 3`` uint8) and the background colour.
Appearance = Tuple[np.ndarray, np.ndarray]


def draw_appearance(rng: np.random.Generator, width: int = 64, height: int = 48) -> Appearance:
    """Draw a texture (side 35-50 % of the short side) and a background colour."""
    size = max(8, int(min(width, height) * rng.uniform(0.35, 0.5)))
    tex = _texture(rng, size)
    return tex, rng.integers(0, 256, size=3).astype(np.uint8)


def render_video(
    motion: str,
    rng: np.random.Generator,
    num_frames: int = 32,
    width: int = 64,
    height: int = 48,
    appearance: Optional[Appearance] = None,
) -> np.ndarray:
    """Render one video of a textured blob performing ``motion``.

    Args:
        motion: one of :data:`MOTIONS`.
        rng: the random generator that draws the motion speed and start position, and the
            appearance when ``appearance`` is ``None``.
        num_frames: ``T``.
        width: ``W`` in pixels.
        height: ``H`` in pixels.
        appearance: a fixed texture and background (:func:`draw_appearance`) instead of a new
            one drawn from ``rng``.

    Returns:
        uint8 array ``T x H x W x 3``.
    """
    if motion not in MOTIONS:
        raise ValueError(f"Unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}.")
    tex, background = appearance if appearance is not None else draw_appearance(rng, width, height)
    size = tex.shape[0]
    speed = rng.uniform(0.6, 1.0)  # pixels (or fraction of a turn / zoom) per frame, scaled below
    cx0 = rng.uniform(0.35, 0.65) * width
    cy0 = rng.uniform(0.35, 0.65) * height
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    travel = 0.5 * min(width, height) / max(num_frames - 1, 1)  # keep the blob mostly in view
    for t in range(num_frames):
        cx, cy, angle, scale = cx0, cy0, 0.0, 1.0
        d = speed * travel * (t - (num_frames - 1) / 2)
        if motion == "MoveLeft":
            cx = cx0 - d
        elif motion == "MoveRight":
            cx = cx0 + d
        elif motion == "MoveUp":
            cy = cy0 - d
        elif motion == "MoveDown":
            cy = cy0 + d
        elif motion == "RotateClockwise":
            angle = speed * 2 * np.pi * t / num_frames
        else:  # ZoomIn
            scale = 0.6 + 0.9 * speed * t / max(num_frames - 1, 1)
        # Inverse mapping: output pixel -> texture coordinate (nearest neighbour).
        dx, dy = (xs - cx) / scale, (ys - cy) / scale
        c, s = np.cos(angle), np.sin(angle)
        u = c * dx + s * dy + size / 2
        v = -s * dx + c * dy + size / 2
        inside = (u >= 0) & (u < size) & (v >= 0) & (v < size)
        frame = np.broadcast_to(background, (height, width, 3)).copy()
        frame[inside] = tex[v[inside].astype(np.int64), u[inside].astype(np.int64)]
        frames[t] = frame
    return frames


def moving_sprite(
    num_frames: int = 12,
    width: int = 128,
    height: int = 96,
    velocity: Tuple[int, int] = (2, 1),
    sprite: int = 40,
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Render a textured square moving by a constant integer ``velocity`` over a static texture.

    For motion tests: between frames ``t`` and ``t + 1`` every sprite pixel moves by exactly
    ``velocity = (dx, dy)`` pixels (``+x`` right, ``+y`` down), the background not at all. Both
    textures are smooth (a random grid upsampled bilinearly) so optical flow and a codec's
    motion search can lock onto them. The sprite starts where it stays in view for all frames.

    Returns:
        ``(frames, masks)``: uint8 ``T x H x W x 3`` and bool ``T x H x W``, the sprite's pixels.
    """
    rng = np.random.default_rng(seed)
    dx, dy = int(velocity[0]), int(velocity[1])
    travel_x, travel_y = abs(dx) * (num_frames - 1), abs(dy) * (num_frames - 1)
    if sprite + travel_x > width or sprite + travel_y > height:
        raise ValueError(
            f"a {sprite}px sprite moving {velocity} for {num_frames} frames leaves the "
            f"{width}x{height} frame; use fewer frames, a smaller velocity or a larger frame."
        )

    def smooth(h: int, w: int, cell: int) -> np.ndarray:
        coarse = rng.uniform(30, 225, size=(h // cell + 2, w // cell + 2, 3))
        ys, xs = np.arange(h) / cell, np.arange(w) / cell
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
        bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
        return (top * (1 - fy) + bottom * fy).astype(np.uint8)

    background, tex = smooth(height, width, 12), smooth(sprite, sprite, 6)
    x0 = 0 if dx >= 0 else width - sprite
    y0 = 0 if dy >= 0 else height - sprite
    x0 += (width - sprite - travel_x) // 2 * (1 if dx >= 0 else -1)
    y0 += (height - sprite - travel_y) // 2 * (1 if dy >= 0 else -1)
    frames = np.repeat(background[None], num_frames, axis=0)
    masks = np.zeros((num_frames, height, width), bool)
    for t in range(num_frames):
        x, y = x0 + dx * t, y0 + dy * t
        frames[t, y : y + sprite, x : x + sprite] = tex
        masks[t, y : y + sprite, x : x + sprite] = True
    return frames, masks


def numbered_frames(num_frames: int, width: int = 48, height: int = 32) -> np.ndarray:
    """Frames that spell their own index: 6 black/white vertical bands, the index in binary.

    For frame-accuracy tests: the index survives lossy coding and resizing, so decoded frames
    can be checked with :func:`read_frame_numbers` without a reference decode. Up to 64 frames.

    Returns:
        uint8 ``T x H x W x 3``.
    """
    if num_frames > 64:
        raise ValueError(f"numbered_frames encodes 6 bits: at most 64 frames, got {num_frames}.")
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    band = width // 6
    for t in range(num_frames):
        for k in range(6):
            frames[t, :, k * band : (k + 1) * band] = 255 * ((t >> k) & 1)
    return frames


def read_frame_numbers(frames) -> list[int]:
    """Read the indices of decoded :func:`numbered_frames` (``T x H x W x 3``, any size)."""
    frames = np.asarray(frames, dtype=np.float32)
    band = frames.shape[2] // 6
    margin = band // 4  # band edges blur under coding and resizing; read their middle
    bits = [
        frames[:, :, k * band + margin : (k + 1) * band - margin].mean(axis=(1, 2, 3)) > 128
        for k in range(6)
    ]
    return [int(sum(int(b[t]) << k for k, b in enumerate(bits))) for t in range(len(frames))]


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = 25,
    codec: str = "mpeg4",
    max_b_frames: int = 0,
    gop_size: int = 12,
    options: dict[str, str] | None = None,
) -> None:
    """Write ``frames`` (uint8 ``T x H x W x 3``, even ``H`` and ``W``) to ``path`` with PyAV.

    The container follows the file suffix (``.avi``, ``.mp4``, ...); ``mjpeg`` (a codec without
    motion vectors) is written in full-range ``yuvj420p``, the others in ``yuv420p``.
    ``max_b_frames=2`` with the
    ``mpeg4`` codec in AVI reproduces the kind of file on which decord's random access returns
    wrong frames (see ``docs/data.md``). ``max_b_frames`` does not reach ``libx264`` (x264 uses
    its own default, B-frames included); ``options`` are encoder options (``{"bf": "0"}``: x264
    without B-frames).
    """
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.gop_size = gop_size
        if codec != "libx264":
            stream.codec_context.max_b_frames = max_b_frames
        if options:
            stream.codec_context.options = dict(options)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_synthetic_dataset(
    root: str | os.PathLike,
    num_classes: int = 6,
    videos_per_class: int = 10,
    num_frames: int = 32,
    width: int = 64,
    height: int = 48,
    fps: int = 25,
    seed: int = 0,
    layout: Literal["ucf101", "hmdb51"] = "ucf101",
    codec: str = "mpeg4",
    max_b_frames: int = 0,
    test_fraction: float = 0.3,
    classes: Sequence[str] | None = None,
    appearance: Literal["per_video", "shared"] = "per_video",
) -> Path:
    """Write a labelled synthetic collection in an official dataset layout.

    Deterministic given ``seed``. With ``layout="ucf101"`` it writes
    ``root/UCF-101/<Class>/v_<Class>_g<GG>_c<CC>.avi`` and ``root/ucfTrainTestlist/`` with
    ``classInd.txt``, ``trainlist0{1,2,3}.txt`` and ``testlist0{1,2,3}.txt`` (groups are split so a
    group never spans train and test, as in UCF101). With ``layout="hmdb51"`` it writes
    ``root/hmdb51/<class>/<file>.avi`` and ``root/testTrainMulti_7030_splits/
    <class>_test_split{1,2,3}.txt`` with lines ``<file> <0|1|2>`` (1 train, 2 test, 0 unused).

    Args:
        root: output folder (created).
        num_classes: how many of :data:`MOTIONS` (or ``classes``) to use.
        videos_per_class: videos written per class.
        num_frames: frames per video.
        width: frame width (even).
        height: frame height (even).
        fps: frame rate written in the container.
        seed: seed of every random draw.
        layout: ``"ucf101"`` or ``"hmdb51"``.
        codec: FFmpeg encoder name; ``mpeg4`` in AVI is what UCF101 and HMDB51 ship.
        max_b_frames: B-frames between references (``2`` makes decord's seeking unreliable).
        test_fraction: share of each class's videos put in the test list.
        classes: motion names to use instead of the first ``num_classes`` of :data:`MOTIONS`.
        appearance: ``"per_video"`` (each video its own texture and background) or ``"shared"``
            (one for the whole collection, so only motion tells videos apart; see the module
            docstring for why self-supervised pretraining needs it).

    Returns:
        The video root (``root/UCF-101`` or ``root/hmdb51``); its parent holds the split files.
    """
    names = list(classes) if classes is not None else list(MOTIONS[:num_classes])
    if len(names) > len(MOTIONS) or any(n not in MOTIONS for n in names):
        raise ValueError(
            f"classes must be among {', '.join(MOTIONS)} (at most {len(MOTIONS)}); got {names}."
        )
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}.")
    if appearance not in ("per_video", "shared"):
        raise ValueError(f"appearance must be 'per_video' or 'shared', got {appearance!r}.")
    root = Path(root)
    video_root = root / ("UCF-101" if layout == "ucf101" else "hmdb51")
    rng = np.random.default_rng(seed)
    shared = (
        draw_appearance(np.random.default_rng([seed, 1]), width, height)
        if appearance == "shared"
        else None
    )
    n_test = max(1, int(round(videos_per_class * test_fraction)))
    train_lines, test_lines = [], []
    for label, name in enumerate(names):
        folder = video_root / name
        folder.mkdir(parents=True, exist_ok=True)
        hmdb_lines = []
        for k in range(videos_per_class):
            frames = render_video(name, rng, num_frames=num_frames, width=width, height=height,
                                  appearance=shared)
            if layout == "ucf101":
                # Two clips per group, so a group never spans both lists.
                fname = f"v_{name}_g{k // 2 + 1:02d}_c{k % 2 + 1:02d}.avi"
                is_test = k >= videos_per_class - n_test
                rel = f"{name}/{fname}"
                (test_lines if is_test else train_lines).append(
                    rel if is_test else f"{rel} {label + 1}"
                )
            else:
                fname = f"{name.lower()}_{k:03d}.avi"
                hmdb_lines.append(f"{fname} {2 if k >= videos_per_class - n_test else 1}")
            write_video(folder / fname, frames, fps=fps, codec=codec, max_b_frames=max_b_frames)
        if layout == "hmdb51":
            split_dir = root / "testTrainMulti_7030_splits"
            split_dir.mkdir(parents=True, exist_ok=True)
            for split in (1, 2, 3):
                (split_dir / f"{name}_test_split{split}.txt").write_text(
                    "\n".join(hmdb_lines) + "\n"
                )
    if layout == "ucf101":
        ann = root / "ucfTrainTestlist"
        ann.mkdir(parents=True, exist_ok=True)
        (ann / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
        # The synthetic set has one split; all three files carry it so split=2/3 also work.
        for split in (1, 2, 3):
            (ann / f"trainlist0{split}.txt").write_text("\n".join(train_lines) + "\n")
            (ann / f"testlist0{split}.txt").write_text("\n".join(test_lines) + "\n")
    return video_root
