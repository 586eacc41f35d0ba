"""Cluster-aware batch sampler: pairs each anchor video with a positive from its pseudo-class.

It runs in the main process and yields lists of ``(anchor, positive)`` dataset indices, the pair
sampling of ``docs/concepts.md``; the ``PseudoLabels`` callback hands it labels
(``set_pseudo_labels``, the ``vidssl.pseudo_labels.PseudoLabelConsumer`` hook).
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from vidssl.distributed import rank_and_world

__all__ = ["ClusterBatchSampler"]

Pair = Tuple[int, int]


class ClusterBatchSampler(Sampler[List[Pair]]):
    """Batch sampler of ``(anchor, positive)`` pairs drawn from the current pseudo-labels.

    Every epoch, the anchors are a permutation of all ``num_samples`` videos (seeded by ``seed`` and
    the epoch). For each anchor ``a`` the positive is ``a`` itself (the dataset then takes a clip
    that does not overlap the anchor's) with probability ``p_same``, otherwise a uniformly random
    *other* video of ``a``'s cluster. Videos without a label (``-1``), videos alone in their
    cluster and every video before the first ``set_labels`` get ``(a, a)``.

    The default ``p_same=0.2`` is SLIC's UCF101 setting (``DATASET.POSITIVE_SAMPLING_P: 0.2`` in
    ``config/custom_configs/resnet_ucf_itercluster_flow.yaml`` of
    github.com/rvl-lab-utoronto/video_similarity_search); its Kinetics config uses 0.5.

    Under DDP each rank takes a disjoint, strided slice of the epoch's anchor permutation (padded
    by repeating the first anchors when ``num_samples`` is not a multiple of the world size, as
    ``DistributedSampler`` does), so all ranks yield the same number of batches. World size and
    rank are read from ``torch.distributed`` when the iteration starts unless given. Lightning must
    not replace this sampler: ``VideoDataModule`` sees to it when the sampler is given through
    ``set_train_batch_sampler``; with another data module train with
    ``Trainer(use_distributed_sampler=False)`` under DDP.

    Lightning calls ``set_epoch`` through the ``sampler`` attribute (it calls
    ``dataloader.batch_sampler.sampler.set_epoch``), which is why ``sampler`` returns ``self``.

    Args:
        num_samples: number of videos ``N`` in the training dataset.
        batch_size: pairs per batch on each rank.
        p_same: probability that the positive is the anchor's own video.
        labels: initial pseudo-labels, ``LongTensor N`` (``-1`` = none); usually set later.
        seed: base seed; the epoch's draws depend only on ``seed`` and the epoch.
        shuffle: shuffle the anchors (otherwise they come in index order).
        drop_last: drop each rank's last incomplete batch.
        num_replicas: world size; ``None`` reads it from ``torch.distributed``.
        rank: this process's rank; ``None`` reads it from ``torch.distributed``.

    Example:
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> s = ClusterBatchSampler(6, batch_size=3, p_same=0.0, labels=labels)
        >>> all(a // 2 == p // 2 and a != p for batch in s for a, p in batch)
        True
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        p_same: float = 0.2,
        labels: Optional[torch.Tensor] = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        if not isinstance(num_samples, (int, np.integer)):
            # What Lightning does when it tries to inject a DistributedSampler under DDP.
            raise TypeError(
                f"ClusterBatchSampler takes the number of videos, got {type(num_samples).__name__}"
                ": Lightning tried to inject a DistributedSampler, but this sampler shards "
                "itself across ranks. Give it to VideoDataModule.set_train_batch_sampler (which "
                "stops the injection), or pass Trainer(use_distributed_sampler=False)."
            )
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not 0.0 <= p_same <= 1.0:
            raise ValueError(f"p_same is a probability in [0, 1], got {p_same}.")
        if num_replicas is not None and rank is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}.")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.p_same = float(p_same)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        # Labels given by set_labels are only read when an iteration starts, so an epoch in
        # progress keeps a consistent partition.
        self._labels: Optional[np.ndarray] = None
        # (epoch, batches): the next iteration of that epoch skips its first batches (a resume).
        self._resume_at: Optional[Tuple[int, int]] = None
        if labels is not None:
            self.set_labels(labels)

    # -- the hand-off with PseudoLabels and Lightning ----------------------------------------

    @property
    def sampler(self) -> ClusterBatchSampler:
        """Return ``self``, so that Lightning's ``batch_sampler.sampler.set_epoch`` reaches it."""
        return self

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """The pseudo-labels used from the next iteration on (``LongTensor N``), or ``None``."""
        return None if self._labels is None else torch.from_numpy(self._labels.copy())

    def set_pseudo_labels(self, state: Any) -> None:
        """Take a ``PseudoLabelState`` (the ``PseudoLabelConsumer`` hook): :meth:`set_labels`."""
        self.set_labels(getattr(state, "labels", state))

    def set_labels(self, labels: Optional[torch.Tensor | np.ndarray | Sequence[int]]) -> None:
        """Use ``labels`` (``N`` ints, -1 = none) from the next ``__iter__`` on; ``None`` clears."""
        if labels is None:
            self._labels = None
            return
        arr = torch.as_tensor(labels).detach().cpu().long().numpy().reshape(-1)
        if arr.shape[0] != self.num_samples:
            raise ValueError(
                f"Got {arr.shape[0]} pseudo-labels for a sampler over {self.num_samples} videos; "
                "pass one label per training video (-1 where there is none)."
            )
        self._labels = arr.copy()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, which (with ``seed``) fixes the anchor order and the positives."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        """Return what an exact resume needs: epoch and labels (the draws follow from the seed)."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "labels": self.labels,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``.

        An optional ``batches_done`` (what ``PseudoLabels`` saves beside this state: the batches
        of the epoch already trained on) makes the next iteration of that epoch skip them, so a
        run resumed mid-epoch trains on the rest of the same epoch (``len`` is unchanged: the
        trainer counts the skipped batches as done).
        """
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.set_labels(state["labels"])
        done = int(state.get("batches_done", 0) or 0)
        self._resume_at = (self.epoch, done) if done > 0 else None

    # -- sampling -----------------------------------------------------------------------------

    def _world(self) -> Tuple[int, int]:
        rank, world = rank_and_world()
        world = self.num_replicas if self.num_replicas is not None else world
        rank = self.rank if self.rank is not None else rank
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside the world of {world} processes.")
        return world, rank

    def _per_rank(self, world: int) -> int:
        return -(-self.num_samples // world)  # ceil: pad like DistributedSampler

    def epoch_pairs(self) -> np.ndarray:
        """All ranks' ``(anchor, positive)`` pairs of the current epoch, ``int64 (N_padded, 2)``.

        Row ``i`` goes to rank ``i % world_size``. Positives are drawn for the whole epoch from one
        generator, so they do not depend on the world size.
        """
        world, _ = self._world()
        rng = np.random.default_rng([self.seed, self.epoch])
        n = self.num_samples
        anchors = rng.permutation(n) if self.shuffle else np.arange(n)
        positives = self._draw_positives(anchors, rng)
        total = self._per_rank(world) * world
        if total > n:  # pad by wrapping around, like DistributedSampler
            reps = -(-total // n)
            anchors = np.tile(anchors, reps)[:total]
            positives = np.tile(positives, reps)[:total]
        return np.stack([anchors, positives], axis=1).astype(np.int64)

    def _draw_positives(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Draw both uniforms for every anchor whatever the labels, so that the stream (and with
        # it the epoch's other draws) does not depend on the partition.
        u_same = rng.random(anchors.shape[0])
        u_pick = rng.random(anchors.shape[0])
        positives = anchors.copy()
        labels = self._labels
        if labels is None:
            return positives
        # Members of each cluster lie contiguously in `order`; a video's block is
        # [start[c], start[c] + size[c]) and `pos_in_block` is its own slot there.
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        uniq, start, size = np.unique(sorted_labels, return_index=True, return_counts=True)
        cluster_of = np.searchsorted(uniq, labels)  # cluster slot of every video
        pos_in_block = np.empty(self.num_samples, dtype=np.int64)
        pos_in_block[order] = np.arange(self.num_samples) - start[cluster_of[order]]

        c = cluster_of[anchors]
        sz = size[c]
        other = (labels[anchors] >= 0) & (sz > 1) & (u_same >= self.p_same)
        # Uniform over the sz - 1 other members: pick j in [0, sz - 1) and skip the anchor's slot.
        j = np.minimum((u_pick * (sz - 1)).astype(np.int64), np.maximum(sz - 2, 0))
        j = j + (j >= pos_in_block[anchors])
        cand = order[np.clip(start[c] + j, 0, self.num_samples - 1)]
        positives[other] = cand[other]
        return positives

    def __iter__(self) -> Iterator[List[Pair]]:
        world, rank = self._world()
        mine = self.epoch_pairs()[rank::world]
        skip, self._resume_at = self._resume_at, None
        first = skip[1] * self.batch_size if skip is not None and skip[0] == self.epoch else 0
        for lo in range(first, mine.shape[0], self.batch_size):
            chunk = mine[lo : lo + self.batch_size]
            if self.drop_last and chunk.shape[0] < self.batch_size:
                return
            yield [(int(a), int(p)) for a, p in chunk]

    def __len__(self) -> int:
        world, _ = self._world()
        per_rank = self._per_rank(world)
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)
