"""The pseudo-label contract: the state a labeller hands over, and what its consumers provide.

A *labeller* makes pseudo-labels: the ``PseudoLabels`` callback (offline clustering of a feature
bank on a schedule) or an online-clustering method (GOCA: Sinkhorn codes in the training step).
It owns a :class:`PseudoLabelState` and hands the same object to every *consumer* that wants it:
a method whose loss reads labels, a batch sampler that draws positives from them. Consumers
implement :class:`PseudoLabelConsumer`; a method may add :class:`PseudoLabelDiagnostics` to have
its own quality measure logged beside the labeller's. Nobody reads another object's private
attributes. Both kinds of labeller expose their state as :class:`PseudoLabelSource`, so logs,
plots and the demo treat them alike (``docs/concepts.md`` draws the picture).

This module depends on nothing else in vidssl, so data, methods and callbacks can all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch

__all__ = [
    "PseudoLabelConsumer",
    "PseudoLabelDiagnostics",
    "PseudoLabelSource",
    "PseudoLabelState",
    "labels_of",
]


@dataclass
class PseudoLabelState:
    """Pseudo-labels keyed by video identity, with the epoch and the provenance of their features.

    ``labels[i]`` is the cluster of the video whose identity is ``keys[i]`` (the path relative to
    the training root, ``VideoDataModule.train_video_ids``), in the current training index order;
    ``-1`` means no label (a video not clustered yet, or one that could not be decoded), which
    every consumer treats as a class of its own. ``keys`` is ``None`` when the data module gives
    no identities (the labels are then by position, as checkpoints before keyed labels stored
    them).

    Attributes:
        labels: ``N`` int64 cluster ids, ``-1`` = none.
        keys: ``N`` video ids (str) or ``None``.
        epoch: the epoch the labels were made at the start of (``-1``: before training).
        provenance: what was clustered, in words (``"backbone features of the model"``,
            ``"backbone features of initial_weights=..."``, ``"ground truth (oracle)"``,
            ``"online Sinkhorn codes"``).
    """

    labels: np.ndarray
    keys: Optional[np.ndarray]
    epoch: int
    provenance: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.keys is not None:
            self.keys = np.asarray(self.keys, dtype=np.str_).reshape(-1)
            if self.keys.shape != self.labels.shape:
                raise ValueError(
                    f"{len(self.labels)} pseudo-labels for {len(self.keys)} video ids; "
                    "pass one id per label."
                )
        self.epoch = int(self.epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def as_tensor(self) -> torch.Tensor:
        """Return the labels as a new ``LongTensor N`` (on the CPU)."""
        return torch.from_numpy(self.labels.copy())

    def to_dict(self) -> Dict[str, Any]:
        """Return what checkpoints hold: ``labels`` (LongTensor N), ``keys``, ``labels_epoch``.

        Also ``provenance``; ``keys`` is a list of ``N`` str or ``None``.
        """
        return {
            "labels": self.as_tensor(),
            "keys": None if self.keys is None else [str(k) for k in self.keys],
            "labels_epoch": self.epoch,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> Optional[PseudoLabelState]:
        """Read :meth:`to_dict`'s output, or an older state (no ``keys``, no ``provenance``)."""
        labels = state.get("labels")
        if labels is None:
            return None
        epoch = state.get("labels_epoch")
        labels = torch.as_tensor(labels).long().cpu().numpy()
        return cls(labels, state.get("keys"), -1 if epoch is None else epoch,
                   str(state.get("provenance") or ""))

    def align(self, keys: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
        """Map the labels onto the videos ``keys`` (the current index, in its order).

        Returns ``(labels, old_to_new, counts)``: ``labels[j]`` is the saved label of video
        ``keys[j]`` (``-1`` for a video not in the saved state), ``old_to_new[i]`` the new
        position of saved video ``i`` (``-1`` if it is gone), ``counts`` holds ``kept``,
        ``added`` and ``removed``. Needs :attr:`keys`.
        """
        if self.keys is None:
            raise ValueError("position-only pseudo-labels cannot be mapped by video identity.")
        new_pos = {str(k): j for j, k in enumerate(keys)}
        old_to_new = np.array([new_pos.get(str(k), -1) for k in self.keys], dtype=np.int64)
        labels = np.full(len(new_pos), -1, dtype=np.int64)
        kept = old_to_new >= 0
        labels[old_to_new[kept]] = self.labels[kept]
        n_kept = int(kept.sum())
        counts = {"kept": n_kept, "added": len(new_pos) - n_kept, "removed": int((~kept).sum())}
        return labels, old_to_new, counts


@runtime_checkable
class PseudoLabelConsumer(Protocol):
    """Something that uses pseudo-labels: a cluster-guided method, a cluster-aware sampler.

    The labeller calls :meth:`set_pseudo_labels` whenever the labels change, at every epoch
    start and after a resume, always with labels in the current training index order. A
    consumer keeps what it needs (a method: a ``LongTensor N`` buffer on its device; a sampler:
    the labels it draws the next epoch's pairs from).
    """

    def set_pseudo_labels(self, state: PseudoLabelState) -> None:
        """Take ``state`` as the current pseudo-labels."""
        ...


@runtime_checkable
class PseudoLabelDiagnostics(Protocol):
    """Optional: a method's own measure of label quality, logged beside the labeller's.

    Called on every rank after each labelling with the clustered features (``N x D``, rows of
    the videos that have a label), their labels and the ground-truth classes (``-1`` unknown);
    returns named numbers (e.g. ``ClusterContrast``: the false-negative rate among the hardest
    negatives it keeps).
    """

    def pseudo_label_diagnostics(
        self, features: np.ndarray, labels: np.ndarray, truth: np.ndarray
    ) -> Dict[str, float]:
        """Return named quality figures of ``labels``."""
        ...


@runtime_checkable
class PseudoLabelSource(Protocol):
    """A labeller: exposes its current :class:`PseudoLabelState` (``None`` before any)."""

    @property
    def pseudo_label_state(self) -> Optional[PseudoLabelState]:
        """The current labels, or ``None``."""
        ...


def labels_of(labels: Any) -> torch.Tensor:
    """``LongTensor N`` of a :class:`PseudoLabelState`, a tensor, an array or a list of ints."""
    if isinstance(labels, PseudoLabelState):
        return labels.as_tensor()
    return torch.as_tensor(labels).detach().cpu().long().reshape(-1)
