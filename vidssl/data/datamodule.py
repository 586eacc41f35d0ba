"""``VideoDataModule``: indexes, datasets, dataloaders and on-device augmentation in one object.

Workers decode uint8 views (and motion fields); ``on_after_batch_transfer`` augments them with
kornia on the device.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from vidssl.data.augment import EvalTransform, VideoAugmentation, build_augmentation
from vidssl.data.dataset import (
    MOTIONS,
    VideoDataset,
    collate_eval_videos,
    collate_videos,
    motion_positions,
    views_of,
    views_settings,
)
from vidssl.data.index import VideoIndex, read_index
from vidssl.data.sampling import TemporalTransform
from vidssl.distributed import rank_and_world

__all__ = ["VideoDataModule"]

log = logging.getLogger(__name__)


class VideoDataModule(pl.LightningDataModule):
    """Video data for self-supervised training, evaluation and feature banks.

    Batches leave the DataLoader as ``{"views": [uint8 B x T x H x W x C, ...], "index": B,
    "label": B[, "positive_index": B][, "motion": {position: uint8 B x T x H x W x 2}]}`` and,
    after the transfer to the device, :meth:`on_after_batch_transfer` turns every view into a
    float ``B x C x T x H x W`` tensor: the training preset (one random draw per clip,
    independent across clips and views) for training batches, the evaluation transform (resize,
    centre crop, normalise) otherwise.

    With ``motion`` set, ``batch["motion"]`` becomes ``{position: float B x M x T x H x W}``
    (``M = motion_channels``) for each view position of ``motion_views`` (every clip in
    evaluation batches): the motion of exactly that view's frames, through the same crop and
    flip as its RGB view (docs/motion.md has the normalisation).

    Args:
        train: training videos: a folder (class folders, unlabeled folder, UCF101 / HMDB51 root)
            or a CSV manifest.
        val: validation videos (default: the official test list for ``ucf101`` / ``hmdb51``
            formats, none otherwise).
        test: test videos (same default as ``val``).
        format: index format of the sources: ``auto``, ``class_folders``, ``folder``, ``csv``,
            ``ucf101``, ``hmdb51``.
        split: official split (1-3) for UCF101 / HMDB51.
        annotations: folder of official split files when not next to the videos.
        clip_len: frames per clip ``T``.
        stride: frame step inside a clip.
        views: the training views the method needs, in order (``VideoSSLMethod.views``, e.g.
            ``("anchor", "positive", "anchor_repeat")``); ``vidssl fit`` sets it from the model.
            It sets ``num_views`` and ``repeat_anchor``; giving either as well with another
            value is an error.
        num_views: clips per training sample: the anchor and ``num_views - 1`` positives
            (default 2, or from ``views``).
        short_side: decode-time resize of the shorter frame side (aspect kept); ``0`` keeps
            the native size for training and decodes evaluation clips at ``crop_size``. Below
            ``crop_size`` every crop is upsampled (a warning at set-up says by how much).
        crop_size: output side of training crops and evaluation centre crops.
        train_preset: training augmentation preset (``simclr``, ``slic``, ``crop_flip``).
        train_augmentation: a :class:`~vidssl.data.VideoAugmentation` used instead of the
            preset, so that every knob (crop scale, flip, colour jitter, blur, ...) can be set in
            a config (``class_path: vidssl.data.VideoAugmentation`` with its ``init_args``); its
            ``crop_size`` must equal ``crop_size``.
        eval_num_clips: clips per video for val/test loaders (views ``0..N-1``; retrieval
            protocols average features over them); the bank loader always uses 1 centre clip.
        temporal_preset: named temporal scheme of the training views
            (:data:`~vidssl.data.sampling.TEMPORAL_PRESETS`): ``cvrl`` (independent clips of the
            video) or ``videosimclr`` (both views from one clip, shifted up to 8 frames each,
            pair-level transforms). ``max_shift``, ``views_from`` and the probabilities below
            override it when set. ``None``: the settings below alone.
        views_from: ``"video"`` (every view a clip of the video, CVRL) or ``"clip"`` (all views
            from one source clip, transforms applied to one view of the pair; the videoSimCLR
            thesis); see :class:`~vidssl.data.sampling.TemporalTransform`. Default ``"video"``.
        max_shift: temporal shift (frames) of later training views from the first (``None``:
            independent random clips); with ``views_from="clip"``, of every view from the
            source clip.
        drop_p: probability of temporal frame drop (keep even/odd of ``2T`` frames).
        reverse_p: probability of reversing a training view (``"clip"``: one view of the pair).
        shuffle_p: probability of shuffling a training view's frames (``"clip"``: one view).
        repeat_anchor: add a last view repeating the anchor's frames (default ``False``, or
            from ``views``).
        batch_size: training batch size (per process).
        eval_batch_size: val/test/bank batch size (default ``batch_size``).
        num_workers: DataLoader worker processes.
        backend: decoding backend, ``decord`` or ``pyav``.
        decode_threads: decoder threads per worker.
        decode_device: ``cpu`` or ``cuda[:N]`` (decord built with CUDA).
        train_on_error: training policy for undecodable videos (``resample`` or ``raise``).
        eval_on_error: evaluation policy for undecodable videos.
        timeout: DataLoader timeout in seconds (0 = none); turns a decoder hang into an error.
        pin_memory: pin host memory of batches.
        persistent_workers: keep workers alive between epochs.
        drop_last: drop the last incomplete training batch.
        cache_dir: folder of the probed-metadata manifests (default ``~/.cache/vidssl``).
        drop_unreadable: drop videos that fail probing instead of handling them by ``on_error``.
        motion: motion view beside the RGB views: ``none``; ``flow`` (stored optical flow of
            ``vidssl flow``, read in the workers); ``mv`` (motion vectors of the compressed
            stream, decoded in the workers); ``diff`` (RGB difference of consecutive frames,
            made on the device).
        flow_dir: the folder ``vidssl flow`` wrote (``motion: flow``). A video's flow is
            ``flow_dir/<its path relative to the flow root, extension .npy>``, the flow root
            being the source folder in the folder's manifest, else the data source's folder;
            ``setup`` names the videos that have none.
        motion_views: positions (in ``views``) that carry a motion field; ``None``: every
            training view. ``vidssl fit`` sets it from the model's ``motion_views``.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        format: Literal["auto", "class_folders", "folder", "csv", "ucf101", "hmdb51"] = "auto",
        split: int = 1,
        annotations: str | None = None,
        clip_len: int = 16,
        stride: int = 2,
        views: list[str] | None = None,
        num_views: int | None = None,
        short_side: int = 128,
        crop_size: int = 112,
        train_preset: str = "simclr",
        train_augmentation: VideoAugmentation | None = None,
        eval_num_clips: int = 1,
        temporal_preset: Literal["cvrl", "videosimclr"] | None = None,
        views_from: Literal["video", "clip"] | None = None,
        max_shift: int | None = None,
        drop_p: float = 0.0,
        reverse_p: float = 0.0,
        shuffle_p: float = 0.0,
        repeat_anchor: bool | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        backend: Literal["decord", "pyav"] = "decord",
        decode_threads: int = 1,
        decode_device: str = "cpu",
        train_on_error: Literal["resample", "raise"] = "resample",
        eval_on_error: Literal["resample", "raise"] = "raise",
        timeout: float = 0.0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        drop_last: bool = True,
        cache_dir: str | None = None,
        drop_unreadable: bool = False,
        motion: Literal["none", "flow", "mv", "diff"] = "none",
        flow_dir: str | None = None,
        motion_views: list[int] | None = None,
    ) -> None:
        super().__init__()
        # The augmentation object itself would make checkpoints unreadable with
        # torch.load(weights_only=True): its settings are kept as plain values instead.
        self.save_hyperparameters(ignore=["train_augmentation"])
        if train_augmentation is not None:
            self.hparams["train_augmentation"] = train_augmentation.settings()
        self.train_source, self.val_source, self.test_source = train, val, test
        self.format = format
        self.split = split
        self.annotations = annotations
        self.clip_len = clip_len
        self.stride = stride
        self.num_views, self.repeat_anchor = _view_settings(views, num_views, repeat_anchor)
        _check_motion(motion, flow_dir, motion_views)
        self.motion = motion
        self.flow_dir = flow_dir
        self.motion_views = motion_positions(motion_views, self.num_views + self.repeat_anchor)
        self.short_side = short_side
        self.crop_size = crop_size
        self.eval_num_clips = eval_num_clips
        self.temporal = TemporalTransform.preset(
            temporal_preset, max_shift=max_shift, drop_p=drop_p, reverse_p=reverse_p,
            shuffle_p=shuffle_p, views_from=views_from,
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.backend = backend
        self.decode_threads = decode_threads
        self.decode_device = decode_device
        self.train_on_error = train_on_error
        self.eval_on_error = eval_on_error
        self.timeout = timeout
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.cache_dir = cache_dir
        self.drop_unreadable = drop_unreadable
        if train_augmentation is not None and train_augmentation.crop_size != crop_size:
            raise ValueError(
                f"data.train_augmentation has crop_size={train_augmentation.crop_size} but "
                f"data.crop_size={crop_size}: give both the same value"
            )
        self.train_augmentation = train_augmentation or build_augmentation(train_preset,
                                                                           crop_size)
        self.eval_transform = EvalTransform(crop_size)
        self.train_dataset: VideoDataset | None = None
        self.val_dataset: VideoDataset | None = None
        self.test_dataset: VideoDataset | None = None
        self._train_batch_sampler: Iterable | None = None
        self._warned_upsampling = False

    # -- indexes and datasets -----------------------------------------------------------------

    def _index(self, source: str | None, subset: Literal["train", "test"]) -> VideoIndex | None:
        if source is None:
            return None
        index = read_index(source, self.format, self.split, subset, self.annotations)
        return index.probe(cache_dir=self.cache_dir, drop_unreadable=self.drop_unreadable)

    def _official(self, source: str | None) -> bool:
        from vidssl.data.index import detect_format

        fmt = self.format if self.format != "auto" else (detect_format(source) if source else "")
        return fmt in ("ucf101", "hmdb51")

    def _dataset(
        self,
        index: VideoIndex,
        mode: str,
        num_clips: int = 1,
        on_error: str | None = None,
        source: str | None = None,
        flow_videos: Sequence[str] | None = None,
    ) -> VideoDataset:
        train = mode == "train"
        if self.motion == "flow" and flow_videos is None:
            flow_videos = _flow_videos(self.flow_dir, index, source)
        if on_error is None:
            on_error = self.train_on_error if train else self.eval_on_error
        return VideoDataset(
            index,
            clip_len=self.clip_len,
            stride=self.stride,
            num_views=self.num_views,
            mode="train" if train else "eval",
            num_clips=num_clips,
            temporal=self.temporal,
            # Evaluation clips all share one short side, so their centre squares stack and no
            # video's crop depends on its batch (native sizes would differ from video to video).
            short_side=self.short_side if train else (self.short_side or self.crop_size),
            backend=self.backend,
            decode_threads=self.decode_threads,
            decode_device=self.decode_device,
            on_error=on_error,
            repeat_anchor=self.repeat_anchor,
            motion=self.motion,
            flow_dir=self.flow_dir,
            flow_videos=flow_videos,
            motion_views=self.motion_views,
        )

    def _warn_upsampling(self, index: VideoIndex) -> None:
        """Warn once when frames are decoded smaller than ``crop_size`` (crops get upsampled)."""
        if self._warned_upsampling:
            return
        self._warned_upsampling = True
        if self.short_side:
            if self.crop_size > self.short_side:
                warnings.warn(
                    f"crop_size={self.crop_size} is larger than short_side={self.short_side}: "
                    f"frames are decoded with a {self.short_side} px short side and crops are "
                    f"upsampled {self.crop_size / self.short_side:.2f}x (blurrier than the "
                    f"network input). Set short_side >= crop_size, e.g. short_side="
                    f"{self.crop_size}, or lower crop_size.",
                    UserWarning,
                    stacklevel=3,
                )
            return
        native = np.minimum(index.width, index.height)[index.num_frames > 0]
        small = int((native < self.crop_size).sum())
        if small:
            warnings.warn(
                f"short_side=0 keeps native sizes, and {small} of {len(native)} readable videos "
                f"have a short side below crop_size={self.crop_size} (down to {native.min()} "
                f"px): their crops are upsampled up to {self.crop_size / native.min():.2f}x. "
                "Lower crop_size, or accept the upsampling.",
                UserWarning,
                stacklevel=3,
            )

    def setup(self, stage: str | None = None) -> None:
        """Read and probe the indexes (cached manifests make a second start near-instant).

        Warns once when ``crop_size`` exceeds ``short_side`` (or, with ``short_side=0``, the
        native short side of some videos): the crops are then upsampled. Motion checks:
        ``motion: flow`` raises :class:`~vidssl.data.flow.FlowMissingError` naming the videos of
        each split without stored flow (readable ones; the others follow ``on_error``);
        ``motion: mv`` warns when the first training video's codec exports no motion vectors.
        """
        if self.train_dataset is None and self.train_source is not None:
            index = self._index(self.train_source, "train")
            self.train_dataset = self._dataset(index, "train", source=self.train_source)
            self._warn_upsampling(index)
            self._check_motion_source(self.train_dataset, "training")
        official = self._official(self.train_source) if self.train_source else False
        val_source = self.val_source or (self.train_source if official else None)
        test_source = self.test_source or (self.train_source if official else None)
        if self.val_dataset is None and val_source is not None:
            self.val_dataset = self._dataset(
                self._index(val_source, "test"), "eval", self.eval_num_clips, source=val_source
            )
            self._check_motion_source(self.val_dataset, "validation")
        if self.test_dataset is None and test_source is not None:
            if test_source == val_source and self.val_dataset is not None:
                self.test_dataset = self.val_dataset
            else:
                self.test_dataset = self._dataset(
                    self._index(test_source, "test"), "eval", self.eval_num_clips,
                    source=test_source,
                )
                self._check_motion_source(self.test_dataset, "test")

    def _check_motion_source(self, ds: VideoDataset, split: str) -> None:
        """Run the start-up checks of ``motion`` on one split (see :meth:`setup`)."""
        readable = ds.index.num_frames > 0
        if split == "training" and self.motion != "none" and not self.motion_views:
            warnings.warn(
                f"data.motion={self.motion!r} but no training view carries motion "
                "(motion_views=[]: the method reads none); only the feature bank and evaluation "
                "clips get it (PseudoLabels(modality='motion'), motion retrieval). If nothing "
                "reads it, set data.motion: none.",
                UserWarning,
                stacklevel=3,
            )
        if self.motion == "mv" and split == "training" and readable.any():
            _warn_without_motion_vectors(str(ds.index.paths[np.flatnonzero(readable)[0]]))
        if self.motion != "flow":
            return
        from vidssl.data.flow import FlowMissingError, load_flow_manifest, missing_flow

        if not Path(str(self.flow_dir)).is_dir():
            raise FlowMissingError(
                f"flow_dir {self.flow_dir} does not exist: compute the flow with `vidssl flow "
                f"VIDEOS -o {self.flow_dir} --short-side {self.short_side or 128}`."
            )
        missing = missing_flow(self.flow_dir, ds.flow_videos[readable], root=".")
        if missing:
            raise FlowMissingError(
                f"motion='flow': {len(missing)} of {int(readable.sum())} {split} videos have no "
                f"flow in {self.flow_dir} (e.g. {', '.join(missing[:3])}); compute it with "
                f"`vidssl flow VIDEOS -o {self.flow_dir}` (a re-run adds only the missing ones)."
            )
        stored = load_flow_manifest(self.flow_dir).get("short_side")
        if split == "training" and stored and self.short_side and stored != self.short_side:
            warnings.warn(
                f"the flow in {self.flow_dir} was computed at short side {stored} but frames "
                f"are decoded at short_side={self.short_side}: every flow clip is resized in "
                f"the workers. `vidssl flow --short-side {self.short_side} --overwrite` into "
                "another folder makes it match.",
                UserWarning,
                stacklevel=3,
            )

    def _require(self, ds: VideoDataset | None, what: str) -> VideoDataset:
        if ds is None:
            self.setup()
            ds = getattr(self, f"{what}_dataset")
        if ds is None:
            raise RuntimeError(
                f"No {what} videos: pass VideoDataModule({what}=...) (UCF101 / HMDB51 layouts "
                "take val and test from the official test list)."
            )
        return ds

    # -- information for callbacks and methods -----------------------------------------------

    @property
    def views(self) -> tuple[str, ...]:
        """The training views every batch carries, in order (``VideoSSLMethod.views`` names)."""
        return views_of(self.num_views, self.repeat_anchor)

    @property
    def motion_channels(self) -> int:
        """``M``, channels of each motion field: 2 (x, y) for flow and mv, 3 for diff, else 0."""
        return {"flow": 2, "mv": 2, "diff": 3}.get(self.motion, 0)

    @property
    def train_batch_sampler(self) -> Iterable | None:
        """The batch sampler given by :meth:`set_train_batch_sampler`, or ``None``."""
        return self._train_batch_sampler

    @property
    def train_labels(self) -> np.ndarray:
        """Ground-truth labels of the training videos, ``N`` int64 (``-1`` unknown)."""
        return self._require(self.train_dataset, "train").labels

    @property
    def num_train_videos(self) -> int:
        """``N``, the number of training videos (the length of pseudo-label tensors)."""
        return len(self._require(self.train_dataset, "train"))

    @property
    def train_video_ids(self) -> np.ndarray:
        """Identity of each training video: its path relative to the ``train`` root (``N`` str).

        The root is the ``train`` folder (a CSV manifest's folder); a video outside it keeps its
        absolute path. Pseudo-labels are stored under these keys, so they survive videos being
        added, removed or reordered, and the data set being moved (with ``train`` updated).
        """
        paths = self._require(self.train_dataset, "train").index.paths
        root = _root_of(self.train_source)
        out = []
        for p in paths:
            p = Path(str(p))
            out.append(p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix())
        return np.asarray(out, dtype=np.str_)

    @property
    def decode_failures(self) -> dict[str, int]:
        """Decoding failures so far, per split, summed over this process's DataLoader workers.

        Training batches carry the same count per sample (``decode_failures``), which the
        methods log as ``train/decode_failures`` each epoch, summed over processes.
        """
        out = {}
        for name in ("train", "val", "test"):
            ds = getattr(self, f"{name}_dataset")
            if ds is not None:
                out[name] = ds.decode_failures
        return out

    def teardown(self, stage: str) -> None:
        """At the end of ``fit``, say how many training videos failed to decode and were replaced.

        One line, on the global-zero process, counting distinct videos over all epochs, all
        DataLoader workers and (under DDP) all processes; each path was logged once when it first
        failed (per process). Nothing is printed when every video decoded.
        """
        if stage != "fit" or self.train_dataset is None:
            return
        failed = self.train_dataset.failed_indices
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            mask = torch.zeros(len(self.train_dataset), dtype=torch.int32)
            mask[torch.from_numpy(failed)] = 1
            mask = trainer.strategy.reduce(
                mask.to(trainer.strategy.root_device), reduce_op="sum"
            )
            failed = np.flatnonzero(mask.cpu().numpy() > 0)
            if not trainer.is_global_zero:
                return
        n = len(failed)
        if n:
            log.warning(
                "%d %s could not be decoded and %s replaced (train_on_error=%r): see the log "
                "above for the paths, or run `vidssl check-videos --decode` on the data.",
                n,
                "video" if n == 1 else "videos",
                "was" if n == 1 else "were",
                self.train_on_error,
            )

    # -- dataloaders --------------------------------------------------------------------------

    def set_train_batch_sampler(self, batch_sampler: Iterable | None) -> None:
        """Use ``batch_sampler`` for training: it yields lists of indices or ``(a, p)`` pairs.

        The sampler lives in the main process, so it can change what it yields (e.g. after new
        pseudo-labels) without restarting workers. Under DDP it must itself yield each rank's
        share, as ``ClusterBatchSampler`` does: the training loader then tells the trainer not
        to inject a ``DistributedSampler`` (no ``use_distributed_sampler=False`` needed), and
        the validation and test loaders shard themselves. ``None`` restores shuffling.
        """
        self._train_batch_sampler = batch_sampler

    def _loader(self, ds: VideoDataset, **kwargs: Any) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            ds,
            num_workers=workers,
            collate_fn=collate_videos if ds.mode == "train" else collate_eval_videos,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            timeout=self.timeout if workers > 0 else 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Return shuffled training batches, or the external batch sampler's batches when set."""
        ds = self._require(self.train_dataset, "train")
        if self._train_batch_sampler is not None:
            _keep_own_sampler(getattr(self, "trainer", None))
            return self._loader(ds, batch_sampler=self._train_batch_sampler)
        return self._loader(ds, batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        """Return validation batches: ``eval_num_clips`` spread clips per video, fixed order.

        Under DDP each rank gets a shard, as in :meth:`eval_dataloader`.
        """
        return self._eval_loader(self._require(self.val_dataset, "val"))

    def test_dataloader(self) -> DataLoader:
        """Return test batches: ``eval_num_clips`` spread clips per video, fixed order.

        Under DDP each rank gets a shard, as in :meth:`eval_dataloader`.
        """
        return self._eval_loader(self._require(self.test_dataset, "test"))

    def _eval_loader(
        self, ds: VideoDataset, rank: int | None = None, world_size: int | None = None
    ) -> DataLoader:
        # Sharded here rather than by Lightning, which is told to keep its hands off when a
        # batch sampler shards the training data itself (_keep_own_sampler).
        if world_size is None:
            rank, world_size = rank_and_world(getattr(self, "trainer", None))
        if world_size > 1:
            sampler = DistributedSampler(
                ds, num_replicas=world_size, rank=rank or 0, shuffle=False, drop_last=False
            )
            return self._loader(ds, batch_size=self.eval_batch_size, sampler=sampler)
        return self._loader(ds, batch_size=self.eval_batch_size, shuffle=False)

    def eval_dataloader(
        self,
        split: Literal["train", "val", "test"] = "test",
        num_clips: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> DataLoader:
        """Return every video of ``split`` once, ``num_clips`` evenly spread clips, fixed order.

        Views ``0..num_clips-1`` of a batch are the clips in time order (one centre clip when
        ``num_clips == 1``); retrieval protocols average their features per video. Batches are
        uint8: apply ``augment(batch, train=False)`` on the device unless the loader runs through
        a Lightning loop, whose ``on_after_batch_transfer`` does it.

        Under DDP each rank gets a disjoint shard (``DistributedSampler(shuffle=False)``, which
        pads the last shard by repeating indices); the ``index`` key of each batch is the true
        dataset index, so gathered features can be de-duplicated. ``rank`` and ``world_size``
        default to the attached trainer's (or ``torch.distributed``'s, or a single process).
        """
        return self._split_loader(split, num_clips, rank, world_size)

    def _split_loader(
        self,
        split: str,
        num_clips: int,
        rank: int | None,
        world_size: int | None,
        on_error: str | None = None,
    ) -> DataLoader:
        source = self._require(getattr(self, f"{split}_dataset", None), split)
        flow_videos = source.flow_videos
        ds = self._dataset(source.index, "eval", num_clips, on_error, flow_videos=flow_videos)
        return self._eval_loader(ds, rank, world_size)

    def bank_dataloader(
        self, rank: int | None = None, world_size: int | None = None
    ) -> DataLoader:
        """Return every training video once, one centre clip, in a fixed order (feature banks).

        Like ``eval_dataloader("train", num_clips=1, rank, world_size)`` (DDP shards padded by
        repetition: de-duplicate by ``index``), but with the *training* decoding policy, since
        the bank serves training: under ``train_on_error="resample"`` an undecodable video is
        skipped (``on_error="skip"``: left out of ``index`` and listed in the batch's
        ``skipped_index``), under ``"raise"`` it raises.
        """
        on_error = "raise" if self.train_on_error == "raise" else "skip"
        return self._split_loader("train", 1, rank, world_size, on_error)

    # -- augmentation -------------------------------------------------------------------------

    def augment(self, batch: dict[str, Any], train: bool = True) -> dict[str, Any]:
        """Turn uint8 ``views`` into float ``B x C x T x H x W`` on their device, in place.

        ``train=True`` applies the training preset independently to every view (one draw per
        clip); ``train=False`` the evaluation transform. Views that are already float are left
        as they are, so augmenting twice is harmless.

        A view with motion (``batch["motion"][position]``, uint8, for ``flow`` / ``mv``; every
        position of ``motion_views``, or every clip when ``train=False``, for ``diff``) shares
        its RGB view's random draw: ``batch["motion"][position]`` becomes float
        ``B x M x T x H x W`` (``forward_with_motion`` of :mod:`vidssl.data.augment`).
        """
        transform = self.train_augmentation if train else self.eval_transform
        views = batch["views"]
        if not views:
            return batch
        transform.to(views[0].device)
        fields = dict(batch.get("motion") or {})
        diff = self.motion == "diff"
        positions = self.motion_views if train else range(len(views))
        out = []
        for pos, v in enumerate(views):
            field = fields.get(pos)
            if v.dtype != torch.uint8:
                out.append(v)
            elif (field is not None and field.dtype == torch.uint8) or (diff and pos in positions):
                rgb, fields[pos] = transform.forward_with_motion(v, field)
                out.append(rgb)
            else:
                out.append(transform(v))
        batch["views"] = out
        if fields or self.motion == "diff":
            batch["motion"] = fields
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment on the device: training preset while training, evaluation transform else."""
        if not isinstance(batch, dict) or "views" not in batch:
            return batch
        trainer = getattr(self, "trainer", None)
        train = bool(trainer is not None and trainer.training)
        return self.augment(batch, train=train)


def _view_settings(
    views: list[str] | None, num_views: int | None, repeat_anchor: bool | None
) -> tuple[int, bool]:
    """``(num_views, repeat_anchor)`` from the method's ``views`` or the explicit settings."""
    if views is None:
        return (2 if num_views is None else num_views), bool(repeat_anchor)
    wanted = views_settings(views)
    for key, given, value in (("num_views", num_views, wanted[0]),
                              ("repeat_anchor", repeat_anchor, wanted[1])):
        if given is not None and given != value:
            raise ValueError(
                f"data.{key}={given} disagrees with the views the method needs "
                f"({', '.join(views)}: {key}={value}); leave data.{key} out, it follows the method"
            )
    return wanted


def _check_motion(motion: str, flow_dir: str | None, motion_views: list[int] | None) -> None:
    """Check the motion settings that need no video (one-line errors)."""
    if motion not in MOTIONS:
        raise ValueError(f"data.motion={motion!r} is not a motion view; valid: "
                         f"{', '.join(MOTIONS)}")
    if motion == "flow" and not flow_dir:
        raise ValueError("data.motion='flow' needs data.flow_dir, the folder `vidssl flow` "
                         "wrote (docs/motion.md); or use motion: mv or diff, which need no files")
    if motion == "none" and motion_views:
        raise ValueError(f"the method reads motion in views {list(motion_views)} but "
                         "data.motion='none'; set data.motion to flow, mv or diff")


def _root_of(source: str | None) -> Path:
    """Return the folder a data source's relative paths start from: itself, or its folder."""
    root = Path(str(source)).expanduser().resolve()
    return root.parent if root.is_file() else root


def _flow_videos(flow_dir: str, index: VideoIndex, source: str | None) -> list[str]:
    """Each indexed video's path relative to its flow root (:func:`flow_relative_paths`)."""
    from vidssl.data.flow import flow_relative_paths

    return flow_relative_paths(flow_dir, index.paths, _root_of(source) if source else None)


def _warn_without_motion_vectors(path: str) -> None:
    """Warn when ``path``'s codec exports no motion vectors (every ``mv`` field would be zero)."""
    from vidssl.data.index import probe_video
    from vidssl.data.motion_vectors import MV_CODECS

    codec = probe_video(path).codec
    if codec and codec not in MV_CODECS:
        warnings.warn(
            f"data.motion='mv' but {path} is {codec}, whose stream carries no motion vectors: "
            "its motion fields are all zero. Transcode the videos to H.264 (`vidssl transcode`) "
            "or use motion: flow or diff.",
            UserWarning,
            stacklevel=4,
        )


def _keep_own_sampler(trainer: pl.Trainer | None) -> None:
    """Stop ``trainer`` from replacing the training batch sampler by a ``DistributedSampler``.

    The same as ``Trainer(use_distributed_sampler=False)``, which Lightning reads when it
    prepares each loader, after this hook; the evaluation loaders shard themselves.
    """
    connector = getattr(trainer, "_accelerator_connector", None)
    if connector is not None and getattr(connector, "use_distributed_sampler", False):
        connector.use_distributed_sampler = False


