"""Collective operations used by methods and callbacks, in one place.

Every helper works without an initialised process group (it then acts as the single-process
identity), so the same code runs in a notebook, on one device and under DDP.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "all_gather_padded",
    "all_reduce",
    "broadcast",
    "gather_unique",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_main_process",
    "rank_and_world",
    "unique_rows",
]


def is_distributed() -> bool:
    """Return True when a process group is initialised and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Return this process' global rank, 0 without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def get_world_size() -> int:
    """Return the number of processes, 1 without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank_and_world(trainer: Any = None) -> Tuple[int, int]:
    """Return ``(rank, world_size)``: the trainer's when given, else the process group's.

    ``trainer`` is anything with ``global_rank`` and ``world_size`` (a Lightning ``Trainer``);
    without one the default process group is asked, and a single process is ``(0, 1)``.
    """
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    return get_rank(), get_world_size()


def is_main_process() -> bool:
    """Return True on global rank 0 (always True without a process group)."""
    return get_rank() == 0


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradient.

    Args:
        tensor: ``B x ...``, the same shape on every rank.

    Returns:
        ``(world_size * B) x ...`` in rank order; ``tensor`` itself in a single process.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor)
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns this rank's share of the summed gradient.

    Every rank's loss depends on every rank's samples. The gradient of the total loss (the sum
    over ranks, which DDP then averages) with respect to this rank's inputs is the sum over ranks
    of the incoming gradient slice that belongs to this rank: an all-reduce, then a slice. A plain
    ``dist.all_gather`` has no backward at all, so the other ranks' terms would be lost.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.batch = tensor.shape[0]
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the gradient correct.

    Use it for contrastive negatives from every GPU (SimCLR). The result on every rank is the
    same ``(world_size * B) x ...`` tensor in rank order; rows ``rank * B : (rank + 1) * B`` are
    this rank's own. Gradients from every rank's loss flow back to the rank that owns the rows.

    Args:
        tensor: ``B x ...``, the same shape on every rank.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_gather_padded(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose dim 0 differs between ranks (no gradient).

    ``dist.all_gather`` needs equal shapes, so the sizes are exchanged first, every rank pads
    to the largest size, gathers, and the padding is trimmed away. Used for feature banks, where
    a ``DistributedSampler`` without ``drop_last`` gives ranks unequal shares.

    Args:
        tensor: ``N_rank x ...``; trailing dimensions and dtype equal on every rank.

    Returns:
        ``sum(N_rank) x ...`` in rank order; ``tensor`` itself in a single process.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    world = get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts: List[int] = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([part[:n] for part, n in zip(out, counts)], dim=0)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over every rank in place (``op``: ``"sum"`` or ``"max"``), no gradient.

    Every rank must pass a tensor of the same shape and dtype; every rank ends with the reduced
    value. The identity without a process group. Returns ``tensor`` for chaining.
    """
    if op not in ("sum", "max"):
        raise ValueError(f"unknown all_reduce op {op!r}; valid: sum, max")
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with its value on rank ``src``, in place.

    Every rank must pass a tensor of the same shape and dtype (allocate it on the receiving ranks
    first, e.g. after broadcasting its size). Returns ``tensor`` for chaining.
    """
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def unique_rows(index: torch.Tensor, num: Optional[int] = None) -> torch.Tensor:
    """Return the rows of ``index`` that hold each of its values once, in increasing value.

    A ``DistributedSampler(drop_last=False)`` evens out the ranks' shares by repeating indices,
    so gathered rows hold some dataset indices twice, with the same content (evaluation clips
    are deterministic): the first row of each index is kept. With ``num``, the indices must be
    exactly ``0 .. num-1``, each at least once, and ``num`` rows come back (row ``i`` holds index
    ``i``); an index out of range or missing raises ``RuntimeError``.

    Args:
        index: ``N`` dataset indices (any integer dtype, on any device).
        num: the number of items every index must cover, or ``None`` to keep what is there.

    Returns:
        ``LongTensor`` of row numbers on the CPU.
    """
    index = index.long().cpu()
    if num is not None and index.numel() and (index.min() < 0 or index.max() >= num):
        raise RuntimeError(
            f"bank indices must be in [0, {num}), got [{index.min()}, {index.max()}]"
        )
    present, first_row = np.unique(index.numpy(), return_index=True)  # first occurrence
    rows = torch.from_numpy(first_row).long()
    if num is None:
        return rows
    first = torch.full((num,), -1, dtype=torch.long)
    first[torch.from_numpy(present)] = rows
    missing = (first < 0).nonzero().flatten()
    if missing.numel():
        raise RuntimeError(
            f"{missing.numel()} of {num} training videos are missing from the feature bank (e.g. "
            f"index {int(missing[0])}); the bank loader must visit every training video."
        )
    return first


def gather_unique(
    index: torch.Tensor, *tensors: torch.Tensor, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, ...]:
    """Gather every rank's rows and keep each dataset index once: ``(index, *tensors)`` on CPU.

    Every tensor has one row per entry of ``index`` (``N_rank x ...``; ranks may hold different
    counts). The collective runs on ``device`` (NCCL needs CUDA tensors; default: where each
    tensor is), then :func:`unique_rows` drops the ``DistributedSampler``'s padding and sorts
    the rows by index. In a single process only the sorting and de-duplication happen.
    """
    parts = (index, *tensors)
    if is_distributed():
        parts = tuple(all_gather_padded(t.to(device) if device else t).cpu() for t in parts)
    rows = unique_rows(parts[0])
    return tuple(t.cpu()[rows] for t in parts)
