"""Retrieval protocol: R@k against brute force, multi-clip features, the online monitor."""

from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from vidssl.callbacks import RetrievalMonitor
from vidssl.data import VideoDataModule
from vidssl.evaluation import (
    RetrievalResult,
    evaluate_retrieval,
    extract_features,
    recall_at_k,
)


def _brute_force(q, ql, g, gl, ks, center):
    q, g = q.astype(np.float64), g.astype(np.float64)
    if center:
        q, g = q - q.mean(0), g - g.mean(0)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(q)):
            sims = g @ q[i]
            top = np.argsort(-sims, kind="stable")[: min(k, len(g))]
            hits += any(gl[j] == ql[i] for j in top)
        out[k] = hits / len(q)
    return out


@pytest.mark.parametrize("center", [False, True])
def test_recall_matches_brute_force(center):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(60, 12)) + 3.0  # an offset, so centring matters
    gl = rng.integers(0, 5, size=60)
    q = rng.normal(size=(25, 12)) + 3.0
    ql = rng.integers(0, 5, size=25)
    ks = (1, 5, 10, 20, 50, 100)
    got = recall_at_k(q, ql, g, gl, ks=ks, center=center)
    expected = _brute_force(q, ql, g, gl, ks, center)
    assert got == pytest.approx(expected)
    assert got[100] == 1.0  # a k over the gallery size retrieves the whole gallery


def test_recall_hand_case():
    g = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    gl = np.array([0, 1, 2])
    q = np.array([[0.9, 0.3], [0.1, -1.0]], dtype=np.float32)  # nearest: 0 then 1; 2 then 0
    ql = np.array([1, 1])
    # query 0: top1 = class 0 (miss), top2 includes class 1 (hit); query 1: its class is 3rd.
    assert recall_at_k(q, ql, g, gl, ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_recall_errors():
    with pytest.raises(ValueError, match="length"):
        recall_at_k(np.ones((3, 2)), [0, 1], np.ones((4, 2)), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="feature sizes"):
        recall_at_k(np.ones((2, 2)), [0, 1], np.ones((4, 3)), [0, 1, 2, 3])


def test_result_records_protocol():
    r = RetrievalResult(recall={1: 0.5, 5: 0.75}, num_queries=4, num_gallery=8, num_clips=10,
                        center=True)  # fmt: skip
    d = r.as_dict()
    assert d["R@1"] == 0.5 and d["R@5"] == 0.75
    assert d["num_clips"] == 10 and d["center"] is True and "IndexFlatIP" in d["similarity"]


class _Mean(nn.Module):
    """Feature = per-channel mean of the clip, so clip averaging can be checked exactly."""

    feature_dim = 3

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.mean(dim=(2, 3, 4)) * self.w


def test_extract_features_averages_clips():
    clips = [torch.full((2, 3, 2, 4, 4), float(v)) for v in (1.0, 2.0, 6.0)]
    clips[2][1] = -3.0
    batch = {"views": clips, "label": torch.tensor([4, 5]), "index": torch.tensor([7, 8])}
    feats, labels, index = extract_features(_Mean(), [batch], dtype=torch.float16)
    assert feats.dtype == torch.float16
    torch.testing.assert_close(feats.float(), torch.tensor([[3.0] * 3, [0.0] * 3]))
    assert labels.tolist() == [4, 5] and index.tolist() == [7, 8]


def _datamodule(root, **kw):
    from vidssl.data import VideoDataModule

    return VideoDataModule(
        train=str(root), clip_len=4, stride=2, short_side=32, crop_size=32, batch_size=4,
        num_workers=0, backend="pyav", **kw,
    )  # fmt: skip


def _tiny():
    from vidssl.methods import Optimization, SimCLR

    return SimCLR(backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16},
                  optim=Optimization(lr=0.01))


