"""The one feature pass: what retrieval, the pseudo-label bank, the monitor and embed share."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vidssl
from vidssl import distributed as vdist
from vidssl.callbacks import PseudoLabels, RetrievalMonitor
from vidssl.clustering.metrics import relabel_by_first_occurrence
from vidssl.data import VideoDataModule
from vidssl.evaluation import ClipSettings, embed_videos, extract_features
from vidssl.evaluation.features import feature_pass
from vidssl.methods import SimCLR

TINY = {"width_mult": 1 / 16}


def _model(seed=0):
    torch.manual_seed(seed)
    return SimCLR(backbone="r3d_18", backbone_kwargs=TINY)


def _dm(root, **kw):
    dm = VideoDataModule(train=str(root), clip_len=4, crop_size=32, short_side=40,
                         num_workers=0, **kw)
    dm.setup("fit")
    return dm


def test_a_video_feature_is_the_mean_of_its_clips_features_one_clip_at_a_time(tiny_video_root):
    model, dm = _model(), _dm(tiny_video_root, eval_batch_size=3)
    out = feature_pass(model, dm.eval_dataloader("test", 2), lambda b: dm.augment(b, False))
    assert out.index.tolist() == list(range(8)) and out.skipped.numel() == 0
    # Oracle: each clip of each video alone through the backbone, then the mean over clips.
    model.eval()
    expected = []
    with torch.no_grad():
        for i in range(8):
            batch = dm.augment(_video(dm, i), train=False)  # a batch of one video
            expected.append(torch.stack([model(v)[0] for v in batch["views"]]).mean(0))
            assert batch["label"].item() == out.labels[i]
    torch.testing.assert_close(out.features, torch.stack(expected), rtol=1e-4, atol=1e-5)
    # The retrieval protocol's extract_features is this pass.
    f, labels, index = extract_features(model, dm.eval_dataloader("test", 2),
                                        lambda b: dm.augment(b, False))
    assert torch.equal(f, out.features) and torch.equal(index, out.index)


def _video(dm, i):
    loader = dm.eval_dataloader("test", 2)
    return loader.collate_fn([loader.dataset[i]])


def test_the_bank_is_the_pass_with_the_methods_normalised_embedding(tiny_video_root):
    model, dm = _model(1), _dm(tiny_video_root, eval_batch_size=5)
    trainer = SimpleNamespace(datamodule=dm, global_rank=0, world_size=1, is_global_zero=True)
    idx, feats, labels = PseudoLabels(progress_bar=False).embed_bank(trainer, model)
    ref = feature_pass(model, dm.bank_dataloader(), lambda b: dm.augment(b, False))
    assert torch.equal(idx, ref.index) and torch.equal(labels, ref.labels)
    torch.testing.assert_close(feats, F.normalize(ref.features, dim=1))


def test_gather_drops_the_distributed_samplers_padding_and_sorts_by_index():
    index = torch.tensor([4, 0, 2, 0, 1, 3, 4])  # shards padded by repeating 0 and 4
    feats = torch.arange(7.0)[:, None].repeat(1, 2)
    idx, f = vdist.gather_unique(index, feats)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    assert f[:, 0].tolist() == [1.0, 4.0, 2.0, 5.0, 0.0]  # the first row of each index
    assert vdist.unique_rows(index).tolist() == [1, 4, 2, 5, 0]
    assert vdist.unique_rows(index, 5).tolist() == [1, 4, 2, 5, 0]
    with pytest.raises(RuntimeError, match="1 of 6 training videos are missing"):
        vdist.unique_rows(index, 6)


def test_rank_and_world_from_a_trainer_or_the_process_group():
    assert vdist.rank_and_world() == (0, 1)
    assert vdist.rank_and_world(SimpleNamespace(global_rank=3, world_size=4)) == (3, 4)


def test_relabel_by_first_occurrence():
    assert relabel_by_first_occurrence(np.array([7, 7, 2, 9, 2, 7])).tolist() == [
        0, 0, 1, 2, 1, 0]


def test_embed_averages_the_clips_of_videos_with_different_clip_counts(tmp_path):
    counts = {"/v/a.avi": 2, "/v/bb.avi": 3, "/v/ccc.avi": 2}

    def reader(path, settings):
        g = torch.Generator().manual_seed(len(path))
        return torch.randint(0, 255, (counts[path], settings.clip_len, 40, 48, 3),
                             generator=g, dtype=torch.uint8)

    torch.manual_seed(0)
    enc = _model().backbone.eval()
    s = ClipSettings(num_clips=2, clip_len=4, stride=1, crop_size=32)
    emb = embed_videos(enc, list(counts), tmp_path / "e", s, batch_size=3, progress=False,
                       reader=reader)
    alone = [embed_videos(enc, [p], tmp_path / f"a{i}", s, progress=False, reader=reader)
             for i, p in enumerate(counts)]
    np.testing.assert_allclose(emb.features, np.concatenate([a.features for a in alone]),
                               rtol=1e-5, atol=1e-6)


def test_the_demo_does_not_import_the_cli():
    tree = ast.parse((Path(vidssl.__file__).parent / "demo.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "vidssl.cli" not in imported
    from vidssl.cli import format_recall_table  # still importable from the CLI
    from vidssl.evaluation.retrieval import format_recall_table as moved

    assert format_recall_table is moved


def test_the_demo_history_comes_from_the_callbacks_public_history():
    from vidssl.demo import _history

    monitor = RetrievalMonitor(every_n_epochs=2, ks=(1, 5))
    pl_module = SimpleNamespace(log=lambda *a, **k: None)
    recalls = iter([{1: 0.5, 5: 0.75}, {1: 0.625, 5: 1.0}])
    monitor.compute = lambda trainer, m: next(recalls)
    for epoch in range(4):
        monitor.on_train_epoch_end(
            SimpleNamespace(current_epoch=epoch, sanity_checking=False), pl_module)
    assert monitor.history == [{"epoch": 1, "recall": {1: 0.5, 5: 0.75}},
                               {"epoch": 3, "recall": {1: 0.625, 5: 1.0}}]
    pseudo = PseudoLabels()
    pseudo.history = [{"epoch": 2, "nmi": 0.25, "num_clusters": 3}]
    assert _history(4, monitor, pseudo) == [
        {"epoch": 0}, {"epoch": 1, "R@1": 0.5}, {"epoch": 2, "NMI": 0.25},
        {"epoch": 3, "R@1": 0.625}]
    assert _history(2, monitor, None) == [{"epoch": 0}, {"epoch": 1, "R@1": 0.5}]
    motion = RetrievalMonitor(every_n_epochs=2, ks=(1,), features="motion")
    motion.history = [{"epoch": 1, "recall": {1: 0.75}}]
    assert _history(2, monitor, None, motion) == [
        {"epoch": 0}, {"epoch": 1, "R@1": 0.5, "R@1 motion": 0.75}]


def test_the_demos_methods_start_from_the_same_backbone_weights():
    import pytorch_lightning as pl

    from vidssl.demo import DemoSettings, _build_method

    s = DemoSettings(width_mult=0.0625)
    built = {}
    for name in ("ClusterTriplet", "SimCLR"):
        pl.seed_everything(s.seed, verbose=False)  # as the demo does before building each
        built[name] = _build_method(name, s)[0]
    slic, simclr = built["ClusterTriplet"], built["SimCLR"]
    assert slic.motion_prob == s.motion_prob and slic.motion_views
    a, b = slic.backbone.state_dict(), simclr.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="unknown demo method 'MoCo'; choose one of"):
        _build_method("MoCo", s)
