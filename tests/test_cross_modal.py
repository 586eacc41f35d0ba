"""CrossModalContrast: its loss against a hand-written NT-Xent, the weights, errors, a run."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from vidssl.data import VideoDataModule
from vidssl.methods import ConfigError, CrossModalContrast, Head, Optimization

TINY = dict(backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16},
            head=Head(hidden_dim=32, output_dim=16))


def _model(**kw):
    torch.manual_seed(0)
    return CrossModalContrast(**{**TINY, **kw})


def _batch(b=4, t=4, size=16, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "views": [torch.randn(b, 3, t, size, size, generator=g) for _ in range(2)],
        "motion": {p: torch.randn(b, channels, t, size, size, generator=g) for p in range(2)},
        "index": torch.arange(b),
        "label": torch.full((b,), -1),
    }


def _nt_xent_by_hand(a, b, t):
    """SimCLR's loss written out: row i of a and of b are positives, all other rows negatives."""
    z = F.normalize(torch.cat([a, b]), dim=1).double()
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [(z[i] @ z[k]).item() / t for k in range(2 * n) if k != i]
        total += -(z[i] @ z[j]).item() / t + math.log(sum(math.exp(s) for s in sims))
    return total / (2 * n)


@pytest.mark.parametrize("weights", [(0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (0.5, 2.0, 0.25)])
def test_loss_is_the_weighted_sum_of_hand_computed_nt_xent_terms(weights):
    rgb, motion, cross = weights
    m = _model(rgb_weight=rgb, motion_weight=motion, cross_weight=cross, temperature=0.2)
    batch = _batch()
    out = m.compute_loss(batch)
    with torch.no_grad():  # the same passes (train-mode BN over both clips of a modality)
        r0, r1 = m.projection(m.backbone(torch.cat(batch["views"]))).chunk(2)
        m0, m1 = m.motion_projection(m.motion_backbone(
            torch.cat([batch["motion"][0], batch["motion"][1]]))).chunk(2)
    want = {"loss_rgb": _nt_xent_by_hand(r0, r1, 0.2),
            "loss_motion": _nt_xent_by_hand(m0, m1, 0.2),
            "loss_cross": (_nt_xent_by_hand(r0, m1, 0.2) + _nt_xent_by_hand(m0, r1, 0.2)) / 2}
    for name, value in want.items():
        assert float(out[name]) == pytest.approx(value, rel=1e-5), name
    total = rgb * want["loss_rgb"] + motion * want["loss_motion"] + cross * want["loss_cross"]
    assert float(out["loss"].detach()) == pytest.approx(total, rel=1e-5)


def _grad_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(sum(g.abs().sum() for g in grads)) if grads else 0.0


def test_the_rgb_stream_learns_only_through_the_terms_that_hold_it():
    # Motion-motion alone: no gradient reaches the RGB stream ...
    m = _model(rgb_weight=0.0, motion_weight=1.0, cross_weight=0.0)
    m.compute_loss(_batch())["loss"].backward()
    assert _grad_norm(m.backbone) == 0.0 and _grad_norm(m.motion_backbone) > 0
    # ... the cross term alone reaches both streams: the RGB clip must find its motion.
    m = _model(rgb_weight=0.0, motion_weight=0.0, cross_weight=1.0)
    m.compute_loss(_batch())["loss"].backward()
    assert _grad_norm(m.backbone) > 0 and _grad_norm(m.motion_backbone) > 0


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="cross_weight must be >= 0"):
        CrossModalContrast(cross_weight=-1.0, **TINY)
    with pytest.raises(ValueError, match="rgb_weight must be >= 0"):
        CrossModalContrast(rgb_weight=float("nan"), **TINY)
    with pytest.raises(ValueError, match="needs a term"):
        CrossModalContrast(rgb_weight=0.0, motion_weight=0.0, cross_weight=0.0, **TINY)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        CrossModalContrast(temperature=0.0, **TINY)
    with pytest.raises(ValueError, match="motion_channels must be >= 1"):
        CrossModalContrast(motion_channels=0, **TINY)
    with pytest.raises(TypeError, match="zoo name"):
        CrossModalContrast(backbone=torch.nn.Identity())


def test_defaults_and_batch_contract():
    m = _model()
    assert (m.rgb_weight, m.motion_weight, m.cross_weight, m.temperature) == (0.0, 1.0, 1.0, 0.1)
    assert m.views == ("anchor", "positive") and m.motion_views == (0, 1)
    assert CrossModalContrast.default_head == Head(hidden_dim=2048, output_dim=128,
                                                   num_layers=2, batch_norm=True)
    # The two streams have one layout; the motion one takes motion_channels inputs.
    assert m.motion_backbone.feature_dim == m.backbone.feature_dim
    assert m.encode_motion(torch.randn(2, 2, 4, 16, 16)).shape == (2, m.feature_dim)


def test_a_checkpoint_loads_as_its_two_streams(tmp_path):
    from vidssl.backbones import TwoStream
    from vidssl.evaluation.embed import load_encoder

    m = _model().eval()
    path = tmp_path / "xmodal.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    enc, info = load_encoder(str(path))
    assert isinstance(enc, TwoStream) and info["motion"]["two_stream"]
    rgb, motion = torch.randn(2, 3, 4, 16, 16), torch.randn(2, 2, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_rgb(rgb), m.encode_rgb(rgb))
        torch.testing.assert_close(enc.encode_motion(motion), m.encode_motion(motion))


def _trainer(tmp_path, epochs, **kw):
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, deterministic=True, **kw)


def _data(root, motion="diff", **kw):
    return VideoDataModule(train=str(root), views=["anchor", "positive"], clip_len=4, stride=2,
                           crop_size=32, short_side=40, batch_size=8, num_workers=0,
                           drop_last=True, motion=motion, **kw)


def test_motion_channels_must_match_the_data(tiny_video_root, tmp_path):
    m = _model(motion_channels=2)  # frame differences have 3 channels
    with pytest.raises(ConfigError, match="3-channel motion.*motion_channels=3"):
        _trainer(tmp_path, 1).fit(m, datamodule=_data(tiny_video_root, motion="diff"))
    with pytest.raises(ConfigError, match="gives no motion"):
        _trainer(tmp_path, 1).fit(m, datamodule=_data(tiny_video_root, motion="none"))


@pytest.mark.slow
def test_trains_on_generated_videos_and_logs_every_term(tiny_video_root, tmp_path):
    m = _model(motion_channels=3, optim=Optimization(optimizer="adamw", lr=1e-3))

    class _Record(pl.Callback):
        rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append({k: float(trainer.callback_metrics[f"train/{k}"])
                              for k in ("loss", "loss_rgb", "loss_motion", "loss_cross")})

    rec = _Record()
    _trainer(tmp_path, 3, callbacks=[rec], enable_checkpointing=False).fit(
        m, datamodule=_data(tiny_video_root))
    assert len(rec.rows) == 6 and all(np.isfinite(list(r.values())).all() for r in rec.rows)
    for r in rec.rows:  # default weights: motion-motion plus cross
        assert r["loss"] == pytest.approx(r["loss_motion"] + r["loss_cross"], rel=1e-5)
