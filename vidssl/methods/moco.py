"""MoCo v1 / v2 for video: a query encoder, a momentum key encoder and a queue of keys."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from vidssl import distributed as vdist
from vidssl.losses import info_nce
from vidssl.methods.base import ConfigError, VideoSSLMethod, momentum_copy
from vidssl.methods.queue import KeyQueue
from vidssl.methods.settings import EMASchedule, Head, Optimization, as_group, merged

__all__ = ["MoCo", "MomentumKeys"]


class MomentumKeys(VideoSSLMethod):
    """Base of the methods whose keys come from a momentum encoder (MoCo, ClusterContrast).

    It holds what they share: the key encoder (an EMA copy of the backbone and head, updated by
    ``VideoSSLMethod`` after every optimiser step; :meth:`momentum_pairs`), and keys that BN
    cannot tell from the queue's (:meth:`_keys`, see ``MoCo`` for the shuffle-BN rule). A
    subclass adds its loss and, if it keeps one, a :class:`~vidssl.methods.queue.KeyQueue`.

    Args:
        shuffle_bn: shuffle the key batch across GPUs under DDP, or within the batch on one
            device (with ``bn_splits``).
        bn_splits: on one device, the number of BN groups (fewer if a group would hold under 2
            samples); ``1`` normalises the whole batch at once, which lets BN leak. Default 2,
            the fewest groups that separate queries from keys and so the largest (least noisy)
            ones; the official demo uses 8 groups of 64 at batch 512. Groups of a few clips are
            noisy: keep several clips per group (docs/benchmarks.md compares group sizes).
        **kwargs: ``VideoSSLMethod``'s arguments.
    """

    def __init__(self, shuffle_bn: bool = True, bn_splits: int = 2, **kwargs: Any) -> None:
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
        super().__init__(**kwargs)
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits
        self.key_backbone = momentum_copy(self.backbone)
        self.key_projection = momentum_copy(self.projection)
        #: The subclass's queue of earlier keys, if it keeps one.
        self.key_queue: Optional[KeyQueue] = None
        self._register_load_state_dict_pre_hook(_rename_old_queue_keys)

    # The queue's buffers under the names they had before KeyQueue (tests, notebooks, plots).
    @property
    def queue(self) -> torch.Tensor:
        """The queued keys, ``K x dim`` (``key_queue.keys``; needs a queue)."""
        return self.key_queue.keys

    @property
    def queue_ptr(self) -> torch.Tensor:
        """The next slot to write (``key_queue.ptr``)."""
        return self.key_queue.ptr

    @property
    def queue_index(self) -> torch.Tensor:
        """The dataset index of each queued key, ``-1`` unknown (``key_queue.index``)."""
        return self.key_queue.index

    # ----------------------------------------------------------------- queue
    def enqueue(
        self, keys: torch.Tensor, index: Optional[torch.Tensor] = None, gathered: bool = False
    ) -> None:
        """Write every rank's keys (``B x dim``) and dataset indices into :attr:`key_queue`.

        ``index`` ``None`` stores ``-1`` (unknown video); ``gathered=True``: the tensors already
        hold the global batch. See :meth:`KeyQueue.enqueue`. Does nothing without a queue.
        """
        if self.key_queue is not None:
            self.key_queue.enqueue(keys, index, gathered=gathered)

    def remap_video_indices(self, old_to_new: torch.Tensor) -> None:
        """Follow a change of the training videos: queued index ``i`` becomes ``old_to_new[i]``.

        ``PseudoLabels`` calls it on resume when the training index changed, so queued keys
        keep pointing at their own video; a key of a removed video becomes an unknown video's
        key (``-1``). See :meth:`KeyQueue.remap`.
        """
        if self.key_queue is not None:
            self.key_queue.remap(old_to_new)

    def check_queue(
        self, batch_size: int, drop_last: Optional[bool], world_size: int = 1
    ) -> None:
        """Raise :class:`ConfigError` when the training batches break the queue's size rule.

        The rule is the queue's (:meth:`KeyQueue.check_batches`): MoCo's ``whole_batches``
        queue, as its official code has it (``_dequeue_and_enqueue`` asserts
        ``K % batch_size == 0``; ``main_moco.py`` trains with ``drop_last=True``), needs
        ``queue_size`` to be a multiple of ``batch_size x world_size`` and the last incomplete
        batch dropped; ClusterContrast's ring takes any batch. ``drop_last=None``: unknown.
        """
        if self.key_queue is None:
            return
        problem = self.key_queue.check_batches(batch_size, drop_last, world_size,
                                               owner=type(self).__name__)
        if problem:
            raise ConfigError(problem)

    def setup(self, stage: str) -> None:
        """Check the views and :meth:`check_queue` on the training batches, before training."""
        super().setup(stage)
        if stage != "fit":
            return
        batches = self.train_batches()
        if batches is not None:
            self.check_queue(*batches, world_size=self.trainer.world_size)

    def momentum_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """Return the query encoder's backbone and head, with their key-encoder copies."""
        return [(self.backbone, self.key_backbone), (self.projection, self.key_projection)]

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


