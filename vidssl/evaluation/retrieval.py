"""Nearest-neighbour video retrieval, the protocol of the field (R@k on UCF101 / HMDB51).

Queries are the test videos, the gallery the training videos; a query is a hit at k when any
of its k nearest gallery videos (cosine similarity, exact search) has its class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import faiss
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vidssl.evaluation.features import (
    COMBINE,
    FEATURES,
    check_features,
    combine_features,
    feature_pass,
)

__all__ = [
    "COMBINE",
    "DEFAULT_KS",
    "FEATURES",
    "PROTOCOLS",
    "RetrievalResult",
    "evaluate_retrieval",
    "combine_features",
    "describe_features",
    "extract_features",
    "format_recall_table",
    "recall_at_k",
    "topk_neighbours",
]

#: The ks every paper of the field reports (e.g. Xu et al. 2019 VCOP, CoCLR, SLIC).
DEFAULT_KS: Tuple[int, ...] = (1, 5, 10, 20, 50)

def describe_features(features: str, combine: str = "mean") -> str:
    """Return how a video's feature was made from its modalities, for the protocol line."""
    if features != "both":
        return features
    how = "averaged" if combine == "mean" else "concatenated"
    return f"rgb+motion (each L2-normalised, then {how})"


#: Which clips represent a video (``evaluate_retrieval(protocol=...)``):
#:
#: - ``uniform``: ``num_clips`` evenly spread clips of every video, test and training alike,
#:   features averaged: the field's protocol (Xu et al. 2019; IIC's ``retrieve_clips.py``), and
#:   the one behind SLIC's published numbers (its README evaluates with ``iic_retrieve_clips.py``:
#:   10 clips a video, the 128-d projection-head outputs).
#: - ``slic_evaluate``: SLIC's own ``evaluate.py``: every back-to-back clip of a test video from
#:   frame 0 (``T // span`` clips, ``test_evaluate``), averaged, against one centre clip per
#:   training video (``DATA.TEMPORAL_CROP = 'center'``); ``num_clips`` is not used.
PROTOCOLS: Tuple[str, ...] = ("uniform", "slic_evaluate")


def _prepare(feats: Any, center: bool) -> np.ndarray:
    x = np.array(feats, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {x.shape}")
    if center:
        # CoCLR (TengdaHan/CoCLR eval/main_classifier.py, test_retrieval) subtracts each set's
        # own mean before normalising: it removes the direction every feature shares.
        x -= x.mean(axis=0, keepdims=True)
    faiss.normalize_L2(x)
    return x


def topk_neighbours(
    query_feats: Any, gallery_feats: Any, k: int, center: bool = False
) -> Tuple[np.ndarray, np.ndarray]:
    """Return the ``k`` most cosine-similar gallery rows of every query, exactly.

    Features are L2-normalised (after optional mean-centring) and searched with faiss
    ``IndexFlatIP``, an exact inner-product search.

    Args:
        query_feats: ``Q x D`` array-like.
        gallery_feats: ``G x D`` array-like.
        k: neighbours per query (at most ``G``).
        center: subtract each set's mean first (CoCLR).

    Returns:
        ``(similarities Q x k, gallery indices Q x k)``, most similar first.
    """
    q = _prepare(query_feats, center)
    g = _prepare(gallery_feats, center)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query and gallery feature sizes differ: {q.shape[1]} vs {g.shape[1]}")
    if not 1 <= k <= len(g):
        raise ValueError(f"k must be in [1, {len(g)}] (the gallery size), got {k}")
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    return index.search(q, k)


def recall_at_k(
    query_feats: Any,
    query_labels: Any,
    gallery_feats: Any,
    gallery_labels: Any,
    ks: Sequence[int] = DEFAULT_KS,
    center: bool = False,
) -> Dict[int, float]:
    """Return R@k for every k: the share of queries with their class among the top-k.

    The top-``max(ks)`` neighbours are searched once and every R@k is read from them. A k larger
    than the gallery is clipped to the gallery size (every gallery item is then retrieved).

    Args:
        query_feats: ``Q x D`` features of the queries (test split).
        query_labels: ``Q`` class ids.
        gallery_feats: ``G x D`` features of the gallery (train split).
        gallery_labels: ``G`` class ids.
        ks: the ks to report.
        center: mean-centre each set before normalising (CoCLR).

    Returns:
        ``{k: recall in [0, 1]}``.
    """
    ql = np.asarray(query_labels).reshape(-1)
    gl = np.asarray(gallery_labels).reshape(-1)
    if len(ql) != len(query_feats) or len(gl) != len(gallery_feats):
        raise ValueError(
            f"labels and features differ in length: {len(ql)} query labels for "
            f"{len(query_feats)} features, {len(gl)} gallery labels for {len(gallery_feats)}"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    kmax = min(max(ks), len(gl))
    _, idx = topk_neighbours(query_feats, gallery_feats, kmax, center=center)
    hits = gl[idx] == ql[:, None]  # Q x kmax
    # first_hit[i] = rank of the first correct neighbour (kmax when none): R@k = P(first < k).
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), kmax)
    return {int(k): float((first_hit < min(k, kmax)).mean()) for k in ks}


