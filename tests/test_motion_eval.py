"""Evaluation on motion: retrieval and embedding export with RGB, motion or both features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vidssl.backbones as vb
from vidssl.cli import format_recall_table
from vidssl.evaluation import (
    ClipSettings,
    combine_features,
    embed_videos,
    evaluate_retrieval,
    extract_features,
    load_encoder,
    recall_at_k,
)
from vidssl.evaluation.embed import EmbeddingsMismatchError, MotionClipReader
from vidssl.methods import ClusterTriplet, Head

TINY = {"width_mult": 1 / 16}


class _Stub(torch.nn.Module):
    """RGB features: per-channel means; motion features: per-channel means of another map."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.feature_dim = 3

    def forward(self, x):
        return x.mean(dim=(2, 3, 4)) * self.w

    def encode_motion(self, m):
        return torch.stack([m[:, 0].mean((1, 2, 3)), m[:, 1].mean((1, 2, 3)),
                            m.abs().mean((1, 2, 3, 4))], 1)


def _eval_batches(n_videos=12, clips=2, seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n_videos, b):
        idx = torch.arange(start, start + b)
        out.append({
            "views": [torch.randn(b, 3, 2, 8, 8, generator=g) for _ in range(clips)],
            "motion": {i: torch.rand(b, 2, 2, 8, 8, generator=g) * 2 - 1 for i in range(clips)},
            "index": idx, "label": idx % 3,
        })
    return out


class _StubData:
    motion_channels = 2

    def eval_dataloader(self, split, num_clips):
        return _eval_batches(seed=0 if split == "train" else 1, clips=num_clips)

    def augment(self, batch, train=False):
        return batch


def test_both_is_the_mean_or_concat_of_the_normalised_single_modality_features():
    model, loader = _Stub(), _eval_batches()
    rgb, labels, _ = extract_features(model, loader, features="rgb")
    motion, _, _ = extract_features(model, loader, features="motion")
    # motion features are the clip mean of encode_motion over batch["motion"][i], i = clip
    b0 = loader[0]
    expected0 = (model.encode_motion(b0["motion"][0]) + model.encode_motion(b0["motion"][1])) / 2
    torch.testing.assert_close(motion[:4], expected0)
    mean, _, _ = extract_features(model, loader, features="both", combine="mean")
    cat, _, _ = extract_features(model, loader, features="both", combine="concat")
    torch.testing.assert_close(mean, (F.normalize(rgb) + F.normalize(motion)) / 2)
    torch.testing.assert_close(cat, torch.cat([F.normalize(rgb), F.normalize(motion)], 1))
    # concatenated unit features: cosine = the mean of the two modalities' cosines
    cos = F.normalize(cat) @ F.normalize(cat).T
    torch.testing.assert_close(
        cos, (F.normalize(rgb) @ F.normalize(rgb).T + F.normalize(motion) @ F.normalize(motion).T)
        / 2)


def test_retrieval_with_both_features_and_the_protocol_line():
    model, dm = _Stub(), _StubData()
    res = evaluate_retrieval(model, dm, num_clips=2, ks=(1, 5), features="both",
                             combine="concat")
    q_r, ql, _ = extract_features(model, dm.eval_dataloader("test", 2), features="rgb")
    q_m, _, _ = extract_features(model, dm.eval_dataloader("test", 2), features="motion")
    g_r, gl, _ = extract_features(model, dm.eval_dataloader("train", 2), features="rgb")
    g_m, _, _ = extract_features(model, dm.eval_dataloader("train", 2), features="motion")
    expected = recall_at_k(combine_features(q_r, q_m, "concat").numpy(), ql.numpy(),
                           combine_features(g_r, g_m, "concat").numpy(), gl.numpy(), ks=(1, 5))
    assert res.recall == expected
    assert res.modality == "rgb+motion (each L2-normalised, then concatenated)"
    line = format_recall_table({"m": res}).splitlines()[0]
    assert "backbone features of rgb+motion (each L2-normalised, then concatenated)" in line
    rgb_only = evaluate_retrieval(model, dm, num_clips=2, ks=(1,))
    assert rgb_only.modality == "rgb" and "features of rgb;" in format_recall_table(
        {"m": rgb_only})


