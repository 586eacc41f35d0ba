"""Similarity search over video embeddings: a faiss index plus the manifest of video paths.

Build a :class:`SearchIndex` from embeddings (see :mod:`vidssl.evaluation.embed`), save it to a
folder, load it back and query it with features; ``vidssl index`` and ``vidssl search`` wrap it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

__all__ = [
    "INDEX_KINDS",
    "SearchHit",
    "SearchIndex",
    "default_nlist",
    "l2_normalize",
]

#: Index kinds accepted by :meth:`SearchIndex.build`.
INDEX_KINDS = ("auto", "flat", "ivf")

# Above this many vectors ``kind="auto"`` switches from exact search to IVF. An exact inner-product
# scan of 100k x 512 float32 vectors takes a few ms per query on one CPU core (see
# docs/benchmarks.md), fast enough for interactive use, so exact search is kept well beyond that.
AUTO_IVF_THRESHOLD = 200_000

_INDEX_FILE = "index.faiss"
_MANIFEST_FILE = "manifest.json"
_FORMAT_VERSION = 1


def l2_normalize(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Return ``features`` (``N x D`` or ``D``) as contiguous float32 rows of unit L2 norm.

    Zero rows stay zero (``eps`` guards the division), so they score 0 against everything.
    """
    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"features must be N x D (or D), got shape {tuple(x.shape)}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps))


@dataclass(frozen=True)
class SearchHit:
    """One search result: the video's ``path``, its ``score`` (cosine similarity) and ``rank``."""

    path: str
    score: float
    rank: int
    id: int


