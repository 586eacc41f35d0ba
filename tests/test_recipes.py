"""The papers' recipes: videoSimCLR's pair-level views, SLIC's test clips, oracle labels,
SLIC's adaptive p, retrieval from projection-head features, and the example configs' sources."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vidssl.data import VideoDataModule, VideoDataset
from vidssl.data.index import read_folder
from vidssl.data.sampling import TemporalTransform, non_overlapping_clips
from vidssl.data.synthetic import numbered_frames, read_frame_numbers, write_video

# -- videoSimCLR views -----------------------------------------------------------------------


def _reversed(idx: np.ndarray) -> bool:
    return bool(np.all(np.diff(idx) < 0))


def test_pair_level_reverse_reverses_exactly_one_view():
    rng = np.random.default_rng(0)
    pair = TemporalTransform(views_from="clip", max_shift=0, reverse_p=1.0)
    which = []
    for _ in range(200):
        a, b = pair.clips(40, 200, 2, 8, 1, rng)
        assert _reversed(a) != _reversed(b)  # one forward, one backward, every time
        assert sorted(a.tolist()) == sorted(b.tolist())  # the same frames (no shift)
        which.append(_reversed(a))
    assert 0.35 < np.mean(which) < 0.65  # either view can be the reversed one
    # CVRL's per-view draws: with reverse_p=0.5 about half of the pairs share a direction.
    per_view = TemporalTransform(reverse_p=0.5)
    same = [len({_reversed(c) for c in per_view.clips(40, 200, 2, 8, 1, rng)}) == 1
            for _ in range(200)]
    assert 0.35 < np.mean(same) < 0.65
    # reverse_p < 1: a pair is reversed at all with that probability, then in one view only.
    half = TemporalTransform(views_from="clip", reverse_p=0.5)
    counts = [sum(_reversed(c) for c in half.clips(40, 200, 2, 8, 1, rng)) for _ in range(200)]
    assert set(counts) == {0, 1}


def test_thesis_shift_range():
    """Each view is shifted from the one source clip by up to s: the pair is up to 2s apart."""
    rng = np.random.default_rng(1)
    thesis = TemporalTransform.preset("videosimclr")
    assert (thesis.views_from, thesis.max_shift) == ("clip", 8)
    offsets = []
    for _ in range(3000):
        a, b = thesis.clips(100, 400, 2, 16, 1, rng)
        offsets.append(int(b[0] - a[0]))
    assert min(offsets) == -16 and max(offsets) == 16
    # The relative-offset distribution is a triangle (sum of two uniforms): 0 the most likely.
    hist = np.bincount(np.asarray(offsets) + 16)
    assert hist[16] > 3 * hist[1] and hist[16] > 3 * hist[31]
    # vidssl's other scheme shifts only the later view from view 0: half the range.
    first = TemporalTransform(max_shift=8)
    rel = {int(b[0] - a[0]) for a, b in (first.clips(100, 400, 2, 16, 1, rng)
                                         for _ in range(1000))}
    assert rel == set(range(-8, 9))


def test_thesis_views_stay_in_the_video_and_other_pair_transforms():
    rng = np.random.default_rng(2)
    t = TemporalTransform(views_from="clip", max_shift=8, drop_p=1.0)
    for _ in range(100):
        a, b = t.clips(2, 30, 2, 4, 1, rng)
        assert min(a.min(), b.min()) >= 0 and max(a.max(), b.max()) < 30
        steps = {int(np.diff(a)[0]), int(np.diff(b)[0])}
        assert steps == {1, 2}  # frame drop (twice the stride) in exactly one view
    sh = TemporalTransform(views_from="clip", shuffle_p=1.0)
    ordered = [sum(bool(np.all(np.diff(c) == 1)) for c in sh.clips(0, 50, 2, 8, 1, rng))
               for _ in range(50)]
    assert set(ordered) == {1}  # shuffled in one view only (8! makes a sorted draw negligible)
    with pytest.raises(ValueError, match="views_from must be 'video'.*or 'clip'"):
        TemporalTransform(views_from="pair")


def test_temporal_presets_in_the_data_module():
    assert VideoDataModule(temporal_preset="videosimclr").temporal == TemporalTransform(
        max_shift=8, views_from="clip")
    assert VideoDataModule(temporal_preset="cvrl").temporal == TemporalTransform()
    hmdb = VideoDataModule(temporal_preset="videosimclr", max_shift=4)
    assert (hmdb.temporal.views_from, hmdb.temporal.max_shift) == ("clip", 4)
    no_shift = VideoDataModule(temporal_preset="videosimclr", max_shift=0, reverse_p=1.0)
    assert (no_shift.temporal.max_shift, no_shift.temporal.reverse_p) == (0, 1.0)
    assert VideoDataModule(views_from="clip").temporal.views_from == "clip"
    with pytest.raises(ValueError, match="unknown temporal_preset 'simclr'; choose one of cvrl"):
        TemporalTransform.preset("simclr")


@pytest.fixture(scope="module")
def numbered_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbered_recipes")
    write_video(root / "a.avi", numbered_frames(60), codec="mpeg4")
    return root


def test_thesis_views_decode_one_clip_forwards_and_backwards(numbered_root):
    index = read_folder(numbered_root).probe(cache_dir=numbered_root / "cache")
    temporal = TemporalTransform(views_from="clip", max_shift=0, reverse_p=1.0)
    ds = VideoDataset(index, clip_len=5, stride=2, num_views=2, temporal=temporal, short_side=0)
    for _ in range(5):
        a, b = (read_frame_numbers(v.numpy()) for v in ds[0]["views"])
        assert a == b[::-1] and a != b


# -- SLIC's test clips -----------------------------------------------------------------------


def test_non_overlapping_clips_are_slics_test_clips(numbered_root):
    clips = non_overlapping_clips(50, 16, 1)
    assert clips.shape == (3, 16) and clips[:, 0].tolist() == [0, 16, 32]  # 2 frames left over
    assert non_overlapping_clips(10, 4, 2).tolist() == [[0, 2, 4, 6]]
    assert non_overlapping_clips(5, 4, 2).tolist() == [[0, 2, 4, 1]]  # short: one looped clip
    index = read_folder(numbered_root).probe(cache_dir=numbered_root / "cache")
    ds = VideoDataset(index, clip_len=8, stride=1, mode="eval", num_clips=0, short_side=0)
    views = ds[0]["views"]
    assert [read_frame_numbers(v.numpy())[0] for v in views] == [0, 8, 16, 24, 32, 40, 48]


# -- the example configs name their sources ----------------------------------------------------

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))
# Keys whose values are paths or bookkeeping, not recipe values.
_NOT_RECIPE = {"train", "class_path", "num_workers", "log_every_n_steps", "format",
               "initial_weights", "progress_bar"}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_example_value_names_its_source(config):
    """Each recipe value carries a comment: a paper table, an official file, or ``ours``."""
    for n, line in enumerate(config.read_text().splitlines(), 1):
        m = re.match(r"^\s*(?:- )?([A-Za-z_]+):\s*([^#{\s][^#]*?)\s*(#.*)?$", line)
        if not m or m.group(1) in _NOT_RECIPE:
            continue
        assert m.group(3), f"{config.name}:{n}: {line.strip()!r} says not where it comes from"
    assert yaml.safe_load(config.read_text())["model"]["class_path"]


# -- retrieval: projection-head features and SLIC's evaluate.py protocol -----------------------


def _retrieval_dm(root):
    return VideoDataModule(train=str(root), clip_len=4, stride=1, crop_size=32, short_side=40,
                           batch_size=4, num_workers=0)


def _tiny_simclr():
    from vidssl.methods import Head, SimCLR

    torch.manual_seed(0)
    return SimCLR(backbone="r3d_18", backbone_kwargs={"width_mult": 0.0625},
                  head=Head(output_dim=8))


class _ClipCounter(torch.nn.Module):
    """Wraps a method: records how many clips each forward pass gets and calls to its head."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes, self.head_calls = model, [], 0

    def forward(self, clips):
        self.sizes.append(clips.shape[0])
        return self.model(clips)

    def projection(self, feats):
        self.head_calls += 1
        return self.model.projection(feats)


