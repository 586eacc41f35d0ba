"""GOCA: Sinkhorn codes, the cross-modal prior's sign, prototypes, clips, resume, a training run."""

import inspect

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from vidssl.callbacks.pseudo_labels import PseudoLabelState
from vidssl.data import VideoDataModule
from vidssl.methods import GOCA, ConfigError, Head, Optimization
from vidssl.methods.goca import (
    guided_codes,
    hyperspherical_prototypes,
    prototype_separation_loss,
    sinkhorn,
)

TINY = dict(backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16}, num_prototypes=12,
            prototype_steps=30, head=Head(hidden_dim=32, output_dim=16), num_short_clips=2)


def _goca(**kw):
    torch.manual_seed(0)
    return GOCA(**{**TINY, **kw})


def _batch(b=4, views=4, t=4, size=16, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "views": [torch.randn(b, 3, t, size, size, generator=g) for _ in range(views)],
        "motion": {p: torch.randn(b, channels, t, size, size, generator=g) for p in range(views)},
        "index": torch.arange(b) + seed * b,
        "label": torch.full((b,), -1),
    }


# ------------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_codes_sum_to_one_and_prototypes_share_the_samples():
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(24, 16, generator=g), dim=1) @ F.normalize(
        torch.randn(6, 16, generator=g), dim=1).t()
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert q.shape == (24, 6) and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(24))  # each sample: a distribution
    # Each prototype's total is N / K once the iterations have converged ...
    converged = sinkhorn(scores, epsilon=0.05, iterations=500)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((6,), 4.0), rtol=1e-3, atol=1e-3)
    # ... which the plain softmax (no balancing) is far from.
    plain = F.softmax(scores / 0.05, dim=1).sum(dim=0)
    assert (plain - 4.0).abs().max() > 0.5


def test_sinkhorn_is_the_official_recursion():
    """3 iterations equal the official distributed_sinkhorn, written out on one process."""
    g = torch.Generator().manual_seed(1)
    out = torch.rand(10, 5, generator=g) * 2 - 1
    Q = torch.exp(out / 0.05).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(3):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    torch.testing.assert_close(sinkhorn(out), (Q * B).t())


def _objective(plan, scores, eps, eps2, prior_plan):
    entropy = -(plan * plan.log()).sum()
    kl = (plan * (plan.log() - prior_plan.log())).sum()
    return (plan * scores).sum() + eps * entropy - eps2 * kl


@pytest.mark.parametrize("sign", ["kl", "official"])
def test_kl_sign_maximises_transport_with_a_kl_term_to_the_prior(sign):
    """Q = argmax <Q, S> + eps H(Q) - eps2 KL(Q || P) on the transport polytope: moving along
    any direction that keeps the row and column sums lowers the objective (it is concave, so
    a zero directional derivative there means the maximum). The official sign fails this."""
    g = torch.Generator().manual_seed(2)
    n, k, eps, eps2 = 8, 4, 0.5, 0.3
    scores = torch.rand(n, k, generator=g, dtype=torch.float64).float()
    prior = F.softmax(torch.randn(n, k, generator=g) * 2, dim=1)
    q = sinkhorn(scores, epsilon=eps, iterations=2000, prior=prior, prior_epsilon=eps2,
                 prior_sign=sign).double()
    plan, prior_plan, s = q / n, prior.double() / n, scores.double()
    best = _objective(plan, s, eps, eps2, prior_plan)
    # Directions with zero row and column sums: +d at (i, a), (j, b); -d at (i, b), (j, a).
    worse = []
    for i, j, a, b in [(0, 1, 0, 1), (2, 5, 3, 1), (4, 7, 2, 0), (3, 6, 1, 3)]:
        d = torch.zeros(n, k, dtype=torch.float64)
        d[i, a] = d[j, b] = 1e-4
        d[i, b] = d[j, a] = -1e-4
        for step in (d, -d):
            worse.append(bool(_objective(plan + step, s, eps, eps2, prior_plan) < best))
    assert all(worse) == (sign == "kl")