def default_nlist(n: int) -> int:
    """Return the IVF cell count for ``n`` vectors: ``4 * sqrt(n)``, low end of faiss' advice.

    The faiss wiki ("Guidelines to choose an index") suggests 4*sqrt(N) to 16*sqrt(N) cells; each
    cell needs at least ~39 training points, so the count is capped at ``n // 39``.
    """
    return int(max(1, min(4 * math.sqrt(n), n // 39)))


class SearchIndex:
    """A faiss inner-product index over L2-normalised features and the paths of its videos.

    Scores are cosine similarities in ``[-1, 1]``: features are normalised before they are added
    and queries are normalised before they are searched.

    Args:
        index: a faiss index with ``METRIC_INNER_PRODUCT`` holding ``len(paths)`` vectors, in the
            order of ``paths``.
        paths: the video of each vector.
        meta: free-form information saved in the manifest (e.g. how the embeddings were made, so
            that ``vidssl search`` can embed a query video the same way).
    """

    def __init__(self, index: Any, paths: Sequence[str], meta: Optional[dict] = None) -> None:
        if index.ntotal != len(paths):
            raise ValueError(f"the index holds {index.ntotal} vectors but {len(paths)} paths given")
        self.index = index
        self.paths = [str(p) for p in paths]
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        features: np.ndarray,
        paths: Sequence[str],
        kind: str = "auto",
        nlist: Optional[int] = None,
        nprobe: int = 16,
        meta: Optional[dict] = None,
        seed: int = 0,
    ) -> SearchIndex:
        """Build an index from ``features`` (``N x D``), one row per entry of ``paths``.

        Args:
            features: the embeddings; normalised here, so raw backbone features are fine.
            paths: the video each row came from.
            kind: ``"flat"`` (exact ``IndexFlatIP``), ``"ivf"`` (``IndexIVFFlat``: approximate,
                faster on very large sets) or ``"auto"`` (flat up to 200,000 vectors, then IVF).
            nlist: IVF cells (default :func:`default_nlist`).
            nprobe: IVF cells visited per query (more: slower, closer to exact).
            meta: saved in the manifest.
            seed: seed of the IVF k-means.
        """
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        x = l2_normalize(features)
        n, dim = x.shape
        if n != len(paths):
            raise ValueError(f"{n} feature rows but {len(paths)} paths")
        if n == 0:
            raise ValueError("cannot build an index from zero videos")
        if kind == "auto":
            kind = "ivf" if n > AUTO_IVF_THRESHOLD else "flat"
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            nlist = int(nlist or default_nlist(n))
            if nlist > n:
                raise ValueError(f"nlist={nlist} IVF cells need at least as many vectors; got {n}")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(x)
            index.nprobe = int(min(nprobe, nlist))
        index.add(x)
        meta = dict(meta or {})
        meta.update(kind=kind, dim=int(dim))
        return cls(index, paths, meta)

    # ------------------------------------------------------------------ querying
    @property
    def dim(self) -> int:
        """Feature size ``D``."""
        return int(self.index.d)

    @property
    def kind(self) -> str:
        """``"flat"`` or ``"ivf"``."""
        return "ivf" if hasattr(self.index, "nprobe") else "flat"

    def __len__(self) -> int:
        return len(self.paths)

    def search_arrays(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Search ``queries`` (``Q x D`` or ``D``); return ``(scores Q x k, ids Q x k)``.

        ``k`` is capped at the index size; IVF may return fewer than ``k`` hits, padded with
        id ``-1`` and score ``-inf``.
        """
        q = l2_normalize(queries)
        if q.shape[1] != self.dim:
            raise ValueError(
                f"query features have size {q.shape[1]} but the index holds size {self.dim}: "
                "embed queries with the model that made the index"
            )
        k = int(min(k, len(self)))
        if k < 1:
            raise ValueError("k must be at least 1")
        scores, ids = self.index.search(q, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def search(
        self, queries: np.ndarray, k: int = 10, exclude: Optional[Sequence[str]] = None
    ) -> list[list[SearchHit]]:
        """Search ``queries`` (``Q x D`` or ``D``); return ``Q`` lists of up to ``k`` hits.

        Args:
            queries: query features (normalised here).
            k: hits per query.
            exclude: for each query, a path to leave out of its hits (e.g. the query video itself
                when it is in the index), or ``None``.
        """
        q = l2_normalize(queries)
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(q)} queries")
        extra = 1 if exclude is not None else 0
        scores, ids = self.search_arrays(q, k + extra)
        results = []
        for qi in range(len(q)):
            hits: list[SearchHit] = []
            for score, i in zip(scores[qi], ids[qi]):
                if i < 0 or len(hits) == k:
                    continue
                path = self.paths[i]
                if exclude is not None and exclude[qi] is not None and path == exclude[qi]:
                    continue
                hits.append(SearchHit(path=path, score=float(score), rank=len(hits) + 1, id=int(i)))
            results.append(hits)
        return results

    def feature_of(self, path: str) -> np.ndarray:
        """Return the stored (normalised) feature ``D`` of the indexed video ``path``."""
        try:
            i = self.paths.index(str(path))
        except ValueError:
            raise KeyError(f"{path} is not in the index") from None
        if self.kind == "ivf":
            self.index.make_direct_map()
        return self.index.reconstruct(i)

    # ------------------------------------------------------------------ files
    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``index.faiss`` and ``manifest.json`` (paths and meta) into ``directory``."""
        import faiss

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Write to temporary names first so an interrupted save never leaves a torn index.
        tmp_index = directory / (_INDEX_FILE + ".tmp")
        # Written by Python, not faiss.write_index: a folder that cannot be written then raises
        # an OSError naming the file (faiss raises a RuntimeError).
        tmp_index.write_bytes(faiss.serialize_index(self.index).tobytes())
        tmp_manifest = directory / (_MANIFEST_FILE + ".tmp")
        manifest = {
            "format": _FORMAT_VERSION,
            "size": len(self),
            "meta": self.meta,
            "paths": self.paths,
        }
        tmp_manifest.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp_index, directory / _INDEX_FILE)
        os.replace(tmp_manifest, directory / _MANIFEST_FILE)
        return directory

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], nprobe: Optional[int] = None) -> SearchIndex:
        """Read an index saved by :meth:`save` (``nprobe`` overrides the saved IVF setting)."""
        import faiss

        directory = Path(directory)
        index_file, manifest_file = directory / _INDEX_FILE, directory / _MANIFEST_FILE
        for f in (index_file, manifest_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} not found: {directory} is not a vidssl search index "
                    "(make one with `vidssl index EMBEDDINGS_DIR -o INDEX_DIR`)"
                )
        manifest = json.loads(manifest_file.read_text())
        index = faiss.read_index(str(index_file))
        if nprobe is not None and hasattr(index, "nprobe"):
            index.nprobe = int(nprobe)
        return cls(index, manifest["paths"], manifest.get("meta", {}))


def brute_force_search(
    features: np.ndarray, queries: np.ndarray, k: int, normalized: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine search in plain numpy: the baseline the benchmark compares with.

    Not part of the API (not in ``__all__``): ``benchmarks/search.py`` times the index against
    it and the tests use it as an independent oracle.

    Returns ``(scores Q x k, ids Q x k)`` sorted by decreasing score. ``normalized=True`` skips
    normalising ``features`` (rows already of unit norm), as an index would have done once.
    """
    x = np.asarray(features, dtype=np.float32) if normalized else l2_normalize(features)
    q = l2_normalize(queries)
    sims = q @ x.T
    k = min(k, x.shape[0])
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part_scores, order, axis=1), np.take_along_axis(part, order, axis=1)
