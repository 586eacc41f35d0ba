"""The method base class, SimCLR and MoCo: API, errors, EMA, schedules, training on videos."""

import copy
import math
import re
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vidssl.losses import info_nce
from vidssl.methods import (
    LARS,
    EMASchedule,
    Head,
    MoCo,
    Optimization,
    SimCLR,
    VideoSSLMethod,
    cosine_momentum,
    ema_update,
    warmup_cosine,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"
TINY = dict(backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16})


def _batch(b=4, views=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "views": [torch.randn(b, 3, 4, 16, 16, generator=g) for _ in range(views)],
        "index": torch.arange(b),
        "label": torch.full((b,), -1),
    }


class _Views(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        b = _batch(1, seed=i)
        return {"views": [v[0] for v in b["views"]], "index": i, "label": -1}


def _trainer(**kw):
    return pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kw,
    )  # fmt: skip


# ----------------------------------------------------------------------------- API and errors
def test_unknown_optimizer_lists_valid():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*sgd, adamw, lars"):
        SimCLR(optim=Optimization(optimizer="adam"), **TINY)


def test_backbone_without_feature_dim():
    with pytest.raises(ValueError, match="feature_dim"):
        SimCLR(backbone=nn.Conv3d(3, 4, 1))


def test_forward_embed_and_checkpoint_keys():
    m = MoCo(queue_size=16, **TINY).eval()
    clips = _batch(3)["views"][0]
    feats = m(clips)
    assert feats.shape == (3, m.feature_dim)
    emb = m.embed(clips)
    proj = m.embed(clips, projection=True)
    assert proj.shape == (3, 128)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(proj.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(emb, nn.functional.normalize(feats, dim=1))
    keys = m.state_dict().keys()
    assert {"key_queue.keys", "key_queue.ptr", "key_queue.index"} <= set(keys)
    assert any(k.startswith("backbone.") for k in keys)
    assert not any(k.startswith("pseudo_labels") for k in keys)


def test_moco_version_defaults():
    v1, v2 = MoCo(version=1, queue_size=16, **TINY), MoCo(version=2, queue_size=16, **TINY)
    assert (v1.temperature, v2.temperature) == (0.07, 0.2)
    assert [type(m) for m in v1.projection] == [nn.Linear]
    assert [type(m) for m in v2.projection] == [nn.Linear, nn.ReLU, nn.Linear]
    assert v2.ema_momentum == 0.999
    with pytest.raises(ValueError, match="version"):
        MoCo(version=3, **TINY)


def test_simclr_head_has_bn():
    m = SimCLR(**TINY)
    assert [type(x) for x in m.projection] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert m.projection[0].out_features == m.feature_dim  # hidden = feature size


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan")])
def test_learning_rate_must_be_positive(lr):
    with pytest.raises(ValueError, match=r"lr must be > 0.*model.init_args.optim.lr"):
        SimCLR(optim=Optimization(lr=lr), **TINY)


def test_batch_checks():
    m = SimCLR(**TINY)
    with pytest.raises(ValueError, match="needs 2 views per batch .* but the batch has 1"):
        m.training_step(_batch(views=1), 0)
    uint8 = _batch()
    uint8["views"] = [torch.zeros(4, 4, 16, 16, 3, dtype=torch.uint8)] * 2
    with pytest.raises(ValueError, match="float views"):
        m.training_step(uint8, 0)

    class NeedsPositive(SimCLR):
        required_keys = ("positive_index",)

    with pytest.raises(ValueError, match="positive_index"):
        NeedsPositive(**TINY).training_step(_batch(), 0)


class _DM(pl.LightningDataModule):
    def __init__(self, num_views=2, batch_size=4, drop_last=None):
        super().__init__()
        self.num_views, self.batch_size = num_views, batch_size
        if drop_last is not None:
            self.drop_last = drop_last

    def train_dataloader(self):
        return DataLoader(_Views(), batch_size=self.batch_size,
                          drop_last=bool(getattr(self, "drop_last", False)))


def test_setup_checks_views_and_queue():
    from vidssl.methods import ConfigError

    with pytest.raises(ConfigError, match="needs 2 views per sample but the data module gives 1"):
        _trainer(fast_dev_run=1).fit(SimCLR(**TINY), datamodule=_DM(num_views=1))
    with pytest.raises(ConfigError, match=r"queue_size=16 is not a multiple .* 3 x 1 = 3"):
        _trainer(fast_dev_run=1).fit(MoCo(queue_size=16, **TINY), datamodule=_DM(batch_size=3))


def test_moco_refuses_a_short_last_batch_at_start_up():
    """8 clips in batches of 3 without drop_last end with a batch of 2 (MoCo: K % batch)."""
    from vidssl.methods import ConfigError

    with pytest.raises(ConfigError, match="needs data.drop_last=true"):
        _trainer(max_epochs=2).fit(MoCo(queue_size=6, **TINY),
                                   datamodule=_DM(batch_size=3, drop_last=False))
    m = MoCo(queue_size=6, **TINY)  # the same with drop_last: trains, whole batches only
    _trainer(max_epochs=2).fit(m, datamodule=_DM(batch_size=3, drop_last=True))
    assert m.queue_ptr.item() == (2 * 2 * 3) % 6


def test_cluster_contrast_takes_any_queue_and_batch():
    """Its queue wraps: no K % batch rule, short batches welcome (3 GPUs x 64 with K=4096)."""
    from vidssl.methods import ClusterContrast

    ClusterContrast(queue_size=4096, **TINY).check_queue(64, drop_last=False, world_size=3)
    with pytest.raises(ValueError, match="4096 is not a multiple .* 64 x 3 = 192"):
        MoCo(queue_size=4096, **TINY).check_queue(64, drop_last=True, world_size=3)


def test_moco_queue_is_a_ring_for_any_batch():
    """A batch that does not divide the queue wraps around: the latest K keys, oldest out."""
    m = MoCo(queue_size=4, head=Head(output_dim=2), **TINY)
    keys = [torch.full((3, 2), float(i)) for i in range(3)]
    for i, k in enumerate(keys):
        m.enqueue(k, torch.full((3,), i))
    # 9 keys written: slots 0..3 hold keys 8, 5, 6, 7 -> batches 2, 1, 2, 2.
    assert m.queue[:, 0].tolist() == [2.0, 1.0, 2.0, 2.0]
    assert m.queue_index.tolist() == [2, 1, 2, 2]
    assert m.queue_ptr.item() == 9 % 4


def test_set_pseudo_labels():
    """Cluster-guided methods consume labels (a state or ints); the others carry nothing."""
    from vidssl.methods import ClusterTriplet
    from vidssl.pseudo_labels import PseudoLabelConsumer, PseudoLabelState

    m = ClusterTriplet(**TINY)
    assert isinstance(m, PseudoLabelConsumer) and m.pseudo_labels is None
    m.set_pseudo_labels([0, -1, 2])
    assert m.pseudo_labels.dtype == torch.long and m.pseudo_labels.tolist() == [0, -1, 2]
    m.set_pseudo_labels(PseudoLabelState([1, 1, 0], ["a", "b", "c"], epoch=3))
    assert m.pseudo_labels.tolist() == [1, 1, 0]
    assert "pseudo_labels" not in m.state_dict()
    simclr = SimCLR(**TINY)
    assert not isinstance(simclr, PseudoLabelConsumer) and not hasattr(simclr, "pseudo_labels")


# ----------------------------------------------------------------------------- EMA, schedules
def test_ema_update_formula():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in target.parameters()]
    ema_update(online, target, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o.detach())