class MoCo(MomentumKeys):
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

    - ``version=2``; ``temperature`` 0.07 for v1, 0.2 for v2; head (``default_head``) linear
      (v1) or a 2-layer MLP without BN, hidden = feature size (v2, ``--mlp``); output 128
      (``--moco-dim``).
    - ``queue_size=65536`` (``--moco-k``), key momentum ``ema.momentum=0.999`` (``--moco-m``,
      ``default_ema``).
    - ``default_optim``: SGD, ``lr=0.03`` for a batch of 256 (``--lr``), momentum 0.9, weight
      decay 1e-4; cosine schedule (v2 ``--cos``; v1's step schedule is not provided).

    Args:
        version: 1 or 2; picks the temperature and head defaults.
        temperature: InfoNCE temperature; ``None`` takes the version's default.
        queue_size: number of negative keys K; must be a multiple of the global batch size,
            and the data module must drop the last incomplete batch (checked at start-up).
        mlp: MLP head (``head.num_layers`` 2, else 1); ``None`` takes the version's default;
            a ``head.num_layers`` given wins.
        mask_own_video: leave the queued keys of a query's own video out of its negatives.
            The queue then remembers each key's dataset index. Off by default, as in MoCo.
            MoCo assumes many more videos than ``queue_size``. On a small dataset a query
            meets stale keys of its own video in the queue, and the loss pushes them away. At
            ``queue_size >= N`` every video's own keys are in the queue (UCF101's 9.5k
            training videos under the default 65536 keys: about 7 each). MoCo then warns at
            start-up unless this is on.
        **kwargs: ``MomentumKeys``'s (``shuffle_bn``, ``bn_splits``) and ``VideoSSLMethod``'s
            (``backbone``, ``head``, ``optim``, ``ema``: ``ema.momentum`` is the key encoder's
            momentum m).
    """

    # Sources: the class docstring ("Defaults and sources"). The head's num_layers follows
    # version / mlp unless head.num_layers is given.
    default_head = Head(hidden_dim=None, output_dim=128, batch_norm=False)
    default_optim = Optimization(
        optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9, exclude_bias_and_norm=False,
        warmup_epochs=0.0, lr_schedule="cosine", min_lr_ratio=0.0,
    )
    default_ema = EMASchedule(momentum=0.999, schedule="constant")

    def __init__(
        self,
        version: int = 2,
        temperature: Optional[float] = None,
        queue_size: int = 65536,
        mlp: Optional[bool] = None,
        mask_own_video: bool = False,
        **kwargs: Any,
    ):
        if version not in (1, 2):
            raise ValueError(f"MoCo version must be 1 or 2, got {version}")
        if queue_size <= 0:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        use_mlp = (version == 2) if mlp is None else mlp
        kwargs["head"] = merged(as_group(Head, kwargs.get("head"), "model.init_args.head"),
                                Head(num_layers=2 if use_mlp else 1))
        super().__init__(**kwargs)
        self.version = version
        default_t = 0.07 if version == 1 else 0.2
        self.temperature = temperature if temperature is not None else default_t
        self.queue_size = queue_size
        self.mask_own_video = mask_own_video
        self.key_queue = KeyQueue(queue_size, self.head.output_dim, whole_batches=True)

    # ----------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        """Check views and queue (``MomentumKeys.setup``); warn of a queue longer than N."""
        super().setup(stage)
        if stage != "fit":
            return
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
        loss = info_nce(q, k, self.key_queue.snapshot_keys(), self.temperature,
                        negative_mask=mask)
        # Only the mask reads the queued indices: without it, no all_gather of them per step.
        self.enqueue(k, index if self.mask_own_video else None)
        return loss


def _rename_old_queue_keys(state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """Rename the queue buffers of checkpoints written before :class:`KeyQueue`.

    They were ``queue``, ``queue_ptr`` and ``queue_index`` on the method itself.
    """
    for old, new in (("queue", "keys"), ("queue_ptr", "ptr"), ("queue_index", "index")):
        if prefix + old in state_dict:
            state_dict[prefix + "key_queue." + new] = state_dict.pop(prefix + old)
