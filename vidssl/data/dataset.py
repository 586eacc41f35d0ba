"""The video dataset: decode the views of one video (or of an anchor/positive pair) as uint8.

Workers open the file inside ``__getitem__``, decode exactly the frames the views need in one pass
and return uint8 ``T x H x W x C`` tensors (and the motion field of the same frames when asked);
damaged files follow the ``on_error`` policy.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from vidssl.data.decoding import VideoDecoder, build_decoder, resized_size
from vidssl.data.flow import FLOW_BOUND, load_flow_manifest, quantize_flow, read_flow
from vidssl.data.index import VideoIndex
from vidssl.data.sampling import (
    TemporalTransform,
    clip_span,
    loop_indices,
    non_overlapping_clips,
    non_overlapping_start,
    random_clip,
    uniform_clips,
)

__all__ = [
    "MOTIONS",
    "VIEWS",
    "Item",
    "VideoDataset",
    "centre_square",
    "collate_eval_videos",
    "collate_videos",
    "views_of",
    "views_settings",
]

log = logging.getLogger(__name__)

#: What a sampler yields: a dataset index, or an ``(anchor, positive)`` pair of indices.
Item = Union[int, Sequence[int]]

OnError = Literal["resample", "raise", "skip"]

#: Motion views: none; stored optical flow (``vidssl flow``); motion vectors of the compressed
#: stream (read in the workers); RGB frame differences (computed on the device, nothing read).
MOTIONS = ("none", "flow", "mv", "diff")

#: The training views a method can ask for (``VideoSSLMethod.views``), in the order they come:
#: a clip of the sample's video, other clips of it (or of the pair's positive video), and the
#: anchor's frames again (augmented independently: SLIC's temporal-discrimination view).
VIEWS = ("anchor", "positive", "anchor_repeat")


def views_of(num_views: int, repeat_anchor: bool) -> tuple[str, ...]:
    """Name the training views a ``VideoDataset(num_views, repeat_anchor)`` gives, in order."""
    return ("anchor",) + ("positive",) * (num_views - 1) + ("anchor_repeat",) * repeat_anchor


def views_settings(views: Sequence[str]) -> tuple[int, bool]:
    """Return the ``(num_views, repeat_anchor)`` that give ``views``; ValueError if none do.

    ``views`` is ``"anchor"``, then any number of ``"positive"``, then at most one
    ``"anchor_repeat"``.
    """
    views = tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown view {unknown[0]!r} in views={list(views)}; valid: "
                         f"{', '.join(VIEWS)}")
    repeat = bool(views) and views[-1] == "anchor_repeat"
    num_views = len(views) - repeat
    if num_views < 1 or views_of(num_views, repeat) != views:
        raise ValueError(f"cannot give views={list(views)}: the data gives 'anchor', then "
                         "'positive' views, then at most one 'anchor_repeat'")
    return num_views, repeat

_NO_FRAMES = "the video has no decodable frames (probing failed)"


class VideoDataset(Dataset):
    """Decode clips of indexed videos into uint8 views.

    ``dataset[i]`` (instance sampling) returns ``num_views`` views of video ``i``; in ``"train"``
    mode the views are drawn by ``temporal`` (:meth:`TemporalTransform.clips`: random clips of
    the video, or shifted copies of one source clip), in ``"eval"`` mode the views are
    ``num_clips`` clips spread evenly over the video (one centre clip when ``num_clips == 1``;
    ``num_clips=0``: every back-to-back clip from frame 0, their number varying by video).
    ``dataset[(a, p)]`` (pair sampling, as cluster-guided batch samplers yield) returns view 0
    from ``a`` and views ``1..num_views-1`` from ``p``; when ``p == a`` the positive clips do
    not overlap the anchor's (SLIC). In ``"train"`` mode, ``repeat_anchor`` adds one last view
    repeating the anchor's frames, for either sampling, so both give the same views
    (``VIEWS``). All views of one video come from one decoder pass.

    Each item is a dict: ``views`` (list of uint8 ``T x H x W x C`` tensors), ``index`` (int, the
    dataset index of the video or anchor that was actually decoded), ``label`` (int, -1 unknown),
    ``decode_failures`` (int, how many videos failed to decode and were replaced while making this
    item; always 0 under ``on_error="raise"``) and, for pairs, ``positive_index``. With
    ``motion="flow"`` or ``"mv"`` it also holds ``motion``: ``{position: uint8 T x H x W x 2}``
    for each view position of ``motion_views`` (every clip in ``"eval"`` mode), the field of
    exactly that view's frames at its decode size, quantised as stored flow
    (:func:`~vidssl.data.flow.quantize_flow`, 20 px/frame bound). A failure to read the motion
    goes through ``on_error`` like a decoding failure.

    A decoding failure names the video that failed: for a pair, the positive's own file when the
    positive is the broken one. Failures are counted per video in shared memory, so the counts
    and :attr:`failed_paths` cover every DataLoader worker (not other DDP ranks).

    Args:
        index: the probed :class:`~vidssl.data.index.VideoIndex`.
        clip_len: frames per clip ``T``.
        stride: frame step inside a clip.
        num_views: clips per sample in ``"train"`` mode: the anchor and ``num_views - 1``
            positives (other clips of the video, or of the pair's positive).
        mode: ``"train"`` (random clips) or ``"eval"`` (deterministic evenly spread clips).
        num_clips: clips per video in ``"eval"`` mode (views ``0..num_clips-1``, in time order);
            ``0``: all back-to-back clips (:func:`~vidssl.data.sampling.non_overlapping_clips`,
            SLIC's test clips; batch such items one video at a time).
        temporal: temporal transforms of training views.
        short_side: decode-time resize of the shorter frame side (aspect kept); ``0`` = native.
        backend: ``"decord"`` (random access; exact-flagged files via PyAV) or ``"pyav"``.
        decode_threads: decoder threads per worker.
        decode_device: ``"cpu"`` or ``"cuda[:N]"`` (decord built with CUDA only).
        on_error: ``"resample"`` (log once, count, decode another random video), ``"raise"``, or
            ``"skip"`` (log once, count, return the item with ``views=None``; the collate
            function leaves it out of the batch and lists its index under ``skipped_index``:
            feature banks use it, where every video must be accounted for by its own index).
        max_consecutive_failures: ``resample`` gives up with an error after this many failures
            in a row (a sign that the data, not one file, is broken).
        repeat_anchor: add a last view repeating the anchor's frames (augmented independently).
        positive_overlap: for pairs with ``p == a``, allow the positive to overlap the anchor.
        motion: ``"flow"`` (read stored flow), ``"mv"`` (decode motion vectors); ``"none"`` and
            ``"diff"`` (made on the device from the RGB clip) read nothing.
        flow_dir: the flow folder (``vidssl flow -o``), for ``motion="flow"``.
        flow_videos: each video's path relative to the flow root (``N`` str; see
            :func:`~vidssl.data.flow.flow_path`); default: relative to the root recorded in
            ``flow_dir``'s manifest.
        motion_views: training view positions that carry a motion field (``None``: all of
            them, ``repeat_anchor``'s included); ignored in ``"eval"`` mode, where every clip does.
    """

    def __init__(
        self,
        index: VideoIndex,
        clip_len: int = 16,
        stride: int = 2,
        num_views: int = 2,
        mode: Literal["train", "eval"] = "train",
        num_clips: int = 1,
        temporal: TemporalTransform | None = None,
        short_side: int = 128,
        backend: str = "decord",
        decode_threads: int = 1,
        decode_device: str = "cpu",
        on_error: OnError = "resample",
        max_consecutive_failures: int = 20,
        repeat_anchor: bool = False,
        positive_overlap: bool = False,
        motion: str = "none",
        flow_dir: str | None = None,
        flow_videos: Sequence[str] | None = None,
        motion_views: Sequence[int] | None = None,
    ) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}.")
        if on_error not in ("resample", "raise", "skip"):
            raise ValueError(f"on_error must be 'resample', 'raise' or 'skip', got {on_error!r}.")
        if clip_len < 1 or stride < 1 or num_views < 1 or num_clips < 0:
            raise ValueError("clip_len, stride and num_views must be >= 1, num_clips >= 0.")
        if motion not in MOTIONS:
            raise ValueError(f"motion must be one of {', '.join(MOTIONS)}, got {motion!r}.")
        if motion == "flow" and not flow_dir:
            raise ValueError("motion='flow' needs flow_dir, the folder written by `vidssl flow`.")
        if not index.probed:
            index.probe()
        self.index = index
        self.clip_len = clip_len
        self.stride = stride
        self.num_views = num_views
        self.mode = mode
        self.num_clips = num_clips
        self.temporal = temporal or TemporalTransform()
        self.short_side = short_side
        self.backend = backend
        self.decode_threads = decode_threads
        self.decode_device = decode_device
        self.on_error = on_error
        self.max_consecutive_failures = max_consecutive_failures
        self.repeat_anchor = repeat_anchor
        self.positive_overlap = positive_overlap
        self.motion = motion
        self.motion_views = motion_positions(motion_views, num_views + repeat_anchor)
        self.flow_dir = flow_dir
        self.flow_bound = FLOW_BOUND
        self.flow_videos: np.ndarray | None = None
        if motion == "flow":
            self.flow_bound = float(load_flow_manifest(flow_dir).get("bound", FLOW_BOUND))
            if flow_videos is None:
                from vidssl.data.flow import flow_relative_paths

                flow_videos = flow_relative_paths(flow_dir, index.paths)
            if len(flow_videos) != len(index):
                raise ValueError(f"flow_videos has {len(flow_videos)} paths for {len(index)} "
                                 "videos; give one per video of the index.")
            self.flow_videos = np.asarray(flow_videos, dtype=np.str_)
        # Failures per video, shared across DataLoader workers (shared memory, inherited or
        # pickled by torch), so the main process reads them and each path is logged once, not
        # once per worker and epoch. Increments can race rarely: acceptable for a report.
        self._failures = torch.zeros(len(index), dtype=torch.int32).share_memory_()
        self._decoder: VideoDecoder | None = None
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] | None = None
        self._readable = np.flatnonzero(index.num_frames > 0)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def decode_failures(self) -> int:
        """Decoding failures so far (one per failed attempt), summed over all workers."""
        return int(self._failures.sum().item())

    @property
    def failed_indices(self) -> np.ndarray:
        """Dataset indices of the videos that failed to decode at least once (all workers)."""
        return np.flatnonzero(self._failures.numpy() > 0)

    @property
    def failed_paths(self) -> list[str]:
        """Paths of the videos that failed to decode at least once (all workers), index order."""
        return [str(p) for p in self.index.paths[self.failed_indices]]

    @property
    def labels(self) -> np.ndarray:
        """Ground-truth labels ``N`` (``-1`` unknown)."""
        return self.index.labels

    # -- per-process state -------------------------------------------------------------------

    def _state(self) -> tuple[VideoDecoder, np.random.Generator]:
        # Built lazily in the process that decodes: decoders never cross a fork, and every
        # worker (and every epoch's fresh workers) gets its own random stream from torch's seed.
        key = (os.getpid(), torch.initial_seed())
        if self._rng_key != key:
            self._rng = np.random.default_rng(key[1] % 2**63)
            self._rng_key = key
        if self._decoder is None:
            self._decoder = build_decoder(self.backend, self.decode_threads, self.decode_device)
        return self._decoder, self._rng

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_decoder"] = None
        return state

    # -- sampling ----------------------------------------------------------------------------

    def _read(
        self,
        i: int,
        clips: list[np.ndarray],
        positions: Sequence[int] = (),
        motion: dict | None = None,
    ) -> list[torch.Tensor]:
        """Decode ``clips`` (index arrays) of video ``i`` in one decoder pass.

        ``positions`` are the clips' view positions; the motion field of each position that needs
        one is put in ``motion`` (when given). Any failure is raised as :class:`_VideoError`
        naming ``i``, so that a pair whose positive is broken is reported under the positive's
        path, not the anchor's.
        """
        decoder, _ = self._state()
        w, h = int(self.index.width[i]), int(self.index.height[i])
        size = resized_size(w, h, self.short_side) if w and h else None
        wanted = []
        if motion is not None and self.motion in ("flow", "mv"):
            wanted = [k for k, p in enumerate(positions) if self._needs_motion(p)]
        try:
            frames = decoder.read(
                str(self.index.paths[i]), np.concatenate(clips), size, bool(self.index.exact[i])
            )
            if wanted:
                # The field of exactly these frames, at the size they were decoded at.
                idx = np.concatenate([clips[k] for k in wanted])
                codes = self._read_motion(i, idx, (frames.shape[2], frames.shape[1]))
                ends = np.cumsum([len(clips[k]) for k in wanted])
                for k, end in zip(wanted, ends):
                    motion[positions[k]] = torch.from_numpy(codes[end - len(clips[k]) : end])
        except Exception as exc:  # noqa: BLE001 - any decoder error goes through the policy
            raise _VideoError(i, exc) from exc
        ends = np.cumsum([len(c) for c in clips])
        return [torch.from_numpy(frames[end - len(c) : end]) for c, end in zip(clips, ends)]

    def _needs_motion(self, position: int) -> bool:
        if self.mode == "eval":
            return True
        # The repeated anchor shares the anchor's frames: its field is read at position 0.
        repeat = self.repeat_anchor and self.num_views in self.motion_views
        return position in self.motion_views or (position == 0 and repeat)

    def _read_motion(self, i: int, idx: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """uint8 codes ``T x H x W x 2`` of frames ``idx`` of video ``i`` at ``size = (W, H)``."""
        if self.motion == "flow":
            rel = str(self.flow_videos[i])
            if self.flow_bound == FLOW_BOUND:
                return read_flow(self.flow_dir, rel, idx, size, quantized=True)
            return quantize_flow(read_flow(self.flow_dir, rel, idx, size, bound=self.flow_bound))
        from vidssl.data.motion_vectors import read_motion_vectors

        return read_motion_vectors(str(self.index.paths[i]), idx, size, quantized=True)

    def _instance_clips(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        if self.mode == "eval":
            if self.num_clips == 0:
                return list(non_overlapping_clips(n, self.clip_len, self.stride))
            return list(uniform_clips(n, self.clip_len, self.stride, self.num_clips))
        start = int(random_clip(n, self.clip_len, self.stride, rng)[0])
        return self.temporal.clips(start, n, self.num_views, self.clip_len, self.stride, rng)

    def _sample(self, item: Item, rng: np.random.Generator) -> dict[str, Any]:
        motion: dict[int, torch.Tensor] = {}
        out = self._sample_views(item, rng, motion)
        if self.repeat_anchor and self.mode == "train":
            out["views"].append(out["views"][0])
            if self.num_views in self.motion_views and 0 in motion:
                motion[self.num_views] = motion[0]
            if 0 not in self.motion_views:
                motion.pop(0, None)
        if self.motion in ("flow", "mv"):
            out["motion"] = motion
        return out

    def _sample_views(self, item: Item, rng: np.random.Generator, motion: dict) -> dict[str, Any]:
        nf = self.index.num_frames
        if isinstance(item, (int, np.integer)):
            i = int(item)
            if nf[i] <= 0:
                raise _VideoError(i, RuntimeError(_NO_FRAMES))
            clips = self._instance_clips(int(nf[i]), rng)
            views = self._read(i, clips, range(len(clips)), motion)
            return {"views": views, "index": i, "label": int(self.index.labels[i])}
        a, p = (int(x) for x in item)
        for j in (a, p):
            if nf[j] <= 0:
                raise _VideoError(j, RuntimeError(_NO_FRAMES))
        span = clip_span(self.clip_len, self.stride)
        na = int(nf[a])
        anchor = random_clip(na, self.clip_len, self.stride, rng)
        positives = self.num_views - 1  # one unless a method declares more
        if p == a:
            clips = [anchor]
            for _ in range(positives):
                start = (
                    int(random_clip(na, self.clip_len, self.stride, rng)[0])
                    if self.positive_overlap
                    else non_overlapping_start(int(anchor[0]), na, span, rng)
                )
                clips.append(loop_indices(start, self.clip_len, self.stride, na))
            views = self._read(a, clips, range(len(clips)), motion)
        else:
            views = self._read(a, [anchor], [0], motion)
            if positives:
                views += self._read(p, [random_clip(int(nf[p]), self.clip_len, self.stride, rng)
                                        for _ in range(positives)], range(1, 1 + positives), motion)
        return {
            "views": views,
            "index": a,
            "label": int(self.index.labels[a]),
            "positive_index": p,
        }

    def __getitem__(self, item: Item) -> dict[str, Any]:
        """Decode the views of ``item`` (an index or an ``(anchor, positive)`` pair)."""
        _, rng = self._state()
        failures: list[str] = []
        while True:
            try:
                out = self._sample(item, rng)
                out["decode_failures"] = len(failures)
                return out
            except Exception as exc:  # noqa: BLE001 - any decoder error goes through the policy
                if isinstance(exc, _VideoError):
                    bad, exc = exc.index, exc.cause
                else:  # not raised by a decoder: charge the item's (anchor) video
                    bad = int(item if isinstance(item, (int, np.integer)) else item[0])
                path = str(self.index.paths[bad])
                msg = f"{path}: {type(exc).__name__}: {exc}"
                first_time = int(self._failures[bad]) == 0
                self._failures[bad] += 1
                if self.on_error == "raise":
                    raise RuntimeError(
                        f"Could not decode {msg} (on_error='raise'; use on_error='resample' to "
                        "skip damaged videos, or check the file with `vidssl check-videos`)."
                    ) from exc
                failures.append(msg)
                if first_time:
                    log.warning("Skipping undecodable video (on_error=%r): %s", self.on_error, msg)
                if self.on_error == "skip":
                    i = int(item if isinstance(item, (int, np.integer)) else item[0])
                    return {"views": None, "index": i, "label": int(self.index.labels[i]),
                            "decode_failures": len(failures)}
                if len(failures) >= self.max_consecutive_failures:
                    raise RuntimeError(
                        f"{len(failures)} consecutive videos failed to decode; giving up "
                        f"(on_error='resample'). Last failures: {'; '.join(failures[-3:])}"
                    ) from exc
                # Draw among videos that probed readable; fall back to any when none did.
                pool = self._readable if len(self._readable) else np.arange(len(self))
                j = int(pool[rng.integers(len(pool))])
                item = j if isinstance(item, (int, np.integer)) else (j, j)


def motion_positions(motion_views: Sequence[int] | None, num_views: int) -> tuple[int, ...]:
    """Return the sorted view positions with motion: ``motion_views``, or all ``num_views``.

    Raises ValueError naming a position outside ``0 .. num_views - 1``.
    """
    if motion_views is None:
        return tuple(range(num_views))
    positions = tuple(sorted({int(p) for p in motion_views}))
    bad = [p for p in positions if not 0 <= p < num_views]
    if bad:
        raise ValueError(f"motion_views={list(motion_views)} names view position {bad[0]}, but "
                         f"there are {num_views} training views (positions 0..{num_views - 1}).")
    return positions


class _VideoError(Exception):
    """A failure to decode dataset video ``index``; ``cause`` is what the decoder raised."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"video {index}: {type(cause).__name__}: {cause}")
        self.index = int(index)
        self.cause = cause


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, into shared memory when called in a DataLoader worker.

    Like ``default_collate``: the batch is written once into shared memory and the worker sends a
    handle. Stacking into ordinary memory instead makes the sender copy it into shared memory,
    and measured worker RSS then grew by ~500 MiB over 1000 clips (docs/benchmarks.md).
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(tensors)
    elem = tensors[0]
    # The same calls as torch.utils.data.default_collate.
    storage = elem._typed_storage()._new_shared(sum(t.numel() for t in tensors), device=elem.device)
    out = elem.new(storage).resize_(len(tensors), *elem.shape)
    return torch.stack(tensors, out=out)


def _crop_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    top, left = (x.shape[-3] - h) // 2, (x.shape[-2] - w) // 2
    return x[..., top : top + h, left : left + w, :]


def centre_square(clip: torch.Tensor) -> torch.Tensor:
    """Return the central ``S x S`` square of uint8 ``... x H x W x C`` frames, ``S = min(H, W)``.

    Slicing only (a view, no copy). The evaluation transform (:class:`~vidssl.data.EvalTransform`:
    resize the short side, centre crop a square) looks at nothing outside this square, so cutting
    a clip to it first leaves the region it sees unchanged.
    """
    s = min(clip.shape[-3], clip.shape[-2])
    return _crop_to(clip, s, s)


def collate_videos(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch: ``views`` (list of uint8 ``B x T x H x W x C``), longs.

    Videos of different aspect ratios decode to different sizes; each view is centre-cropped to
    the smallest height and width in the batch (slicing only: no float work in workers). Items'
    ``motion`` fields become ``batch["motion"] = {position: uint8 B x T x H x W x 2}``, each cut
    exactly as the RGB view of its position (same offsets). Training
    batches use it; evaluation batches use :func:`collate_eval_videos`. Items skipped by
    ``on_error="skip"`` (``views`` is ``None``) are left out; their indices are in
    ``skipped_index`` (``LongTensor S``, present only when ``S > 0``). A batch of skipped items
    only has ``views == []`` and empty ``index`` and ``label``.
    """
    return _collate(samples, square=False)


def collate_eval_videos(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack evaluation items into a batch, each clip cut to its own :func:`centre_square` first.

    The region a clip shows then never depends on the other videos of its batch (cropping to
    the batch's smallest height and width, as :func:`collate_videos` does, shifts and zooms the
    evaluation crop of a video whose aspect ratio differs from its neighbours'). Clips decoded at
    one short side, as evaluation datasets of :class:`~vidssl.data.VideoDataModule` always are,
    give squares of one size; squares that still differ (a custom dataset decoding at native
    size) are cropped to the smallest, as :func:`collate_videos` does. Skipped items as in
    :func:`collate_videos`.
    """
    return _collate(samples, square=True)


def _collate(samples: list[dict[str, Any]], square: bool) -> dict[str, Any]:
    skipped = [s["index"] for s in samples if s["views"] is None]
    if skipped:
        kept = [s for s in samples if s["views"] is not None]
        empty = torch.zeros(0, dtype=torch.int64)
        batch = _collate(kept, square) if kept else {"views": [], "index": empty, "label": empty}
        batch["skipped_index"] = torch.tensor(skipped, dtype=torch.int64)
        return batch
    num_views = len(samples[0]["views"])
    views, motion = [], {}
    for v in range(num_views):
        clips = [s["views"][v] for s in samples]
        # A motion field has its view's H x W: the same slicing keeps the two aligned.
        fields = [s["motion"][v] for s in samples] if v in samples[0].get("motion", ()) else []
        if square:
            clips, fields = [centre_square(c) for c in clips], [centre_square(f) for f in fields]
        h = min(c.shape[-3] for c in clips)
        w = min(c.shape[-2] for c in clips)
        views.append(_stack([_crop_to(c, h, w) for c in clips]))
        if fields:
            motion[v] = _stack([_crop_to(f, h, w) for f in fields])
    batch: dict[str, Any] = {"views": views}
    if "motion" in samples[0]:
        batch["motion"] = motion
    for key in samples[0]:
        if key not in ("views", "motion"):
            batch[key] = _stack([torch.tensor(s[key], dtype=torch.int64) for s in samples])
    return batch