def test_slic_evaluate_protocol_clips(tiny_video_root):
    from vidssl.evaluation import evaluate_retrieval

    dm = _retrieval_dm(tiny_video_root)
    spy = _ClipCounter(_tiny_simclr())
    r = evaluate_retrieval(spy, dm, protocol="slic_evaluate", ks=(1, 5))
    assert (r.num_queries, r.num_gallery, r.protocol) == (8, 16, "slic_evaluate")
    # 8 test videos of 16 frames: 4 back-to-back 4-frame clips each, one video a pass; then
    # the 16 training videos, one centre clip each, in batches of 4.
    assert spy.sizes == [4] * 8 + [4] * 4
    assert "SLIC's evaluate.py" in r.clips and "evaluate.py" not in r.__class__(
        recall={}, num_queries=1, num_gallery=1, num_clips=10, center=False).clips
    with pytest.raises(ValueError, match="unknown retrieval protocol 'iic'; choose one of uniform"):
        evaluate_retrieval(spy, dm, protocol="iic")


def test_retrieval_monitor_can_use_the_projection_head(tiny_video_root):
    from types import SimpleNamespace

    from vidssl.callbacks import RetrievalMonitor

    dm = _retrieval_dm(tiny_video_root)
    dm.setup("fit")
    trainer = SimpleNamespace(datamodule=dm, global_rank=0, world_size=1)
    model = _tiny_simclr()
    spy = _ClipCounter(model)
    spy.device = torch.device("cpu")
    RetrievalMonitor(ks=(1,)).compute(trainer, spy)
    assert spy.head_calls == 0
    RetrievalMonitor(ks=(1,), features_from="projection").compute(trainer, spy)
    assert spy.head_calls > 0
    with pytest.raises(ValueError, match="features_from must be 'backbone' or 'projection'"):
        RetrievalMonitor(features_from="head")


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, tiny_video_root):
    """A SimCLR checkpoint (8-d head) trained for 2 steps through `vidssl fit`."""
    from vidssl.cli import main

    tmp = tmp_path_factory.mktemp("fit_recipes")
    cfg = {
        "seed_everything": 0,
        "model": {"class_path": "SimCLR", "init_args": {
            "backbone": "r3d_18", "backbone_kwargs": {"width_mult": 0.0625},
            "head": {"output_dim": 8}}},
        "data": {"class_path": "VideoDataModule", "init_args": {
            "train": str(tiny_video_root), "clip_len": 4, "stride": 1, "crop_size": 32,
            "short_side": 40, "batch_size": 4, "num_workers": 0}},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2,
                    "limit_val_batches": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False,
                    "default_root_dir": str(tmp)},
    }
    path = tmp / "simclr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path), "--trainer.callbacks+=ModelCheckpoint",
                 f"--trainer.callbacks.dirpath={tmp / 'ckpt'}"]) == 0
    (ckpt,) = (tmp / "ckpt").glob("*.ckpt")
    return ckpt


