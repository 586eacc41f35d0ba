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
    "non_overlapping_clips",
    "TEMPORAL_PRESETS",
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


def non_overlapping_clips(num_frames: int, clip_len: int, stride: int) -> np.ndarray:
    """Every clip of the video that fits back to back from frame 0: ``K x clip_len`` indices.

    ``K = num_frames // span`` (at least 1: a video shorter than one clip gives one looped clip);
    frames after the last whole clip are dropped. These are the test clips of SLIC's
    ``evaluate.py`` (``test_evaluate`` splits each test video into ``T // SAMPLE_DURATION``
    consecutive clips and averages their embeddings).
    """
    span = clip_span(clip_len, stride)
    k = max(1, num_frames // span)
    return np.stack([loop_indices(i * span, clip_len, stride, num_frames) for i in range(k)])


@dataclass(frozen=True)
class TemporalTransform:
    """Where the training views of one video come from, and their temporal transforms.

    Two schemes (``views_from``):

    - ``"video"`` (CVRL's, Qian et al. 2021): view 0 is a random clip of the video; every later
      view is another random clip of the whole video (``max_shift=None``) or starts within
      ``[-max_shift, max_shift]`` frames of view 0's start. Drop, reverse and shuffle are drawn
      for each view on its own (two views end with the same direction half of the time under
      ``reverse_p=1``).
    - ``"clip"`` (the videoSimCLR thesis): one source clip at a random start; *every* view starts
      at the source's start plus its own offset in ``[-max_shift, max_shift]`` (two views are
      then up to ``2 * max_shift`` frames apart). The transforms act on the pair: with its
      probability, each one is applied to exactly one view, picked at random (reverse: the two
      views play in opposite directions). The thesis uses one transform type per experiment.

    Per view, in this order: frame drop samples ``2m`` frames and keeps the even or the odd ones
    (a clip at twice the stride, phase chosen at random); reverse plays the clip backwards;
    shuffle permutes its frames. Starts are clipped to the video.

    Attributes:
        max_shift: largest start offset (frames): of views after the first from view 0
            (``"video"``; ``None`` draws each view over the whole video), or of every view from
            the source clip (``"clip"``; ``None`` means 0).
        drop_p: probability of frame drop.
        reverse_p: probability of reversing.
        shuffle_p: probability of shuffling.
        views_from: ``"video"`` (CVRL) or ``"clip"`` (videoSimCLR thesis).
    """

    max_shift: int | None = None
    drop_p: float = 0.0
    reverse_p: float = 0.0
    shuffle_p: float = 0.0
    views_from: str = "video"

    def __post_init__(self) -> None:
        for name in ("drop_p", "reverse_p", "shuffle_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}.")
        if self.max_shift is not None and self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0 or None, got {self.max_shift}.")
        if self.views_from not in ("video", "clip"):
            raise ValueError(
                f"views_from must be 'video' (CVRL: views drawn over the video) or 'clip' "
                f"(videoSimCLR: views from one source clip), got {self.views_from!r}."
            )

    @classmethod
    def preset(cls, name: str | None, **settings: object) -> TemporalTransform:
        """Return the scheme named ``name`` (:data:`TEMPORAL_PRESETS`; ``None``: defaults).

        ``settings`` (the fields) override the preset, except those given as ``None`` and
        probabilities given as ``0.0``, the data module's "not set" values:
        ``preset("videosimclr", max_shift=4)`` is the thesis's HMDB51 setting.
        """
        if name is not None and name not in TEMPORAL_PRESETS:
            raise ValueError(
                f"unknown temporal_preset {name!r}; choose one of {', '.join(TEMPORAL_PRESETS)}"
            )
        given = {k: v for k, v in settings.items()
                 if v is not None and not (k.endswith("_p") and v == 0.0)}
        return cls(**{**TEMPORAL_PRESETS.get(name or "", {}), **given})

    def clips(
        self,
        start: int,
        num_frames: int,
        num_views: int,
        clip_len: int,
        stride: int,
        rng: np.random.Generator,
    ) -> list[np.ndarray]:
        """Frame indices of ``num_views`` views; ``start`` is view 0's (or the source clip's)."""
        span = clip_span(clip_len, stride)
        if self.views_from == "video":
            return [
                self.view_indices(
                    start if v == 0 else self.shifted_start(start, num_frames, span, rng),
                    num_frames, clip_len, stride, rng,
                )
                for v in range(num_views)
            ]
        # One source clip; each view moved from it by its own offset.
        last = max(0, num_frames - span)
        s = self.max_shift or 0
        starts = [int(np.clip(start + (rng.integers(-s, s + 1) if s else 0), 0, last))
                  for _ in range(num_views)]
        # Pair-level transforms: each, with its probability, hits exactly one view.
        picked = {
            name: int(rng.integers(num_views)) if p and rng.random() < p else -1
            for name, p in (("drop", self.drop_p), ("reverse", self.reverse_p),
                            ("shuffle", self.shuffle_p))
        }
        return [
            self._apply(st, num_frames, clip_len, stride, rng, drop=picked["drop"] == v,
                        reverse=picked["reverse"] == v, shuffle=picked["shuffle"] == v)
            for v, st in enumerate(starts)
        ]

    def view_indices(
        self,
        start: int,
        num_frames: int,
        clip_len: int,
        stride: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Frame indices of one view whose (unshifted) clip starts at ``start``.

        Each transform is drawn on its own, with its probability (the ``"video"`` scheme).
        """
        return self._apply(
            start, num_frames, clip_len, stride, rng,
            drop=bool(self.drop_p) and rng.random() < self.drop_p,
            reverse=bool(self.reverse_p) and rng.random() < self.reverse_p,
            shuffle=bool(self.shuffle_p) and rng.random() < self.shuffle_p,
        )

    @staticmethod
    def _apply(
        start: int, num_frames: int, clip_len: int, stride: int, rng: np.random.Generator, *,
        drop: bool, reverse: bool, shuffle: bool,
    ) -> np.ndarray:
        if drop:
            # 2m frames at the clip stride, keep the even or the odd ones.
            idx = loop_indices(start, 2 * clip_len, stride, num_frames)[int(rng.integers(2)) :: 2]
        else:
            idx = loop_indices(start, clip_len, stride, num_frames)
        if reverse:
            idx = idx[::-1].copy()
        if shuffle:
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


#: Named temporal schemes (``VideoDataModule(temporal_preset=...)``):
#:
#: - ``cvrl``: every view a random clip of the whole video, no temporal transforms (Qian et al.,
#:   "Spatiotemporal Contrastive Video Representation Learning", CVPR 2021; CVRL draws the
#:   interval between the two clips from a distribution that favours short ones, vidssl draws
#:   the starts independently).
#: - ``videosimclr``: both views from one source clip, each shifted by up to 8 frames: the
#:   thesis's best temporal transform on UCF101 (shift 8; on HMDB51 its best was 4: set
#:   ``max_shift: 4``).
TEMPORAL_PRESETS: dict[str, dict] = {
    "cvrl": {"views_from": "video", "max_shift": None},
    "videosimclr": {"views_from": "clip", "max_shift": 8},
}