def test_motion_features_need_motion_data_and_a_motion_encoder():
    class NoMotion(_StubData):
        motion_channels = 0

    with pytest.raises(ValueError, match="gives none.*motion='flow'"):
        evaluate_retrieval(_Stub(), NoMotion(), num_clips=2, features="motion")
    backbone = vb.build("r3d_18", **TINY)
    with pytest.raises(ValueError, match="encode_motion.*VideoResNet has none"):
        evaluate_retrieval(backbone, _StubData(), num_clips=2, features="both")
    batches = _eval_batches()
    del batches[0]["motion"][1]
    with pytest.raises(ValueError, match=r"positions 0..1.*has \[0\]"):
        extract_features(_Stub(), batches, features="motion")
    with pytest.raises(ValueError, match="unknown features"):
        extract_features(_Stub(), batches, features="flow")


@pytest.mark.parametrize("mode", ["x3", "xy"])
def test_checkpoint_trained_with_motion_loads_as_a_shared_encoder(tmp_path, mode):
    torch.manual_seed(0)
    m = ClusterTriplet(backbone="r3d_18", backbone_kwargs=TINY, head=Head(hidden_dim=16),
                       motion_prob=0.25, motion_input=mode)
    if mode == "xy":
        with torch.no_grad():
            m.motion_stem.conv.weight.normal_()  # differs from the cross-modality start
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    enc, info = load_encoder(path)
    assert isinstance(enc, vb.SharedEncoder)
    assert info["motion"] == {"motion_input": mode, "motion_channels": 2}
    m.eval()
    x, f = torch.randn(2, 3, 4, 32, 32), torch.rand(2, 2, 4, 32, 32) * 2 - 1
    torch.testing.assert_close(enc(x), m(x))
    torch.testing.assert_close(enc.encode_motion(f), m.encode_motion(f))
    # an RGB-only checkpoint stays a plain backbone
    rgb = ClusterTriplet(backbone="r3d_18", backbone_kwargs=TINY, head=Head(hidden_dim=16))
    torch.save({"state_dict": rgb.state_dict(), "hyper_parameters": dict(rgb.hparams)}, path)
    assert isinstance(load_encoder(path)[0], vb.VideoResNet)


def _reader(path, settings):
    g = torch.Generator().manual_seed(len(path))
    return torch.randint(0, 255, (settings.num_clips, settings.clip_len, 40, 48, 3),
                         generator=g, dtype=torch.uint8)


def _motion_reader(path, settings):
    g = torch.Generator().manual_seed(len(path) + 1)
    s = settings.crop_size
    return torch.rand(settings.num_clips, 2, settings.clip_len, s, s, generator=g) * 2 - 1


def test_embed_videos_with_both_features(tmp_path):
    torch.manual_seed(0)
    enc = vb.SharedEncoder(vb.build("r3d_18", **TINY), vb.MotionStem(
        vb.build("r3d_18", **TINY), "x3")).eval()
    videos = [f"/v/{'x' * i}.avi" for i in range(1, 4)]
    s = ClipSettings(num_clips=2, clip_len=4, stride=1, crop_size=32)
    kw = dict(settings=s, progress=False, reader=_reader, motion_reader=_motion_reader)
    rgb = embed_videos(enc, videos, tmp_path / "rgb", **kw).features
    motion = embed_videos(enc, videos, tmp_path / "motion", features="motion", **kw).features
    both = embed_videos(enc, videos, tmp_path / "both", features="both", **kw)
    np.testing.assert_allclose(
        both.features,
        combine_features(torch.from_numpy(rgb), torch.from_numpy(motion)).numpy(), atol=1e-6)
    assert both.meta["features"] == "rgb+motion (each L2-normalised, then averaged)"
    with pytest.raises(EmbeddingsMismatchError, match="another features"):
        embed_videos(enc, videos, tmp_path / "both", **kw)  # rgb into a folder of both
    with pytest.raises(ValueError, match="needs a motion_reader"):
        embed_videos(enc, videos, tmp_path / "x", features="motion", settings=s, progress=False)


