"""The motion view of VideoDataModule batches: aligned with its RGB view through crop and flip,
one random draw shared by the two, start-up checks of the configuration."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion

from vidssl.data import VideoDataModule
from vidssl.data.augment import IMAGENET_MEAN, IMAGENET_STD, VideoAugmentation
from vidssl.data.decoding import PyAVDecoder
from vidssl.data.flow import FLOW_BOUND, FlowMissingError, flow_path, quantize_flow
from vidssl.data.synthetic import moving_sprite, write_video

S = 32  # crop_size
SIDE = 48  # training crop side forced below: scale 0.375 of a 96 x 64 frame, ratio 1
VELOCITY = {"right_down.avi": (3, 2), "sub/left_up.avi": (-3, -2)}


def _manifest(flow_dir, root, short_side=64):
    flow_dir.mkdir(parents=True, exist_ok=True)
    (flow_dir / "flow_manifest.json").write_text(json.dumps(
        {"version": 1, "method": "truth", "bound": FLOW_BOUND, "short_side": short_side,
         "root": str(root.resolve()), "videos": {}}))


@pytest.fixture(scope="module")
def sprites(tmp_path_factory):
    """Textured sprites on a black background moving by a known vector per frame, 96 x 64, with
    their true optical flow stored as `vidssl flow` stores it (flow_dir/<rel>.npy)."""
    root = tmp_path_factory.mktemp("sprites")
    flow_dir = root.parent / f"{root.name}_flow"
    (root / "sub").mkdir()
    for rel, v in VELOCITY.items():
        frames, masks = moving_sprite(num_frames=8, width=96, height=64, velocity=v, sprite=36)
        frames = np.where(masks[..., None], np.clip(frames, 90, 255), 0).astype(np.uint8)
        write_video(root / rel, frames, codec="mpeg4")
        truth = np.zeros((8, 64, 96, 2), np.float32)
        for t in range(7):  # flow t: frame t -> t + 1, on frame t's pixels
            truth[t][masks[t]] = v
        truth[7] = truth[6]
        out = flow_path(flow_dir, rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, quantize_flow(truth))
    _manifest(flow_dir, root)
    return root, flow_dir


def _dm(root, **kw):
    args = dict(train=str(root), format="folder", clip_len=4, stride=1, short_side=64,
                crop_size=S, batch_size=2, num_workers=0, backend="pyav")
    args.update(kw)
    dm = VideoDataModule(**args)
    dm.setup()
    return dm


def _rgb01(views: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of float B x C x T x H x W views."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return views * std + mean


@pytest.mark.parametrize("source", ["flow", "mv"])
@pytest.mark.parametrize("transform", ["flip", "no_flip", "eval"])
def test_motion_view_gives_the_sprite_vector_back_through_crop_and_flip(
    sprites, source, transform
):
    root, flow_dir = sprites
    dm = _dm(root, motion=source, flow_dir=str(flow_dir))
    paths = [p.replace("\\", "/") for p in dm.train_dataset.index.paths]
    if transform == "eval":
        batch = dm.augment(next(iter(dm.eval_dataloader("train"))), train=False)
        scale = (S / 64, S / 64)  # short side 64 -> S, centre crop
        flipped = False
    else:
        flipped = transform == "flip"
        dm.train_augmentation = VideoAugmentation(
            S, scale=(0.375, 0.375), ratio=(1.0, 1.0), flip_p=float(flipped), jitter_p=0.0,
            grayscale_p=0.0, blur_p=0.0)
        dm.set_train_batch_sampler([[0, 1]])
        torch.manual_seed(3)
        batch = dm.augment(next(iter(dm.train_dataloader())), train=True)
        scale = ((S - 1) / (SIDE - 1),) * 2  # kornia resizes corner-aligned
    assert sorted(batch["motion"]) == [0, 1] if transform != "eval" else [0]
    motion, rgb = batch["motion"][0], _rgb01(batch["views"][0])
    assert motion.shape == (2, 2, 4, S, S) and motion.dtype == torch.float32
    sprite = (rgb.mean(1) > 0.25).numpy()  # B x T x S x S: the sprite where the RGB view has it
    for b, i in enumerate(batch["index"].tolist()):
        vx, vy = next(v for rel, v in VELOCITY.items() if paths[i].endswith(rel))
        expected = np.array([-vx if flipped else vx, vy]) * np.array(scale) / FLOW_BOUND
        checked = 0
        for t in range(4):
            field = motion[b, :, t].numpy()
            if np.abs(field).max() < 0.01:  # an I-frame: no motion vectors
                assert source == "mv"
                continue
            inside = binary_erosion(sprite[b, t], iterations=3)
            assert inside.sum() > 40
            med = np.median(field[:, inside], axis=1)
            assert np.allclose(med, expected, rtol=0.15, atol=0.01), (paths[i], t, med, expected)
            if source == "flow":  # (an encoder's vectors over flat black are arbitrary)
                outside = binary_erosion(~sprite[b, t], iterations=4)
                assert np.abs(np.median(field[:, outside], axis=1)).max() < 0.01  # static
            checked += 1
        assert checked >= 2


@pytest.fixture(scope="module")
def pattern_video(tmp_path_factory):
    """Static videos of noise (48 x 64 and 48 x 80: batches crop them) whose stored 'flow' is
    their own decoded red and green channels."""
    root = tmp_path_factory.mktemp("pattern")
    flow_dir = root.parent / f"{root.name}_flow"
    _manifest(flow_dir, root, short_side=48)
    rng = np.random.default_rng(0)
    for name, width in (("a.avi", 64), ("b.avi", 80)):
        frame = rng.integers(0, 256, (1, 48, width, 3), dtype=np.uint8)
        write_video(root / name, np.repeat(frame, 6, axis=0))
        decoded = PyAVDecoder().read(str(root / name), np.arange(6))
        np.save(flow_path(flow_dir, name), np.ascontiguousarray(decoded[..., :2]))
    return root, flow_dir


@pytest.mark.parametrize("cpu_chunk", [1, 0], ids=["per-clip", "one-call"])
def test_rgb_and_motion_share_one_draw_that_differs_across_clips(pattern_video, cpu_chunk):
    root, flow_dir = pattern_video
    dm = _dm(root, motion="flow", flow_dir=str(flow_dir), short_side=48, train_preset="crop_flip",
             num_views=2)
    dm.train_augmentation.cpu_chunk = cpu_chunk
    dm.set_train_batch_sampler([[0, 1] * 4])  # four clips of each video
    raw = next(iter(dm.train_dataloader()))
    # Out of the workers and the collate function (which crops the wider video to the batch's
    # size) the motion field of a view has exactly its RGB pixels: same frames, same crop.
    for v in (0, 1):
        assert raw["views"][v].shape == (8, 4, 48, 64, 3)
        assert torch.equal(raw["motion"][v], raw["views"][v][..., :2])
    evaluation = next(iter(dm.eval_dataloader("train")))  # centre squares
    assert torch.equal(evaluation["motion"][0], evaluation["views"][0][..., :2])
    torch.manual_seed(0)
    out = dm.augment(raw, train=True)
    ks = []
    for v in (0, 1):
        rgb, motion = _rgb01(out["views"][v]), out["motion"][v]
        for b in range(8):
            for c in (0, 1):  # x follows red, y follows green
                pattern = (2 * rgb[b, c] - 1).flatten()
                m = motion[b, c].flatten()
                # The same crop: the field is the pattern times the vector scale (and the flip's
                # sign for x), with no offset; another crop of noise would not be proportional.
                k = float(m @ pattern / (pattern @ pattern))
                assert abs(k) > 0.5
                assert torch.allclose(m, k * pattern, atol=1e-4), (v, b, c)
                ks.append(k)
    # Different draws across the clips of a batch (the same video four times) and across views:
    # scales and flips vary.
    assert len({round(k, 3) for k in ks}) > 8
    assert any(k < 0 for k in ks[::2]) and any(k > 0 for k in ks[::2])  # some x flipped
    assert all(k > 0 for k in ks[1::2])  # y never negated


def test_diff_is_the_frame_difference_of_the_augmented_clip(sprites):
    root, _ = sprites
    dm = _dm(root, motion="diff", num_views=2, motion_views=[1])
    assert dm.motion_channels == 3
    dm.train_augmentation = VideoAugmentation(S, flip_p=1.0, jitter_p=0.0, grayscale_p=0.0,
                                              blur_p=0.0)
    raw = next(iter(dm.train_dataloader()))
    assert "motion" not in raw  # nothing read in the workers
    out = dm.augment(raw, train=True)
    assert sorted(out["motion"]) == [1]  # only the view the method asked for
    rgb, diff = _rgb01(out["views"][1]), out["motion"][1]
    assert diff.shape == (2, 3, 4, S, S)
    assert torch.allclose(diff[:, :, :3], rgb[:, :, 1:] - rgb[:, :, :-1], atol=1e-5)
    assert torch.equal(diff[:, :, 3], diff[:, :, 2])  # the last frame repeats the one before
    assert diff.abs().max() > 0.2  # the sprite moves
    # Evaluation batches: every clip, centre crop.
    dm = _dm(root, motion="diff", eval_num_clips=2, val=str(root))
    val = dm.augment(next(iter(dm.val_dataloader())), train=False)
    assert sorted(val["motion"]) == [0, 1] and val["motion"][1].shape == (2, 3, 4, S, S)
    rgb = _rgb01(val["views"][1])
    assert torch.allclose(val["motion"][1][:, :, 0], rgb[:, :, 1] - rgb[:, :, 0], atol=1e-5)


def test_motion_views_and_the_repeated_anchor(sprites):
    root, flow_dir = sprites
    views = ["anchor", "positive", "anchor_repeat"]
    dm = _dm(root, motion="flow", flow_dir=str(flow_dir), views=views, motion_views=[0, 2])
    assert dm.motion_views == (0, 2) and dm.motion_channels == 2
    raw = next(iter(dm.train_dataloader()))
    assert sorted(raw["motion"]) == [0, 2]
    assert raw["motion"][0].shape == (2, 4, 64, 96, 2) and raw["motion"][0].dtype == torch.uint8
    assert torch.equal(raw["motion"][0], raw["motion"][2])  # the same frames
    dm = _dm(root, motion="mv", views=views, motion_views=[2])
    raw = next(iter(dm.train_dataloader()))
    assert sorted(raw["motion"]) == [2]
    out = dm.augment(raw, train=True)
    assert out["motion"][2].shape == (2, 2, 4, S, S)
    assert out["views"][0].dtype == torch.float32 and out["views"][0].shape == (2, 3, 4, S, S)
    assert dm.augment(out, train=True)["motion"][2] is out["motion"][2]  # idempotent
    with pytest.raises(ValueError, match="motion_views=\\[3\\].*3 training views"):
        VideoDataModule(train=str(root), motion="mv", views=views, motion_views=[3])


def test_evaluation_loaders_carry_motion_for_every_clip(sprites):
    root, flow_dir = sprites
    dm = _dm(root, motion="flow", flow_dir=str(flow_dir), val=str(root), eval_num_clips=2,
             motion_views=[1])
    val = next(iter(dm.val_dataloader()))
    assert sorted(val["motion"]) == [0, 1]
    assert val["motion"][1].shape == val["views"][1].shape[:4] + (2,)
    bank = next(iter(dm.bank_dataloader()))
    assert sorted(bank["motion"]) == [0]
    out = dm.augment(bank, train=False)
    assert out["motion"][0].shape == (2, 2, 4, S, S)
    # Deterministic: the same clip and centre crop every time.
    again = dm.augment(next(iter(dm.bank_dataloader())), train=False)
    assert torch.equal(out["motion"][0], again["motion"][0])
    test = next(iter(dm.eval_dataloader("val", num_clips=3)))
    assert sorted(test["motion"]) == [0, 1, 2]


def test_a_video_without_flow_is_named_at_setup(sprites, tmp_path):
    root, flow_dir = sprites
    partial = tmp_path / "flow"
    _manifest(partial, root)
    np.save(flow_path(partial, "right_down.avi"), np.load(flow_path(flow_dir, "right_down.avi")))
    dm = VideoDataModule(train=str(root), format="folder", motion="flow", flow_dir=str(partial),
                         num_workers=0)
    with pytest.raises(FlowMissingError) as err:
        dm.setup()
    msg = str(err.value)
    assert "1 of 2 training videos have no flow" in msg and "sub/left_up.avi" in msg
    assert "vidssl flow" in msg and "\n" not in msg
    dm = VideoDataModule(train=str(root), format="folder", motion="flow",
                         flow_dir=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(FlowMissingError, match="nowhere does not exist"):
        dm.setup()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(motion="flo"), "data.motion='flo' is not a motion view; valid: none, flow, mv, diff"),
        (dict(motion="flow"), "data.motion='flow' needs data.flow_dir"),
        (dict(motion_views=[1]), "reads motion in views [1] but data.motion='none'"),
    ],
)
def test_bad_motion_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError) as err:
        VideoDataModule(train="unused", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_motion_settings_through_the_command_line(tmp_path, tiny_video_root, capsys):
    import yaml

    from vidssl.cli import VidsslCLI, _motion_views, main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"class_path": "SimCLR", "init_args": {"backbone": "r3d_18",
                                                        "backbone_kwargs": {"width_mult": 0.0625}}},
        "data": {"class_path": "VideoDataModule",
                 "init_args": {"train": str(tiny_video_root), "num_workers": 0}},
        "trainer": {"accelerator": "cpu", "logger": False},
    }))
    for bad, needle in (("motion=flo", "none', 'flow', 'mv', 'diff"),
                        ("motion=flow", "data.motion='flow' needs data.flow_dir")):
        assert main(["fit", "--config", str(cfg), f"--data.init_args.{bad}"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and needle in err[0], err
    # data.motion_views follows the method's motion_views; every view when it declares none.
    assert _motion_views(SimpleNamespace()) is None
    assert _motion_views(SimpleNamespace(motion_views=(1,))) == [1]
    assert _motion_views(SimpleNamespace(motion_views=())) == []
    cli = VidsslCLI(["--config", str(cfg), "--data.init_args.motion=diff"], run=False)
    declared = _motion_views(cli.model)
    assert cli.datamodule.motion_views == tuple(range(2) if declared is None else declared)


def test_mv_warns_when_the_codec_carries_no_motion_vectors(tmp_path):
    import av

    if "mjpeg" not in av.codecs_available:
        pytest.skip("no mjpeg encoder")
    frames, _ = moving_sprite(num_frames=8, width=64, height=48, velocity=(1, 0), sprite=16)
    write_video(str(tmp_path / "v.avi"), frames, codec="mjpeg")
    with pytest.warns(UserWarning, match="is mjpeg, whose stream carries no motion vectors"):
        _dm(tmp_path, motion="mv", short_side=48)


def test_flow_of_vidssl_flow_is_found_by_the_path_rule(tiny_video_root, tmp_path):
    pytest.importorskip("cv2")
    from vidssl.cli import main

    # `vidssl flow` on the video folder: the manifest's root is UCF-101/, not the data root.
    flow_dir = tmp_path / "flow"
    assert main(["flow", str(tiny_video_root / "UCF-101"), "-o", str(flow_dir), "--method",
                 "farneback", "--short-side", "32"]) == 0
    dm = VideoDataModule(train=str(tiny_video_root), motion="flow", flow_dir=str(flow_dir),
                         clip_len=4, short_side=32, crop_size=24, batch_size=4, num_workers=0)
    dm.setup()  # training and test split both found
    i = 0
    rel = dm.train_dataset.flow_videos[i]
    assert (tiny_video_root / "UCF-101" / rel).exists() and rel.count("/") == 1
    assert flow_path(flow_dir, rel).exists()
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["motion"]) == [0, 1]
    assert batch["motion"][0].shape == batch["views"][0].shape[:4] + (2,) == (4, 4, 32, 43, 2)
    out = dm.augment(batch, train=True)
    assert out["motion"][1].shape == (4, 2, 4, 24, 24)
    # A video whose flow is removed is named at the next start.
    flow_path(flow_dir, rel).unlink()
    dm = VideoDataModule(train=str(tiny_video_root), motion="flow", flow_dir=str(flow_dir),
                         num_workers=0)
    with pytest.raises(FlowMissingError, match=rel):
        dm.setup()


def test_lightning_loop_delivers_float_motion_to_the_step(sprites):
    import pytorch_lightning as pl

    root, flow_dir = sprites
    seen = []

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append({k: (tuple(v.shape), v.dtype) for k, v in batch["motion"].items()})
            return (self.w * batch["motion"][0].mean()).sum() + self.w.sum() ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(root, motion="flow", flow_dir=str(flow_dir))
    pl.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(Probe(), datamodule=dm)
    assert seen == [{0: ((2, 2, 4, S, S), torch.float32), 1: ((2, 2, 4, S, S), torch.float32)}]
