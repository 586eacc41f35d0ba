"""The feature pass: a model over a loader gives one feature per video, each video once.

Used by the retrieval protocol, the ``PseudoLabels`` bank, the ``RetrievalMonitor`` and
``embed_videos``: a video's feature is the mean of its clips' features, of its RGB clips, its
motion fields or both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vidssl import distributed as vdist

__all__ = [
    "COMBINE",
    "FEATURES",
    "VideoFeatures",
    "check_features",
    "clip_mean",
    "combine_features",
    "feature_pass",
    "video_features",
]

#: Which clips a video's feature is made of: its RGB clips, its motion fields, or both.
FEATURES: Tuple[str, ...] = ("rgb", "motion", "both")
#: How ``features="both"`` joins the two L2-normalised features of a video.
COMBINE: Tuple[str, ...] = ("mean", "concat")


def check_features(features: str, combine: str = "mean", model: Optional[nn.Module] = None
                   ) -> None:
    """Raise ``ValueError`` unless ``features`` / ``combine`` are known and ``model`` can do them.

    A ``features`` other than ``"rgb"`` needs a model with ``encode_motion`` (checked when
    ``model`` is given).
    """
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; valid: {', '.join(FEATURES)}")
    if combine not in COMBINE:
        raise ValueError(f"unknown combine {combine!r}; valid: {', '.join(COMBINE)}")
    if model is not None and features != "rgb" and not callable(
        getattr(model, "encode_motion", None)
    ):
        raise ValueError(
            f"features={features!r} needs a model that encodes motion (encode_motion): a "
            "ClusterTriplet trained with motion_prob > 0, a vidssl.backbones.SharedEncoder or "
            f"TwoStream; {type(model).__name__} has none, use features='rgb'"
        )


def combine_features(rgb: torch.Tensor, motion: torch.Tensor, combine: str = "mean"
                     ) -> torch.Tensor:
    """Join per-video RGB and motion features ``N x D`` into one, for ``features="both"``.

    Each is L2-normalised first, so neither modality outweighs the other by its scale; then
    ``"mean"`` averages them (``N x D``, needs equal ``D``) and ``"concat"`` concatenates them
    (``N x (D + D')``): the cosine similarity of two concatenations is the mean of the two
    modalities' cosine similarities (late fusion of the similarities).
    """
    rgb = F.normalize(rgb.float(), dim=1)
    motion = F.normalize(motion.float(), dim=1)
    if combine == "concat":
        return torch.cat([rgb, motion], dim=1)
    if rgb.shape != motion.shape:
        raise ValueError(
            f"combine='mean' needs RGB and motion features of one size, got {rgb.shape[1]} and "
            f"{motion.shape[1]}; use combine='concat'"
        )
    return (rgb + motion) / 2


def clip_mean(encode: Callable[[torch.Tensor], torch.Tensor], clips: Sequence[torch.Tensor],
              head: Optional[nn.Module] = None) -> torch.Tensor:
    """Return ``B x D``: the mean over ``K`` clips of ``B`` videos of their features.

    ``clips[k]`` is clip ``k`` of every video (``B x ...``, the batch contract's ``views``);
    all ``K * B`` clips go through ``encode`` (then ``head`` when given) in one forward pass.
    """
    out = encode(torch.cat(list(clips), dim=0))
    if head is not None:
        out = head(out)
    if len(clips) == 1:
        return out
    return out.view(len(clips), clips[0].shape[0], -1).mean(dim=0)


def _motion_clips(batch: Dict[str, Any], num_clips: int) -> List[torch.Tensor]:
    motion = batch.get("motion")
    have = sorted(motion) if isinstance(motion, dict) else []
    if any(i not in have for i in range(num_clips)):
        raise ValueError(
            f"motion features need the motion field of every clip (positions 0..{num_clips - 1})"
            f" in the eval batch, it has {have}; build the data module with motion='flow' "
            "(and flow_dir), 'mv' or 'diff' and no motion_views"
        )
    return [motion[i] for i in range(num_clips)]


def video_features(
    model: nn.Module,
    batch: Dict[str, Any],
    features: str = "rgb",
    combine: str = "mean",
    head: Optional[nn.Module] = None,
    encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Return the features ``B x D`` of the ``B`` videos of one float batch on the device.

    ``"rgb"``: :func:`clip_mean` of the ``views`` through ``encode`` (default: the model's
    ``encode_rgb`` when it has one, else the model); ``"motion"``: of the motion fields
    (``batch["motion"][k]`` float ``B x M x T x H x W`` for clip ``k``) through
    ``model.encode_motion``; ``"both"``: the two joined by :func:`combine_features`.
    """
    views = batch["views"]
    rgb = motion = None
    if features != "motion":
        rgb = clip_mean(encode or getattr(model, "encode_rgb", None) or model, views, head)
    if features != "rgb":
        motion = clip_mean(model.encode_motion, _motion_clips(batch, len(views)), head)
    if motion is None:
        return rgb
    return motion if rgb is None else combine_features(rgb, motion, combine)


@dataclass
class VideoFeatures:
    """What a feature pass returns, on the CPU.

    Attributes:
        features: ``N x D``, one row per video (the mean over its clips).
        labels: ``N`` class ids (``-1`` where unknown).
        index: ``N`` dataset indices.
        skipped: dataset indices the loader could not decode and left out (a batch's
            ``skipped_index``).
    """

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    skipped: torch.Tensor


@torch.no_grad()
def feature_pass(
    model: nn.Module,
    loader: Any,
    augment: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
    *,
    encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    projection: bool = False,
    features: str = "rgb",
    combine: str = "mean",
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    progress: Optional[str] = None,
    gather: bool = False,
) -> VideoFeatures:
    """Embed every video of ``loader`` with ``model`` in eval mode: one feature per video.

    Each batch of the batch contract has its ``views`` (and, for motion features, its
    ``motion``) moved to ``device``, then ``augment`` turns uint8 views into float ones (e.g.
    ``lambda b: dm.augment(b, train=False)``), then :func:`video_features` averages the clips.
    The model's training mode is restored afterwards. Batches without views (every video
    skipped) only contribute their ``skipped_index``.

    Args:
        model: the module put in eval mode; encodes the clips unless ``encode`` is given.
        loader: any iterable of batches (a ``DataLoader``, a list, a progress bar).
        augment: ``callable(batch) -> batch`` on the device; ``None`` when views are float.
        encode: ``clips B x C x T x H x W -> B x D`` used instead of the model for RGB clips.
        projection: put the model's ``projection`` head on every clip's feature.
        features: ``"rgb"``, ``"motion"`` or ``"both"`` (:data:`FEATURES`).
        combine: ``"mean"`` or ``"concat"`` (``features="both"`` only).
        device: where to run (default: the model's device).
        dtype: dtype of the returned features.
        progress: when given, show a progress bar (tqdm) with this description.
        gather: under DDP, gather every rank's share; always keep each dataset index once
            (the first of a ``DistributedSampler``'s repeats), rows sorted by index.
    """
    check_features(features, combine, model)
    if progress is not None:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=progress, unit="batch")
    device = device or next(model.parameters()).device
    head = model.projection if projection else None
    was_training = model.training
    model.eval()  # BN running statistics, no dropout: features of the model as it is
    feats, labels, indices, skipped = [], [], [], []
    try:
        for batch in loader:
            batch = dict(batch)
            if "skipped_index" in batch:
                skipped.append(torch.as_tensor(batch["skipped_index"]).long().cpu())
            if not batch["views"]:
                continue
            batch["views"] = [v.to(device) for v in batch["views"]]
            if features != "rgb" and isinstance(batch.get("motion"), dict):
                batch["motion"] = {k: v.to(device) for k, v in batch["motion"].items()}
            if augment is not None:
                batch = augment(batch)
            out = video_features(model, batch, features, combine, head, encode)
            feats.append(out.to("cpu", dtype))
            labels.append(torch.as_tensor(batch["label"]).cpu())
            indices.append(torch.as_tensor(batch["index"]).cpu())
    finally:
        model.train(was_training)
    result = VideoFeatures(
        torch.cat(feats) if feats else torch.zeros(0, 0, dtype=dtype),
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        torch.cat(skipped) if skipped else torch.zeros(0, dtype=torch.long),
    )
    if gather:
        result.index, result.features, result.labels = vdist.gather_unique(
            result.index, result.features, result.labels, device=device
        )
    return result