@dataclasses.dataclass
class RetrievalResult:
    """R@k with the protocol knobs that produced it (report them beside the numbers).

    Attributes:
        recall: ``{k: R@k}`` in [0, 1].
        num_queries: ``Q`` (test videos).
        num_gallery: ``G`` (training videos).
        num_clips: clips per video whose features are averaged.
        center: whether features were mean-centred (CoCLR).
        feature: which features were compared (``"backbone"`` or ``"projection"``).
        modality: which clips made them (``"rgb"``, ``"motion"`` or how both were joined, see
            :func:`describe_features`).
        similarity: the similarity and the search used.
        protocol: which clips represent a video (:data:`PROTOCOLS`).
    """

    recall: Dict[int, float]
    num_queries: int
    num_gallery: int
    num_clips: int
    center: bool
    feature: str = "backbone"
    modality: str = "rgb"
    similarity: str = "cosine, exact (faiss IndexFlatIP on L2-normalised features)"
    protocol: str = "uniform"

    @property
    def clips(self) -> str:
        """How each video was represented, in words (for the protocol line)."""
        if self.protocol == "slic_evaluate":
            return ("all back-to-back clips per test video averaged, one centre clip per "
                    "training video (SLIC's evaluate.py)")
        return f"{self.num_clips} clips per video averaged"

    def as_dict(self) -> Dict[str, Any]:
        """Return a flat dict (``R@1``, ``R@5``, ..., and the knobs), e.g. for a logger."""
        out: Dict[str, Any] = {f"R@{k}": v for k, v in self.recall.items()}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        del out["recall"]
        return out


