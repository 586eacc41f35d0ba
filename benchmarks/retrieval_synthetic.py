"""Retrieval after short pretraining: every method against a randomly initialised backbone.

Methods: SimCLR, MoCo v2, SLIC's ClusterTriplet (also with motion views), ClusterContrast and
GOCA, CrossModalContrast (``xmodal*``: RGB and flow streams contrasted within and across
modalities), all from the same initial backbone weights (the random-init row);
``supervised`` (cross-entropy on the true classes) is the upper bound of what the backbone
learns in the budget; ``ce_flow`` is that cross-entropy on clusters of the flow view instead
(DeepCluster's loss).

Writes the synthetic motion collection (classes differ only by motion; vidssl.data.synthetic),
by default with one appearance shared by every video (``--appearance shared``: with a look of
its own per video, instance discrimination is solved by appearance and learns no motion),
pretrains each method for the same number of epochs from the same initial backbone weights,
and reports retrieval R@k (test videos query the training videos; vidssl.evaluation) side by
side, with the pseudo-label quality (NMI/AMI, homogeneity, false-positive rate of cluster
positives, false negatives among the hardest negatives) of every re-clustering the PseudoLabels
callback made.

    .venv/bin/python benchmarks/retrieval_synthetic.py
    .venv/bin/python benchmarks/retrieval_synthetic.py --epochs 30 --every 5
    .venv/bin/python benchmarks/retrieval_synthetic.py --methods simclr+slic --start-epoch 20

``A+B`` trains A for ``--start-epoch`` epochs, then B from A's backbone for the remaining
epochs, clustering from B's first epoch: pseudo-labels from a pretrained network.

``A>B`` trains A (a method with a motion encoder: ``xmodal``) for ``--start-epoch`` epochs as a
teacher, then B from the common starting weights for the remaining epochs, on the clusters of
the teacher's ``--bank`` features (``PseudoLabels(initial_weights=<A's checkpoint>)``); with
``--every 0`` they are never re-made (fixed teacher labels):

    .venv/bin/python benchmarks/retrieval_synthetic.py --appearance per_video \
        --videos-per-class 100 --methods simclr "xmodal>slic_flow" --epochs 80 \
        --start-epoch 20 --every 0 --bank motion --num-clusters 6
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import tempfile
import time
import warnings
from typing import Optional

import numpy as np
import pytorch_lightning as pl
import torch

from vidssl.callbacks import PseudoLabels
from vidssl.data import VideoAugmentation, VideoDataModule, write_synthetic_dataset
from vidssl.evaluation import evaluate_retrieval
from vidssl.methods import (
    GOCA,
    ClusterContrast,
    ClusterTriplet,
    CrossModalContrast,
    EMASchedule,
    Head,
    MoCo,
    Optimization,
    SimCLR,
)

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def _backbone(args) -> dict:
    # The same narrow backbone for every method, so that only the method differs.
    return dict(backbone=args.backbone, backbone_kwargs={"width_mult": args.width})


def _optim(args, **fields) -> dict:
    # One optimiser for every method: the papers' SGD settings are tuned for hundreds of epochs
    # (SimCLR with SGD at lr 0.1 was still at the chance loss log(2B - 1) after 75 steps here),
    # and a short run has a few hundred steps. `--optimizer sgd` keeps each method's own default
    # (but for the `fields` given).
    if args.optimizer != "sgd":
        fields = dict(optimizer=args.optimizer, lr=args.lr, weight_decay=1e-4,
                      lr_schedule="cosine", **fields)
    return {"optim": Optimization(**fields)}


class _Supervised(SimCLR):
    """Cross-entropy on the true classes, the same backbone and optimiser: what this backbone
    learns of the classes in this budget when it is told them (an upper bound, not SSL).

    A SimCLR subclass for SimCLR's optimiser defaults (no decay on biases and norms), so that
    only the loss differs from the ``simclr`` row; its projection head is unused.
    """

    views = ("anchor",)

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.classifier = torch.nn.Linear(self.feature_dim, num_classes)

    def compute_loss(self, batch):
        logits = self.classifier(self.backbone(batch["views"][0]))
        return torch.nn.functional.cross_entropy(logits, batch["label"])


class _PseudoCE(ClusterTriplet):
    """Cross-entropy on the pseudo-labels (DeepCluster's loss) instead of SLIC's triplets.

    The ``supervised`` row with the clusters in place of the true classes: a linear classifier
    over at most ``max_classes`` clusters, reset whenever the labels change (DeepCluster
    re-initialises it after every clustering), on the anchor clips only.
    """

    def __init__(self, max_classes: int, **kwargs) -> None:
        super().__init__(temporal_weight=0.0, **kwargs)
        self.views, self.motion_views = ("anchor",), ()
        self.classifier = torch.nn.Linear(self.feature_dim, max_classes)
        self._labels_seen: Optional[torch.Tensor] = None

    def compute_loss(self, batch):
        if self.pseudo_labels is None:
            raise RuntimeError("no pseudo-labels yet: cluster from epoch 0")
        if self._labels_seen is None or not torch.equal(self._labels_seen, self.pseudo_labels):
            self._labels_seen = self.pseudo_labels.clone()
            self.classifier.reset_parameters()
        labels = self.pseudo_labels.to(batch["index"].device)[batch["index"]]
        logits = self.classifier(self.backbone(batch["views"][0]))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1)}


def _pseudo_labels(args, start_epoch: Optional[int] = None, **kw) -> PseudoLabels:
    # Before --start-epoch there are no labels: every video is its own class (instance
    # discrimination), and the first clustering uses the network trained that way.
    start = args.start_epoch if start_epoch is None else start_epoch
    if args.every == 0:  # cluster once, the starting weights' features, and keep the labels
        kw["cluster_before_training"] = True
    if args.num_clusters is not None:
        kw.setdefault("num_clusters", args.num_clusters)
    if args.level:
        kw.setdefault("level", args.level)
    if getattr(args, "teacher_weights", None):  # A>B: the clusters of A's features
        kw["initial_weights"] = args.teacher_weights
    if args.oracle:  # the true classes as pseudo-labels: the upper bound of the clustering
        kw = {"oracle": True, "modality": kw.get("modality", "rgb")}
    return PseudoLabels(every_n_epochs=args.every, start_epoch=start,
                        p_same=args.p_same, seed=args.seed, **kw)  # fmt: skip


#: CrossModalContrast rows: (rgb_weight, motion_weight, cross_weight).
_CROSS_MODAL = {"xmodal": (0.0, 1.0, 1.0), "xmodal_maclr": (1.0, 0.0, 1.0),
                "xmodal_cross": (0.0, 0.0, 1.0), "xmodal_all": (1.0, 1.0, 1.0)}


def _build(name: str, args, start_epoch: Optional[int] = None):
    """Return (method, callbacks, data module settings) of a method name."""
    if name == "random":
        return SimCLR(**_backbone(args)), [], {}
    if name == "supervised":
        method = _Supervised(args.classes, **_optim(args), **_backbone(args))
        return method, [], {"views": list(method.views)}
    if name == "simclr":
        return SimCLR(**_optim(args), **_backbone(args)), [], {}
    if name in ("simclr_cvrl", "simclr_videosimclr"):
        # The two view schemes (docs/data.md): independent clips of the video (CVRL) against
        # both views from one clip, each shifted by up to --shift frames (videoSimCLR thesis).
        preset = name.split("_")[1]
        extra = {"max_shift": args.shift} if preset == "videosimclr" else {}
        return SimCLR(**_optim(args), **_backbone(args)), [], {"temporal_preset": preset, **extra}
    if name == "moco":
        # As for ClusterContrast below: --ema instead of 0.999 for a short run, and a queue of
        # two batches (a multiple of the batch, as MoCo requires).
        method = MoCo(version=2, queue_size=2 * args.batch, ema=EMASchedule(momentum=args.ema),
                      bn_splits=args.bn_splits, mask_own_video=args.mask_own_video,
                      **_optim(args), **_backbone(args))  # fmt: skip
        return method, [], {}
    if name == "slic":
        method = ClusterTriplet(margin=args.margin, **_optim(args), **_backbone(args))
        labels = _pseudo_labels(args, start_epoch)
        return method, [labels], {"views": list(method.views)}
    if name == "ce_flow":  # DeepCluster's loss on clusters of the flow view's features
        method = _PseudoCE(max_classes=args.videos_per_class * args.classes, motion_channels=2,
                           **_optim(args), **_backbone(args))  # fmt: skip
        labels = _pseudo_labels(args, start_epoch, modality=args.bank)
        return method, [labels], {"views": ["anchor"], "motion": "flow",
                                  "flow_dir": args.flow_dir, "motion_views": []}
    if name.startswith("slic_"):
        # SLIC's multi-view (ClusterTriplet motion_prob, official 0.25): the positive and the
        # re-augmented anchor each replaced by their motion field, x copied to 3 channels.
        # Frame differences are 3-channel RGB: they take their own stem (xy), not SLIC's x3.
        source = name.split("_", 1)[1]
        channels, stem = (3, "xy") if source == "diff" else (2, args.motion_input)
        method = ClusterTriplet(motion_prob=args.motion_prob, motion_input=stem,
                                motion_channels=channels, temporal_weight=args.temporal_weight,
                                margin=args.margin, **_optim(args), **_backbone(args))  # fmt: skip
        labels = _pseudo_labels(args, start_epoch, modality=args.bank)
        dm_kw = {"views": list(method.views), "motion": source,
                 "motion_views": list(method.motion_views)}
        if source == "flow":
            dm_kw["flow_dir"] = args.flow_dir
        return method, [labels], dm_kw
    if name == "goca":
        # GOCA on RGB and stored flow, scaled down for a few hundred short clips: --goca-prototypes
        # prototypes (the paper's 1000 are for Kinetics), short clips cut from the long ones, the
        # cross-view prior from the middle of training (the official start is epoch 100 of 600).
        method = GOCA(motion_channels=2, num_prototypes=args.goca_prototypes,
                      prototype_steps=2000, prior_start_epoch=max(1, args.epochs // 2),
                      num_short_clips=2, short_clips_from="long", head=Head(hidden_dim=128),
                      **_optim(args, warmup_epochs=0.0), **_backbone(args))  # fmt: skip
        dm_kw = {"views": list(method.views), "motion": "flow", "flow_dir": args.flow_dir,
                 "motion_views": list(method.motion_views)}
        return method, [_SourceNMI()], dm_kw
    if name in _CROSS_MODAL:
        # CrossModalContrast on RGB and stored flow; the rows differ by the terms weighted in
        # (rgb, motion, cross): its default, MaCLR's, the cross term alone, all three.
        rgb, motion, cross = _CROSS_MODAL[name]
        source = args.xmodal_motion
        method = CrossModalContrast(motion_channels=3 if source == "diff" else 2,
                                    rgb_weight=rgb, motion_weight=motion, cross_weight=cross,
                                    **_optim(args), **_backbone(args))  # fmt: skip
        dm_kw = {"views": list(method.views), "motion": source,
                 "motion_views": list(method.motion_views)}
        if source == "flow":
            dm_kw["flow_dir"] = args.flow_dir
        return method, [], dm_kw
    if name == "cluster_contrast":
        # A short run has few steps: MoCo's key momentum 0.999 would leave the key encoder near
        # its initial weights, so --ema (0.9) is used; the queue holds two batches of keys.
        method = ClusterContrast(queue_size=2 * args.batch, ema=EMASchedule(momentum=args.ema),
                                 hard_fraction=args.hard_fraction, positives=args.cc_positives,
                                 drop_fraction=args.drop_fraction, bn_splits=args.bn_splits,
                                 **_optim(args), **_backbone(args))  # fmt: skip
        # --cc-clustering finch: FINCH's finest partition (SLIC's labels) instead of the default
        # agglomerative N / 10 (ward), to separate the clustering from the loss; average: the
        # same cut of an average-linkage tree (the default before 2026-12-01).
        clustering = {
            "default": {},
            "finch": {"method": "finch", "level": 0},
            "average": {"method": "agglomerative", "clustering_kwargs": {"linkage": "average"}},
        }[args.cc_clustering]
        if args.cc_features:  # which features are clustered (its default: the backbone's)
            clustering["features"] = args.cc_features
        labels = _pseudo_labels(args, start_epoch, cluster_fraction=args.cluster_fraction,
                                **clustering)  # fmt: skip
        return method, [labels], {}
    raise SystemExit(f"unknown method {name!r}; valid: simclr, simclr_cvrl, simclr_videosimclr, "
                     "moco, slic, slic_flow, slic_mv, slic_diff, ce_flow, goca, xmodal, "
                     "xmodal_maclr, xmodal_cross, xmodal_all, cluster_contrast, "
                     "supervised, A+B (A for --start-epoch epochs, then B from its backbone) "
                     "or A>B (B on the clusters of A's features)")


class _SourceNMI(pl.Callback):
    """Records, after every epoch, the NMI against the classes of a labeller's state.

    For a method that is its own labeller (GOCA: ``pseudo_label_state``, the pseudo-label
    contract's ``PseudoLabelSource``), in the rows of the ``PseudoLabels`` history.
    """

    def __init__(self) -> None:
        self.history: list = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from vidssl.clustering import clustering_metrics

        state = pl_module.pseudo_label_state
        truth = trainer.datamodule.train_labels
        if state is None:
            return
        seen = state.labels >= 0
        m = clustering_metrics(state.labels[seen], truth[seen], ami=True)
        m.update(epoch=trainer.current_epoch, num_clusters=int(len(set(state.labels[seen]))),
                 size_max=int(max(np.bincount(state.labels[seen]))))
        self.history.append(m)


def _motion_rows(method, root: str, args, dm_kw: dict, name: str, tag: str = "") -> list:
    """Rows ``(label, 0.0, result)`` of ``method`` retrieving by motion and by both.

    Empty for a method trained without a motion view (``dm_kw`` names none).
    """
    if not dm_kw.get("motion"):
        return []
    dm = _datamodule(root, args, motion=dm_kw["motion"], flow_dir=dm_kw.get("flow_dir"))
    return [(f"{name} [{features}{tag}]", 0.0,
             evaluate_retrieval(method, dm, num_clips=args.num_clips, features=features,
                                projection=args.projection))
            for features in ("motion", "both")]  # fmt: skip


class _LastEpoch(pl.Callback):
    """Keeps the logged epoch means of the last training epoch (the trainer clears them)."""

    def __init__(self) -> None:
        self.logged: dict = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()}


class _Curve(pl.Callback):
    """Prints R@1 (and SLIC's distances) every ``every`` epochs: where a run plateaus or lifts.

    The evaluation runs with the random states saved and restored, so the training draws are
    those of a run without the curve.
    """

    def __init__(self, every: int, root: str, args) -> None:
        self.every, self.root, self.args = every, root, args

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every:
            return
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        res = evaluate_retrieval(pl_module, _datamodule(self.root, self.args),
                                 num_clips=self.args.num_clips, projection=self.args.projection)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        dist = (f", dist_same {logged['train/dist_same']:.3f}, dist_other "
                f"{logged['train/dist_other']:.3f}" if "train/dist_same" in logged else "")
        print(f"  after epoch {epoch}: R@1 {res.recall[1]:.3f}{dist}", flush=True)


def _fit(method, callbacks, dm: VideoDataModule, epochs: int, save_to: Optional[str] = None
         ) -> float:
    """Train ``method`` for ``epochs`` epochs on the CPU; return the minutes it took.

    ``save_to``: write a Lightning checkpoint of the trained method there.
    """
    last = _LastEpoch()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[*callbacks, last],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(method, datamodule=dm)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    logged = last.logged
    if "train/dist_same" in logged:  # ClusterTriplet's collapse diagnostic, last epoch's mean
        print(f"{type(method).__name__} last epoch: cosine distance between rows of the same "
              f"pseudo-class {logged['train/dist_same']:.3f}, of other pseudo-classes "
              f"{logged['train/dist_other']:.3f}, triplet loss {logged['train/triplet_loss']:.3f} "
              f"(margin {method.margin})", flush=True)
    return (time.perf_counter() - start) / 60


_NO_COLOUR = {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}


def _datamodule(root: str, args, **kw) -> VideoDataModule:
    settings = dict(
        train=root,
        clip_len=args.clip_len,
        stride=2,
        short_side=args.crop,
        crop_size=args.crop,
        batch_size=args.batch,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        backend="pyav",
        # The classes are directions of motion and a horizontal flip turns MoveLeft into
        # MoveRight, so no flip; crops keep 40-100 % of the frame (SimCLR's 8 % leaves a small
        # frame without the blob); colour changes are left out (the look is not what is
        # learned) unless --colour asks for SimCLR's jitter, grayscale and blur.
        train_augmentation=VideoAugmentation(args.crop, scale=(0.4, 1.0), flip_p=0.0,
                                             **({} if args.colour else _NO_COLOUR)),
    )
    settings.update(kw)
    return VideoDataModule(**settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="*", default=["simclr", "moco", "slic", "cluster_contrast"])
    ap.add_argument("--root", default=None, help="where to write the collection (default: tmp)")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--videos-per-class", type=int, default=40)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--appearance", choices=("shared", "per_video"), default="shared")
    ap.add_argument("--clip-len", type=int, default=8)
    ap.add_argument("--size", type=int, default=40, help="frame side (square)")
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--backbone", default="r3d_18")
    ap.add_argument("--width", type=float, default=0.125, help="backbone width multiplier")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--every", type=int, default=5,
                    help="re-clustering period (epochs); 0: cluster once, before training")
    ap.add_argument("--start-epoch", type=int, default=0, help="first re-clustering epoch")
    ap.add_argument("--shift", type=int, default=8,
                    help="simclr_videosimclr: largest shift of each view from the source clip")
    ap.add_argument("--p-same", type=float, default=0.2, help="same-video positive probability")
    ap.add_argument("--motion-prob", type=float, default=0.25,
                    help="slic_flow / slic_mv / slic_diff: share of positives (and, drawn "
                    "apart, re-augmented anchors) replaced by motion (SLIC: 0.25)")
    ap.add_argument("--temporal-weight", type=float, default=1.0,
                    help="slic_*: weight of SLIC's temporal discrimination term (SLIC: 1; 0 "
                    "drops it and its re-augmented anchor)")
    ap.add_argument("--margin", type=float, default=0.2,
                    help="slic, slic_*: the triplet margin m1 (SLIC: 0.2)")
    ap.add_argument("--motion-input", choices=("x3", "xy"), default="x3",
                    help="slic_*: motion through the RGB stem (x3, SLIC's) or its own stem (xy)")
    ap.add_argument("--bank", choices=("rgb", "motion", "both"), default="rgb",
                    help="slic_*: what the pseudo-labels cluster: RGB (SLIC's), the motion "
                    "view or both (PseudoLabels modality)")
    ap.add_argument("--num-clusters", type=int, default=None,
                    help="cluster-guided methods: the cluster count (FINCH's req_clust; "
                    "default: the method's own, FINCH's finest level for SLIC)")
    ap.add_argument("--level", type=int, default=0,
                    help="cluster-guided methods: FINCH's partition, 0 the finest")
    ap.add_argument("--oracle", action="store_true",
                    help="cluster-guided methods: the true classes instead of clusters (an "
                    "upper bound, not self-supervised; SLIC's 'Supervised SLIC')")
    ap.add_argument("--goca-prototypes", type=int, default=30, help="goca: prototypes K")
    ap.add_argument("--xmodal-motion", choices=("flow", "mv", "diff"), default="flow",
                    help="xmodal*: the motion stream's source (stored flow, motion vectors, "
                    "frame differences)")
    ap.add_argument("--flow-method", default="dis",
                    help="slic_flow: how `vidssl flow` computes the flow (tvl1, dis, farneback)")
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="adamw (lr --lr, cosine) for every method, or sgd: each its own default")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    ap.add_argument("--ema", type=float, default=0.9, help="MoCo, ClusterContrast key momentum")
    ap.add_argument("--bn-splits", type=int, default=2,
                    help="MoCo, ClusterContrast: BN groups on one device (1: whole batch)")
    ap.add_argument("--mask-own-video", action="store_true",
                    help="MoCo: leave queued keys of a query's own video out of its negatives")
    ap.add_argument("--cluster-fraction", type=float, default=None,
                    help="ClusterContrast: clusters as a share of N (default: its own, 0.1)")
    ap.add_argument("--cc-clustering", choices=("default", "finch", "average"),
                    default="default", help="ClusterContrast: its agglomerative default "
                    "(ward linkage), FINCH's finest level, or average linkage")
    ap.add_argument("--cc-features", choices=("backbone", "projection"), default=None,
                    help="ClusterContrast: features clustered (default: its own, backbone)")
    ap.add_argument("--cc-positives", choices=("cluster", "sampled"), default="cluster",
                    help="ClusterContrast: every key of the query's pseudo-class, or only its "
                    "sampled positive key")
    ap.add_argument("--hard-fraction", type=float, default=0.05,
                    help="ClusterContrast: share of negatives kept (Cai et al.: 0.05)")
    ap.add_argument("--drop-fraction", type=float, default=0.001,
                    help="ClusterContrast: share of the very hardest negatives dropped first "
                    "(Cai et al.: 0.001)")
    ap.add_argument("--colour", action="store_true",
                    help="SimCLR's colour jitter, grayscale and blur on the training clips "
                    "(VideoAugmentation's defaults) instead of none")
    ap.add_argument("--projection", action="store_true",
                    help="retrieve with the projection head's outputs (SLIC's published "
                    "protocol) instead of the backbone's features")
    ap.add_argument("--num-clips", type=int, default=5, help="eval clips per video")
    ap.add_argument("--curve-every", type=int, default=0,
                    help="print R@1 every N training epochs (0: only at the end)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="initial weights and sampling")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="reseed after building, before training: the sampling, augmentation "
                    "and clustering draws of --seed's starting weights (default: --seed's own)")
    ap.add_argument("--data-seed", type=int, default=0,
                    help="the collection's seed: keep it fixed to compare --seed values")
    args = ap.parse_args()

    root = args.root or tempfile.mkdtemp(prefix="vidssl_synth_")
    if not os.path.isdir(os.path.join(root, "ucfTrainTestlist")):
        write_synthetic_dataset(root, num_classes=args.classes,
                                videos_per_class=args.videos_per_class,
                                num_frames=args.frames, seed=args.data_seed, width=args.size,
                                height=args.size, appearance=args.appearance)  # fmt: skip
    args.flow_dir = os.path.join(root, f"flow_{args.flow_method}")
    # Stored flow only where a row reads it (xmodal rows read --xmodal-motion).
    with_flow = ("slic_flow", "goca", "ce_flow") + (
        tuple(_CROSS_MODAL) if args.xmodal_motion == "flow" else ())
    if any(part in with_flow for m in args.methods for part in m.replace(">", "+").split("+")):
        from vidssl.data.flow import flow_dataset

        t0 = time.perf_counter()
        flow_dataset(os.path.join(root, "UCF-101"), args.flow_dir, method=args.flow_method,
                     short_side=args.crop, progress=False)  # fmt: skip
        print(f"flow ({args.flow_method}) of the collection: {time.perf_counter() - t0:.1f} s "
              "(kept for later runs)", flush=True)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, no GPU used; torch "
          f"{torch.__version__}; load average {os.getloadavg()}")  # fmt: skip
    print(f"collection: {args.classes} motion classes x {args.videos_per_class} videos of "
          f"{args.frames} frames {args.size}x{args.size}, {args.appearance} appearance, "
          f"collection seed {args.data_seed}, seed {args.seed}"
          f"{'' if args.train_seed is None else f' (training draws: seed {args.train_seed})'}; "
          f"{args.backbone} width {args.width}, clips {args.clip_len} x "
          f"{args.crop}px, batch {args.batch}, {args.epochs} epochs, re-clustering every "
          f"{args.every} epochs from epoch {args.start_epoch}, p_same {args.p_same}, "
          f"{args.optimizer} lr {args.lr}, colour changes {'on' if args.colour else 'off'}, "
          f"eval {args.num_clips} clips of {'projection' if args.projection else 'backbone'} "
          "features", flush=True)

    rows, histories = [], {}
    for name in ["random"] + args.methods:
        # "simclr+slic": SimCLR for --start-epoch epochs, then SLIC from those backbone weights
        # for the rest, clustering from its first epoch (pseudo-labels from a pretrained network).
        first, _, second = name.rpartition("+")
        # "xmodal>slic_flow": CrossModalContrast for --start-epoch epochs as a teacher, then SLIC
        # from the common starting weights on the clusters of the teacher's --bank features.
        teacher, _, second = second.rpartition(">")
        args.teacher_weights = None
        if teacher:
            if first:
                raise SystemExit(f"{name}: use A+B or A>B, not both")
            fd, args.teacher_weights = tempfile.mkstemp(suffix=f"_{teacher}.ckpt")
            os.close(fd)  # the teacher's checkpoint is written there; removed after the row
        # The same seed before building: every method starts from the same backbone weights.
        pl.seed_everything(args.seed, verbose=False)
        # After a pretraining stage, clustering starts at once (pseudo-labels from its weights).
        method, callbacks, dm_kw = _build(second, args, start_epoch=0 if first else None)
        if args.train_seed is not None:  # the same starting weights, other training draws
            pl.seed_everything(args.train_seed, verbose=False)
            for cb in callbacks:
                if isinstance(cb, PseudoLabels):
                    cb.seed = args.train_seed
        minutes = 0.0
        # Its own starting weights on motion: the baseline to beat there.
        starts = _motion_rows(method, root, args, dm_kw, name, ", start")
        if name != "random":
            epochs = args.epochs
            if first:
                # The first stage with its own data settings (a two-stream method reads motion).
                pretrained, _, first_kw = _build(first, args)
                pretrained.backbone.load_state_dict(method.backbone.state_dict())
                minutes += _fit(pretrained, [], _datamodule(root, args, **first_kw),
                                args.start_epoch)  # fmt: skip
                method.backbone.load_state_dict(pretrained.backbone.state_dict())
                for online, momentum in method.momentum_pairs():  # keys start as the queries
                    momentum.load_state_dict(online.state_dict())
                epochs -= args.start_epoch
            if teacher:
                # The teacher from the same starting RGB weights, with its own data settings.
                taught, _, teacher_kw = _build(teacher, args)
                taught.backbone.load_state_dict(method.backbone.state_dict())
                minutes += _fit(taught, [], _datamodule(root, args, **teacher_kw),
                                args.start_epoch, save_to=args.teacher_weights)  # fmt: skip
                epochs -= args.start_epoch
            curve = [_Curve(args.curve_every, root, args)] if args.curve_every > 0 else []
            minutes += _fit(method, callbacks + curve, _datamodule(root, args, **dm_kw), epochs)
        res = evaluate_retrieval(method, _datamodule(root, args), num_clips=args.num_clips,
                                 projection=args.projection)  # fmt: skip
        rows.append((name, minutes, res))
        rows.extend(starts)
        for row in _motion_rows(method, root, args, dm_kw, name):  # trained, by motion and both
            rows.append(row)
            print(f"{row[0]}: R@1 {row[2].recall[1]:.3f}", flush=True)
        for cb in callbacks:
            if isinstance(cb, (PseudoLabels, _SourceNMI)):
                histories[name] = cb.history
            levels = getattr(cb, "diagnostics", {}).get("clustering", {}).get("level_clusters")
            if levels:  # FINCH's partitions of the latest clustering
                print(f"{name}: FINCH's levels of the latest clustering: {levels} clusters")
        if args.teacher_weights:
            os.remove(args.teacher_weights)
        print(f"{name}: R@1 {res.recall[1]:.3f} after {minutes:.1f} min", flush=True)

    ks = list(rows[0][2].recall)
    r = rows[0][2]
    print(f"\nqueries (test) {r.num_queries}, gallery (train) {r.num_gallery}, "
          f"{r.similarity}, centre={r.center}, chance R@1 ~ {1 / args.classes:.3f}")
    print(f"{'method':17} {'train min':>9} " + " ".join(f"{'R@' + str(k):>6}" for k in ks)
          + f" {'R@1/random':>10} {'R@1/SimCLR':>10}")  # fmt: skip
    base = rows[0][2].recall[1]
    simclr = dict((n, x) for n, _, x in rows).get("simclr")
    for name, minutes, res in rows:
        ratio = res.recall[1] / base if base > 0 else float("nan")
        vs = res.recall[1] / simclr.recall[1] if simclr and simclr.recall[1] > 0 else float("nan")
        print(f"{name:17} {minutes:9.1f} " + " ".join(f"{res.recall[k]:6.3f}" for k in ks)
              + f" {ratio:10.2f} {vs:10.2f}")  # fmt: skip
    for name, hist in histories.items():
        print(f"\npseudo-labels of {name} (one row per re-clustering):")
        print(f"{'epoch':>5} {'clusters':>8} {'largest':>7} {'NMI':>6} {'homog':>6} {'AMI':>6} "
              f"{'pos FP':>7} {'neg FN':>7} {'hard FN':>7}")  # fmt: skip
        nan = float("nan")
        for h in hist:
            print(f"{h['epoch']:5d} {h['num_clusters']:8d} {h['size_max']:7d} "
                  f"{h.get('nmi', nan):6.3f} {h.get('homogeneity', nan):6.3f} "
                  f"{h.get('ami', nan):6.3f} {h.get('positive_fp_rate', nan):7.3f} "
                  f"{h.get('negative_fn_rate', nan):7.3f} "
                  f"{h.get('hard_negative_fn_rate', nan):7.3f}")  # fmt: skip
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
