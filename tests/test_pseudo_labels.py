"""PseudoLabels: schedule, hand-off, diagnostics, resume without re-clustering, DDP (2 gloo)."""

import itertools
import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from vidssl import clustering
from vidssl.callbacks.pseudo_labels import PseudoLabels, hard_negative_fn_rate, pair_error_rates
from vidssl.data.cluster_sampler import ClusterBatchSampler
from vidssl.methods import Head, Optimization
from vidssl.methods.cluster_triplet import ClusterTriplet

N_CLASSES, PER_CLASS = 4, 8


# -- a tiny in-memory stand-in for VideoDataModule (same batch contract, no decoding) ----------


class _Clips(Dataset):
    """Class-patterned uint8 clips ``T x H x W x C``: class means differ, videos add noise."""

    def __init__(self, n_per_class=PER_CLASS, n_classes=N_CLASSES, extra=0, seed=0):
        g = torch.Generator().manual_seed(seed)
        protos = torch.rand(n_classes, 4, 8, 8, 3, generator=g) * 200
        self.labels = torch.arange(n_classes).repeat_interleave(n_per_class)
        if extra:
            self.labels = torch.cat([self.labels, torch.zeros(extra, dtype=torch.long)])
        noise = torch.rand(len(self.labels), 4, 8, 8, 3, generator=g) * 40
        self.clips = (protos[self.labels] + noise).clamp(0, 255).to(torch.uint8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        if isinstance(item, (tuple, list)):
            a, p = (int(x) for x in item)
            views = [self.clips[a], self.clips[p], self.clips[a]]
            return {"views": views, "index": a, "label": int(self.labels[a]), "positive_index": p}
        i = int(item)
        return {"views": [self.clips[i]] * 3, "index": i, "label": int(self.labels[i])}


def _collate(items):
    out = {"views": [torch.stack([it["views"][v] for it in items]) for v in range(3)]}
    for k in ("index", "label", "positive_index"):
        if k in items[0]:
            out[k] = torch.tensor([it[k] for it in items])
    return out


class FakeDM(pl.LightningDataModule):
    """The parts of ``VideoDataModule`` that PseudoLabels and the methods use."""

    def __init__(self, dataset=None, batch_size=8):
        super().__init__()
        self.ds = dataset if dataset is not None else _Clips()
        self.batch_size = batch_size
        self.drop_last = True
        self.num_views = 3
        self._train_batch_sampler = None

    @property
    def num_train_videos(self):
        return len(self.ds)

    def set_train_batch_sampler(self, s):
        self._train_batch_sampler = s

    def train_dataloader(self):
        return DataLoader(self.ds, batch_sampler=self._train_batch_sampler, collate_fn=_collate)

    def bank_dataloader(self, rank=None, world_size=None):
        if world_size and world_size > 1:
            s = DistributedSampler(self.ds, world_size, rank, shuffle=False, drop_last=False)
            return DataLoader(self.ds, batch_size=5, sampler=s, collate_fn=_collate)
        return DataLoader(self.ds, batch_size=5, collate_fn=_collate)

    def augment(self, batch, train=True):
        views = []
        for v in batch["views"]:
            if v.dtype == torch.uint8:
                v = v.permute(0, 4, 1, 2, 3).float() / 255.0
                if train:
                    v = v + 0.05 * torch.randn_like(v)
            views.append(v)
        batch["views"] = views
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.augment(batch, train=self.trainer is not None and self.trainer.training)


class TinyBackbone(nn.Module):
    feature_dim = 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(), nn.AdaptiveAvgPool3d(1)
        )

    def forward(self, x):
        return self.net(x).flatten(1)


def _model():
    return ClusterTriplet(backbone=TinyBackbone(), head=Head(hidden_dim=16, output_dim=8),
                          optim=Optimization(lr=0.05))


def _trainer(tmp_path, callbacks, max_epochs, **kw):
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


class _Spy:
    """Wraps vidssl.clustering.cluster and records the size of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, features, **kw):
        self.calls.append(len(features))
        return self.fn(features, **kw)


class _Recorder(pl.Callback):
    """Records, at each epoch start, the labels the method and the sampler hold."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        s = trainer.train_dataloader.batch_sampler
        self.seen.append((trainer.current_epoch, pl_module.pseudo_labels.clone(), s.labels))


