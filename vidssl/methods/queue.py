"""A queue of keys from earlier batches (MoCo's negatives), with the dataset index of each key.

One component, composed by every method that keeps such a queue (``MoCo``, ``ClusterContrast``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vidssl import distributed as vdist

__all__ = ["KeyQueue"]


class KeyQueue(nn.Module):
    """A ring buffer of the latest ``size`` keys (``size x dim``) and their dataset indices.

    - **Filled from all ranks**: :meth:`enqueue` all-gathers the keys (and indices) of every DDP
      rank, so every rank holds the same queue, as in the official MoCo code
      (``_dequeue_and_enqueue`` after ``concat_all_gather``).
    - **A ring**: the queue always holds the latest ``size`` keys, whatever the batch size; a
      batch larger than the queue keeps its last ``size`` keys.
    - **Its size rule** (:meth:`check_batches`): with ``whole_batches=True`` (MoCo's official
      code asserts ``K % batch_size == 0`` and trains with ``drop_last=True``) every write must
      be one whole global batch that divides ``size``; with ``False`` any size and batch works.
    - **Checkpointed**: ``keys``, ``ptr`` and ``index`` are persistent buffers, so a resumed run
      continues with the same queue.
    - **Indices**: ``index[j]`` is the dataset index of the video key ``j`` came from, ``-1`` for
      a slot never written or a key of unknown video. :meth:`remap` follows a change of the
      training videos (``PseudoLabels`` calls it through the method on resume).

    Slots start as random unit vectors with index ``-1`` (the official code's initialisation);
    :meth:`filled` tells which slots hold real keys.

    Args:
        size: number of keys ``K`` (``>= 1``).
        dim: key dimension.
        whole_batches: enforce MoCo's rule (see above) in :meth:`check_batches`.
    """

    def __init__(self, size: int, dim: int, whole_batches: bool = False) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"a key queue needs size >= 1, got {size}")
        self.size = size
        self.whole_batches = whole_batches
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))

    def extra_repr(self) -> str:
        """Size, key dimension and rule, for ``print(model)``."""
        return f"size={self.size}, dim={self.keys.shape[1]}, whole_batches={self.whole_batches}"

    def check_batches(
        self, batch_size: int, drop_last: Optional[bool], world_size: int = 1, owner: str = "MoCo"
    ) -> Optional[str]:
        """Return why the training batches break this queue's rule, or ``None`` if they fit.

        Only a ``whole_batches`` queue has a rule: ``drop_last`` must not be ``False`` (``None``:
        unknown, not checked) and ``size`` must be a multiple of ``batch_size x world_size``. The
        message names the config keys to change; ``owner`` is the method's name in it.
        """
        if not self.whole_batches:
            return None
        if drop_last is False:
            return (
                f"{owner} needs data.drop_last=true: as in the official MoCo code, every step "
                "enqueues one whole global batch, and a short last batch would break "
                "model.queue_size % batch == 0 (ClusterContrast's queue takes any batch)"
            )
        global_batch = batch_size * world_size
        if self.size % global_batch:
            return (
                f"model.queue_size={self.size} is not a multiple of the global batch size "
                f"data.batch_size x processes = {batch_size} x {world_size} = {global_batch}; "
                "each step enqueues one global batch of keys (MoCo: K % batch == 0). Change "
                "model.queue_size or data.batch_size."
            )
        return None

    def filled(self) -> torch.Tensor:
        """Boolean ``K`` mask of the slots written with a key of a known video."""
        return self.index >= 0

    def snapshot(self, filled_only: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return a copy of ``(keys, index)`` as they are now (read before this step's enqueue).

        ``filled_only`` keeps the slots of :meth:`filled` only.
        """
        if filled_only:
            keep = self.filled()
            return self.keys[keep].clone(), self.index[keep].clone()
        return self.keys.clone(), self.index.clone()

    def snapshot_keys(self) -> torch.Tensor:
        """Return a copy of the keys ``K x dim`` as they are now (no copy of the index).

        For a loss that reads only the keys (MoCo without ``mask_own_video``): one clone per
        step instead of two.
        """
        return self.keys.clone()

    @torch.no_grad()
    def enqueue(
        self, keys: torch.Tensor, index: Optional[torch.Tensor] = None, gathered: bool = False
    ) -> None:
        """Write every rank's ``keys`` (``B x dim`` here) and dataset ``index`` (``B``).

        ``index=None`` stores ``-1`` (and skips gathering indices). ``gathered=True``: the
        tensors already hold the global batch (every rank's rows), so nothing is gathered.
        """
        if not gathered:
            keys = vdist.all_gather(keys)
            index = None if index is None else vdist.all_gather(index.long())
        if index is None:
            index = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        keys, index = keys[-self.size :], index[-self.size :]
        ptr = int(self.ptr)
        slots = (ptr + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.index[slots] = index.long()
        self.ptr.fill_((ptr + keys.shape[0]) % self.size)

    @torch.no_grad()
    def remap(self, old_to_new: torch.Tensor) -> None:
        """Queued index ``i`` becomes ``old_to_new[i]``; indices outside the mapping become -1."""
        mapping = old_to_new.to(self.index.device).long()
        old = self.index
        inside = (old >= 0) & (old < mapping.numel())
        new = torch.full_like(old, -1)
        new[inside] = mapping[old[inside]]
        self.index.copy_(new)
