"""Shared test fixtures: a tiny synthetic video dataset written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vidssl.data.synthetic import write_synthetic_dataset

# Tiny test models are dominated by threading overhead; one thread is faster and steadier,
# especially when the two cores are shared.
torch.set_num_threads(1)

REAL_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-videos"


@pytest.fixture(scope="session")
def tiny_video_root(tmp_path_factory) -> Path:
    """A UCF101-layout synthetic set: 4 motion classes x 6 videos, 16 frames of 64x48.

    Returns the dataset root (holding ``UCF-101/`` and ``ucfTrainTestlist/``); pass it as
    ``VideoDataModule(train=str(root))``. Split 1: 4 train + 2 test videos per class.
    """
    root = tmp_path_factory.mktemp("tiny_ucf")
    write_synthetic_dataset(root, num_classes=4, videos_per_class=6, num_frames=16, seed=0)
    return root


@pytest.fixture(scope="session", autouse=True)
def video_cache_dir(tmp_path_factory) -> Path:
    """A session-private folder for probed-metadata manifests, so tests never write ~/.cache."""
    path = tmp_path_factory.mktemp("vidssl_cache")
    old = os.environ.get("VIDSSL_CACHE")
    os.environ["VIDSSL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("VIDSSL_CACHE", None)
    else:
        os.environ["VIDSSL_CACHE"] = old


@pytest.fixture
def real_videos() -> Path:
    """The folder of real sample videos; skips the test when it is not there."""
    if not REAL_VIDEOS.is_dir():
        pytest.skip(f"real sample videos not found at {REAL_VIDEOS}")
    return REAL_VIDEOS