# -- diagnostics ------------------------------------------------------------------------------


def _rates_loop(p, t):
    fp, fp_n, fn, fn_n = 0.0, 0, 0.0, 0
    idx = [i for i in range(len(t)) if t[i] >= 0]
    for a in idx:
        same = [j for j in idx if j != a and p[j] == p[a]]
        out = [j for j in idx if p[j] != p[a]]
        if same:
            fp += sum(t[j] != t[a] for j in same) / len(same)
            fp_n += 1
        if out:
            fn += sum(t[j] == t[a] for j in out) / len(out)
            fn_n += 1
    return fp / fp_n, fn / fn_n


def test_pair_error_rates_match_loop():
    g = np.random.default_rng(0)
    p = g.integers(0, 6, 60)
    p[:3] = [50, 51, 52]  # singletons
    t = g.integers(0, 4, 60)
    t[5:8] = -1  # unknown classes are left out
    fp, fn = _rates_loop(p.tolist(), t.tolist())
    out = pair_error_rates(p, t)
    assert out["positive_fp_rate"] == pytest.approx(fp, abs=1e-12)
    assert out["negative_fn_rate"] == pytest.approx(fn, abs=1e-12)
    perfect = pair_error_rates(t[t >= 0], t[t >= 0])
    assert perfect == {"positive_fp_rate": 0.0, "negative_fn_rate": 0.0}