def test_the_prior_pulls_codes_toward_the_other_view():
    # Sample 0 is a tie for RGB; its motion codes say prototype 0. Samples 1-3 keep the balance.
    rgb = torch.tensor([[0.0, 0.0], [0.5, -0.5], [-0.5, 0.5], [0.0, 0.0]])
    motion_codes = torch.tensor([[0.99, 0.01], [0.5, 0.5], [0.5, 0.5], [0.01, 0.99]])
    plain = sinkhorn(rgb)
    assert plain[0, 0].item() == pytest.approx(0.5, abs=1e-6)
    kl = sinkhorn(rgb, prior=motion_codes, prior_sign="kl")
    official = sinkhorn(rgb, prior=motion_codes, prior_sign="official")
    assert kl[0, 0] > 0.6 and kl[3, 1] > 0.6  # toward the motion view
    assert official[0, 0] < 0.4 and official[3, 1] < 0.4  # the official sign: away from it
    # guided_codes feeds each modality's plain codes to the other as the prior.
    motion_scores = torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    q_rgb, _ = guided_codes(rgb, motion_scores, cycles=1)
    q_plain, _ = guided_codes(rgb, motion_scores, cycles=0)
    assert q_rgb[0, 0] > q_plain[0, 0] + 0.05


def test_prior_of_zeros_stays_finite():
    rgb = torch.tensor([[0.3, -0.3], [-0.3, 0.3]])
    prior = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for sign in ("kl", "official"):
        assert torch.isfinite(sinkhorn(rgb, prior=prior, prior_sign=sign)).all()


# ------------------------------------------------------------------------------- prototypes
def test_hyperspherical_prototypes_are_spread_unit_vectors_and_cached(video_cache_dir):
    random = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(300)), dim=1)
    p = hyperspherical_prototypes(40, 8, steps=200, lr=0.1)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(40))
    # the largest cosine of each prototype to the others went down
    assert prototype_separation_loss(p) < prototype_separation_loss(random) - 0.1
    assert list((video_cache_dir / "prototypes").glob("hyperspherical-40x8-200-*.pt"))
    assert torch.equal(hyperspherical_prototypes(40, 8, steps=200, lr=0.1), p)  # from the cache


def test_frozen_prototypes_get_no_gradient_and_learned_ones_do():
    frozen = _goca(prior_start_epoch=0)
    frozen.compute_loss(_batch())["loss"].backward()
    assert frozen.prototypes.weight.grad is None
    trained = [p for g in frozen.param_groups() for p in g["params"]]
    assert all(p is not frozen.prototypes.weight for p in trained)
    learned = _goca(prototypes="learned")
    out = learned.compute_loss(_batch())
    out["loss"].backward()
    assert learned.prototypes.weight.grad is not None
    assert learned.prototypes.weight.grad.abs().sum() > 0
    assert "separation" in out


# ------------------------------------------------------------------------------- clips, loss
def test_short_clips_are_windows_of_the_same_frames_in_both_modalities():
    m = _goca(num_short_clips=3, short_frames=2)
    b = _batch(views=5, t=6)
    rgb, mot = m.clips(b)
    assert [c.shape[2] for c in rgb] == [6, 6, 2, 2, 2]
    for j in range(3):
        src = 2 + j
        for row in range(4):
            # find the window: RGB and motion are cut at the same start
            starts = [s for s in range(5) if torch.equal(rgb[2 + j][row],
                                                         b["views"][src][row, :, s:s + 2])]
            assert len(starts) == 1
            s = starts[0]
            assert torch.equal(mot[2 + j][row], b["motion"][src][row, :, s:s + 2])
    long_only = _goca(num_short_clips=2, short_clips_from="long")
    assert long_only.views == ("anchor", "positive")
    rgb, _ = long_only.clips(_batch(views=2))
    assert len(rgb) == 4 and rgb[3].shape[2] == 2