def test_moco_key_encoder_follows_by_ema_after_each_step():
    torch.manual_seed(0)
    m = MoCo(queue_size=16, ema=EMASchedule(momentum=0.9), **TINY)
    key_before = copy.deepcopy(m.key_backbone.state_dict())
    _trainer(max_steps=1).fit(m, DataLoader(_Views(), batch_size=4))
    online = m.backbone.state_dict()
    for name, p in m.key_backbone.named_parameters():
        torch.testing.assert_close(p, 0.9 * key_before[name] + 0.1 * online[name])
    assert m.queue_ptr.item() == 4
    assert not any(p.requires_grad for p in m.key_backbone.parameters())


def test_moco_queue_remembers_videos_and_can_mask_own_keys():
    torch.manual_seed(0)
    m = MoCo(queue_size=8, mask_own_video=True, **TINY)
    # Fill the queue with known keys of videos 0..7, then a batch of videos 2 and 5 computes
    # a loss that must equal InfoNCE over the queue without each query's own video.
    m.enqueue(F.normalize(torch.randn(8, 128), dim=1), torch.arange(8))
    assert m.queue_index.tolist() == list(range(8)) and m.queue_ptr.item() == 0
    batch = _batch(b=2)
    batch["index"] = torch.tensor([2, 5])
    queue = m.queue.clone()
    with torch.no_grad():
        loss = m.compute_loss(batch)
        q = m._queries(batch["views"][0])
        k = m._keys(batch["views"][1])
    expected = torch.stack([
        info_nce(q[i : i + 1], k[i : i + 1], queue[torch.arange(8) != v], m.temperature)
        for i, v in enumerate((2, 5))
    ]).mean()  # fmt: skip
    torch.testing.assert_close(loss, expected)
    assert m.queue_index[:2].tolist() == [2, 5]  # the batch went in with its indices
    # Without the mask the own keys count as negatives (MoCo as published).
    m.mask_own_video = False
    m.queue.copy_(queue)
    m.queue_ptr.zero_()
    m.queue_index.copy_(torch.arange(8))
    with torch.no_grad():
        plain = m.compute_loss(batch)
    torch.testing.assert_close(plain, info_nce(q, k, queue, m.temperature))
    assert m.queue_index[:2].tolist() == [-1, -1]  # nothing reads them: not gathered, not stored
    # A batch without dataset indices: unknown videos (-1) in the queue; the mask needs them.
    del batch["index"]
    with torch.no_grad():
        m.compute_loss(batch)
    assert m.queue_index[2:4].tolist() == [-1, -1]
    m.mask_own_video = True
    with pytest.raises(ValueError, match="needs the batch's 'index'"):
        m.compute_loss(batch)


