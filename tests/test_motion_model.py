"""Motion views on the model side: M-channel stems, TwoStream, SLIC's motion positives."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from test_cluster_methods import slic_loss_by_hand

import vidssl.backbones as vb
from vidssl.methods import ClusterTriplet, Head
from vidssl.methods.base import ConfigError

TINY = {"width_mult": 1 / 16}
FAMILIES = ["r3d_18", "mc3_18", "r2plus1d_18", "r3d_50", "s3d", "r3d_18_hara"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)


def _batch(b=6, seed=0, t=4, size=32, motion=True):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "views": [torch.randn(b, 3, t, size, size, generator=g) for _ in range(3)],
        "index": torch.arange(b),
        "positive_index": torch.tensor([0, 2, 1, 3, 5, 4])[:b],
        "label": torch.arange(b) % 2,
    }
    if motion:
        batch["motion"] = {p: torch.rand(b, 2, t, size, size, generator=g) * 2 - 1 for p in (1, 2)}
    return batch


def _triplet(**kwargs):
    kwargs = {"backbone": "r3d_18", "backbone_kwargs": TINY, "head": Head(hidden_dim=32), **kwargs}
    return ClusterTriplet(**kwargs)


# ------------------------------------------------------------------ backbones
def test_cross_modality_stem_is_the_mean_over_input_channels_repeated():
    w = torch.tensor([[1.0, 2.0, 6.0], [-3.0, 0.0, 0.0]]).view(2, 3, 1, 1, 1)
    out = vb.cross_modality_stem(w, 2)
    assert out.shape == (2, 2, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 3.0, -1.0, -1.0]


@pytest.mark.parametrize("name", FAMILIES)
def test_rgb_weights_load_into_an_m_channel_stem_of_every_family(name):
    torch.manual_seed(0)
    rgb = vb.build(name, **TINY)
    motion = vb.build(name, in_channels=2, weights=rgb.state_dict(), **TINY)
    key = f"{motion.stem_conv}.weight"
    w = rgb.state_dict()[key]
    assert motion.state_dict()[key].shape[1] == 2
    assert torch.equal(motion.state_dict()[key], w.mean(1, keepdim=True).repeat(1, 2, 1, 1, 1))
    # every other weight is the RGB model's
    assert all(torch.equal(v, rgb.state_dict()[k]) for k, v in motion.state_dict().items()
               if k != key)
    out = motion.eval()(torch.randn(2, 2, 4, 32, 32))
    assert out.shape == (2, motion.feature_dim) and torch.isfinite(out).all()


def test_a_stem_of_another_width_is_still_a_mismatch():
    rgb = vb.build("r3d_18", width_mult=1 / 8)
    with pytest.raises(vb.WeightsMismatchError, match="stem.0.weight"):
        vb.build("r3d_18", in_channels=2, weights=rgb.state_dict(), **TINY)


def test_two_stream_has_the_same_layout_and_returns_both_features():
    torch.manual_seed(0)
    rgb = vb.build("r3d_18", **TINY)
    two = vb.build_two_stream("r3d_18", motion_channels=2, weights=rgb.state_dict(), **TINY)
    assert two.feature_dim == rgb.feature_dim
    assert [k for k in two.rgb.state_dict()] == [k for k in two.motion.state_dict()]
    assert two.motion.stem[0].weight.shape[1] == 2
    x, m = torch.randn(2, 3, 4, 32, 32), torch.randn(2, 2, 4, 32, 32)
    two.eval()
    fr, fm = two(x, m)
    assert torch.equal(fr, rgb.eval()(x)) and torch.equal(fm, two.encode_motion(m))
    assert fm.shape == (2, rgb.feature_dim)


def test_xy_stem_swaps_the_first_convolution_of_the_motion_rows_only():
    torch.manual_seed(0)
    backbone = vb.build("r3d_18_hara", **TINY).eval()
    stem = vb.MotionStem(backbone, "xy", in_channels=2)
    assert torch.equal(stem.conv.weight, vb.cross_modality_stem(backbone.conv1.weight, 2))
    rgb, motion = torch.randn(4, 3, 4, 32, 32), torch.randn(4, 2, 4, 32, 32)
    mask = torch.tensor([True, False, True, False])
    mixed = stem(backbone, rgb, motion[mask], mask)
    # a motion-only backbone: the same layout with the motion stem's weights
    alone = vb.build("r3d_18_hara", in_channels=2, **TINY).eval()
    alone.load_state_dict({**backbone.state_dict(), "conv1.weight": stem.conv.weight})
    torch.testing.assert_close(mixed[mask], alone(motion[mask]))
    torch.testing.assert_close(mixed[~mask], backbone(rgb[~mask]))
    torch.testing.assert_close(stem.encode(backbone, motion), alone(motion))


def test_x3_needs_two_channels_and_xy_a_named_stem():
    with pytest.raises(ValueError, match="motion_input='xy'"):
        vb.MotionStem(vb.build("r3d_18", **TINY), "x3", in_channels=3)

    class Plain(torch.nn.Module):
        feature_dim = 4

    with pytest.raises(ValueError, match="stem_conv"):
        vb.MotionStem(Plain(), "xy")


# ------------------------------------------------------------------ SLIC motion positives
def test_draws_are_per_sample_per_view_at_the_binomial_rate():
    m = _triplet(motion_prob=0.25)
    assert m.motion_views == (1, 2)
    b, batches = 500, 40
    draws = []
    for i in range(batches):
        m._batch_idx = i
        masks = m.draw_motion_masks(b)
        for p in (1, 2):
            # per sample, not per batch: both outcomes in every batch
            assert 0 < int(masks[p].sum()) < b
        draws.append(torch.stack([masks[1], masks[2]]))
    d = torch.stack(draws).float()  # batches x 2 x b
    n = d.numel()
    sd = math.sqrt(0.25 * 0.75 / n)
    assert abs(d.mean().item() - 0.25) < 5 * sd
    # the positive and the re-augmented anchor draw independently (SLIC: one draw per _load_clip)
    both = (d[:, 0] * d[:, 1]).mean().item()
    assert abs(both - 0.0625) < 5 * math.sqrt(0.0625 * 0.9375 / (n // 2))
    # the same batch index draws the same (a resumed run), another index not
    m._batch_idx = 3
    again = m.draw_motion_masks(b)
    assert torch.equal(torch.stack([again[1], again[2]]).float(), d[3])
    assert not torch.equal(d[3], d[4])


def test_motion_prob_0_is_the_rgb_only_loss_exactly():
    torch.manual_seed(0)
    m = _triplet()
    assert m.motion_views == () and m.motion_prob == 0.0
    m.set_pseudo_labels(torch.tensor([0, 1, 0, 1, -1, -1]))
    batch = _batch()
    torch.manual_seed(5)
    out = m.compute_loss(batch)
    # by hand, as the RGB-only method computes it (the motion in the batch is ignored)
    rgb = {k: v for k, v in batch.items() if k != "motion"}
    expected, _ = slic_loss_by_hand(m, rgb, [0, 1, 0, 1, -1, -1], seed=5)
    assert torch.equal(out["loss"], expected)
    assert "motion_fraction" not in out and "motion_mask" not in batch


def test_motion_prob_1_feeds_slic_x3_inputs_for_positive_and_anchor_repeat():
    torch.manual_seed(0)
    m = _triplet(motion_prob=1.0)
    batch = _batch()
    seen = []
    m.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    out = m.compute_loss(batch)
    x = seen[0]
    b = 6

    def x3(f):  # SLIC: u = (x + 1) / 2 as the grey image, 3 copies, ImageNet-normalised
        return ((f[:, :1] + 1) / 2).repeat(1, 3, 1, 1, 1).sub(MEAN).div(STD)

    assert torch.equal(x[:b], batch["views"][0])  # the anchor stays RGB
    torch.testing.assert_close(x[b : 2 * b], x3(batch["motion"][1]))
    torch.testing.assert_close(x[2 * b :], x3(batch["motion"][2]))
    assert out["motion_fraction"].item() == 1.0
    assert all(mask.all() for mask in batch["motion_mask"].values())


def test_partial_replacement_replaces_exactly_the_drawn_rows():
    m = _triplet(motion_prob=0.5)
    batch = _batch()
    seen = []
    m.backbone.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    out = m.compute_loss(batch)
    b, x = 6, seen[0]
    for p in (1, 2):
        mask = batch["motion_mask"][p]
        rows = x[p * b : (p + 1) * b]
        assert torch.equal(rows[~mask], batch["views"][p][~mask])
        assert not torch.equal(rows[mask], batch["views"][p][mask]) or not mask.any()
    frac = torch.stack(list(batch["motion_mask"].values())).float().mean()
    assert out["motion_fraction"].item() == frac.item()


def test_xy_trains_its_own_stem_and_the_shared_trunk():
    torch.manual_seed(0)
    m = _triplet(motion_prob=1.0, motion_input="xy")
    out = m.compute_loss(_batch())
    out["loss"].backward()
    assert m.motion_stem.conv.weight.grad.abs().sum() > 0
    assert m.backbone.stem[0].weight.grad.abs().sum() > 0  # the RGB anchors
    assert m.encode_motion(torch.zeros(2, 2, 4, 32, 32)).shape == (2, m.feature_dim)
    # without motion training the xy stem does not exist: no motion encoder to evaluate
    with pytest.raises(NotImplementedError, match="features='rgb'"):
        _triplet(motion_input="xy").encode_motion(torch.zeros(2, 2, 4, 32, 32))


def test_bad_motion_settings_are_refused():
    with pytest.raises(ValueError, match="motion_prob"):
        _triplet(motion_prob=1.5)
    with pytest.raises(ValueError, match="motion_input"):
        _triplet(motion_input="uv")


def test_first_batch_without_motion_is_a_clear_error():
    m = _triplet(motion_prob=0.25)
    with pytest.raises(ValueError, match=r"motion of views \[1, 2\]"):
        m.check_batch(_batch(motion=False))


class _StubData(pl.LightningDataModule):
    """Hand-made batches in the motion contract's device format (no decoding, no augment)."""

    def __init__(self, views, motion_channels=0, motion_views=None, steps=2):
        super().__init__()
        self.views, self.motion_channels, self.motion_views = tuple(views), motion_channels, (
            motion_views)
        self.steps = steps

    def train_dataloader(self):
        batches = [_batch(seed=i, motion=self.motion_channels > 0) for i in range(self.steps)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


def _fit(model, dm):
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return trainer


def test_start_up_error_when_motion_is_needed_but_not_configured():
    m = _triplet(motion_prob=0.25)
    with pytest.raises(ConfigError, match="motion_prob=0.25.*gives no motion.*data.init_args.mot"):
        _fit(m, _StubData(m.views))
    with pytest.raises(ConfigError, match="views \\[1\\]"):
        _fit(m, _StubData(m.views, motion_channels=2, motion_views=[1]))
    with pytest.raises(ConfigError, match="motion_input='x3' needs flow or motion vectors"):
        _fit(_triplet(motion_prob=0.25), _StubData(m.views, motion_channels=3))


def test_trains_on_stub_motion_batches_and_logs_the_replaced_fraction():
    m = _triplet(motion_prob=0.5)
    trainer = _fit(m, _StubData(m.views, motion_channels=2))
    frac = trainer.callback_metrics["train/motion_fraction"].item()
    assert 0.0 < frac < 1.0 and torch.isfinite(trainer.callback_metrics["train/loss"])
