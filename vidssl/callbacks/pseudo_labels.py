"""The ``PseudoLabels`` callback: re-cluster the training set on a schedule and hand labels over.

It embeds every training video, gathers the bank across ranks, clusters it on rank 0, broadcasts
the labels, checkpoints them, and logs how well they agree with the ground truth.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from vidssl import clustering
from vidssl import distributed as vdist
from vidssl.clustering.metrics import pair_error_rates
from vidssl.evaluation.features import check_features, feature_pass
from vidssl.losses.mining import hard_negative_fn_rate
from vidssl.pseudo_labels import PseudoLabelConsumer, PseudoLabelDiagnostics, PseudoLabelState

# PseudoLabelState, pair_error_rates and hard_negative_fn_rate live in vidssl.pseudo_labels,
# vidssl.clustering.metrics and vidssl.losses.mining; they stay importable from here.
__all__ = ["PseudoLabelState", "PseudoLabels", "hard_negative_fn_rate", "pair_error_rates"]

log = logging.getLogger(__name__)

FEATURES = ("backbone", "projection")
MODALITIES = ("rgb", "motion", "both")


class PseudoLabels(pl.Callback):
    """Re-cluster the training videos every ``every_n_epochs`` and hand the labels over.

    At ``on_train_epoch_start`` of epochs ``start_epoch, start_epoch + k, ...`` it embeds every
    training video (the data module's ``bank_dataloader()``: one centre clip, evaluation
    transform, model in eval mode), all-gathers ``(index, feature, label)`` across ranks with
    padding, drops the ``DistributedSampler``'s padding duplicates by index, clusters on rank 0
    (``vidssl.clustering.cluster``), broadcasts the labels and hands its
    :class:`~vidssl.pseudo_labels.PseudoLabelState` to every consumer
    (:class:`~vidssl.pseudo_labels.PseudoLabelConsumer`): the method, if it takes labels, and
    the training batch sampler (the data module's ``train_batch_sampler``, else the training
    loader's ``batch_sampler``), if it does (``docs/concepts.md``). It does the hand-off again at
    every epoch start and after a resume, so reloaded dataloaders and resumed runs see the same
    labels.

    The labels live in a :class:`PseudoLabelState`, keyed by video identity (the data module's
    ``train_video_ids``: paths relative to the training root). It, the diagnostics and the
    training batch sampler's state are in :meth:`state_dict`, saved in Lightning checkpoints: a
    resumed run uses them and re-clusters only when the schedule says so, never because of the
    resume alone. If the training videos changed since the checkpoint, the labels are mapped
    onto the current index by identity and one log line says how many videos were kept, added
    and removed; when a current video has no saved label (one was added), the callback
    re-clusters at once, when training starts, rather than train with partial labels (removals
    and reorderings alone only map). A checkpoint with position-only labels (before keyed
    labels) is read as keyed by the current index when the counts match (with a warning), else
    the callback re-clusters at once.

    Videos that cannot be decoded follow the data module's *training* policy: under
    ``train_on_error="resample"`` the bank skips them, they are left out of clustering and get
    the label ``-1`` (never a positive: the sampler and the methods treat ``-1`` as a class of
    its own), and each re-clustering logs their count and paths (``pseudo_labels/unreadable``);
    under ``"raise"`` the bank pass raises.

    Logged under ``pseudo_labels/`` each time: cluster count, size min/median/max, singletons,
    NMI/AMI/ARI against the ground truth where known, :func:`pair_error_rates`, and what the
    method's ``pseudo_label_diagnostics`` returns, if it has that hook
    (:class:`~vidssl.pseudo_labels.PseudoLabelDiagnostics`; ``ClusterContrast``: the
    false-negative rate among its hardest negatives, :func:`hard_negative_fn_rate`).

    Three ways to get labels:

    - re-clustering the model's own features every ``every_n_epochs`` (SLIC's iterative
      clustering, the default);
    - clustering once, before training, the features of a pre-trained network
      (``initial_weights``) and never again (``every_n_epochs=0``): the source stage of
      cluster-guided contrastive learning (``examples/configs/cluster_contrast_ucf101.yaml``);
    - ``oracle=True``: the training index's ground-truth classes, never clustering ("Supervised
      SLIC" in SLIC's table): an upper bound that tells the clustering's errors from the loss's,
      not a self-supervised result.

    Arguments left at ``None`` take the method's ``pseudo_label_defaults`` (a class attribute of
    ``ClusterTriplet`` and ``ClusterContrast``), then the values in brackets.

    Args:
        every_n_epochs: re-clustering period ``k`` [5]; ``0`` never re-clusters: the labels are
            made once before training (needs ``initial_weights`` or
            ``cluster_before_training``).
        start_epoch: first re-clustering epoch [0].
        method: ``"finch"``, ``"agglomerative"`` or ``"kmeans"`` [``"finch"``].
        level: FINCH partition, ``0`` the finest [0]; ignored with ``num_clusters``.
        num_clusters: cluster count: FINCH's ``req_clust``, k-means' k, agglomerative's cut.
        cluster_fraction: cluster count as a fraction of the number of videos ``N`` (used when
            ``num_clusters`` is not set), e.g. ``0.1`` for ``N / 10`` clusters.
        distance_threshold: agglomerative only: cut the tree at this cosine distance.
        clustering_kwargs: further keyword arguments of ``vidssl.clustering.cluster``.
        features: ``"backbone"`` features or ``"projection"`` head outputs [``"backbone"``].
        modality: what the bank embeds: the RGB clips (``"rgb"``, SLIC's clustering), the
            motion view (``"motion"``: the method's ``encode_motion`` of ``batch["motion"]``,
            or that of ``initial_weights`` for the initial labels; needs ``data.motion``) or
            both, each L2-normalised and averaged (``"both"``) [``"rgb"``]. Clustering the
            motion view and training the RGB clips towards its clusters is the cross-modal
            step of CoCLR (Han et al., NeurIPS 2020: positives mined from the flow network's
            neighbours train the RGB network): videos that move alike become positives
            whatever they look like (docs/motion.md).
        cluster_before_training: make initial labels at the start of training, before epoch 0's
            schedule, with ``initial_weights`` if given (the "pseudo-labels from a pretrained
            network" start); skipped when resuming with labels.
        initial_weights: the pre-trained network whose features make the initial labels.
            Implies ``cluster_before_training``. With ``modality="rgb"``: a backbone of the
            method's architecture (any file ``vidssl.backbones.load_backbone_weights`` reads),
            whose backbone features of the RGB clips are clustered. With ``"motion"`` or
            ``"both"``: a vidssl checkpoint of a method with a motion encoder
            (``CrossModalContrast``, ``GOCA``, ``ClusterTriplet(motion_prob > 0)``; read by
            :func:`vidssl.evaluation.embed.load_encoder`, any architecture), whose motion (or
            averaged RGB and motion) features of the bank are clustered: a motion teacher's
            clusters guide a student of any kind (CoCLR's cross-modal step, with labels from
            a separately trained flow network). Its motion input must be the data module's
            ``motion`` source.
        install_sampler: if the data module has ``set_train_batch_sampler`` and no batch sampler
            yet, install a ``ClusterBatchSampler`` (pair sampling) at setup.
        p_same: the installed sampler's probability of a same-video positive (SLIC UCF101: 0.2).
        adaptive_p: after each clustering, set the training sampler's ``p_same`` to ``1 - NMI``
            of the pseudo-labels against the ground-truth classes: SLIC's
            ``ITERCLUSTER.ADAPTIVEP`` (``online_train.py`` of the official code sets
            ``DATASET.POSITIVE_SAMPLING_P = 1.0 - NMI`` with
            ``NMI = normalized_mutual_info_score(true_labels, cluster_labels)``). It reads the
            true labels, so a run with it is not label-free; NMI over the videos with a known
            class (an error when none has one).
        oracle: hand over the ground-truth classes of the training index (``train_labels``)
            instead of clusters, and never cluster: an upper bound (unknown classes, ``-1``,
            are each their own class, as for clusters).
        seed: the installed sampler's seed.
        progress_bar: show a tqdm bar over the embedding pass on rank 0 when it has more than
            20 batches.

    Attributes:
        diagnostics: what the latest re-clustering logged (``epoch``, ``nmi``, ...).
        history: the numeric diagnostics of every re-clustering, in order, each with the
            ``epoch`` its labels were made at the start of (saved in checkpoints).
    """

    def __init__(
        self,
        every_n_epochs: Optional[int] = None,
        start_epoch: Optional[int] = None,
        method: Optional[str] = None,
        level: Optional[int] = None,
        num_clusters: Optional[int] = None,
        cluster_fraction: Optional[float] = None,
        distance_threshold: Optional[float] = None,
        clustering_kwargs: Optional[Dict[str, Any]] = None,
        features: Optional[str] = None,
        modality: str = "rgb",
        cluster_before_training: bool = False,
        initial_weights: Optional[str] = None,
        install_sampler: bool = True,
        p_same: float = 0.2,
        adaptive_p: bool = False,
        oracle: bool = False,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        super().__init__()
        if method is not None and method not in clustering.METHODS:
            raise ValueError(
                f"unknown clustering method {method!r}; valid: {', '.join(clustering.METHODS)}"
            )
        if features is not None and features not in FEATURES:
            raise ValueError(f"unknown features {features!r}; valid: {', '.join(FEATURES)}")
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
        if cluster_fraction is not None and not 0.0 < cluster_fraction <= 1.0:
            raise ValueError(f"cluster_fraction must be in (0, 1], got {cluster_fraction}")
        if every_n_epochs is not None and every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 1, or 0 for never, got {every_n_epochs}")
        if every_n_epochs == 0 and not (cluster_before_training or initial_weights or oracle):
            raise ValueError(
                "every_n_epochs=0 never re-clusters, so the labels must be made before training: "
                "give initial_weights (a pre-trained backbone to cluster) or "
                "cluster_before_training=True"
            )
        if oracle and adaptive_p:
            raise ValueError("oracle=True never clusters, so adaptive_p has no NMI to follow; "
                             "drop one of them")
        self._args = dict(
            every_n_epochs=every_n_epochs,
            start_epoch=start_epoch,
            method=method,
            level=level,
            features=features,
            cluster_fraction=cluster_fraction,
        )
        self.modality = modality
        self.num_clusters = num_clusters
        self.distance_threshold = distance_threshold
        self.clustering_kwargs = dict(clustering_kwargs or {})
        self.cluster_before_training = cluster_before_training or initial_weights is not None
        self.initial_weights = initial_weights
        self.install_sampler = install_sampler
        self.p_same = p_same
        self.adaptive_p = adaptive_p
        self.oracle = oracle
        self.seed = seed
        self.progress_bar = progress_bar
        # State saved in checkpoints.
        self.state: Optional[PseudoLabelState] = None
        self.diagnostics: Dict[str, Any] = {}
        self.history: List[Dict[str, Any]] = []
        self._sampler_state: Optional[Dict[str, Any]] = None  # loaded, given to the sampler
        self._sampler: Any = None  # the training batch sampler labels were last handed to
        self._batches_done = 0  # training batches finished in the current epoch
        self._adapted_p: Optional[float] = None  # adaptive_p's current p_same
        self._in_epoch_start = False  # inside on_train_epoch_start, where self.log is allowed
        self._teacher: Optional[nn.Module] = None  # initial_weights' motion encoder, until used

    @property
    def pseudo_label_state(self) -> Optional[PseudoLabelState]:
        """The current labels (:class:`~vidssl.pseudo_labels.PseudoLabelSource`), or ``None``."""
        return self.state

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """The current pseudo-labels (``LongTensor N``, -1 = none), or ``None`` before any."""
        return None if self.state is None else torch.from_numpy(self.state.labels.copy())

    @property
    def labels_epoch(self) -> Optional[int]:
        """The epoch the current labels were made at the start of (``-1``: before training)."""
        return None if self.state is None else self.state.epoch

    # -- settings -----------------------------------------------------------------------------

    _FALLBACK = dict(
        every_n_epochs=5,
        start_epoch=0,
        method="finch",
        level=0,
        features="backbone",
        cluster_fraction=None,
    )

    # Defaults that belong to one clustering method (ClusterContrast's N / 10 clusters and
    # ward linkage are agglomerative settings): a model's values for these apply only when
    # the callback clusters with that model's own method.
    _METHOD_SPECIFIC = ("level", "cluster_fraction", "clustering_kwargs")

    def _model_defaults(self, pl_module: Optional[pl.LightningModule]) -> Dict[str, Any]:
        defaults = dict(getattr(pl_module, "pseudo_label_defaults", {}) or {})
        if self._args["method"] is not None and self._args["method"] != defaults.get("method"):
            for name in self._METHOD_SPECIFIC:
                defaults.pop(name, None)
        return defaults

    def setting(self, name: str, pl_module: Optional[pl.LightningModule] = None) -> Any:
        """Return setting ``name``: the argument, else the method default, else the fallback.

        A method's ``level``, ``cluster_fraction`` and ``clustering_kwargs`` defaults are
        skipped when ``method`` names another clustering method than the model's default.
        """
        value = self._args[name]
        if value is None and pl_module is not None:
            value = self._model_defaults(pl_module).get(name)
        return self._FALLBACK.get(name) if value is None else value

    def is_due(self, epoch: int, pl_module: Optional[pl.LightningModule] = None) -> bool:
        """Whether the schedule re-clusters at the start of ``epoch``."""
        if self.oracle:
            return False
        start = self.setting("start_epoch", pl_module)
        every = self.setting("every_n_epochs", pl_module)
        return every > 0 and epoch >= start and (epoch - start) % every == 0

    # -- checkpointed state -------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Return the labels' state, the diagnostics, the history and the sampler's state.

        Keys: those of :meth:`PseudoLabelState.to_dict` (``labels``, ``keys``,
        ``labels_epoch``), ``diagnostics``, ``history``, ``adapted_p_same`` (``adaptive_p``'s
        current value, or ``None``), and ``sampler``: the training batch sampler's
        ``state_dict()`` plus ``batches_done``, the batches of the current epoch finished when
        the checkpoint was made.
        """
        out: Dict[str, Any] = {"labels": None, "keys": None, "labels_epoch": None}
        if self.state is not None:
            out.update(self.state.to_dict())
        out["diagnostics"] = dict(self.diagnostics)
        out["history"] = [dict(h) for h in self.history]
        out["adapted_p_same"] = self._adapted_p
        sampler = self._sampler
        if sampler is not None and hasattr(sampler, "state_dict"):
            out["sampler"] = {**sampler.state_dict(), "batches_done": self._batches_done}
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (old position-only states load too).

        The labels are mapped onto the current videos and handed over when training starts.
        """
        self.state = PseudoLabelState.from_dict(state_dict)
        self.diagnostics = dict(state_dict.get("diagnostics", {}))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._adapted_p = state_dict.get("adapted_p_same")
        self._sampler_state = state_dict.get("sampler")

    # -- Lightning hooks ----------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check ``modality``; install a ``ClusterBatchSampler`` when asked and none is set."""
        if stage != "fit":
            return
        dm = getattr(trainer, "datamodule", None)
        if self.modality != "rgb":
            if self.initial_weights is not None and self.state is None:
                # Loaded now so that a checkpoint mistake fails at start-up (a resumed run
                # restores its labels after setup and then drops the teacher unused).
                self._teacher = self._motion_teacher()
            if self.setting("every_n_epochs", pl_module) > 0 and not self.oracle:
                check_features(self.modality, model=pl_module)  # it re-clusters its own motion
            if getattr(dm, "motion", "none") == "none":
                raise ValueError(f"PseudoLabels(modality={self.modality!r}) clusters the motion "
                                 "view, but data.motion is 'none'; set it to flow, mv or diff")
        if not self.install_sampler:
            return
        if dm is None or not hasattr(dm, "set_train_batch_sampler"):
            return
        if getattr(dm, "train_batch_sampler", None) is not None:
            return
        from vidssl.data.cluster_sampler import ClusterBatchSampler

        dm.set_train_batch_sampler(
            ClusterBatchSampler(
                dm.num_train_videos,
                batch_size=dm.batch_size,
                p_same=self.p_same,
                seed=self.seed,
                drop_last=bool(getattr(dm, "drop_last", False)),
                num_replicas=trainer.world_size,
                rank=trainer.global_rank,
            )
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Map resumed labels onto the current videos, make initial labels if asked, hand over.

        Re-clusters at once when videos were added since the checkpoint; initial labels
        (``cluster_before_training``) are not made when resuming with labels. With ``oracle``
        the labels are the index's classes, read afresh (resumed or not).
        """
        if self.oracle:
            self._oracle_labels(trainer)
        elif self.state is not None and not self._align(trainer, pl_module):
            self.recluster(trainer, pl_module, epoch=trainer.current_epoch)
        if self.cluster_before_training and self.state is None:
            encoder = None
            if self.initial_weights is not None:
                encoder = self._pretrained_encoder(pl_module)
            self.recluster(trainer, pl_module, epoch=-1, encoder=encoder)
        self._teacher = None  # a motion teacher loaded at setup is not needed again
        self._hand_over(trainer, pl_module)
        self._restore_sampler(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-cluster when the schedule says so (once per epoch), then hand the labels over."""
        self._batches_done = 0
        epoch = trainer.current_epoch
        if self.is_due(epoch, pl_module) and self.labels_epoch != epoch:
            self._in_epoch_start = True
            try:
                self.recluster(trainer, pl_module, epoch=epoch)
            finally:
                self._in_epoch_start = False
        self._hand_over(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        """Count the epoch's finished batches (saved with the sampler state)."""
        self._batches_done = batch_idx + 1

    # -- the work -----------------------------------------------------------------------------

    def _align(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Map the loaded labels onto the current training videos; False: re-cluster now."""
        state = self.state
        assert state is not None
        dm = getattr(trainer, "datamodule", None)
        ids = getattr(dm, "train_video_ids", None)
        keys = None if ids is None else np.asarray(ids, dtype=np.str_)
        n = _num_videos(trainer, torch.zeros(0))
        say = log.warning if trainer.is_global_zero else log.debug
        if state.keys is None or keys is None:
            if len(state.labels) != n:
                say(
                    "PseudoLabels: the checkpoint has %d position-only pseudo-labels for %d "
                    "training videos; re-clustering now.", len(state.labels), n,
                )
                return False
            if keys is not None:
                say(
                    "PseudoLabels: the checkpoint's pseudo-labels are stored by position only "
                    "(older vidssl); assuming the %d training videos are unchanged.", n,
                )
            self.state = PseudoLabelState(state.labels, keys, state.epoch, state.provenance)
            return True
        if np.array_equal(state.keys, keys):
            return True
        labels, old_to_new, counts = state.align(keys)
        remap = getattr(pl_module, "remap_video_indices", None)
        if remap is not None:
            remap(torch.from_numpy(old_to_new))
        self.state = PseudoLabelState(labels, keys, state.epoch, state.provenance)
        self._sampler_state = None  # its epoch's draws were over the old videos
        again = counts["added"] > 0
        say(
            "PseudoLabels: the training videos changed since the checkpoint: %d kept (labels "
            "follow them), %d added, %d removed; %s.", counts["kept"], counts["added"],
            counts["removed"], "re-clustering now" if again else "labels mapped",
        )
        return not again

    def _oracle_labels(self, trainer: pl.Trainer) -> None:
        dm = getattr(trainer, "datamodule", None)
        truth = getattr(dm, "train_labels", None)
        if truth is None:
            raise RuntimeError("PseudoLabels(oracle=True) needs a data module with train_labels "
                               "(vidssl.data.VideoDataModule)")
        truth = np.asarray(truth, dtype=np.int64)
        if not (truth >= 0).any():
            raise RuntimeError(
                "PseudoLabels(oracle=True) hands over ground-truth classes, but no training video "
                "has one: use class folders, a CSV with a label column, or a UCF101 / HMDB51 "
                "layout, or drop oracle"
            )
        ids = getattr(dm, "train_video_ids", None)
        self.state = PseudoLabelState(truth, ids, -1, "ground-truth classes (oracle)")
        if trainer.is_global_zero:
            log.warning(
                "PseudoLabels(oracle=True): training on the ground-truth classes of %d videos "
                "(%d classes, %d unknown), not on clusters: an upper bound, not a "
                "self-supervised result.", len(truth), len(np.unique(truth[truth >= 0])),
                int((truth < 0).sum()),
            )

    def _restore_sampler(self, trainer: pl.Trainer) -> None:
        state, self._sampler_state = self._sampler_state, None
        sampler = self._sampler
        if state is None or sampler is None or not hasattr(sampler, "load_state_dict"):
            return
        state = dict(state)
        if state.get("epoch") != trainer.current_epoch:
            state["batches_done"] = 0  # saved at an epoch's end: the next one starts afresh
        self._batches_done = int(state.get("batches_done", 0))
        state["labels"] = self.labels  # the hand-over's, mapped onto the current videos
        sampler.load_state_dict(state)

    def _hand_over(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = _train_batch_sampler(trainer)
        if isinstance(sampler, PseudoLabelConsumer):
            self._sampler = sampler
        if self.state is None:
            return
        for consumer in (pl_module, self._sampler):
            if isinstance(consumer, PseudoLabelConsumer):
                consumer.set_pseudo_labels(self.state)
        if self._sampler is not None and self._adapted_p is not None:
            self._sampler.p_same = self._adapted_p

    def _motion_teacher(self) -> nn.Module:
        """Load ``initial_weights`` as a model that encodes motion; a clear error if it cannot."""
        from vidssl.evaluation.embed import load_encoder

        try:
            model, info = load_encoder(self.initial_weights)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"PseudoLabels(modality={self.modality!r}, initial_weights="
                             f"{self.initial_weights!r}): {e}") from e
        if "motion" not in info:
            raise ValueError(
                f"PseudoLabels(modality={self.modality!r}) clusters the motion features of "
                f"initial_weights, but {self.initial_weights} has no motion encoder: give a "
                "checkpoint of CrossModalContrast, GOCA or ClusterTriplet(motion_prob > 0), or "
                "use modality='rgb'"
            )
        return model

    def _pretrained_encoder(self, pl_module: pl.LightningModule) -> Callable:
        if self.modality != "rgb":  # a motion teacher: its RGB stream and its motion encoder
            teacher = self._motion_teacher() if self._teacher is None else self._teacher
            self._teacher = None
            rgb = getattr(teacher, "encode_rgb", teacher)  # TwoStream's, or SharedEncoder itself

            def teach(clips: torch.Tensor) -> torch.Tensor:
                return F.normalize(rgb(clips), dim=1)

            teach.module = teacher  # type: ignore[attr-defined]
            teach.modality = self.modality  # type: ignore[attr-defined]
            teach.provenance = (  # type: ignore[attr-defined]
                f"{self.modality} features of initial_weights={self.initial_weights}")
            return teach
        backbone = pl_module.backbone_with_weights(self.initial_weights)

        def encode(clips: torch.Tensor) -> torch.Tensor:
            return F.normalize(backbone(clips), dim=1)

        encode.module = backbone  # type: ignore[attr-defined]
        encode.provenance = (  # type: ignore[attr-defined]
            f"backbone features of initial_weights={self.initial_weights}")
        return encode

    def _encoder(self, pl_module: pl.LightningModule) -> Callable:
        projection = self.setting("features", pl_module) == "projection"

        def encode(clips: torch.Tensor) -> torch.Tensor:
            return pl_module.embed(clips, projection=projection)

        encode.module = pl_module  # type: ignore[attr-defined]
        return encode

    @torch.no_grad()
    def embed_bank(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        encoder: Optional[Callable] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed this rank's share of the bank: ``(index B_r, features B_r x D, label B_r)``.

        ``encoder`` (``clips -> B x D``) replaces the model for the RGB clips (the backbone of
        ``initial_weights``); when it has a ``modality`` attribute other than ``"rgb"`` (a
        motion teacher), its ``module``'s ``encode_motion`` embeds the motion view too. Without
        it the model being trained embeds its ``modality``. A video the bank loader skipped
        (undecodable under the training policy ``resample``: the batch lists it in
        ``skipped_index``) has a row of NaN features and label ``-1``.
        """
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "bank_dataloader"):
            raise RuntimeError(
                "PseudoLabels needs a data module with bank_dataloader() and augment() "
                "(vidssl.data.VideoDataModule); pass it as trainer.fit(model, datamodule=...)."
            )
        own_model = encoder is None
        encoder = encoder or self._encoder(pl_module)
        module: nn.Module = encoder.module  # type: ignore[attr-defined]
        rank, world = vdist.rank_and_world(trainer)
        loader = dm.bank_dataloader(rank=rank, world_size=world)
        device = pl_module.device
        module.to(device)
        batches = loader
        if self.progress_bar and trainer.is_global_zero and len(loader) > 20:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc="PseudoLabels: embedding", leave=False)
        augment = lambda b: dm.augment(b, train=False)  # noqa: E731
        modality = self.modality if own_model else getattr(encoder, "modality", "rgb")
        if own_model and modality != "rgb":  # the model's motion (and RGB) encoders
            bank = feature_pass(module, batches, augment, device=device, features=modality,
                                projection=self.setting("features", pl_module) == "projection")
        else:  # RGB clips through the encoder; a motion teacher's motion view through its module
            bank = feature_pass(module, batches, augment, encode=encoder, device=device,
                                features=modality)
        if modality != "rgb":
            bank.features = F.normalize(bank.features, dim=1)  # as embed() does for RGB
        if not bank.index.numel() and bank.skipped.numel():
            raise RuntimeError(
                "PseudoLabels: none of this process's training videos could be decoded; check "
                "them with `vidssl check-videos`."
            )
        gone = bank.skipped
        nan = torch.full((gone.numel(), bank.features.shape[1]), float("nan"))
        return (
            torch.cat([bank.index.long(), gone]).to(device),
            torch.cat([bank.features, nan]).to(device),
            torch.cat([bank.labels.long(), torch.full_like(gone, -1)]).to(device),
        )

    def cluster(
        self, features: np.ndarray, pl_module: Optional[pl.LightningModule] = None
    ) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Cluster ``N x D`` features with the configured method; ``(labels, diagnostics)``."""
        method = self.setting("method", pl_module)
        kwargs = dict(self._model_defaults(pl_module).get("clustering_kwargs", {}))
        kwargs.update(self.clustering_kwargs)
        num_clusters = self.num_clusters
        fraction = self.setting("cluster_fraction", pl_module)
        if num_clusters is None and fraction is not None and self.distance_threshold is None:
            num_clusters = max(1, int(round(fraction * len(features))))
        if method == "finch":
            if num_clusters is not None:
                kwargs["req_clust"] = num_clusters
            kwargs["level"] = self.setting("level", pl_module)
        elif num_clusters is not None:
            kwargs["num_clusters"] = num_clusters
            kwargs.pop("distance_threshold", None)
        if method == "agglomerative" and self.distance_threshold is not None:
            kwargs["distance_threshold"] = self.distance_threshold
            kwargs.pop("num_clusters", None)
        if method == "agglomerative" and not {"num_clusters", "distance_threshold"} & set(kwargs):
            raise ValueError(
                "agglomerative clustering needs num_clusters, cluster_fraction or "
                "distance_threshold: set one on PseudoLabels"
            )
        # Looked up at call time, so tests (and users) can wrap vidssl.clustering.cluster.
        result = clustering.cluster(features, method=method, **kwargs)
        return np.asarray(result.labels, dtype=np.int64), dict(result.diagnostics)

    def recluster(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        epoch: int,
        encoder: Optional[Callable] = None,
    ) -> torch.Tensor:
        """Embed, gather, cluster on rank 0, broadcast; store, log and return the labels."""
        t0 = time.perf_counter()
        idx, feats, truth = self.embed_bank(trainer, pl_module, encoder)
        # Feature banks differ in length between ranks (DistributedSampler padding only evens
        # them out when N is known to every rank), so gather with padding.
        all_idx = vdist.all_gather_padded(idx).cpu()
        all_feats = vdist.all_gather_padded(feats).cpu()
        all_truth = vdist.all_gather_padded(truth).cpu()
        n = _num_videos(trainer, all_idx)
        order = _unique_rows(all_idx, n)
        feats_np = all_feats[order].numpy()
        truth_np = all_truth[order].numpy()
        # Videos the bank could not decode (NaN rows) are left out and keep the label -1.
        ok = np.isfinite(feats_np).all(axis=1)
        unreadable = np.flatnonzero(~ok)
        if unreadable.size:
            self._report_unreadable(trainer, unreadable, n)
        feats_np, truth_ok = feats_np[ok], truth_np[ok]
        device = pl_module.device
        labels = torch.full((n,), -1, dtype=torch.long, device=device)
        diag: Dict[str, Any] = {}
        if trainer.is_global_zero:
            t1 = time.perf_counter()
            lab_np, diag = self.cluster(feats_np, pl_module)
            labels[torch.from_numpy(ok).to(device)] = torch.from_numpy(lab_np).to(device)
            # Numbers, strings and lists of numbers (FINCH's level_clusters) are kept.
            diag = {k: v for k, v in diag.items() if _is_number(v) or isinstance(v, str) or (
                isinstance(v, list) and all(_is_number(x) for x in v))}
            diag["embed_seconds"] = t1 - t0
            diag["cluster_seconds"] = time.perf_counter() - t1
        vdist.broadcast(labels, src=0)
        diag = trainer.strategy.broadcast(diag, src=0)  # rank 0's timings and settings
        labels = labels.cpu()
        clustered = labels.numpy()[ok]
        # Every rank holds the gathered bank, so the metrics are computed everywhere from the
        # broadcast labels and logged identically (no rank-0-only logging); over the videos
        # that were clustered.
        metrics = clustering.clustering_metrics(clustered, truth_ok, ami=True)
        metrics.update(pair_error_rates(clustered, truth_ok))
        if self.adaptive_p:
            if "nmi" not in metrics:
                raise RuntimeError(
                    "PseudoLabels(adaptive_p=True) sets p_same = 1 - NMI against the true "
                    "classes, but no training video has a class; drop adaptive_p"
                )
            self._adapted_p = min(1.0, max(0.0, 1.0 - float(metrics["nmi"])))
            metrics["p_same"] = self._adapted_p
        # The method's own measure of label quality, if it offers one.
        if isinstance(pl_module, PseudoLabelDiagnostics):
            metrics.update(pl_module.pseudo_label_diagnostics(feats_np, clustered, truth_ok))
        metrics.update({"epoch": epoch, "bank_rows": int(all_idx.numel()), "bank_size": n})
        metrics["unreadable"] = int(unreadable.size)
        metrics["method"] = self.setting("method", pl_module)
        metrics["embed_seconds"] = diag.get("embed_seconds", 0.0)
        metrics["cluster_seconds"] = diag.get("cluster_seconds", 0.0)
        metrics["clustering"] = diag
        ids = getattr(getattr(trainer, "datamodule", None), "train_video_ids", None)
        provenance = getattr(encoder, "provenance", None) or (
            f"{self.setting('features', pl_module)} features ({self.modality}) of the model "
            "being trained")
        self.state = PseudoLabelState(labels.numpy(), ids, epoch, provenance)
        self.diagnostics = metrics
        self.history.append({k: v for k, v in metrics.items() if _is_number(v)})
        self._log(pl_module, metrics)
        return labels

    def _report_unreadable(self, trainer: pl.Trainer, rows: np.ndarray, n: int) -> None:
        if not trainer.is_global_zero:
            return
        ds = getattr(getattr(trainer, "datamodule", None), "train_dataset", None)
        paths = getattr(getattr(ds, "index", None), "paths", None)
        names = [str(paths[i]) if paths is not None else f"index {i}" for i in rows[:10]]
        more = f" and {rows.size - 10} more" if rows.size > 10 else ""
        log.warning(
            "PseudoLabels: %d of %d training videos could not be decoded (skipped by the "
            "training policy train_on_error='resample'); they are left out of clustering with "
            "label -1, never a positive: %s%s", rows.size, n, ", ".join(names), more,
        )

    def _log(self, pl_module: pl.LightningModule, metrics: Dict[str, Any]) -> None:
        values = {
            f"pseudo_labels/{k}": float(v)
            for k, v in metrics.items()
            if _is_number(v) and k not in ("bank_rows", "bank_size")
        }
        if not values:
            return
        if self._in_epoch_start:
            for k, v in values.items():
                # Equal on every rank: the sync (a mean) changes nothing but Lightning's warning.
                pl_module.log(k, v, on_step=False, on_epoch=True, sync_dist=True)
        else:  # on_train_start, or a direct call: Lightning's self.log is not allowed there
            trainer = pl_module.trainer
            if trainer.logger is not None and trainer.is_global_zero:
                trainer.logger.log_metrics(values, step=trainer.global_step)
        log.info("PseudoLabels epoch %s: %s", metrics.get("epoch"), {k: values[k] for k in values})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _train_batch_sampler(trainer: pl.Trainer) -> Any:
    """Return the training batch sampler, found through public attributes only.

    The data module's ``train_batch_sampler`` (``VideoDataModule``), else the ``batch_sampler``
    of the trainer's training loader (``trainer.train_dataloader``, a single loader), else
    ``None``.
    """
    sampler = getattr(getattr(trainer, "datamodule", None), "train_batch_sampler", None)
    if sampler is not None:
        return sampler
    loader = getattr(trainer, "train_dataloader", None)
    return getattr(loader, "batch_sampler", None)


def _num_videos(trainer: pl.Trainer, gathered_index: torch.Tensor) -> int:
    dm = getattr(trainer, "datamodule", None)
    n = getattr(dm, "num_train_videos", None)
    if isinstance(n, int):
        return n
    return int(gathered_index.max().item()) + 1 if gathered_index.numel() else 0


#: Rows of the gathered bank index holding each video once (vidssl.distributed.unique_rows).
_unique_rows = vdist.unique_rows