def test_motion_clip_reader_crops_stored_flow_to_the_contract_format(tmp_path):
    pytest.importorskip("cv2")
    from vidssl.data.flow import flow_dataset
    from vidssl.data.synthetic import moving_sprite, write_video

    root = tmp_path / "videos"
    root.mkdir()
    frames, _ = moving_sprite(num_frames=8, width=96, height=64, velocity=(4, 2), sprite=32)
    write_video(root / "right_down.avi", frames, codec="mpeg4")
    flow_dataset(root, tmp_path / "flow", method="farneback", short_side=64, workers=1)
    s = ClipSettings(num_clips=2, clip_len=4, stride=1, crop_size=32)
    field = MotionClipReader("flow", tmp_path / "flow")(str(root / "right_down.avi"), s)
    assert field.shape == (2, 2, 4, 32, 32) and field.dtype == torch.float32
    assert field.abs().max() <= 1.0
    moving = field[:, 0].abs() > 0.02
    # decoded at short side 32 (half the stored 64): +4 px -> +2 px -> 2 / 20 in x, y half that
    assert field[:, 0][moving].median().item() == pytest.approx(0.1, abs=0.03)
    assert field[:, 1][moving].median().item() == pytest.approx(0.05, abs=0.03)


def test_embed_command_with_motion_features(tmp_path, capsys):
    pytest.importorskip("cv2")
    from vidssl.cli import main
    from vidssl.data.flow import flow_dataset
    from vidssl.data.synthetic import moving_sprite, write_video
    from vidssl.evaluation import load_embeddings

    root = tmp_path / "videos"
    root.mkdir()
    for name, v in (("a.avi", (3, 1)), ("b.avi", (-2, 2))):
        frames, _ = moving_sprite(num_frames=8, width=64, height=48, velocity=v, sprite=24)
        write_video(root / name, frames, codec="mpeg4")
    flow_dataset(root, tmp_path / "flow", method="farneback", short_side=48, workers=1)
    m = ClusterTriplet(backbone="r3d_18", backbone_kwargs=TINY, head=Head(hidden_dim=16),
                       motion_prob=0.25)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, ckpt)
    clips = ["--num-clips", "2", "--clip-len", "4", "--stride", "1", "--crop-size", "32",
             "--num-workers", "0", "--device", "cpu"]
    out = tmp_path / "emb"
    assert main(["embed", str(ckpt), str(root), "-o", str(out), "--features", "both",
                 "--combine", "concat", "--flow-dir", str(tmp_path / "flow"), *clips]) == 0
    emb = load_embeddings(out)
    assert emb.features.shape == (2, 2 * m.feature_dim)
    assert emb.meta["features"] == "rgb+motion (each L2-normalised, then concatenated)"
    assert "features of rgb+motion" in capsys.readouterr().err
    # no motion source, or a model without a motion encoder: one-line errors
    assert main(["embed", str(ckpt), str(root), "-o", str(out), "--features", "motion",
                 *clips]) == 2
    assert "needs a motion source: --flow-dir" in capsys.readouterr().err
    assert main(["embed", "r3d_18", "--random-init", str(root), "-o", str(tmp_path / "e2"),
                 "--features", "motion", "--motion", "mv", *clips]) == 2
    assert "needs a model that encodes motion" in capsys.readouterr().err