def _eval_loader(datamodule: Any, split: str, num_clips: int):
    """Return a loader over ``split`` ("train" / "test"), ``num_clips`` uniform clips a video."""
    maker = getattr(datamodule, "eval_dataloader", None)
    if not callable(maker):
        raise TypeError(
            f"retrieval needs a data module with eval_dataloader(split, num_clips), "
            f"{type(datamodule).__name__} has none; use vidssl.data.VideoDataModule"
        )
    return maker(split, num_clips=num_clips)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Any,
    augment: Any = None,
    projection: bool = False,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    progress: Optional[str] = None,
    features: str = "rgb",
    combine: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return one feature per video: the mean over its clips' features.

    ``features`` says which clips: ``"rgb"`` (the views, through ``model.encode_rgb`` when the
    model has it, else ``model``), ``"motion"`` (the motion field of each clip,
    ``batch["motion"][i]`` float ``B x M x T x H x W`` for clip ``i``, through
    ``model.encode_motion``: for a shared encoder the motion in the format it trained with, for
    a :class:`~vidssl.backbones.TwoStream` its motion backbone) or ``"both"``: the two
    per-video features joined by :func:`combine_features` (``combine``).

    Args:
        model: a ``VideoSSLMethod`` (or any module whose ``forward`` gives ``B x D``).
        loader: yields batches of the batch contract whose ``views`` are the clips of each video.
        augment: ``callable(batch) -> batch`` turning uint8 views into float ones on the device
            (e.g. ``lambda b: dm.augment(b, train=False)``); ``None`` when views are float.
        projection: average projection-head outputs instead of backbone features.
        device: where to run the model (default: the model's device).
        dtype: dtype of the returned features (``float16`` halves the memory of a bank).
        progress: when given, show a progress bar (tqdm) with this description.
        features: ``"rgb"``, ``"motion"`` or ``"both"``.
        combine: ``"mean"`` or ``"concat"`` (``features="both"`` only).

    Returns:
        ``(features N x D on the CPU, labels N, dataset indices N)``, as
        :func:`vidssl.evaluation.features.feature_pass` makes them.
    """
    out = feature_pass(model, loader, augment, projection=projection, features=features,
                       combine=combine, device=device, dtype=dtype, progress=progress)
    return out.features, out.labels, out.index


def evaluate_retrieval(
    model: nn.Module,
    datamodule: Any,
    num_clips: int = 10,
    ks: Sequence[int] = DEFAULT_KS,
    center: bool = False,
    projection: bool = False,
    device: Optional[torch.device] = None,
    progress: bool = False,
    features: str = "rgb",
    combine: str = "mean",
    protocol: str = "uniform",
) -> RetrievalResult:
    """Run the retrieval protocol: test videos query the training videos.

    Every video is represented by the mean of its features over ``num_clips`` uniformly spaced
    clips (10 in the field's protocol), with the data module's evaluation transform (resize and
    centre crop); ``protocol="slic_evaluate"`` takes SLIC's ``evaluate.py`` clips instead
    (:data:`PROTOCOLS`). With ``features="motion"`` or ``"both"`` the clips' motion fields (the
    data module's ``motion``, centre-cropped as the RGB) are embedded too, see
    :func:`extract_features`; ``RetrievalResult.modality`` records which.

    Args:
        model: the trained method (its ``forward`` returns backbone features).
        datamodule: a ``VideoDataModule`` with training and test videos.
        num_clips: clips per video.
        ks: the ks to report.
        center: mean-centre the features (CoCLR).
        projection: compare projection-head outputs instead of backbone features.
        device: where to run the model (default: the model's device).
        progress: show a progress bar for each split's feature extraction.
        features: ``"rgb"``, ``"motion"`` or ``"both"``.
        combine: ``"mean"`` or ``"concat"``, how ``"both"`` joins the two features.
        protocol: ``"uniform"`` or ``"slic_evaluate"``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown retrieval protocol {protocol!r}; choose one of "
                         f"{', '.join(PROTOCOLS)}")
    slic = protocol == "slic_evaluate"
    check_features(features, combine, model)
    if features != "rgb" and not getattr(datamodule, "motion_channels", 0):
        raise ValueError(
            f"features={features!r} needs motion fields in the eval batches but the data module "
            "gives none; build it with motion='flow' (and flow_dir), 'mv' or 'diff' "
            "(vidssl retrieval --motion ...)"
        )
    extract = dict(projection=projection, device=device, features=features, combine=combine)

    def augment(batch):
        return datamodule.augment(batch, train=False)

    queries = _eval_loader(datamodule, "test", 0 if slic else num_clips)
    if slic:  # clip counts differ between videos: one video a batch, as SLIC's test loader
        queries = DataLoader(queries.dataset, batch_size=1, sampler=queries.sampler,
                             num_workers=queries.num_workers, collate_fn=queries.collate_fn)
    q, ql, _ = extract_features(
        model, queries, augment,
        progress="queries (test)" if progress else None, **extract,
    )
    g, gl, _ = extract_features(
        model, _eval_loader(datamodule, "train", 1 if slic else num_clips), augment,
        progress="gallery (train)" if progress else None, **extract,
    )
    recall = recall_at_k(q.numpy(), ql.numpy(), g.numpy(), gl.numpy(), ks=ks, center=center)
    return RetrievalResult(
        recall=recall,
        num_queries=len(q),
        num_gallery=len(g),
        num_clips=1 if slic else num_clips,
        center=center,
        feature="projection" if projection else "backbone",
        modality=describe_features(features, combine),
        protocol=protocol,
    )


def format_recall_table(
    results: Union[Mapping[str, RetrievalResult], Sequence[Tuple[str, RetrievalResult]]],
) -> str:
    """Format results as a table of R@k in percent, protocol line first.

    ``results`` is ``{name: RetrievalResult}`` or a sequence of ``(name, result)`` rows (a name
    may repeat, e.g. one model on two kinds of features). When the rows were made from
    different clips (their ``modality``: ``rgb``, ``motion``, ...), a ``features`` column says
    which for each row and the protocol line says so; otherwise the protocol line names them.
    """
    rows = list(results.items()) if isinstance(results, Mapping) else list(results)
    first = rows[0][1]
    ks = list(first.recall)
    width = max(8, *(len(n) for n, _ in rows))
    mixed = len({r.modality for _, r in rows}) > 1
    made_of = "each row's clips (features column)" if mixed else first.modality
    fwidth = max(8, *(len(r.modality) for _, r in rows)) if mixed else 0
    head = f"{'features':<{fwidth}} " if mixed else ""
    lines = [
        f"retrieval protocol: {first.num_queries} test videos query {first.num_gallery} "
        f"training videos; {first.clips}; {first.feature} "
        f"features of {made_of}"
        f"{', mean-centred' if first.center else ''}; {first.similarity}; a query "
        "counts at k when one of its k nearest training videos has its class",
        f"{'model':<{width}} {head}" + " ".join(f"{'R@' + str(k):>6}" for k in ks),
    ]
    for name, r in rows:
        feats = f"{r.modality:<{fwidth}} " if mixed else ""
        lines.append(f"{name:<{width}} {feats}"
                     + " ".join(f"{100 * r.recall[k]:>6.1f}" for k in ks))
    return "\n".join(lines)