def test_cli_retrieval_from_the_projection_head(trained_ckpt, tiny_video_root, tmp_path, capsys):
    import json

    from vidssl.cli import main

    out = {}
    for features in ("backbone", "projection"):
        capsys.readouterr()
        assert main(["retrieval", str(trained_ckpt), str(tiny_video_root), "--num-clips", "2",
                     "--features-from", features, "--num-workers", "0", "--device", "cpu",
                     "--json", str(tmp_path / f"{features}.json")]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert f"; {features} features" in line and "2 clips per video averaged" in line
        (out[features],) = json.loads((tmp_path / f"{features}.json").read_text()).values()
    assert out["projection"]["feature"] == "projection"
    recalls = {f: [out[f][f"R@{k}"] for k in (1, 5, 10)] for f in out}
    assert recalls["projection"] != recalls["backbone"]
    # SLIC's protocol by name, with the head; the baseline gets a fresh head of the same shape.
    assert main(["retrieval", str(trained_ckpt), str(tiny_video_root), "--features-from",
                 "projection", "--protocol", "slic_evaluate", "--baseline", "--num-workers",
                 "0", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "one centre clip per training video (SLIC's evaluate.py); projection" in text
    assert "random init" in text
    # A backbone name has no head to use.
    assert main(["retrieval", "r3d_18", str(tiny_video_root), "--random-init",
                 "--features-from", "projection", "--device", "cpu"]) != 0
    assert "--features-from projection needs a vidssl Lightning checkpoint" in (
        capsys.readouterr().err)


def test_projection_head_rebuilt_from_a_checkpoint_matches_the_method():
    from vidssl.methods import MoCo
    from vidssl.methods.heads import projection_head_from_state_dict

    for model in (_tiny_simclr(), MoCo(backbone="r3d_18", backbone_kwargs={"width_mult": 0.0625},
                                       queue_size=8, version=2)):
        head = projection_head_from_state_dict(model.state_dict())
        model.projection.eval()
        x = torch.randn(3, model.feature_dim)
        torch.testing.assert_close(head(x), model.projection(x))
        fresh = projection_head_from_state_dict(model.state_dict(), random_init=True)
        assert not torch.allclose(fresh(x), head(x))
    with pytest.raises(ValueError, match="no projection head in this checkpoint"):
        projection_head_from_state_dict({"backbone.conv.weight": torch.zeros(1)})
