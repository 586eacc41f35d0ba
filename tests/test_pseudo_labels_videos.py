"""PseudoLabels on real files: undecodable training videos, labels keyed by video identity."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from vidssl import clustering
from vidssl.callbacks.pseudo_labels import PseudoLabels, PseudoLabelState
from vidssl.data import VideoDataModule
from vidssl.data.synthetic import write_synthetic_dataset
from vidssl.methods import ClusterContrast, ClusterTriplet, CrossModalContrast, Head

BROKEN = "MoveLeft/zz_broken.avi"


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Class folders of 3 x 4 tiny synthetic videos (written once; tests copy them)."""
    root = tmp_path_factory.mktemp("pl_videos")
    write_synthetic_dataset(root, num_classes=3, videos_per_class=4, num_frames=12, seed=1)
    return root / "UCF-101"


def _copy(videos, tmp_path, broken=False):
    root = tmp_path / "train"
    shutil.copytree(videos, root)
    if broken:  # random bytes named .avi among the good videos
        (root / BROKEN).write_bytes(np.random.default_rng(0).bytes(4000))
    return root


def _dm(root, **kw):
    kw.setdefault("views", ("anchor", "positive", "anchor_repeat"))
    return VideoDataModule(
        train=str(root), format="class_folders", clip_len=4, stride=1, short_side=40,
        crop_size=32, train_preset="crop_flip", batch_size=4,
        num_workers=0, cache_dir=str(root.parent / "cache"), **kw,
    )


def _ids(dm, root):
    """The training videos' paths relative to ``root``, in index order."""
    return [Path(p).relative_to(root).as_posix() for p in dm.train_dataset.index.paths]


def _model(cls=ClusterTriplet):
    torch.manual_seed(0)
    kw = dict(backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16})
    if cls is ClusterContrast:
        return ClusterContrast(queue_size=8, **kw)
    return ClusterTriplet(head=Head(hidden_dim=16, output_dim=8), **kw)


def _trainer(tmp_path, callbacks, **kw):
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kw,
    )


# -- item 3: the bank follows the training decode policy --------------------------------------


def test_unreadable_video_is_left_out_with_label_minus_one_and_never_a_positive(
    videos, tmp_path, caplog
):
    root = _copy(videos, tmp_path, broken=True)
    dm = _dm(root)  # train_on_error="resample" (the default)
    cb = PseudoLabels(every_n_epochs=1, method="kmeans", num_clusters=3, p_same=0.0)
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(
            _model(), datamodule=dm
        )
    ids = _ids(dm, root)
    assert list(dm.train_video_ids) == ids
    broken = ids.index(BROKEN)
    labels = cb.labels
    assert labels.shape == (13,) and labels[broken] == -1
    assert (np.delete(labels.numpy(), broken) >= 0).all()
    assert cb.diagnostics["unreadable"] == 1 and cb.diagnostics["bank_size"] == 13
    said = [m for m in (r.getMessage() for r in caplog.records)
            if m.startswith("PseudoLabels:") and "could not be decoded" in m]
    assert len(said) == 1 and "1 of 13" in said[0] and str(root / BROKEN) in said[0]
    # the sampler never draws it as another anchor's positive
    sampler = dm._train_batch_sampler
    for epoch in range(20):
        sampler.set_epoch(epoch)
        pairs = sampler.epoch_pairs()
        assert not ((pairs[:, 1] == broken) & (pairs[:, 0] != broken)).any()


def test_unreadable_video_raises_under_the_strict_policy(videos, tmp_path):
    root = _copy(videos, tmp_path, broken=True)
    dm = _dm(root, train_on_error="raise")
    cb = PseudoLabels(every_n_epochs=1, method="kmeans", num_clusters=3)
    with pytest.raises(RuntimeError, match="zz_broken.avi"):
        _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(
            _model(), datamodule=dm
        )


# -- item 4: labels keyed by video identity ---------------------------------------------------