def test_moco_warns_when_the_queue_holds_every_video():
    class _Videos(_DM):
        num_train_videos = 8

    with pytest.warns(UserWarning, match="queue_size=8 >= 8 training videos.*Set model.queue_"
                      "size below the number of videos.*8192 on UCF101.*1024 on HMDB51"):
        _trainer(fast_dev_run=1).fit(MoCo(queue_size=8, **TINY), datamodule=_Videos())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*training videos.*")
        _trainer(fast_dev_run=1).fit(MoCo(queue_size=8, mask_own_video=True, **TINY),
                                     datamodule=_Videos())  # fmt: skip


def test_moco_split_bn_on_one_device_keeps_query_and_key_statistics_apart():
    torch.manual_seed(0)
    m = MoCo(queue_size=16, bn_splits=2, **TINY).train()
    x = _batch(b=8)["views"][0]

    def enc(backbone, head, clips):
        return head(backbone(clips))

    # queries: BN over each half of the batch, in order (MoCo's one-GPU SplitBatchNorm) ...
    with torch.no_grad():
        q = m._queries(x)
        halves = torch.cat([enc(m.backbone, m.projection, h) for h in (x[:4], x[4:])])
        whole = enc(m.backbone, m.projection, x)
    torch.testing.assert_close(q, halves)
    assert not torch.allclose(q, whole, atol=1e-4)  # one BN over 8 samples differs
    # ... keys: the batch shuffled by a permutation drawn from the step number, split the same
    # way, then put back in order: each key is normalised with a group of other samples.
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(int(m.global_step)))
    with torch.no_grad():
        shuffled = torch.cat(
            [enc(m.key_backbone, m.key_projection, x[perm][:4]),
             enc(m.key_backbone, m.key_projection, x[perm][4:])]
        )  # fmt: skip
    expected = nn.functional.normalize(shuffled, dim=1)[torch.argsort(perm)]
    torch.testing.assert_close(m._keys(x), expected)
    torch.testing.assert_close(m._keys(x), expected)  # same step, same shuffle (resume-safe)
    assert set(perm[:4].tolist()) != {0, 1, 2, 3}  # this seed's key groups mix the halves
    # bn_splits=1, or groups that would hold a single sample: the whole batch at once
    m1 = MoCo(queue_size=16, bn_splits=1, **TINY).train()
    m1.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m1._queries(x), whole)
        torch.testing.assert_close(m._queries(x[:3]), enc(m.backbone, m.projection, x[:3]))
    with pytest.raises(ValueError, match="bn_splits"):
        MoCo(bn_splits=0, **TINY)


def test_warmup_cosine_values():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)  # half-way through the decay
    assert warmup_cosine(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)


def test_cosine_momentum_values():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)


def test_lars_step_matches_formula():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_adaptation": False}],
        lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.01,
    )  # fmt: skip
    w.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([2.0])
    opt.step()
    g = torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([3.0, 4.0])  # (2.5, 2)
    trust = 0.01 * 5.0 / math.hypot(2.5, 2.0)
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * trust * g)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))


def test_lr_schedule_is_stepped_per_step():
    m = SimCLR(optim=Optimization(optimizer="lars", lr=1.0, warmup_epochs=1), **TINY)
    lrs = []

    class Rec(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(max_epochs=2, callbacks=[Rec()]).fit(m, DataLoader(_Views(), batch_size=4))
    # 2 steps per epoch: warm-up 1/2, 2/2, then cosine over the remaining 2 steps.
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])


# ----------------------------------------------------------------------------- the docs example
def _doc_code(which: int = 0):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return blocks[which]


