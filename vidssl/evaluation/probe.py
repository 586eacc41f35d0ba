"""Supervised evaluation of a pretrained backbone: linear probe and full fine-tuning.

Both are LightningModules (``vidssl fit --model LinearProbe``) reporting top-1 accuracy at video
level: the softmax outputs of a video's evaluation clips are averaged before the argmax.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from vidssl.methods.base import log_decode_failures

__all__ = ["FineTune", "LinearProbe", "VideoClassifier", "video_probs"]


def video_probs(clip_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return video-level probabilities ``B x classes`` of clip logits ``K x [B x classes]``.

    The softmax outputs of a video's ``K`` clips are averaged (the multi-clip protocol of CoCLR's
    ``test_10crop`` and of 3D-ResNets); the argmax is the video's prediction.
    """
    return torch.stack([F.softmax(lg.float(), dim=1) for lg in clip_logits]).mean(0)


class VideoClassifier(pl.LightningModule):
    """A backbone and a linear classifier trained on labels.

    Use :class:`LinearProbe` or :class:`FineTune`, which set the defaults of each protocol.
    Training reads ``views[0]`` and ``label`` of the batch (the data module gives one clip per
    video: ``num_views = 1``); validation and test read every view (the data module's
    ``eval_num_clips`` clips) and log ``val/top1`` / ``test/top1`` at video level, plus the
    clip-level ``val/clip_top1``.

    Args:
        num_classes: number of classes (UCF101: 101, HMDB51: 51).
        backbone: a name of ``vidssl.backbones``.
        backbone_kwargs: further arguments of the backbone (e.g. ``width_mult``).
        weights: pretrained weights: a vidssl ``.ckpt`` (its ``backbone.`` weights), an exported
            ``.pth`` or torchvision / Hara weights; ``None`` trains from scratch.
        train_backbone: fine-tune the backbone (``False``: frozen, BN statistics too).
        backbone_lr_ratio: backbone learning rate as a fraction of ``lr`` when fine-tuning.
        feature_norm: BatchNorm1d then L2 normalisation of the features before the classifier.
        dropout: dropout before the classifier.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr: learning rate of the classifier.
        weight_decay: weight decay.
        milestones: epochs at which the learning rate is divided by 10.
        label_smoothing: cross-entropy label smoothing.
    """

    num_views = 1

    def __init__(
        self,
        num_classes: int,
        backbone: str = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        train_backbone: bool = False,
        backbone_lr_ratio: float = 0.1,
        feature_norm: bool = True,
        dropout: float = 0.0,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        milestones: List[int] = [60, 80],  # noqa: B006 - typed list default for LightningCLI
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        from vidssl.backbones import build

        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: adam, sgd")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        # Saved from the caller's frame: LinearProbe / FineTune record their own arguments.
        self.save_hyperparameters()
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.backbone_lr_ratio, self.milestones = backbone_lr_ratio, list(milestones)
        self.label_smoothing = label_smoothing
        self.backbone = build(backbone, weights=weights, **(backbone_kwargs or {}))
        dim = int(self.backbone.feature_dim)
        self.train_backbone = train_backbone
        if not train_backbone:
            self.backbone.requires_grad_(False)
        self.final_bn = nn.BatchNorm1d(dim) if feature_norm else nn.Identity()
        self.feature_norm = feature_norm
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.val_clip_top1 = MulticlassAccuracy(num_classes, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Return class logits ``B x classes`` of float clips ``B x C x T x H x W``."""
        feats = self.final_bn(self.backbone(clips))
        if self.feature_norm:
            feats = F.normalize(feats, dim=1)
        return self.classifier(self.dropout(feats))

    def on_train_epoch_start(self) -> None:
        """Keep a frozen backbone in eval mode, so its BN statistics do not move."""
        if not self.train_backbone:
            self.backbone.eval()

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one clip per video (videos labelled ``-1`` are ignored)."""
        labels = batch["label"]
        logits = self(batch["views"][0])
        loss = F.cross_entropy(logits, labels, ignore_index=-1,
                               label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        bs = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, batch_size=bs)
        self.log("train/top1", acc, on_epoch=True, on_step=False, batch_size=bs)
        log_decode_failures(self, batch)
        return loss

    def _evaluate(self, batch: Dict[str, Any], stage: str) -> None:
        labels = batch["label"]
        logits = [self(v) for v in batch["views"]]
        probs = video_probs(logits)
        metric = self.val_top1 if stage == "val" else self.test_top1
        metric.update(probs, labels)
        self.log(f"{stage}/top1", metric, prog_bar=True, on_epoch=True, on_step=False)
        if stage == "val":
            self.val_clip_top1.update(torch.cat(logits), labels.repeat(len(logits)))
            self.log("val/clip_top1", self.val_clip_top1, on_epoch=True, on_step=False)

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        """Accumulate video-level accuracy over the batch's clips."""
        self._evaluate(batch, "val")

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        """Accumulate video-level test accuracy over the batch's clips."""
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        """Adam / SGD with the backbone at ``backbone_lr_ratio * lr``; x0.1 at ``milestones``."""
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        groups = [{"params": head}]
        if self.train_backbone:
            groups.append({"params": list(self.backbone.parameters()),
                           "lr": self.lr * self.backbone_lr_ratio})
        if self.optimizer_name == "adam":
            opt = torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9,
                                  weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": sched}


class LinearProbe(VideoClassifier):
    """Linear probe: a frozen backbone (BN statistics included) and a linear classifier.

    Defaults of CoCLR's ``eval/main_classifier.py --train_what last`` (the protocol SLIC's README
    uses): Adam, ``lr=1e-3``, weight decay ``1e-3``, final BatchNorm and L2 normalisation of the
    features, no dropout, lr / 10 at epochs 60 and 80.

    Args:
        num_classes, backbone, ...: as :class:`VideoClassifier`.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        milestones: List[int] = [60, 80],  # noqa: B006
    ) -> None:
        super().__init__(num_classes, backbone, backbone_kwargs, weights, train_backbone=False,
                         feature_norm=True, dropout=0.0, optimizer=optimizer, lr=lr,
                         weight_decay=weight_decay, milestones=milestones)


class FineTune(VideoClassifier):
    """Full fine-tuning: backbone and classifier trained, the backbone at a 10x lower rate.

    Defaults of CoCLR's ``eval/main_classifier.py --train_what ft`` (used by SLIC's README):
    Adam, ``lr=1e-3`` for the classifier and ``lr / 10`` for the backbone, weight decay
    ``1e-3``, dropout 0.9 before the classifier, no feature normalisation, lr / 10 at epochs 60
    and 100 (SLIC README: ``--epochs 150 --schedule 60 100``).

    Args:
        num_classes, backbone, ...: as :class:`VideoClassifier`.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        backbone_lr_ratio: float = 0.1,
        dropout: float = 0.9,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        milestones: List[int] = [60, 100],  # noqa: B006
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_classes, backbone, backbone_kwargs, weights, train_backbone=True,
                         backbone_lr_ratio=backbone_lr_ratio, feature_norm=False,
                         dropout=dropout, optimizer=optimizer, lr=lr,
                         weight_decay=weight_decay, milestones=milestones,
                         label_smoothing=label_smoothing)