def test_state_maps_labels_by_identity():
    state = PseudoLabelState(np.array([5, 6, 7, 8]), ["a", "b", "c", "d"], epoch=3)
    labels, old_to_new, counts = state.align(["d", "x", "a", "c"])
    assert labels.tolist() == [8, -1, 5, 7]
    assert old_to_new.tolist() == [2, -1, 3, 0]
    assert counts == {"kept": 3, "added": 1, "removed": 1}
    back = PseudoLabelState.from_dict(state.to_dict())
    assert back.keys.tolist() == ["a", "b", "c", "d"] and back.epoch == 3
    assert back.labels.tolist() == [5, 6, 7, 8]
    # an old, position-only state loads with no keys
    old = PseudoLabelState.from_dict({"labels": torch.tensor([1, 2]), "labels_epoch": 0})
    assert old.keys is None and old.labels.tolist() == [1, 2]


class _AtRecluster:
    """Wraps PseudoLabels.recluster: records the labels held just before each call."""

    def __init__(self, cb):
        self.cb, self.fn, self.before = cb, cb.recluster, []
        cb.recluster = self

    def __call__(self, trainer, pl_module, epoch, encoder=None):
        self.before.append((epoch, self.cb.labels))
        return self.fn(trainer, pl_module, epoch, encoder)


def test_resume_after_one_video_added_and_one_removed_follows_identity(
    videos, tmp_path, caplog
):
    root = _copy(videos, tmp_path)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = PseudoLabels(every_n_epochs=5, method="kmeans", num_clusters=4)
    dm = _dm(root)
    _trainer(tmp_path, [cb, ckpt], max_epochs=1, limit_train_batches=1).fit(
        _model(ClusterContrast), datamodule=dm
    )
    saved = dict(zip(_ids(dm, root), cb.labels.tolist()))
    # Remove the first video, add one that sorts last: same count, every position shifts.
    gone = "MoveLeft/v_MoveLeft_g01_c01.avi"
    (root / gone).unlink()
    shutil.copy(root / "MoveLeft/v_MoveLeft_g02_c01.avi", root / "Zz_new.avi")
    shutil.move(root / "Zz_new.avi", root / "MoveUp" / "zz_new.avi")
    dm2, cb2 = _dm(root), PseudoLabels(every_n_epochs=5, method="kmeans", num_clusters=4)
    spy, model = _AtRecluster(cb2), _model(ClusterContrast)
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, [cb2], max_epochs=2, limit_train_batches=1).fit(
            model, datamodule=dm2, ckpt_path=str(tmp_path / "ckpt/last.ckpt")
        )
    ids = _ids(dm2, root)
    assert len(ids) == len(saved) and gone not in ids and "MoveUp/zz_new.avi" in ids
    said = [r.getMessage() for r in caplog.records if "videos changed" in r.getMessage()]
    assert len(said) == 1
    assert "11 kept" in said[0] and "1 added" in said[0] and "1 removed" in said[0]
    # re-clustered at once (epoch 1 is not scheduled), from labels mapped by identity
    assert [e for e, _ in spy.before] == [1]
    mapped = spy.before[0][1].tolist()
    for key, label in zip(ids, mapped):
        assert label == saved.get(key, -1), key
    assert cb2.labels_epoch == 1 and cb2.labels.shape == (len(ids),)
    assert (cb2.labels >= 0).all()
    assert torch.equal(dm2._train_batch_sampler.labels, cb2.labels)
    assert torch.equal(model.pseudo_labels.cpu(), cb2.labels)


def test_position_only_checkpoint_loads_when_the_count_matches(videos, tmp_path, caplog):
    root = _copy(videos, tmp_path)
    dm = _dm(root)
    cb = PseudoLabels(every_n_epochs=5, method="kmeans", num_clusters=4)
    old = torch.arange(12) % 4
    cb.load_state_dict({"labels": old, "labels_epoch": 0, "diagnostics": {}, "history": []})

    def forbidden(*a, **k):
        raise AssertionError("re-clustered")

    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as mp:
        mp.setattr(clustering, "cluster", forbidden)
        _trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=1).fit(
            _model(), datamodule=dm
        )
    assert torch.equal(cb.labels, old) and cb.state.keys.tolist() == list(dm.train_video_ids)
    assert any("position only" in r.getMessage() for r in caplog.records)


