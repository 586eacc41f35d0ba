"""MoCo v1 / v2 for video: a query encoder, a momentum key encoder and a queue of keys."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from vidssl import distributed as vdist
from vidssl.losses import info_nce
from vidssl.methods.base import ConfigError, VideoSSLMethod, momentum_copy

__all__ = ["MoCo"]


class MoCo(VideoSSLMethod):
    """MoCo v1 / v2 (Momentum Contrast) on video clips.

    v1 is He et al. 2020, v2 Chen et al. 2020 ("Improved Baselines with Momentum Contrastive
    Learning"); the code follows facebookresearch/moco ``moco/builder.py``.

    View 0 is the query clip, view 1 the key clip (two clips of one video). The key encoder is an
    EMA copy of the query encoder (backbone and head), updated by the base class after every
    optimiser step. Keys of the whole global batch are enqueued into a FIFO queue of
    ``queue_size`` negatives, kept as a persistent buffer so that it is saved in checkpoints.

    BN must not leak which key is the positive (the paper's sec. 3.3): under DDP the key
    encoder's input is shuffled across GPUs and un-shuffled after (official
    ``_batch_shuffle_ddp``), unless its BN layers are already SyncBatchNorm
    (``Trainer(sync_batchnorm=True)``), where shuffling changes nothing. On one device the
    batch is split into ``bn_splits`` groups, each normalised with its own statistics, and the
    key batch is shuffled before it is split, so a query and its key are normalised with
    different samples: the ``SplitBatchNorm`` + ``_batch_shuffle_single_gpu`` of MoCo's official
    one-GPU demo (facebookresearch/moco, ``colab/moco_cifar10_demo.ipynb``). Without it one
    device lets BN tell the current batch's keys from the queue's.

    Defaults and sources (official code / papers):

    - ``version=2``; ``temperature`` 0.07 for v1, 0.2 for v2; head linear (v1) or a 2-layer MLP
      without BN, hidden = feature size (v2, ``--mlp``); output 128 (``--moco-dim``).
    - ``queue_size=65536`` (``--moco-k``), key momentum ``ema_momentum=0.999`` (``--moco-m``).
    - SGD, ``lr=0.03`` for a batch of 256 (``--lr``), momentum 0.9, weight decay 1e-4; cosine
      schedule (v2 ``--cos``; v1's step schedule is not provided).

    Args:
        version: 1 or 2; picks the temperature and head defaults.
        temperature: InfoNCE temperature; ``None`` takes the version's default.
        queue_size: number of negative keys K; must be a multiple of the global batch size,
            and the data module must drop the last incomplete batch (checked at start-up).
        mlp: MLP head; ``None`` takes the version's default.
        shuffle_bn: shuffle the key batch across GPUs under DDP, or within the batch on one
            device (with ``bn_splits``).
        bn_splits: on one device, the number of BN groups (fewer if a group would hold under 2
            samples); ``1`` normalises the whole batch at once, which lets BN leak. Default 2,
            the fewest groups that separate queries from keys and so the largest (least noisy)
            ones; the official demo uses 8 groups of 64 at batch 512. MoCo v2 at batch 32 on the
            synthetic collection, 8 groups of 4 gave R@1 0.653 and 2 groups 0.944
            (docs/benchmarks.md).
        ema_momentum: key encoder momentum m.
        mask_own_video: leave the queued keys of a query's own video out of its negatives.
            The queue then remembers each key's dataset index. Off by default, as in MoCo.
            MoCo assumes many more videos than ``queue_size``. On a small dataset a query
            meets stale keys of its own video in the queue, and the loss pushes them away. At
            ``queue_size >= N`` every video's own keys are in the queue (UCF101's 9.5k
            training videos under the default 65536 keys: about 7 each). MoCo then warns at
            start-up unless this is on.
        backbone, ...: as ``VideoSSLMethod``.
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        version: int = 2,
        temperature: Optional[float] = None,
        queue_size: int = 65536,
        mlp: Optional[bool] = None,
        shuffle_bn: bool = True,
        bn_splits: int = 2,
        ema_momentum: float = 0.999,
        mask_own_video: bool = False,
        proj_hidden_dim: Optional[int] = None,
        proj_output_dim: int = 128,
        optimizer: str = "sgd",
        lr: float = 0.03,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
    ):
        if version not in (1, 2):
            raise ValueError(f"MoCo version must be 1 or 2, got {version}")
        if queue_size <= 0:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
        use_mlp = (version == 2) if mlp is None else mlp
        super().__init__(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            weights=weights,
            proj_hidden_dim=proj_hidden_dim,
            proj_output_dim=proj_output_dim,
            proj_num_layers=2 if use_mlp else 1,
            proj_batch_norm=False,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            exclude_bias_and_norm=False,
            warmup_epochs=warmup_epochs,
            lr_schedule=lr_schedule,
            min_lr_ratio=min_lr_ratio,
            ema_momentum=ema_momentum,
            ema_schedule="constant",
        )
        self.version = version
        default_t = 0.07 if version == 1 else 0.2
        self.temperature = temperature if temperature is not None else default_t
        self.queue_size = queue_size
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits
        self.mask_own_video = mask_own_video
        self.key_backbone = momentum_copy(self.backbone)
        self.key_projection = momentum_copy(self.projection)
        # Random unit vectors until real keys replace them, as in the official code.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_output_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Dataset index of each queued key; -1 marks a slot not written yet.
        self.register_buffer("queue_index", torch.full((queue_size,), -1, dtype=torch.long))

    def momentum_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """Return the query encoder's backbone and head, with their key-encoder copies."""
        return [(self.backbone, self.key_backbone), (self.projection, self.key_projection)]

    # ----------------------------------------------------------------- checks
    def check_queue(
        self, batch_size: int, drop_last: Optional[bool], world_size: int = 1
    ) -> None:
        """Raise :class:`ConfigError` unless every step enqueues one whole global batch.

        MoCo's rule, as its official code has it (``_dequeue_and_enqueue`` asserts
        ``K % batch_size == 0``; ``main_moco.py`` trains with ``drop_last=True``): ``queue_size``
        is a multiple of ``batch_size x world_size`` and the last incomplete batch is dropped.
        ``ClusterContrast`` lifts it (its queue takes any batch). ``drop_last=None``: unknown,
        not checked.
        """
        if drop_last is False:
            raise ConfigError(
                f"{type(self).__name__} needs data.drop_last=true: as in the official MoCo code, "
                "every step enqueues one whole global batch, and a short last batch would break "
                "model.queue_size % batch == 0 (ClusterContrast's queue takes any batch)"
            )
        global_batch = batch_size * world_size
        if self.queue_size % global_batch:
            raise ConfigError(
                f"model.queue_size={self.queue_size} is not a multiple of the global batch size "
                f"data.batch_size x processes = {batch_size} x {world_size} = {global_batch}; "
                "each step enqueues one global batch of keys (MoCo: K % batch == 0). Change "
                "model.queue_size or data.batch_size."
            )

    def setup(self, stage: str) -> None:
        """Check the views and :meth:`check_queue` on the training batches, before training."""
        super().setup(stage)
        if stage != "fit":
            return
        batches = self.train_batches()
        if batches is not None:
            self.check_queue(*batches, world_size=self.trainer.world_size)
        dm = self._datamodule()
        try:
            n = int(dm.num_train_videos)  # a VideoDataModule's N; other data modules: unknown
        except Exception:  # noqa: BLE001 - no data module, no train set, no such property
            n = None
        if n is not None and self.queue_size >= n and not self.mask_own_video:
            rank_zero_warn(
                f"MoCo queue_size={self.queue_size} >= {n} training videos: every query meets "
                "stale keys of its own video among its negatives. Set model.queue_size below the "
                "number of videos and a multiple of the global batch (the videoSimCLR thesis: "
                "8192 on UCF101's 9.5k training videos, 1024 on HMDB51's 3.6k), or "
                "model.mask_own_video=True."
            )

    # ----------------------------------------------------------------- shuffle BN
    def _uses_sync_bn(self) -> bool:
        return any(isinstance(m, nn.SyncBatchNorm) for m in self.key_backbone.modules())

    def _split_bn(self) -> bool:
        # One device only: under DDP each GPU's batch is already a BN group of its own.
        return self.shuffle_bn and self.bn_splits > 1 and not vdist.is_distributed()

    def _encode(self, backbone: nn.Module, head: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        """``head(backbone(clips))``, in ``bn_splits`` groups on one device (see the class)."""
        # At least 2 samples per group: BN in training cannot normalise a single sample.
        groups = min(self.bn_splits, clips.shape[0] // 2) if self._split_bn() else 1
        if groups <= 1:
            return head(backbone(clips))
        # Running each group through the network is BN over that group alone (SplitBatchNorm).
        return torch.cat([head(backbone(c)) for c in clips.chunk(groups)])

    def _queries(self, clips: torch.Tensor) -> torch.Tensor:
        """Query embeddings ``B x dim`` (not normalised) of ``clips``."""
        return self._encode(self.backbone, self.projection, clips)

    @torch.no_grad()
    def _keys(self, clips: torch.Tensor) -> torch.Tensor:
        """Key embeddings ``B x dim`` (normalised) of ``clips``, with shuffle-BN (see the class)."""
        if self._split_bn():
            # The official demo's _batch_shuffle_single_gpu. The permutation is drawn from the
            # step number, not the global RNG, so a resumed run shuffles exactly as before.
            gen = torch.Generator().manual_seed(int(self.global_step))
            perm = torch.randperm(clips.shape[0], generator=gen).to(clips.device)
            k = self._encode(self.key_backbone, self.key_projection, clips[perm])
            return F.normalize(k, dim=1)[torch.argsort(perm)]
        shuffle = self.shuffle_bn and vdist.is_distributed() and not self._uses_sync_bn()
        if not shuffle:
            return F.normalize(self.key_projection(self.key_backbone(clips)), dim=1)
        # Official _batch_shuffle_ddp / _batch_unshuffle_ddp: one permutation of the global
        # batch, drawn on rank 0 and broadcast; each rank encodes its slice of the shuffled batch.
        world, rank = vdist.get_world_size(), vdist.get_rank()
        gathered = vdist.all_gather(clips)
        perm = vdist.broadcast(torch.randperm(gathered.shape[0], device=clips.device), src=0)
        unperm = torch.argsort(perm)
        k = self.key_projection(self.key_backbone(gathered[perm.view(world, -1)[rank]]))
        k = F.normalize(k, dim=1)
        return vdist.all_gather(k)[unperm.view(world, -1)[rank]]

    # ----------------------------------------------------------------- queue
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, index: Optional[torch.Tensor] = None) -> None:
        """Write every rank's keys (``B x dim`` here) and dataset indices into the queue.

        ``index`` ``None`` stores ``-1`` (unknown video). The pointer moves past the keys.
        """
        keys = vdist.all_gather(keys)
        if index is None:
            index = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        else:
            index = vdist.all_gather(index.long())
        self._write_queue(keys, index)

    @torch.no_grad()
    def _write_queue(self, keys: torch.Tensor, index: torch.Tensor) -> None:
        # A ring buffer: the queue always holds the latest queue_size keys, whatever the batch
        # size (with MoCo's K % batch == 0 the writes are whole batches, as in the official code).
        k = self.queue.shape[0]
        keys, index = keys[-k:], index[-k:]
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(keys.shape[0], device=keys.device)) % k
        self.queue[slots] = keys
        self.queue_index[slots] = index
        self.queue_ptr.fill_((ptr + keys.shape[0]) % k)

    @torch.no_grad()
    def remap_video_indices(self, old_to_new: torch.Tensor) -> None:
        """Follow a change of the training videos: queued index ``i`` becomes ``old_to_new[i]``.

        ``PseudoLabels`` calls it on resume when the training index changed, so queued keys
        keep pointing at their own video; a key of a removed video (``-1``) becomes an unknown
        video's key (``ClusterContrast`` leaves such slots out).
        """
        mapping = old_to_new.to(self.queue_index.device).long()
        old = self.queue_index
        inside = (old >= 0) & (old < mapping.numel())
        new = torch.full_like(old, -1)
        new[inside] = mapping[old[inside]]
        self.queue_index.copy_(new)

    # ----------------------------------------------------------------- loss
    def compute_loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        """InfoNCE of queries (view 0) against their keys (view 1) and the queue's negatives."""
        q = self._queries(batch["views"][0])
        k = self._keys(batch["views"][1])
        index = batch.get("index")  # dataset indices; a custom data module may leave them out
        mask = None
        if self.mask_own_video:
            if index is None:
                raise ValueError("MoCo(mask_own_video=True) needs the batch's 'index' key")
            mask = self.queue_index[None, :] != index.long()[:, None]
        # The loss uses the queue as it was before this batch's keys go in.
        loss = info_nce(q, k, self.queue.clone(), self.temperature, negative_mask=mask)
        # Only the mask reads the queued indices: without it, no all_gather of them per step.
        self.enqueue(k, index if self.mask_own_video else None)
        return loss