def test_loss_is_the_swapped_prediction_within_each_modality():
    m = _goca(num_short_clips=1, prior_start_epoch=0).eval()
    b = _batch(views=3)
    rgb, mot = m.clips(b)
    with torch.no_grad():
        out = m.compute_loss(b)["loss"]
        s_r = [m.prototypes(F.normalize(m.projection(m.backbone(c)), dim=1)) for c in rgb]
        s_m = [m.prototypes(F.normalize(m.motion_projection(m.motion_backbone(c)), dim=1))
               for c in mot]
    expected = 0.0
    for scores, which in ((s_r, 0), (s_m, 1)):
        total = 0.0
        for a in range(2):
            q = guided_codes(s_r[a], s_m[a], cycles=1)[which]
            for v in range(3):
                if v != a:
                    total += -(q * F.log_softmax(scores[v] / 0.1, dim=1)).sum(1).mean() / 2
        expected += total / 2 / 2
    assert out.item() == pytest.approx(float(expected), rel=1e-5)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown prior_sign 'plus'.*kl, official"):
        _goca(prior_sign="plus")
    with pytest.raises(ValueError, match="short clips of 4 frames need longer views"):
        _goca(short_frames=4).check_batch(_batch(t=4))


class _StubData(pl.LightningDataModule):
    """Hand-made batches in the motion contract's device format."""

    def __init__(self, views, channels=2, steps=3, motion_channels=None):
        super().__init__()
        self.views, self.channels, self.steps = tuple(views), channels, steps
        self.motion_channels = channels if motion_channels is None else motion_channels
        self.motion_views = None
        self.batch_size, self.drop_last = 4, True

    def train_dataloader(self):
        batches = [_batch(views=len(self.views), channels=self.channels, seed=i)
                   for i in range(self.steps)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


def _trainer(tmp_path, epochs, **kw):
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, deterministic=True, **kw)


def test_motion_channels_must_match_the_data(tmp_path):
    m = _goca()
    with pytest.raises(ConfigError, match="3-channel motion.*motion_channels=3"):
        _trainer(tmp_path, 1).fit(m, datamodule=_StubData(m.views, channels=3))
    with pytest.raises(ConfigError, match="gives no motion"):
        _trainer(tmp_path, 1).fit(m, datamodule=_StubData(m.views, motion_channels=0))


# ------------------------------------------------------------------------------- resume
def _resumable():
    return _goca(prototypes="learned", queue_length=8, queue_start_epoch=0, prior_start_epoch=1,
                 optim=Optimization(optimizer="sgd", lr=0.05, warmup_epochs=0))


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


@pytest.mark.slow
def test_resume_restores_prototypes_queue_and_assignments_bit_for_bit(tmp_path):
    def fit(model, root, ckpt_path=None):
        rec = _Losses()
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1)
        _trainer(root, 2, callbacks=[rec, ckpt]).fit(model, datamodule=_StubData(model.views),
                                                     ckpt_path=ckpt_path)
        return rec.losses

    full = _resumable()
    full_losses = fit(full, tmp_path)
    first = next(tmp_path.glob("epoch=0-*.ckpt"))
    assert "goca_assignments" in torch.load(first, weights_only=False)
    loaded = GOCA.load_from_checkpoint(first).assignments()  # the record after epoch 0
    assert loaded.epoch == 0 and (loaded.labels >= 0).sum() == 12
    resumed = _resumable()
    torch.rand(1000)  # another global RNG state (same seed) must not matter (clips' windows)
    resumed_losses = fit(resumed, tmp_path / "resumed", ckpt_path=str(first))
    assert torch.equal(torch.stack(resumed_losses), torch.stack(full_losses[3:]))
    assert resumed.prior_active() and full.prior_active()  # the start-epoch state: epoch 1 >= 1
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and {"prototypes.weight", "queue.keys", "queue.ptr"} <= set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["prototypes.weight"], _resumable().prototypes.weight)  # trained
    assert full.queue.filled().all()
    la, lb = full.assignments(), resumed.assignments()
    assert np.array_equal(la.labels, lb.labels) and la.epoch == lb.epoch == 1
    assert (la.labels >= 0).all() and len(la.labels) == 12  # 3 batches of 4 videos


def test_assignments_read_as_a_pseudo_label_state():
    m = _goca()
    m.compute_loss(_batch(seed=1))  # indices 4..7
    state = PseudoLabelState.from_dict(m.assignments().to_dict())
    assert (state.labels[:4] == -1).all() and (state.labels[4:] >= 0).all()
    assert state.labels.max() < 12 and state.epoch == 0
    # GOCA is a labeller of the pseudo-label contract, like the PseudoLabels callback.
    from vidssl.callbacks import PseudoLabels
    from vidssl.pseudo_labels import PseudoLabelSource

    assert isinstance(m, PseudoLabelSource) and isinstance(PseudoLabels(), PseudoLabelSource)
    assert isinstance(m.pseudo_label_state, PseudoLabelState)
    assert "Sinkhorn" in m.pseudo_label_state.provenance