def test_queue_indices_follow_their_videos():
    model = _model(ClusterContrast)
    model.queue_index[:] = torch.tensor([0, 1, 2, -1, 3, 0, 2, 1])
    model.remap_video_indices(torch.tensor([2, -1, 0, 1]))  # video 1 removed, the rest moved
    assert model.queue_index.tolist() == [2, -1, 0, -1, 1, 2, 0, -1]


def test_resume_after_a_removal_maps_labels_without_reclustering(videos, tmp_path, caplog):
    root = _copy(videos, tmp_path)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb, dm = PseudoLabels(every_n_epochs=5, method="kmeans", num_clusters=4), _dm(root)
    _trainer(tmp_path, [cb, ckpt], max_epochs=1, limit_train_batches=1).fit(
        _model(), datamodule=dm
    )
    saved = dict(zip(_ids(dm, root), cb.labels.tolist()))
    (root / "MoveLeft/v_MoveLeft_g01_c01.avi").unlink()
    cb2, dm2 = PseudoLabels(every_n_epochs=5, method="kmeans", num_clusters=4), _dm(root)

    def forbidden(*a, **k):
        raise AssertionError("re-clustered")

    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as mp:
        mp.setattr(clustering, "cluster", forbidden)
        _trainer(tmp_path, [cb2], max_epochs=2, limit_train_batches=1).fit(
            _model(), datamodule=dm2, ckpt_path=str(tmp_path / "ckpt/last.ckpt")
        )
    assert cb2.labels.tolist() == [saved[k] for k in _ids(dm2, root)]
    assert cb2.labels_epoch == 0
    said = [r.getMessage() for r in caplog.records if "videos changed" in r.getMessage()]
    assert len(said) == 1 and "0 added, 1 removed; labels mapped" in said[0]


# -- clustering the motion view (modality) ----------------------------------------------------


def test_motion_modality_clusters_the_motion_features_of_the_bank(videos, tmp_path):
    """modality='motion': the labels are the clustering of the method's motion features."""
    torch.manual_seed(0)
    model = ClusterTriplet(motion_prob=0.5, motion_input="xy", motion_channels=3,
                           proj_hidden_dim=16, proj_output_dim=8, backbone="r3d_18",
                           backbone_kwargs={"width_mult": 1 / 16})  # fmt: skip
    dm = _dm(videos, motion="diff", motion_views=list(model.motion_views))
    dm.setup("fit")
    # The labels are made at the start of epoch 0, from the weights as they are now, of the
    # projection outputs (ClusterTriplet's pseudo_label_defaults: SLIC clusters those).
    # Computed here by hand, batch by batch in eval mode, rows in dataset-index order.
    model.eval()
    feats, order = {"motion": [], "rgb": []}, []
    with torch.no_grad():
        for batch in dm.bank_dataloader():
            batch = dm.augment(batch, train=False)
            order.append(batch["index"])
            feats["motion"].append(model.projection(model.encode_motion(batch["motion"][0])))
            feats["rgb"].append(model.projection(model.backbone(batch["views"][0])))
    model.train()
    rows = torch.cat(order).argsort()
    expected = {
        k: clustering.cluster(torch.nn.functional.normalize(torch.cat(v)[rows], dim=1).numpy(),
                              method="finch").labels
        for k, v in feats.items()
    }
    cb = PseudoLabels(every_n_epochs=1, method="finch", modality="motion")
    _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(model, datamodule=dm)
    assert cb.history[0]["epoch"] == 0
    np.testing.assert_array_equal(cb.state.labels, expected["motion"])
    assert "(motion)" in cb.state.provenance
    # The motion and RGB features of this model cluster the videos differently, so the test
    # would see an RGB bank.
    assert not np.array_equal(expected["motion"], expected["rgb"])


def test_motion_modality_needs_a_motion_view_and_a_model_that_encodes_it(videos, tmp_path):
    cb = PseudoLabels(modality="motion")
    with pytest.raises(ValueError, match="data.motion is 'none'"):
        _trainer(tmp_path, [cb], max_epochs=1).fit(_model(), datamodule=_dm(videos))
    with pytest.raises(ValueError, match="unknown modality 'flow'; valid: rgb, motion, both"):
        PseudoLabels(modality="flow")


