"""ClusterTriplet (SLIC) and ClusterContrast: defaults, loss composition, queue, training."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from vidssl.backbones import HaraResNet
from vidssl.callbacks.pseudo_labels import PseudoLabels
from vidssl.losses.mining import (
    cluster_contrastive_loss,
    cluster_triplet_loss,
    hard_negative_mask,
    label_distances,
    temporal_discrimination_loss,
)
from vidssl.methods import ClusterContrast, ClusterTriplet, Head, Optimization

TINY = {"width_mult": 1 / 16}


def _batch(b=6, seed=0, t=4, size=16):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, t, size, size, generator=g) for _ in range(3)]
    index = torch.arange(b)
    positive_index = torch.tensor([0, 2, 1, 3, 5, 4])[:b]
    return {"views": views, "index": index, "positive_index": positive_index, "label": index % 2}


def test_cluster_triplet_defaults_follow_slic():
    m = ClusterTriplet(backbone_kwargs=TINY)
    assert isinstance(m.backbone, HaraResNet)
    linear = [x for x in m.projection if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linear] == [(m.feature_dim, 2048), (2048, 128)]
    assert any(isinstance(x, torch.nn.BatchNorm1d) for x in m.projection)
    assert (m.margin, m.temporal_margin, m.temporal_weight) == (0.2, 0.04, 1.0)
    assert (m.lr, m.momentum, m.weight_decay, m.optimizer_name) == (0.1, 0.5, 0.0, "sgd")
    assert m.lr_schedule == "constant" and m.num_views == 3
    assert m.pseudo_label_defaults["method"] == "finch"
    assert m.pseudo_label_defaults["every_n_epochs"] == 5
    assert ClusterTriplet(backbone_kwargs=TINY, temporal_weight=0.0).num_views == 2


def slic_loss_by_hand(m, batch, pseudo, seed):
    """SLIC's loss on an RGB batch written out: triplet on pseudo-classes (a video without a
    label is its own class) plus the temporal term, negatives drawn after ``manual_seed(seed)``.
    Returns the loss and the triplet selection."""
    b = len(batch["index"])
    z = m.projection(m.backbone(torch.cat(batch["views"])))
    za, zp, za2 = z[:b], z[b : 2 * b], z[2 * b :]
    pl_ = torch.tensor(pseudo)
    lab = lambda i: pl_[i] if pl_[i] >= 0 else -2 - i  # noqa: E731
    pos = batch["positive_index"]
    labels = torch.tensor([lab(i) for i in range(b)] + [lab(int(p)) for p in pos])
    torch.manual_seed(seed)
    trip = cluster_triplet_loss(torch.cat([za, zp]), labels, 0.2)
    return trip.loss + temporal_discrimination_loss(za, za2, zp, 0.04), trip


def test_cluster_triplet_loss_is_triplet_plus_temporal():
    m = ClusterTriplet(backbone="r3d_18", backbone_kwargs=TINY, head=Head(hidden_dim=32))
    m.set_pseudo_labels(torch.tensor([0, 1, 0, 1, -1, -1]))
    batch = _batch()
    torch.manual_seed(5)
    out = m.compute_loss(batch)
    # the same computation by hand, with the same random state for the negative draws
    expected, trip = slic_loss_by_hand(m, batch, [0, 1, 0, 1, -1, -1], seed=5)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert out["num_triplets"].item() == trip.anchor.numel()
    assert out["same_video_rate"].item() == pytest.approx(2 / 6)
    # the collapse diagnostic: distances between the anchors' and positives' embeddings
    b = len(batch["index"])
    with torch.no_grad():
        z = m.projection(m.backbone(torch.cat(batch["views"])))[: 2 * b]
    # labels of the 2B rows: anchors 0..5, then positives [0, 2, 1, 3, 5, 4] (-1: own video)
    rows = torch.tensor([0, 1, 0, 1, -6, -7, 0, 0, 1, 1, -7, -6])
    for key, value in label_distances(z, rows).items():
        assert out[key].item() == pytest.approx(value.item(), abs=1e-5)
    out["loss"].backward()
    assert m.backbone.stem[0].weight.grad.abs().sum() > 0


def test_positive_view_is_the_hook_for_other_modalities():
    class FlowTriplet(ClusterTriplet):
        called = 0

        def positive_view(self, batch):
            FlowTriplet.called += 1
            return batch["views"][1].flip(2)  # stands for a flow clip of the positive

    torch.manual_seed(0)
    m = FlowTriplet(backbone="r3d_18", backbone_kwargs=TINY, head=Head(hidden_dim=32))
    base = ClusterTriplet(backbone="r3d_18", backbone_kwargs=TINY, head=Head(hidden_dim=32))
    base.load_state_dict(m.state_dict())
    batch = _batch()
    torch.manual_seed(1)
    a = m.compute_loss(batch)["loss"]
    torch.manual_seed(1)
    b = base.compute_loss(batch)["loss"]
    assert FlowTriplet.called == 1 and a.item() != pytest.approx(b.item())


def test_cluster_contrast_loss_matches_masks_by_hand():
    torch.manual_seed(0)
    m = ClusterContrast(backbone="r3d_18", backbone_kwargs=TINY, queue_size=0, hard_fraction=0.5,
                       bn_splits=1)  # whole-batch BN: the reference encodes the batch at once
    pseudo = torch.tensor([0, 0, 1, 1, 2, 2])
    m.set_pseudo_labels(pseudo)
    batch = _batch()
    out = m.compute_loss(batch)
    q = m.projection(m.backbone(batch["views"][0]))
    with torch.no_grad():
        k = F.normalize(m.key_projection(m.key_backbone(batch["views"][1])), dim=1)
    ql, kl = pseudo[batch["index"]], pseudo[batch["positive_index"]]
    pos = ql[:, None] == kl[None, :]
    # negatives: other classes, hardest half (ceil) of each row, none dropped at this size
    sim = F.normalize(q, dim=1) @ k.t()
    neg = torch.zeros_like(pos)
    for i in range(6):
        cand = [j for j in range(6) if not pos[i, j]]
        cand.sort(key=lambda j: -sim[i, j].item())
        for j in cand[: math.ceil(len(cand) * 0.5)]:
            neg[i, j] = True
    ref = cluster_contrastive_loss(q, k, pos, neg, 0.2)
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.equal(hard_negative_mask(sim, ~pos, 0.5, 0.001), neg)


def test_cluster_contrast_sampled_positives_by_hand():
    # positives="sampled": one positive per query (its own row's key); the rest of its class is
    # neither positive nor negative. Row 1's sampled key (video 2) is of another class here, as
    # when labels change after sampling: it stays a positive and never becomes a negative.
    torch.manual_seed(0)
    m = ClusterContrast(backbone="r3d_18", backbone_kwargs=TINY, queue_size=0, hard_fraction=0.5,
                        bn_splits=1, positives="sampled")
    pseudo = torch.tensor([0, 0, 1, 1, 2, 2])
    m.set_pseudo_labels(pseudo)
    batch = _batch()
    out = m.compute_loss(batch)
    q = F.normalize(m.projection(m.backbone(batch["views"][0])), dim=1)
    with torch.no_grad():
        k = F.normalize(m.key_projection(m.key_backbone(batch["views"][1])), dim=1)
    ql, kl = pseudo[batch["index"]], pseudo[batch["positive_index"]]
    sim = (q @ k.t()).detach()
    losses = []
    for i in range(6):
        cand = [j for j in range(6) if j != i and ql[i] != kl[j]]
        cand.sort(key=lambda j: -sim[i, j].item())
        negs = cand[: math.ceil(len(cand) * 0.5)]
        logits = torch.stack([sim[i, i]] + [sim[i, j] for j in negs]) / 0.2
        losses.append(-torch.log_softmax(logits.double(), 0)[0])
    assert out["positives_per_query"].item() == 1.0
    assert out["loss"].item() == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="cluster, sampled"):
        ClusterContrast(backbone="r3d_18", backbone_kwargs=TINY, positives="class")


def test_cluster_contrast_queue_wraps_and_follows_new_labels():
    m = ClusterContrast(backbone="r3d_18", backbone_kwargs=TINY, queue_size=8)
    for step in range(3):  # 6 keys per step into 8 slots
        m.enqueue(torch.randn(6, 128), torch.arange(6) + 10 * step)
    assert m.queue_ptr.item() == 18 % 8
    assert sorted(m.queue_index.tolist()) == sorted([14, 15, 20, 21, 22, 23, 24, 25])
    m.enqueue(torch.randn(20, 128), torch.arange(20) + 100)  # more than the queue: the last 8
    assert sorted(m.queue_index.tolist()) == list(range(112, 120))
    # a queued key's pseudo-label is read from the current labels through its index
    m2 = ClusterContrast(backbone="r3d_18", backbone_kwargs=TINY, queue_size=4)
    batch = _batch()
    m2.compute_loss(batch)  # enqueues the 6 positive keys (the last 4 fit)
    labels = torch.zeros(6, dtype=torch.long)
    m2.set_pseudo_labels(labels)  # everything one class: every key a positive, no negative
    out = m2.compute_loss(batch)
    assert out["positives_per_query"].item() == 6 + 4
    assert out["negatives_per_query"].item() == 0 and out["loss"].item() == 0.0


def test_cluster_contrast_defaults():
    m = ClusterContrast(backbone="r3d_18", backbone_kwargs=TINY)
    assert (m.hard_fraction, m.drop_fraction, m.temperature) == (0.05, 0.001, 0.2)
    assert m.pseudo_label_defaults["method"] == "agglomerative"
    with pytest.raises(ValueError, match="hard_fraction"):
        ClusterContrast(backbone="r3d_18", backbone_kwargs=TINY, hard_fraction=0.0)


@pytest.mark.slow
def test_slic_trains_on_videos_with_pair_sampling(tmp_path, tiny_video_root):
    # End to end with the real data module: pair sampling, the repeated anchor view, the bank.
    # (ClusterContrast trains in benchmarks/retrieval_synthetic.py.)
    from vidssl.data import VideoDataModule

    model = ClusterTriplet(backbone_kwargs=TINY, head=Head(hidden_dim=32),
                           optim=Optimization(lr=0.05))
    dm = VideoDataModule(
        train=str(tiny_video_root),
        clip_len=4,
        stride=1,
        short_side=40,
        crop_size=32,
        views=list(model.views),
        batch_size=8,
        num_workers=0,
        backend="pyav",
    )
    cb = PseudoLabels(every_n_epochs=1, method="kmeans", num_clusters=4)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=2,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    assert [h["epoch"] for h in cb.history] == [0, 1]
    assert all(h["num_clusters"] == 4 for h in cb.history)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.equal(model.pseudo_labels.cpu(), cb.labels)
    assert trainer.callback_metrics["train/same_video_rate"] < 1.0  # cluster positives were used
