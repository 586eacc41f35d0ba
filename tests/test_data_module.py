"""Clip sampling, temporal transforms, the dataset and VideoDataModule on real batches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from vidssl.data import VideoDataModule, VideoDataset
from vidssl.data.index import read_folder
from vidssl.data.sampling import (
    TemporalTransform,
    centre_clip,
    clip_span,
    loop_indices,
    non_overlapping_start,
    random_clip,
    uniform_clips,
)
from vidssl.data.synthetic import numbered_frames, read_frame_numbers, write_video

# -- sampling -------------------------------------------------------------------------------


def test_clip_indices():
    rng = np.random.default_rng(0)
    assert clip_span(4, 3) == 10
    assert loop_indices(5, 4, 2, 9).tolist() == [5, 7, 0, 2]  # loops over a short video
    for _ in range(50):
        c = random_clip(40, 8, 2, rng)
        assert c[0] <= 40 - 15 and np.all(np.diff(c) == 2)
    assert random_clip(5, 4, 2, rng).tolist() == [0, 2, 4, 1]  # short: start 0, looped
    assert centre_clip(100, 4, 2).tolist() == [46, 48, 50, 52]
    u = uniform_clips(100, 4, 2, 5)
    assert u.shape == (5, 4) and u[:, 0].tolist() == [0, 23, 46, 70, 93]
    assert uniform_clips(100, 4, 2, 1).tolist() == [centre_clip(100, 4, 2).tolist()]


def test_non_overlapping_positive():
    rng = np.random.default_rng(0)
    for anchor in (0, 10, 30, 50):
        for _ in range(20):
            s = non_overlapping_start(anchor, 64, 15, rng)
            assert s + 15 <= anchor or s >= anchor + 15
            assert 0 <= s <= 64 - 15
    # Too short for two disjoint clips: the farthest start (least overlap).
    assert non_overlapping_start(2, 20, 15, rng) == 5
    assert non_overlapping_start(4, 20, 15, rng) == 0


def test_temporal_transforms():
    rng = np.random.default_rng(0)
    drop = TemporalTransform(drop_p=1.0)
    seen = set()
    for _ in range(20):
        idx = drop.view_indices(10, 100, 4, 1, rng)
        assert len(idx) == 4 and np.all(np.diff(idx) == 2)  # every other frame of 2m
        seen.add(int(idx[0]))
    assert seen == {10, 11}  # even or odd phase
    assert TemporalTransform(reverse_p=1.0).view_indices(3, 50, 4, 2, rng).tolist() == [9, 7, 5, 3]
    sh = TemporalTransform(shuffle_p=1.0).view_indices(0, 50, 8, 1, rng)
    assert sorted(sh.tolist()) == list(range(8))
    shift = TemporalTransform(max_shift=3)
    starts = {shift.shifted_start(20, 100, 10, rng) for _ in range(200)}
    assert starts == set(range(17, 24))
    assert shift.shifted_start(1, 100, 10, rng) >= 0
    with pytest.raises(ValueError, match="drop_p"):
        TemporalTransform(drop_p=2.0)


# -- dataset on videos whose frames say their index ----------------------------------------


def numbered_video(path, n, bframes=0):
    write_video(path, numbered_frames(n), codec="mpeg4", max_b_frames=bframes)


def frame_ids(view: torch.Tensor) -> list[int]:
    return read_frame_numbers(view.numpy())


@pytest.fixture(scope="module")
def numbered_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbered")
    numbered_video(root / "a_plain.avi", 60)
    numbered_video(root / "b_bframes.avi", 60, bframes=2)  # decoded by the exact path
    numbered_video(root / "c_short.avi", 6)
    return read_folder(root).probe(cache_dir=root / "cache")


def test_views_decode_the_requested_frames(numbered_index):
    assert numbered_index.exact.tolist() == [False, True, False]
    ds = VideoDataset(numbered_index, clip_len=5, stride=3, num_views=3, short_side=16)
    for i in (0, 1):
        item = ds[i]
        assert len(item["views"]) == 3 and item["index"] == i
        for v in item["views"]:
            assert v.dtype == torch.uint8 and v.shape == (5, 16, 24, 3)
            ids = frame_ids(v)
            assert np.all(np.diff(ids) == 3), ids  # exact frames, in order, at the stride
    short = frame_ids(ds[2]["views"][0])
    assert short == [0, 3, 0, 3, 0]  # looped


def test_pairs_and_repeat_anchor(numbered_index):
    ds = VideoDataset(numbered_index, clip_len=4, stride=2, repeat_anchor=True, short_side=0)
    for _ in range(10):
        item = ds[(1, 1)]
        a, p, r = (frame_ids(v) for v in item["views"])
        assert item["index"] == 1 and item["positive_index"] == 1
        assert a == r and set(range(a[0], a[-1] + 1)).isdisjoint(range(p[0], p[-1] + 1))
    item = ds[(0, 2)]
    assert item["positive_index"] == 2 and max(frame_ids(item["views"][1])) < 6


def test_instance_and_pair_items_give_the_same_views(numbered_index):
    ds = VideoDataset(numbered_index, clip_len=4, stride=2, num_views=3, repeat_anchor=True,
                      short_side=0)
    for item in (ds[1], ds[(1, 1)], ds[(1, 0)]):  # anchor, 2 positives, anchor again
        a, p1, p2, r = (frame_ids(v) for v in item["views"])
        assert a == r
    a, p1, p2, _ = (frame_ids(v) for v in ds[(1, 1)]["views"])
    assert not set(a) & (set(p1) | set(p2))  # same-video positives never overlap the anchor
    assert ds[(1, 0)]["positive_index"] == 0


def test_views_follow_the_method_declaration(tiny_video_root):
    from vidssl.data.dataset import views_settings

    assert views_settings(["anchor", "positive", "anchor_repeat"]) == (2, True)
    dm = VideoDataModule(train=str(tiny_video_root), views=["anchor", "positive", "anchor_repeat"])
    assert (dm.num_views, dm.repeat_anchor, dm.views) == (2, True, ("anchor", "positive",
                                                                    "anchor_repeat"))
    assert VideoDataModule(train="x").views == ("anchor", "positive")  # no declaration
    with pytest.raises(ValueError, match="data.repeat_anchor=False disagrees"):
        VideoDataModule(views=["anchor", "positive", "anchor_repeat"], repeat_anchor=False)
    with pytest.raises(ValueError, match="unknown view 'flow'.*anchor, positive, anchor_repeat"):
        VideoDataModule(views=["anchor", "flow"])
    with pytest.raises(ValueError, match="cannot give views"):
        VideoDataModule(views=["positive", "anchor"])


def test_eval_mode_spreads_clips(numbered_index):
    ds = VideoDataset(numbered_index, clip_len=4, stride=2, mode="eval", num_clips=3)
    starts = [frame_ids(v)[0] for v in ds[1]["views"]]
    assert starts == uniform_clips(60, 4, 2, 3)[:, 0].tolist() == [0, 26, 53]


# -- the DataModule --------------------------------------------------------------------------


def make_dm(root, **kw) -> VideoDataModule:
    args = dict(
        train=str(root),
        clip_len=4,
        stride=2,
        short_side=32,
        crop_size=24,
        batch_size=4,
        num_workers=0,
    )
    args.update(kw)
    dm = VideoDataModule(**args)
    dm.setup()
    return dm


def test_batch_contract(tiny_video_root):
    dm = make_dm(tiny_video_root, num_views=2)
    assert dm.num_train_videos == 16 and dm.train_labels.tolist()[:4] == [0, 0, 0, 0]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"views", "index", "label", "decode_failures"}
    assert batch["decode_failures"].tolist() == [0, 0, 0, 0]
    assert [v.shape for v in batch["views"]] == [(4, 4, 32, 43, 3)] * 2  # 64x48 -> short side 32
    assert batch["views"][0].dtype == torch.uint8 and batch["index"].dtype == torch.int64
    assert torch.equal(batch["label"], torch.as_tensor(dm.train_labels)[batch["index"]])
    out = dm.augment(batch, train=True)
    assert [v.shape for v in out["views"]] == [(4, 3, 4, 24, 24)] * 2
    assert out["views"][0].dtype == torch.float32
    assert dm.augment(out, train=True)["views"][0] is out["views"][0]  # idempotent


def test_real_batch_same_draw_per_clip_independent_across_clips_and_views(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(4):  # static videos: every frame of a clip is the same picture
        frame = rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
        write_video(tmp_path / f"s{k}.avi", np.repeat(frame, 12, axis=0), gop_size=100)
    dm = make_dm(tmp_path, format="folder", num_views=2, train_preset="slic", crop_size=24)
    dm.set_train_batch_sampler([[0, 1, 2, 3, 0, 1, 2, 3]])
    batch = next(iter(dm.train_dataloader()))
    raw = batch["views"][0]
    assert torch.equal(raw, raw[:, :1].expand_as(raw))  # the decoded frames are identical
    torch.manual_seed(0)
    v0, v1 = dm.augment(batch, train=True)["views"]
    for v in (v0, v1):
        assert torch.equal(v, v[:, :, :1].expand_as(v))  # one draw shared by a clip's frames
    # Clips 0 and 4 (and 1 and 5, ...) are the same video: different draws make them differ.
    assert all(not torch.allclose(v0[i], v0[i + 4]) for i in range(4))
    assert all(not torch.allclose(v0[i], v1[i]) for i in range(8))


def test_val_multiclip_and_bank(tiny_video_root):
    dm = make_dm(tiny_video_root, eval_num_clips=3, eval_batch_size=5)
    vb = next(iter(dm.val_dataloader()))
    assert len(vb["views"]) == 3 and vb["views"][0].shape[0] == 5
    bank = [b for b in dm.bank_dataloader()]
    idx = torch.cat([b["index"] for b in bank])
    assert idx.tolist() == list(range(16))  # every video once, fixed order
    assert all(len(b["views"]) == 1 for b in bank)
    shards = [torch.cat([b["index"] for b in dm.bank_dataloader(r, 3)]) for r in range(3)]
    assert all(len(s) == 6 for s in shards)  # padded to equal shards
    counts = np.bincount(torch.cat(shards).numpy(), minlength=16)
    assert counts.min() == 1 and counts.sum() == 18  # disjoint except the 2 padding repeats
    test = torch.cat([b["index"] for b in dm.eval_dataloader("test", num_clips=2)])
    assert test.tolist() == list(range(8))
    assert len(next(iter(dm.eval_dataloader("test", num_clips=2)))["views"]) == 2
    # Bank clips are deterministic (centre clip, eval transform).
    a = dm.augment(next(iter(dm.bank_dataloader())), train=False)["views"][0]
    b = dm.augment(next(iter(dm.bank_dataloader())), train=False)["views"][0]
    assert torch.equal(a, b)


def test_a_self_sharding_batch_sampler_keeps_lightning_from_injecting_one(tiny_video_root):
    from types import SimpleNamespace

    dm = make_dm(tiny_video_root, val=str(tiny_video_root))
    connector = SimpleNamespace(use_distributed_sampler=True)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, _accelerator_connector=connector)
    dm.train_dataloader()
    assert connector.use_distributed_sampler  # Lightning's own sampler: left to Lightning
    dm.set_train_batch_sampler([[(0, 0), (1, 5)]])
    dm.train_dataloader()
    assert not connector.use_distributed_sampler
    # The evaluation loaders then shard themselves, as Lightning would have.
    shard = torch.cat([b["index"] for b in dm.val_dataloader()])
    expected = list(range(len(dm.val_dataset)))[1::2]
    assert shard.tolist() == expected


def test_external_batch_sampler_with_pairs_and_workers(tiny_video_root):
    dm = make_dm(tiny_video_root, num_workers=2, repeat_anchor=True)
    dm.set_train_batch_sampler([[(0, 0), (1, 5)], [(2, 9), (3, 3)], [4, 7]])
    batches = list(dm.train_dataloader())
    assert batches[0]["index"].tolist() == [0, 1]
    assert batches[0]["positive_index"].tolist() == [0, 5]
    assert len(batches[0]["views"]) == 3
    # Instance items get the same views as pairs: the anchor repeated last.
    assert batches[2]["index"].tolist() == [4, 7] and len(batches[2]["views"]) == 3
    assert dm.decode_failures["train"] == 0


def test_decode_failures_visible_from_workers(tiny_video_root, tmp_path):
    import shutil

    root = tmp_path / "vids"
    shutil.copytree(tiny_video_root / "UCF-101" / "MoveLeft", root)
    (root / "zz_broken.avi").write_bytes(b"\x00" * 4000)
    dm = make_dm(root, format="folder", num_workers=2, batch_size=7)
    bad = int(np.flatnonzero(["zz_broken" in p for p in dm.train_dataset.index.paths])[0])
    dm.set_train_batch_sampler([[bad] * 3, [bad, 0]])
    batches = list(dm.train_dataloader())
    assert all(bad not in b["index"].tolist() for b in batches)
    assert dm.decode_failures["train"] == 4
    with pytest.raises(RuntimeError, match="zz_broken.avi"):
        dm.val_dataset = dm._dataset(dm.train_dataset.index, "eval")
        dm.val_dataset[bad]


def test_decode_failures_are_logged_per_epoch_and_reported_at_the_end_of_fit(
    tiny_video_root, tmp_path, caplog
):
    import csv
    import logging
    import shutil

    from vidssl.methods import SimCLR

    root = tmp_path / "vids"
    shutil.copytree(tiny_video_root / "UCF-101" / "MoveLeft", root)
    (root / "zz_broken.avi").write_bytes(b"\x00" * 4000)
    dm = make_dm(root, format="folder", num_workers=2, short_side=16, crop_size=16)
    bad = int(np.flatnonzero(["zz_broken" in p for p in dm.train_dataset.index.paths])[0])
    # Two batches an epoch, one per worker process, each meeting the broken video once.
    dm.set_train_batch_sampler([[bad, 0, 1], [2, bad, 3]])
    # Workers are forked processes: a file handler sees what every one of them logs.
    worker_log = tmp_path / "workers.log"
    handler = logging.FileHandler(worker_log)
    logging.getLogger("vidssl.data.dataset").addHandler(handler)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="vidssl.data.datamodule"):
            trainer.fit(
                SimCLR(backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16}), datamodule=dm
            )
    finally:
        logging.getLogger("vidssl.data.dataset").removeHandler(handler)
        handler.close()
    # Per epoch: 2 replacements, counted in the batches, so workers' counts add up.
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/decode_failures")]
    assert [(int(r["epoch"]), float(r["train/decode_failures"])) for r in rows] == [
        (0, 2.0), (1, 2.0)
    ]
    # The path is logged once over both workers and both epochs ...
    lines = [ln for ln in worker_log.read_text().splitlines() if "Skipping undecodable" in ln]
    assert len(lines) == 1 and "zz_broken.avi" in lines[0]
    # ... and fit ends with one line counting distinct videos.
    end = [r.getMessage() for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(end) == 1 and end[0].startswith("1 video could not be decoded and was replaced")


def test_end_of_fit_report_counts_distinct_videos_over_processes(tiny_video_root, caplog):
    import logging
    from types import SimpleNamespace

    dm = make_dm(tiny_video_root)
    dm.train_dataset._failures[3] = 2  # this process met video 3 twice
    other = torch.zeros(16, dtype=torch.int32)
    other[[3, 7]] = 1  # the other process met videos 3 and 7

    def reduce(mask, reduce_op):
        assert reduce_op == "sum"
        return mask + other

    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce)
    for zero in (False, True):
        dm.trainer = SimpleNamespace(world_size=2, is_global_zero=zero, strategy=strategy)
        with caplog.at_level(logging.WARNING, logger="vidssl.data.datamodule"):
            dm.teardown("fit")
            dm.teardown("validate")
    end = [r.getMessage() for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(end) == 1 and end[0].startswith("2 videos could not be decoded and were replaced")


def test_crop_larger_than_short_side_warns_once_with_the_factor(tiny_video_root):
    with pytest.warns(UserWarning, match=r"crop_size=40 .*short_side=32.*upsampled 1\.25x") as w:
        dm = make_dm(tiny_video_root, crop_size=40)
        dm.setup()  # set-up runs again under Lightning: no second warning
    assert len([x for x in w if "upsampled" in str(x.message)]) == 1
    # Native sizes (short_side=0): the tiny videos are 64x48, below a 64 px crop.
    with pytest.warns(UserWarning, match=r"short_side=0.*24 of 24 readable.*crop_size=64.*1\.33x"):
        make_dm(tiny_video_root, short_side=0, crop_size=64, format="class_folders",
                train=str(tiny_video_root / "UCF-101"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_dm(tiny_video_root, short_side=32, crop_size=32)


def test_lightning_distributed_sampler_injection(tiny_video_root):
    # What Lightning does under DDP: rebuild the train loader around a DistributedSampler.
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    dm = make_dm(tiny_video_root, batch_size=4, drop_last=False)
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank, seed=3)
        loader = _update_dataloader(dm.train_dataloader(), sampler)
        assert loader.collate_fn is dm.train_dataloader().collate_fn
        seen.append(torch.cat([b["index"] for b in loader]).tolist())
    assert len(seen[0]) == len(seen[1]) == 8
    assert sorted(seen[0] + seen[1]) == list(range(16))


def test_datamodule_errors(tiny_video_root, tmp_path):
    with pytest.raises(ValueError, match="simclr, slic"):
        VideoDataModule(train=str(tiny_video_root), train_preset="nope")
    dm = VideoDataModule(train=None, num_workers=0)
    with pytest.raises(RuntimeError, match="No train videos"):
        dm.train_dataloader()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dm(tmp_path / "missing")


class _Probe(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        self.seen.append(
            ("train", [tuple(v.shape) for v in batch["views"]], batch["views"][0].dtype)
        )
        return (self.w * batch["views"][0].mean()).sum() + self.w.sum() ** 2

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", [tuple(v.shape) for v in batch["views"]], batch["views"][0].dtype))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_loop_augments_after_transfer(tiny_video_root):
    dm = VideoDataModule(
        train=str(tiny_video_root),
        clip_len=4,
        short_side=32,
        crop_size=16,
        batch_size=4,
        num_workers=0,
        eval_num_clips=2,
    )
    model = _Probe()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    train = [s for s in model.seen if s[0] == "train"]
    val = [s for s in model.seen if s[0] == "val"]
    assert len(train) == 2 and train[0][1] == [(4, 3, 4, 16, 16)] * 2
    assert train[0][2] == torch.float32
    assert val and val[0][1] == [(4, 3, 4, 16, 16)] * 2