def test_doc_example_is_short_and_trains():
    code = _doc_code()
    assert len(code.strip().splitlines()) < 60
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    byol = namespace["BYOL"](head=Head(hidden_dim=32, output_dim=16), **TINY)
    assert isinstance(byol, VideoSSLMethod)
    target_before = copy.deepcopy(byol.target_backbone.state_dict())
    online_before = copy.deepcopy(byol.backbone.state_dict())
    _trainer(max_steps=2).fit(byol, DataLoader(_Views(), batch_size=4))
    moved = [
        not torch.equal(p, target_before[n]) for n, p in byol.target_backbone.named_parameters()
    ]
    assert all(moved)  # the base's EMA update ran
    assert any(not torch.equal(p, online_before[n]) for n, p in byol.backbone.named_parameters())


# ----------------------------------------------------------------------------- on videos
@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_trains_on_generated_videos(name, tiny_video_root):
    from vidssl.data import VideoDataModule

    dm = VideoDataModule(
        train=str(tiny_video_root), clip_len=4, stride=2, short_side=32, crop_size=32,
        batch_size=4, num_workers=0, backend="pyav",
    )  # fmt: skip
    torch.manual_seed(0)
    m = SimCLR(**TINY) if name == "simclr" else MoCo(queue_size=16, **TINY)
    before = copy.deepcopy(m.backbone.state_dict())
    trainer = _trainer(fast_dev_run=2)
    trainer.fit(m, datamodule=dm)
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss.item() > 0
    assert any(not torch.equal(p, before[n]) for n, p in m.backbone.named_parameters())


@pytest.mark.parametrize("cls", [SimCLR, MoCo])
def test_checkpoint_round_trip(cls, tmp_path):
    torch.manual_seed(0)
    kw = dict(queue_size=16, version=1) if cls is MoCo else dict(temperature=0.3)
    m = cls(**kw, **TINY)
    trainer = _trainer(max_steps=1)
    trainer.fit(m, DataLoader(_Views(), batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = cls.load_from_checkpoint(tmp_path / "m.ckpt")
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.temperature == m.temperature


def test_checkpoints_from_before_the_key_queue_load_their_queue():
    """Checkpoints that stored ``queue``, ``queue_ptr``, ``queue_index`` on the method load."""
    m = MoCo(queue_size=8, **TINY)
    old = {k.replace("key_queue.keys", "queue").replace("key_queue.ptr", "queue_ptr")
           .replace("key_queue.index", "queue_index"): v for k, v in m.state_dict().items()}
    old["queue"] = torch.ones(8, 128)
    old["queue_ptr"] = torch.tensor(5)
    old["queue_index"] = torch.arange(8)
    fresh = MoCo(queue_size=8, **TINY)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.queue, torch.ones(8, 128)) and fresh.queue_ptr.item() == 5
    assert fresh.queue_index.tolist() == list(range(8))


def test_moco_and_cluster_contrast_share_one_queue_component():
    """Both compose a KeyQueue: MoCo's holds its K % batch rule, ClusterContrast's none."""
    from vidssl.methods import ClusterContrast
    from vidssl.methods.queue import KeyQueue

    moco, cc = MoCo(queue_size=8, **TINY), ClusterContrast(queue_size=10, **TINY)
    assert isinstance(moco.key_queue, KeyQueue) and isinstance(cc.key_queue, KeyQueue)
    assert moco.key_queue.check_batches(3, True) is not None  # 8 % 3 != 0
    assert cc.key_queue.check_batches(3, False) is None
    assert ClusterContrast(queue_size=0, **TINY).key_queue is None
    assert not isinstance(cc, MoCo)  # no subclass that undoes its parent


def test_cluster_guided_doc_example_is_short_and_takes_the_callbacks_labels(tiny_video_root):
    """docs/adding_a_method.md's cluster-guided example: under 60 lines, trains, and the
    PseudoLabels callback hands it the labels and logs its diagnostics hook."""
    from vidssl.callbacks import PseudoLabels
    from vidssl.data import VideoDataModule
    from vidssl.pseudo_labels import PseudoLabelConsumer

    code = _doc_code(2)
    assert "class PseudoSupCon" in code and len(code.strip().splitlines()) < 60
    namespace = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    torch.manual_seed(0)
    method = namespace["PseudoSupCon"](head=Head(hidden_dim=32, output_dim=16), **TINY)
    assert isinstance(method, PseudoLabelConsumer)
    dm = VideoDataModule(train=str(tiny_video_root), clip_len=4, stride=2, short_side=32,
                         crop_size=32, batch_size=4, num_workers=0, views=method.views)
    cb = PseudoLabels(every_n_epochs=1, method="kmeans", num_clusters=4, progress_bar=False)
    _trainer(max_epochs=2, callbacks=[cb]).fit(method, datamodule=dm)
    assert cb.labels_epoch == 1 and torch.equal(method.pseudo_labels.cpu(), cb.labels)
    assert torch.equal(dm.train_batch_sampler.labels, cb.labels)
    assert cb.diagnostics["clusters"] == 4.0
    assert "model being trained" in cb.pseudo_label_state.provenance