def _hard_fn_loop(x, p, t, fraction, drop=0.0):
    """Direct loop: per anchor, sort its other-cluster videos by cosine, skip the top ``drop``
    share, count the next ``fraction``."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    keep_rows = [i for i in range(len(t)) if t[i] >= 0]
    rates = []
    for a in keep_rows:
        negs = [j for j in keep_rows if p[j] != p[a]]
        if not negs:
            continue
        negs.sort(key=lambda j: -float(x[a] @ x[j]))
        d = int(np.floor(drop * len(negs)))
        k = int(np.ceil(fraction * len(negs)))
        rates.append(sum(t[j] == t[a] for j in negs[d : d + k]) / k)
    return float(np.mean(rates))


def test_hard_negative_fn_rate_matches_loop_and_sees_split_classes():
    g = np.random.default_rng(0)
    t = np.repeat(np.arange(3), 20)
    x = np.eye(3)[t] * 3 + g.normal(size=(60, 3))
    t[[4, 30]] = -1  # unknown classes are left out as anchors and as negatives
    p = g.integers(0, 5, 60)
    for fraction, drop in ((0.05, 0.0), (0.3, 0.0), (1.0, 0.0), (0.05, 0.2), (0.3, 0.1)):
        got = hard_negative_fn_rate(x, p, t, fraction, drop_fraction=drop)
        assert got == pytest.approx(_hard_fn_loop(x, p, t, fraction, drop), abs=1e-6)
    # Every class split into two clusters: all negatives hold a third of false ones, the hardest
    # 5 % are all false (the sibling cluster), which the rate over all negatives does not show.
    # (Features with well-separated classes.)
    x = np.eye(3)[np.maximum(t, 0)] * 3 + 0.3 * g.normal(size=(60, 3))
    split = np.where(t >= 0, 2 * np.maximum(t, 0) + (np.arange(60) % 2), 99)
    assert pair_error_rates(split, t)["negative_fn_rate"] < 0.25
    assert hard_negative_fn_rate(x, split, t, 0.05) == 1.0
    # A subset of anchors estimates the same rate.
    sub = hard_negative_fn_rate(x, split, t, 0.05, max_anchors=10, chunk_size=3)
    assert sub == 1.0
    with pytest.raises(ValueError, match="fraction"):
        hard_negative_fn_rate(x, p, t, 0.0)
    with pytest.raises(ValueError, match="drop_fraction"):
        hard_negative_fn_rate(x, p, t, 0.05, drop_fraction=1.0)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="valid: finch, agglomerative, kmeans"):
        PseudoLabels(method="dbscan")
    with pytest.raises(ValueError, match="backbone, projection"):
        PseudoLabels(features="logits")


def test_schedule_uses_method_defaults_then_arguments():
    m = _model()
    cb = PseudoLabels()
    assert [e for e in range(12) if cb.is_due(e, m)] == [0, 5, 10]  # SLIC: every 5 from 0
    assert cb.setting("method", m) == "finch" and cb.setting("features", m) == "projection"
    cb = PseudoLabels(every_n_epochs=2, start_epoch=1, features="backbone")
    assert [e for e in range(6) if cb.is_due(e, m)] == [1, 3, 5]
    assert cb.setting("features", m) == "backbone"


def test_method_specific_defaults_follow_only_their_own_clustering_method():
    from vidssl.methods import ClusterContrast

    m = ClusterContrast(backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16}, queue_size=8)
    feats = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    # its own method: agglomerative, N / 10 clusters, ward linkage
    labels, diag = PseudoLabels().cluster(feats, m)
    assert diag["method"] == "agglomerative" and labels.max() + 1 == 6
    assert diag["linkage"] == "ward"
    ward = clustering.cluster(feats, "agglomerative", num_clusters=6, linkage="ward").labels
    assert np.array_equal(labels, ward)
    assert PseudoLabels(method="agglomerative").setting("cluster_fraction", m) == 0.1
    # another method: none of the agglomerative settings leak into it (linkage used to reach
    # finch() as an unknown argument, and N / 10 became FINCH's req_clust)
    cb = PseudoLabels(method="finch")
    assert cb.setting("cluster_fraction", m) is None and cb.setting("level", m) == 0
    labels, diag = cb.cluster(feats, m)
    finest = clustering.cluster(feats, "finch").labels
    assert diag["method"] == "finch" and np.array_equal(labels, finest)
    # schedule and feature defaults are not method-specific: they still come from the model
    assert cb.setting("features", m) == "backbone"


# -- single device ------------------------------------------------------------------------------


def test_reclusters_on_schedule_hands_over_and_logs(tmp_path, monkeypatch):
    spy = _Spy(clustering.cluster)
    monkeypatch.setattr(clustering, "cluster", spy)
    dm, rec = FakeDM(), _Recorder()
    cb = PseudoLabels(every_n_epochs=2, p_same=0.0)
    model = _model()
    # The method's own diagnostics hook (ClusterContrast's): its figures are logged too.
    model.pseudo_label_diagnostics = lambda f, lab, t: {
        "hard_negative_fn_rate": hard_negative_fn_rate(f, lab, t, 0.25)}
    _trainer(tmp_path, [cb, rec], max_epochs=3).fit(model, datamodule=dm)
    n = len(dm.ds)
    assert spy.calls == [n, n]  # epochs 0 and 2
    assert [h["epoch"] for h in cb.history] == [0, 2]
    assert cb.labels_epoch == 2 and cb.labels.shape == (n,) and cb.labels.min() >= 0
    assert isinstance(dm._train_batch_sampler, ClusterBatchSampler)  # installed at setup
    for epoch, module_labels, sampler_labels in rec.seen:
        made = 0 if epoch < 2 else 2
        expected = [h for h in cb.history if h["epoch"] == made][0]
        assert torch.equal(module_labels.cpu(), sampler_labels)
        assert int(module_labels.max()) + 1 == expected["num_clusters"]
    assert torch.equal(rec.seen[-1][1].cpu(), cb.labels)
    d = cb.diagnostics
    for key in ("num_clusters", "size_min", "size_median", "size_max", "singletons", "nmi"):
        assert key in d
    assert "positive_fp_rate" in d and "negative_fn_rate" in d
    assert 0.0 <= d["hard_negative_fn_rate"] <= 1.0


def test_metrics_are_logged_through_lightning(tmp_path):
    cb = PseudoLabels(every_n_epochs=1)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(_model(), datamodule=FakeDM())
    for k in ("nmi", "ami", "num_clusters", "positive_fp_rate", "negative_fn_rate"):
        assert f"pseudo_labels/{k}" in trainer.callback_metrics
    logged = trainer.callback_metrics["pseudo_labels/nmi"].item()
    assert logged == pytest.approx(cb.diagnostics["nmi"])


def test_resume_restores_labels_and_does_not_recluster(tmp_path, monkeypatch):
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = PseudoLabels(every_n_epochs=5, seed=3)
    _trainer(tmp_path, [cb, ckpt_cb], max_epochs=2).fit(_model(), datamodule=FakeDM())
    saved = cb.state_dict()
    assert saved["labels_epoch"] == 0

    def forbidden(*a, **k):
        raise AssertionError("re-clustered on resume")

    monkeypatch.setattr(clustering, "cluster", forbidden)
    cb2, rec, dm = PseudoLabels(every_n_epochs=5, seed=3), _Recorder(), FakeDM()
    _trainer(tmp_path, [cb2, rec], max_epochs=4).fit(
        _model(), datamodule=dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert torch.equal(cb2.labels, saved["labels"])
    assert cb2.labels_epoch == 0 and cb2.history == saved["history"]
    assert [e for e, _, _ in rec.seen] == [2, 3]
    for _, module_labels, sampler_labels in rec.seen:
        assert torch.equal(module_labels.cpu(), saved["labels"])
        assert torch.equal(sampler_labels, saved["labels"])
    # the sampler continues the epoch sequence: same pairs as an uninterrupted sampler
    s = dm._train_batch_sampler
    ref = ClusterBatchSampler(len(dm.ds), 8, labels=saved["labels"], seed=3, drop_last=True)
    ref.set_epoch(3)
    assert s.epoch == 3 and list(s) == list(ref)


def test_initial_labels_from_pretrained_backbone(tmp_path, monkeypatch):
    spy = _Spy(clustering.cluster)
    monkeypatch.setattr(clustering, "cluster", spy)
    torch.manual_seed(0)  # weights whose features have no near-ties that batching could flip
    pretrained = TinyBackbone()
    path = tmp_path / "backbone.pt"
    torch.save(pretrained.state_dict(), path)
    cb = PseudoLabels(every_n_epochs=5, start_epoch=1, initial_weights=str(path))
    model, dm = _model(), FakeDM()
    _trainer(tmp_path, [cb], max_epochs=1).fit(model, datamodule=dm)
    assert len(spy.calls) == 1 and cb.labels_epoch == -1
    # the labels are those of the pretrained backbone's features, not the model's
    pretrained.eval()
    with torch.no_grad():
        clips = dm.ds.clips.permute(0, 4, 1, 2, 3).float() / 255.0
        feats = torch.nn.functional.normalize(pretrained(clips), dim=1)
    expected = clustering.cluster(feats.numpy(), method="finch", level=0).labels
    assert clustering.adjusted_rand_index(expected, cb.labels.numpy()) == pytest.approx(1.0)


# -- DDP: 2 gloo processes ------------------------------------------------------------------


class _Dump(pl.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        cb = [c for c in trainer.callbacks if isinstance(c, PseudoLabels)][0]
        s = trainer.train_dataloader.batch_sampler
        torch.save(
            {
                "labels": cb.labels,
                "module": pl_module.pseudo_labels.cpu(),
                "sampler": s.labels,
                "diag": cb.diagnostics,
                "anchors": [a for batch in s for a, _ in batch],
            },
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_hold_identical_labels_for_every_index(tmp_path):
    n = N_CLASSES * PER_CLASS + 3  # odd: the bank's DistributedSampler pads one index
    dm = FakeDM(_Clips(extra=3), batch_size=4)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",  # no re-import in the children: seconds, not tens
        use_distributed_sampler=False,  # ClusterBatchSampler shards itself
        max_epochs=1,
        callbacks=[PseudoLabels(every_n_epochs=1), _Dump(str(tmp_path))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_model(), datamodule=dm)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (r0, r1):
        assert r["labels"].shape == (n,) and r["labels"].min() >= 0
        assert torch.equal(r["module"], r["labels"]) and torch.equal(r["sampler"], r["labels"])
        assert r["diag"]["bank_size"] == n and r["diag"]["bank_rows"] == n + 1
    assert torch.equal(r0["labels"], r1["labels"])
    assert r0["diag"] == r1["diag"]
    # the training shards of the two ranks are disjoint and cover the padded epoch
    a0, a1 = r0["anchors"], r1["anchors"]
    assert len(a0) == len(a1)
    assert set(a0) | set(a1) == set(range(n)) or len(a0) * 2 < n  # drop_last may cut the tail
    assert not set(itertools.chain(a0)) & set(a1) or n % 2


def test_unique_rows_drops_padding_and_catches_gaps():
    from vidssl.callbacks.pseudo_labels import _unique_rows

    rows = _unique_rows(torch.tensor([0, 2, 4, 1, 3, 0]), 5)  # DistributedSampler padding: 0
    assert rows.tolist() == [0, 3, 1, 4, 2]
    with pytest.raises(RuntimeError, match="missing from the feature bank"):
        _unique_rows(torch.tensor([0, 1, 3]), 4)


# -- the recipes: oracle labels, SLIC's adaptive p, clustering once ----------------------------


class LabelledDM(FakeDM):
    """FakeDM with the index's ground truth, as ``VideoDataModule.train_labels`` gives it."""

    def __init__(self, truth=None, **kw):
        super().__init__(**kw)
        self.truth = self.ds.labels.numpy() if truth is None else np.asarray(truth)

    @property
    def train_labels(self):
        return self.truth