# ------------------------------------------------------------------------------- training
class _DiffData(VideoDataModule):
    """VideoDataModule plus the contract's ``diff`` motion, for a data side without motion."""

    motion_channels = 3
    motion_views = None

    def augment(self, batch, train=True):
        batch = super().augment(batch, train)
        diff = {}
        for p, v in enumerate(batch["views"]):
            d = v[:, :, 1:] - v[:, :, :-1]
            diff[p] = torch.cat([d, d[:, :, -1:]], dim=2)
        batch["motion"] = diff
        return batch


def _video_data(root, views):
    kw = dict(train=str(root), views=list(views), clip_len=4, stride=2, crop_size=32,
              short_side=40, batch_size=8, num_workers=0, drop_last=True)
    if "motion" in inspect.signature(VideoDataModule).parameters:
        return VideoDataModule(motion="diff", **kw)
    return _DiffData(**kw)


@pytest.mark.slow
def test_trains_on_generated_videos_without_collapse(tiny_video_root, tmp_path):
    torch.manual_seed(0)
    m = GOCA(**{**TINY, "num_prototypes": 8}, motion_channels=3,
             prior_start_epoch=1, optim=Optimization(optimizer="sgd", lr=0.05, warmup_epochs=0))

    class _Record(pl.Callback):
        losses, entropies = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            self.entropies.append(float(trainer.callback_metrics["train/code_entropy"]))

    rec = _Record()
    _trainer(tmp_path, 3, callbacks=[rec], enable_checkpointing=False).fit(
        m, datamodule=_video_data(tiny_video_root, m.views))
    assert len(rec.losses) == 6 and all(np.isfinite(rec.losses))
    # not collapsed: the batch's mean code spreads over more than half of the 8 prototypes
    assert min(rec.entropies) > np.log(4)
    labels = m.assignments().labels
    assert (labels >= 0).sum() == 16 and len(set(labels[labels >= 0].tolist())) > 1


def test_retrieval_features_both_are_the_mean_of_the_two_streams():
    from vidssl.evaluation.retrieval import combine_features, extract_features

    m = _goca().eval()
    batches = [_batch(views=2, seed=s) for s in range(2)]  # 2 clips per video
    feats, _, index = extract_features(m, batches, features="both", combine="mean")
    with torch.no_grad():
        rgb = torch.cat([(m.backbone(b["views"][0]) + m.backbone(b["views"][1])) / 2
                         for b in batches])
        mot = torch.cat([(m.motion_backbone(b["motion"][0]) + m.motion_backbone(b["motion"][1]))
                         / 2 for b in batches])
    torch.testing.assert_close(feats, combine_features(rgb, mot, "mean"))
    assert feats.shape == (8, m.feature_dim) and index.tolist() == list(range(8))
    assert (feats - F.normalize(rgb, dim=1)).abs().max() > 1e-3  # the motion stream counts


def test_a_goca_checkpoint_loads_as_its_two_streams(tmp_path):
    """`vidssl retrieval` / `embed` load a GOCA checkpoint as its RGB and motion backbones."""
    from vidssl.backbones import TwoStream
    from vidssl.evaluation.embed import load_encoder

    m = _goca()
    path = tmp_path / "goca.ckpt"
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}, path)
    enc, info = load_encoder(str(path))
    assert isinstance(enc, TwoStream) and info["motion"]["two_stream"]
    rgb = torch.randn(2, 3, 4, 16, 16)
    motion = torch.randn(2, m.motion_channels, 4, 16, 16)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_rgb(rgb), m.encode_rgb(rgb))
        torch.testing.assert_close(enc.encode_motion(motion), m.encode_motion(motion))
    base, _ = load_encoder(info["backbone"], backbone_kwargs=info["backbone_kwargs"],
                           random_init=True, motion=info["motion"])
    assert isinstance(base, TwoStream)  # the baseline of a motion evaluation: same kind
