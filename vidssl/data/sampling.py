"""Clip sampling and temporal transforms: which frame indices each view of a video decodes.

Everything here works on integer index arrays (no pixels), so it is cheap, exact and testable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "clip_span",
    "loop_indices",
    "random_clip",
    "centre_clip",
    "uniform_clips",
    "non_overlapping_start",
    "TemporalTransform",
]


def clip_span(clip_len: int, stride: int) -> int:
    """Frames covered by a clip of ``clip_len`` frames taken every ``stride`` frames."""
    return (clip_len - 1) * stride + 1


def loop_indices(start: int, clip_len: int, stride: int, num_frames: int) -> np.ndarray:
    """Return ``clip_len`` indices ``start, start + stride, ...``, looped over a short video.

    Looping (index modulo ``num_frames``) repeats the video from its start when the clip runs past
    the end, as 3D-ResNets' ``LoopPadding`` does for videos shorter than a clip.
    """
    if num_frames <= 0:
        raise ValueError("Cannot sample a clip from a video with no frames.")
    return (start + stride * np.arange(clip_len, dtype=np.int64)) % num_frames


def random_clip(
    num_frames: int, clip_len: int, stride: int, rng: np.random.Generator
) -> np.ndarray:
    """Return a clip at a uniformly random start (start 0 and looping when the video is short)."""
    last = num_frames - clip_span(clip_len, stride)
    start = int(rng.integers(0, last + 1)) if last > 0 else 0
    return loop_indices(start, clip_len, stride, num_frames)


def centre_clip(num_frames: int, clip_len: int, stride: int) -> np.ndarray:
    """Return the clip centred in the video (the evaluation clip of the bank dataloader)."""
    start = max(0, (num_frames - clip_span(clip_len, stride)) // 2)
    return loop_indices(start, clip_len, stride, num_frames)


def uniform_clips(num_frames: int, clip_len: int, stride: int, num_clips: int) -> np.ndarray:
    """``num_clips`` clips with starts spread evenly from the first to the last possible start.

    Returns:
        int64 ``num_clips x clip_len`` frame indices. One clip is the centre clip.
    """
    if num_clips == 1:
        return centre_clip(num_frames, clip_len, stride)[None]
    last = max(0, num_frames - clip_span(clip_len, stride))
    starts = np.round(np.linspace(0, last, num_clips)).astype(np.int64)
    return np.stack([loop_indices(int(s), clip_len, stride, num_frames) for s in starts])


def non_overlapping_start(
    anchor_start: int, num_frames: int, span: int, rng: np.random.Generator
) -> int:
    """Return a random clip start whose span avoids the anchor's ``[start, start + span)``.

    SLIC's same-video positive is a clip that does not overlap the anchor (its official code takes
    the anchor at the beginning and the positive from frame ``SAMPLE_DURATION`` on,
    ``datasets/data_loader.py`` of rvl-lab-utoronto/video_similarity_search). Here the anchor may
    be anywhere; the positive is drawn uniformly among the starts that avoid it. When the video is
    too short for two disjoint clips, the start farthest from the anchor is used (least overlap).
    """
    last = num_frames - span
    if last <= 0:
        return 0
    starts = np.arange(last + 1)
    ok = (starts + span <= anchor_start) | (starts >= anchor_start + span)
    if ok.any():
        return int(rng.choice(starts[ok]))
    return 0 if anchor_start > last - anchor_start else last


@dataclass(frozen=True)
class TemporalTransform:
    """Temporal augmentation of one view, in the style of video SimCLR baselines.

    Applied to a view's frame indices, in this order: ``max_shift`` moves the view's start by a
    random offset in ``[-max_shift, max_shift]`` relative to the first view (0 with
    ``independent=False`` aligns all views; see ``VideoDataset``); frame drop samples ``2m`` frames
    and keeps the even or the odd ones (a clip at twice the stride, phase chosen at random);
    reverse plays the clip backwards; shuffle permutes its frames.

    Attributes:
        max_shift: largest start offset (frames) of views after the first; ``None`` draws every
            view's start independently over the whole video.
        drop_p: probability of frame drop.
        reverse_p: probability of reversing.
        shuffle_p: probability of shuffling.
    """

    max_shift: int | None = None
    drop_p: float = 0.0
    reverse_p: float = 0.0
    shuffle_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drop_p", "reverse_p", "shuffle_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}.")
        if self.max_shift is not None and self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0 or None, got {self.max_shift}.")

    def view_indices(
        self,
        start: int,
        num_frames: int,
        clip_len: int,
        stride: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Frame indices of one view whose (unshifted) clip starts at ``start``."""
        if self.drop_p and rng.random() < self.drop_p:
            # 2m frames at the clip stride, keep the even or the odd ones.
            idx = loop_indices(start, 2 * clip_len, stride, num_frames)[int(rng.integers(2)) :: 2]
        else:
            idx = loop_indices(start, clip_len, stride, num_frames)
        if self.reverse_p and rng.random() < self.reverse_p:
            idx = idx[::-1].copy()
        if self.shuffle_p and rng.random() < self.shuffle_p:
            idx = rng.permutation(idx)
        return idx

    def shifted_start(
        self, start: int, num_frames: int, span: int, rng: np.random.Generator
    ) -> int:
        """Return a later view's start: ``start`` moved by up to ``max_shift``, in the video."""
        if self.max_shift is None:
            last = num_frames - span
            return int(rng.integers(0, last + 1)) if last > 0 else 0
        shift = int(rng.integers(-self.max_shift, self.max_shift + 1)) if self.max_shift else 0
        return int(np.clip(start + shift, 0, max(0, num_frames - span)))
