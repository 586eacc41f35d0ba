"""Evaluation: the retrieval protocol (R@k), embedding export and similarity search."""

from vidssl.evaluation.embed import (
    ClipSettings,
    Embeddings,
    embed_paths,
    embed_videos,
    find_videos,
    load_embeddings,
    load_encoder,
)
from vidssl.evaluation.probe import FineTune, LinearProbe, VideoClassifier
from vidssl.evaluation.retrieval import (
    COMBINE,
    DEFAULT_KS,
    FEATURES,
    RetrievalResult,
    combine_features,
    evaluate_retrieval,
    extract_features,
    recall_at_k,
    topk_neighbours,
)
from vidssl.evaluation.search import SearchHit, SearchIndex

__all__ = [
    "COMBINE",
    "DEFAULT_KS",
    "FEATURES",
    "RetrievalResult",
    "combine_features",
    "evaluate_retrieval",
    "extract_features",
    "recall_at_k",
    "topk_neighbours",
    # embedding export, similarity search, supervised evaluation
    "ClipSettings",
    "Embeddings",
    "FineTune",
    "LinearProbe",
    "SearchHit",
    "SearchIndex",
    "VideoClassifier",
    "embed_paths",
    "embed_videos",
    "find_videos",
    "load_embeddings",
    "load_encoder",
]