@pytest.mark.slow
def test_evaluate_retrieval_on_videos(tiny_video_root, capsys):
    dm = _datamodule(tiny_video_root)
    model = _tiny()
    result = evaluate_retrieval(model, dm, num_clips=3, ks=(1, 5, 50))
    # 4 classes x 6 videos; split 1 holds 2 test videos per class.
    assert (result.num_queries, result.num_gallery, result.num_clips) == (8, 16, 3)
    r = result.recall
    assert 0.0 <= r[1] <= r[5] <= r[50] == 1.0
    # The progress bars name each split and change nothing in the result.
    capsys.readouterr()
    shown = evaluate_retrieval(model, dm, num_clips=3, ks=(1, 5, 50), progress=True)
    err = capsys.readouterr().err
    assert "queries (test)" in err and "gallery (train)" in err
    assert shown.recall == r


@pytest.mark.slow
def test_retrieval_monitor_logs(tiny_video_root):
    dm = _datamodule(tiny_video_root)
    monitor = RetrievalMonitor(every_n_epochs=1, ks=(1, 5))
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor],
    )  # fmt: skip
    trainer.fit(_tiny(), datamodule=dm)
    assert set(monitor.last) == {1, 5}
    for k in (1, 5):
        assert trainer.callback_metrics[f"val/R@{k}"].item() == pytest.approx(monitor.last[k])
    assert 0.0 <= monitor.last[1] <= monitor.last[5] <= 1.0
    # at_start: the starting weights under the same protocol, measured before any step
    model = _tiny()
    dm.setup("fit")
    single = SimpleNamespace(datamodule=dm, global_rank=0, world_size=1)  # what compute reads
    rng = torch.get_rng_state()
    start = RetrievalMonitor(ks=(1, 5)).compute(single, model)
    # a monitor leaves the random stream as it found it (DataLoaders draw their seeds from it)
    assert torch.equal(torch.get_rng_state(), rng)
    monitor2 = RetrievalMonitor(every_n_epochs=1, ks=(1, 5), at_start=True)
    steps_seen = []
    compute = monitor2.compute
    monitor2.compute = lambda t, m: steps_seen.append(t.global_step) or compute(t, m)
    trainer2 = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor2],
    )  # fmt: skip
    trainer2.fit(model, datamodule=dm)
    assert steps_seen == [0, 1]  # once before the first step, once after the epoch
    assert monitor2.initial == start
    assert trainer2.callback_metrics["val/R@1_start"].item() == pytest.approx(start[1])


class _NoEvalLoader(VideoDataModule):
    """A data module without ``eval_dataloader``."""

    eval_dataloader = None


def test_retrieval_needs_a_data_module_with_eval_dataloader(tiny_video_root):
    with pytest.raises(TypeError, match="eval_dataloader.*_NoEvalLoader has none"):
        evaluate_retrieval(_tiny(), _NoEvalLoader(train=str(tiny_video_root)), num_clips=1)


@pytest.mark.parametrize("short_side", [40, 0])
def test_eval_features_of_a_video_do_not_depend_on_its_batch(tmp_path, short_side):
    from vidssl.data.synthetic import write_video
    from vidssl.evaluation.retrieval import _eval_loader

    rng = np.random.default_rng(0)
    # 4:3, 2:1, a portrait 3:5 and 4:3 at twice the size, in two class folders.
    for i, (w, h) in enumerate([(64, 48), (96, 48), (48, 80), (128, 96)]):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        write_video(tmp_path / f"c{i % 2}" / f"v{i}.avi",
                    rng.integers(0, 256, (8, h, w, 3), dtype=np.uint8))
    model = _tiny()
    feats = {}
    for batch in (1, 4):
        dm = VideoDataModule(train=str(tmp_path), format="class_folders", clip_len=4,
                    short_side=short_side, crop_size=32, eval_batch_size=batch, num_workers=0)
        dm.setup("fit")
        f, _, idx = extract_features(model, _eval_loader(dm, "train", 2),
                                     lambda b, dm=dm: dm.augment(b, train=False))
        feats[batch] = f[idx.argsort()]
    # Alone or batched with videos of other shapes and sizes, a video has the same feature.
    torch.testing.assert_close(feats[4], feats[1], rtol=1e-5, atol=1e-6)
