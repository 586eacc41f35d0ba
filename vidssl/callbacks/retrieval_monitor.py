"""Online retrieval monitor: R@k of the validation videos against the training videos.

A cheap progress signal during pretraining (one centre clip per training video by default),
logged through whatever Lightning logger is in use.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from vidssl import distributed as vdist
from vidssl.evaluation.features import check_features, feature_pass
from vidssl.evaluation.retrieval import recall_at_k

__all__ = ["RetrievalMonitor"]

log = logging.getLogger(__name__)


def _sharded(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """Return the same loader over this rank's share of its dataset (fixed order)."""
    if world == 1:
        return loader
    sampler = DistributedSampler(
        loader.dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


class RetrievalMonitor(pl.Callback):
    """Every ``every_n_epochs`` epochs, log R@k of the val split querying the train split.

    Query features come from the data module's ``val_dataloader`` (``eval_num_clips`` clips
    averaged per video), gallery features from its ``bank_dataloader`` (one centre clip per
    training video; ``gallery_clips`` more), both with the evaluation transform. Features are
    held on the CPU in float16 (a UCF101 bank of 9.5k x 512 takes 10 MB). Under DDP every rank
    embeds its share, the shares are gathered, and every rank computes (and logs) the same
    numbers. This is a monitor, not the reported protocol: use
    ``vidssl.evaluation.evaluate_retrieval`` (10 clips per video, test split) for the numbers
    you publish.

    Args:
        every_n_epochs: run after every n-th training epoch.
        ks: which R@k to log (as ``val/R@k``).
        center: mean-centre the features (CoCLR).
        prefix: metric name prefix.
        at_start: also measure once before the first training step (not on resume), kept in
            ``initial`` and logged as ``{prefix}R@k_start``: the starting point of the curve
            under the same protocol.
        features_from: compare ``"backbone"`` features or ``"projection"`` head outputs
            (SLIC's published numbers use its 128-d head's).
        features: which clips make a video's feature: ``"rgb"``, ``"motion"`` (its motion
            fields through the method's ``encode_motion``) or ``"both"``, as
            :func:`vidssl.evaluation.evaluate_retrieval`. Other than ``"rgb"`` it needs a method
            that encodes motion and a data module that reads motion (``motion`` set), else
            training stops at setup with the reason; its metrics are logged as
            ``{prefix}{features}/R@k``, so it runs beside an RGB monitor.
        gallery_clips: clips averaged per training video: 1 (the default) is the feature
            bank's centre clip, cheap; more are the retrieval protocol's evenly spread clips
            (``eval_dataloader("train", gallery_clips)``): with ``gallery_clips`` equal to the
            data module's ``eval_num_clips`` the monitor measures what ``evaluate_retrieval``
            with that ``num_clips`` does (on the val split).

    Attributes:
        initial: ``{k: R@k}`` of the starting weights (``at_start``), else ``None``.
        last: ``{k: R@k}`` of the latest measurement, ``None`` before the first.
        history: every measurement after an epoch of this run, in order:
            ``{"epoch": e, "recall": {k: R@k}}`` measured at the end of epoch ``e`` (not saved in
            checkpoints).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        ks: Sequence[int] = (1, 5),
        center: bool = False,
        prefix: str = "val/",
        at_start: bool = False,
        features_from: str = "backbone",
        features: str = "rgb",
        gallery_clips: int = 1,
    ):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if features_from not in ("backbone", "projection"):
            raise ValueError(f"features_from must be 'backbone' or 'projection', got "
                             f"{features_from!r}")
        check_features(features)
        if gallery_clips < 1:
            raise ValueError(f"gallery_clips must be >= 1, got {gallery_clips}")
        self.every_n_epochs = every_n_epochs
        self.ks = tuple(ks)
        self.center = center
        self.prefix = prefix
        self.at_start = at_start
        self.features_from = features_from
        self.features = features
        self.gallery_clips = gallery_clips
        self.initial: Optional[dict] = None
        self.last: Optional[dict] = None
        self.history: List[Dict[str, Any]] = []
        self._warned = False

    @property
    def _metric_prefix(self) -> str:
        return self.prefix if self.features == "rgb" else f"{self.prefix}{self.features}/"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that motion features can be made: a method and data module with motion."""
        if self.features == "rgb":
            return
        check_features(self.features, model=pl_module)
        dm = trainer.datamodule
        if dm is not None and not getattr(dm, "motion_channels", 0):
            raise ValueError(
                f"RetrievalMonitor(features={self.features!r}) needs motion fields in the eval "
                f"batches but the data module reads none; build it with motion='flow' (and "
                "flow_dir), 'mv' or 'diff', or use features='rgb'")

    def _loaders(self, trainer: pl.Trainer) -> Optional[Tuple[Any, Any, Any]]:
        dm = trainer.datamodule
        if dm is None or not all(
            hasattr(dm, a) for a in ("val_dataloader", "bank_dataloader", "augment")
        ):
            reason = "needs a VideoDataModule (val_dataloader, bank_dataloader, augment)"
        else:
            try:
                query = dm.val_dataloader()
            except RuntimeError as err:  # no val videos configured
                query, reason = None, str(err)
            if query is not None:
                rank, world = vdist.rank_and_world(trainer)
                if self.gallery_clips == 1:
                    gallery = dm.bank_dataloader(rank=rank, world_size=world)
                else:
                    gallery = dm.eval_dataloader("train", num_clips=self.gallery_clips,
                                                 rank=rank, world_size=world)
                return _sharded(query, rank, world), gallery, dm
        if not self._warned:
            log.warning("RetrievalMonitor is skipped: %s", reason)
            self._warned = True
        return None

    @torch.no_grad()
    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Embed val and train videos and return ``{k: R@k}`` (an empty dict when skipped).

        The random number generators are restored afterwards: every DataLoader iterator draws
        its seed from torch's global generator, and a monitor must not change the run it
        watches (with or without it, training sees the same random draws).
        """
        loaders = self._loaders(trainer)
        if loaders is None:
            return {}
        device = pl_module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return self._recall(pl_module, *loaders)

    def _recall(self, pl_module: pl.LightningModule, query: Any, gallery: Any, dm: Any) -> dict:
        def augment(batch):
            return dm.augment(batch, train=False)

        # Features on the CPU in float16; every rank's share gathered, each video once.
        kw = dict(projection=self.features_from == "projection", device=pl_module.device,
                  dtype=torch.float16, gather=True, features=self.features)
        q = feature_pass(pl_module, query, augment, **kw)
        g = feature_pass(pl_module, gallery, augment, **kw)
        return recall_at_k(q.features.float().numpy(), q.labels.numpy(),
                           g.features.float().numpy(), g.labels.numpy(),
                           ks=self.ks, center=self.center)  # fmt: skip

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``at_start``, measure the starting weights (a fresh run only)."""
        if not self.at_start or trainer.global_step > 0:
            return
        recall = self.compute(trainer, pl_module)
        if recall:
            self.initial = recall
            for k, v in recall.items():
                pl_module.log(f"{self._metric_prefix}R@{k}_start", v, on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute and log R@k when the epoch is due."""
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0 or trainer.sanity_checking:
            return
        recall = self.compute(trainer, pl_module)
        if not recall:
            return
        self.last = recall
        self.history.append({"epoch": trainer.current_epoch, "recall": dict(recall)})
        for k, v in recall.items():
            # Every rank holds the same value, so no sync is needed.
            pl_module.log(f"{self._metric_prefix}R@{k}", v, on_step=False, on_epoch=True)