def test_oracle_hands_over_the_index_labels_and_never_clusters(tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("oracle=True clustered")

    monkeypatch.setattr(clustering, "cluster", forbidden)
    # Labels that no clustering of these clips would give (classes permuted, one unknown).
    truth = np.random.default_rng(0).permutation(np.arange(N_CLASSES * PER_CLASS) % 5)
    truth[3] = -1
    dm, rec = LabelledDM(truth), _Recorder()
    cb = PseudoLabels(oracle=True, every_n_epochs=1)
    model = _model()
    _trainer(tmp_path, [cb, rec], max_epochs=2).fit(model, datamodule=dm)
    assert [e for e, _, _ in rec.seen] == [0, 1]
    for _, module_labels, sampler_labels in rec.seen:
        assert module_labels.cpu().tolist() == truth.tolist()
        assert sampler_labels.tolist() == truth.tolist()
    assert cb.labels.tolist() == truth.tolist() and cb.history == []
    with pytest.raises(RuntimeError, match="no training video has one"):
        _trainer(tmp_path, [PseudoLabels(oracle=True)], max_epochs=1).fit(
            _model(), datamodule=LabelledDM(np.full(N_CLASSES * PER_CLASS, -1)))


def test_adaptive_p_sets_p_same_to_one_minus_nmi(tmp_path):
    dm = LabelledDM()
    cb = PseudoLabels(every_n_epochs=1, p_same=0.2, adaptive_p=True)
    _trainer(tmp_path, [cb], max_epochs=2).fit(_model(), datamodule=dm)
    nmi = cb.diagnostics["nmi"]
    assert 0.0 < nmi < 1.0
    assert dm._train_batch_sampler.p_same == pytest.approx(1.0 - nmi)
    assert cb.diagnostics["p_same"] == pytest.approx(1.0 - nmi)
    assert cb.state_dict()["adapted_p_same"] == pytest.approx(1.0 - nmi)
    fixed = PseudoLabels(every_n_epochs=1, p_same=0.2)
    _trainer(tmp_path, [fixed], max_epochs=1).fit(_model(), datamodule=(dm2 := LabelledDM()))
    assert dm2._train_batch_sampler.p_same == 0.2


def test_cluster_once_from_pretrained_weights(tmp_path, monkeypatch):
    spy = _Spy(clustering.cluster)
    monkeypatch.setattr(clustering, "cluster", spy)
    path = tmp_path / "backbone.pt"
    torch.save(TinyBackbone().state_dict(), path)
    cb = PseudoLabels(every_n_epochs=0, initial_weights=str(path))
    _trainer(tmp_path, [cb], max_epochs=3).fit(_model(), datamodule=FakeDM())
    assert len(spy.calls) == 1 and cb.labels_epoch == -1  # once, before training, never again
    with pytest.raises(ValueError, match="every_n_epochs=0 never re-clusters.*initial_weights"):
        PseudoLabels(every_n_epochs=0)
    with pytest.raises(ValueError, match="oracle=True never clusters"):
        PseudoLabels(oracle=True, adaptive_p=True)