# -- a motion teacher's clusters (initial_weights with modality='motion') ---------------------


def _teacher_checkpoint(videos, tmp_path):
    """A CrossModalContrast (frame-difference stream) checkpoint after one training batch."""
    torch.manual_seed(1)
    teacher = CrossModalContrast(motion_channels=3, head=Head(hidden_dim=16, output_dim=8),
                                 backbone="r3d_18", backbone_kwargs={"width_mult": 1 / 16})
    dm = _dm(videos, views=list(teacher.views), motion="diff",
             motion_views=list(teacher.motion_views))
    trainer = _trainer(tmp_path / "teacher", [], max_epochs=1, limit_train_batches=1,
                       enable_checkpointing=False)
    trainer.fit(teacher, datamodule=dm)
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_motion_teacher_labels_are_the_clusters_of_its_motion_features(videos, tmp_path):
    """initial_weights + modality='motion': an RGB-only student trains on a teacher's clusters."""
    path = _teacher_checkpoint(videos, tmp_path)
    dm = _dm(videos, motion="diff", motion_views=[])
    dm.setup("fit")
    # By hand, from the checkpoint through Lightning's own loader: the teacher's RGB and motion
    # streams over the bank (one centre clip per video, eval mode), rows in index order.
    teacher = CrossModalContrast.load_from_checkpoint(path).eval()
    feats, order = {"motion": [], "rgb": []}, []
    with torch.no_grad():
        for batch in dm.bank_dataloader():
            batch = dm.augment(batch, train=False)
            order.append(batch["index"])
            feats["motion"].append(teacher.encode_motion(batch["motion"][0]))
            feats["rgb"].append(teacher.encode_rgb(batch["views"][0]))
    rows = torch.cat(order).argsort()
    feats = {k: torch.nn.functional.normalize(torch.cat(v)[rows], dim=1) for k, v in feats.items()}
    feats["both"] = torch.nn.functional.normalize(feats["rgb"] + feats["motion"], dim=1)
    labels = {k: clustering.cluster(v.numpy(), method="finch", req_clust=3).labels
              for k, v in feats.items()}
    expected = labels["motion"]
    student = _model()  # ClusterTriplet without a motion encoder: it never re-clusters
    cb = PseudoLabels(every_n_epochs=0, method="finch", num_clusters=3, modality="motion",
                      initial_weights=str(path))
    _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(student, datamodule=dm)
    assert [h["epoch"] for h in cb.history] == [-1]  # made once, before training
    np.testing.assert_array_equal(cb.state.labels, expected)
    assert f"motion features of initial_weights={path}" == cb.state.provenance
    assert cb._teacher is None  # not held after the labels are made
    # The teacher's RGB stream clusters the videos otherwise: the bank was its motion view.
    assert not np.array_equal(labels["rgb"], expected)
    # modality='both': the teacher's RGB and motion features, each normalised, averaged.
    cb = PseudoLabels(every_n_epochs=0, method="finch", num_clusters=3, modality="both",
                      initial_weights=str(path))
    _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(_model(), datamodule=dm)
    np.testing.assert_array_equal(cb.state.labels, labels["both"])
    assert not np.array_equal(labels["both"], expected)


def test_motion_teacher_without_a_motion_encoder_fails_at_setup(videos, tmp_path):
    rgb_only = tmp_path / "rgb_only.ckpt"
    student = _model()
    torch.save({"state_dict": student.state_dict(),
                "hyper_parameters": {"backbone": "r3d_18",
                                     "backbone_kwargs": {"width_mult": 1 / 16}}}, rgb_only)
    dm = _dm(videos, motion="diff", motion_views=[])
    for weights, error in [(rgb_only, "has no motion encoder: give a checkpoint of "
                                      "CrossModalContrast, GOCA or ClusterTriplet"),
                           (tmp_path / "missing.ckpt", "missing.ckpt not found")]:
        cb = PseudoLabels(every_n_epochs=0, modality="motion", initial_weights=str(weights))
        trainer = _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1)
        with pytest.raises(ValueError, match=error):
            trainer.fit(_model(), datamodule=dm)
        assert trainer.global_step == 0