class _MonitorData(_StubData):
    """The stub data as a RetrievalMonitor reads it: val = the test split, a bank, shards."""

    eval_num_clips = 2

    def eval_dataloader(self, split, num_clips, rank=None, world_size=None):
        return super().eval_dataloader(split, num_clips)

    def val_dataloader(self):
        return self.eval_dataloader("test", self.eval_num_clips)

    def bank_dataloader(self, rank=None, world_size=None):
        return self.eval_dataloader("train", 1)


def test_retrieval_monitor_follows_motion_features_under_the_protocols_clips():
    from types import SimpleNamespace

    from vidssl.callbacks import RetrievalMonitor

    model, dm = _Stub(), _MonitorData()
    model.device = torch.device("cpu")
    trainer = SimpleNamespace(datamodule=dm, global_rank=0, world_size=1, current_epoch=0,
                              sanity_checking=False)
    ks = (1, 2, 5)
    expected = {f: evaluate_retrieval(model, dm, num_clips=2, ks=ks, features=f).recall
                for f in ("rgb", "motion")}
    assert expected["rgb"] != expected["motion"]  # so the monitor's choice shows
    for features in ("rgb", "motion"):
        # gallery_clips = the eval clips: the monitor measures what evaluate_retrieval does
        mon = RetrievalMonitor(ks=ks, features=features, gallery_clips=2)
        assert mon.compute(trainer, model) == expected[features]
    # one centre clip per training video (the default) is another measure
    assert RetrievalMonitor(ks=ks, features="motion").compute(trainer, model) != expected["motion"]
    logged = []
    model.log = lambda name, value, **kw: logged.append(name)
    RetrievalMonitor(ks=(1,), features="motion").on_train_epoch_end(trainer, model)
    assert logged == ["val/motion/R@1"]  # beside an RGB monitor's val/R@1


def test_retrieval_monitor_on_motion_needs_motion_data_and_a_motion_encoder():
    from types import SimpleNamespace

    from vidssl.callbacks import RetrievalMonitor

    with pytest.raises(ValueError, match="unknown features 'flow'"):
        RetrievalMonitor(features="flow")
    with pytest.raises(ValueError, match="gallery_clips must be >= 1"):
        RetrievalMonitor(gallery_clips=0)
    mon = RetrievalMonitor(features="motion")
    no_motion = SimpleNamespace(datamodule=SimpleNamespace(motion_channels=0))
    with pytest.raises(ValueError, match="needs motion fields in the eval batches"):
        mon.setup(no_motion, _Stub(), "fit")
    with pytest.raises(ValueError, match="needs a model that encodes motion"):
        mon.setup(SimpleNamespace(datamodule=_MonitorData()), torch.nn.Linear(2, 2), "fit")
    mon.setup(SimpleNamespace(datamodule=_MonitorData()), _Stub(), "fit")  # both there: fine
    RetrievalMonitor().setup(no_motion, torch.nn.Linear(2, 2), "fit")  # RGB needs neither


def test_recall_table_names_each_rows_features_when_they_differ():
    model, dm = _Stub(), _StubData()
    rgb = evaluate_retrieval(model, dm, num_clips=2, ks=(1, 5))
    motion = evaluate_retrieval(model, dm, num_clips=2, ks=(1, 5), features="motion")
    # (name, result) rows: one model may appear on two kinds of features
    lines = format_recall_table([("m", rgb), ("m", motion)]).splitlines()
    assert "features of each row's clips (features column)" in lines[0]
    assert lines[1].split() == ["model", "features", "R@1", "R@5"]
    assert lines[2].split()[:2] == ["m", "rgb"] and lines[3].split()[:2] == ["m", "motion"]
    assert lines[3].split()[2] == f"{100 * motion.recall[1]:.1f}"
    # one kind of features: the protocol line names it, no column (the table as before)
    same = format_recall_table({"a": rgb, "b": rgb}).splitlines()
    assert "features of rgb;" in same[0] and same[1].split() == ["model", "R@1", "R@5"]
    assert same == format_recall_table([("a", rgb), ("b", rgb)]).splitlines()
