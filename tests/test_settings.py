"""The shared settings groups (head, optim, ema): defaults per method, merging, legacy names."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
import yaml

from vidssl.cli import main
from vidssl.evaluation.embed import load_encoder
from vidssl.methods import (
    GOCA,
    ClusterContrast,
    ClusterTriplet,
    EMASchedule,
    Head,
    MoCo,
    Optimization,
    SimCLR,
)
from vidssl.methods.queue import KeyQueue

TINY = {"backbone": "r3d_18", "backbone_kwargs": {"width_mult": 1 / 16}}

# Each method's defaults as its flat __init__ arguments stated them before the groups.
OLD_DEFAULTS = {
    SimCLR: dict(proj_hidden_dim=None, proj_output_dim=128, proj_num_layers=2,
                 proj_batch_norm=True, optimizer="sgd", lr=0.05, weight_decay=1e-6, momentum=0.9,
                 exclude_bias_and_norm=True, lars_eta=0.001, warmup_epochs=0.0,
                 lr_schedule="cosine", min_lr_ratio=0.0, ema_momentum=0.99,
                 ema_momentum_end=1.0, ema_schedule="constant"),
    MoCo: dict(proj_hidden_dim=None, proj_output_dim=128, proj_num_layers=2,
               proj_batch_norm=False, optimizer="sgd", lr=0.03, weight_decay=1e-4, momentum=0.9,
               exclude_bias_and_norm=False, lars_eta=0.001, warmup_epochs=0.0,
               lr_schedule="cosine", min_lr_ratio=0.0, ema_momentum=0.999,
               ema_momentum_end=1.0, ema_schedule="constant"),
    ClusterTriplet: dict(proj_hidden_dim=2048, proj_output_dim=128, proj_num_layers=2,
                         proj_batch_norm=True, optimizer="sgd", lr=0.1, weight_decay=0.0,
                         momentum=0.5, exclude_bias_and_norm=False, lars_eta=0.001,
                         warmup_epochs=0.0, lr_schedule="constant", min_lr_ratio=0.0,
                         ema_momentum=0.99, ema_momentum_end=1.0, ema_schedule="constant"),
    ClusterContrast: dict(proj_hidden_dim=None, proj_output_dim=128, proj_num_layers=2,
                          proj_batch_norm=False, optimizer="sgd", lr=0.03, weight_decay=1e-4,
                          momentum=0.9, exclude_bias_and_norm=False, lars_eta=0.001,
                          warmup_epochs=0.0, lr_schedule="cosine", min_lr_ratio=0.0,
                          ema_momentum=0.999, ema_momentum_end=1.0, ema_schedule="constant"),
    GOCA: dict(proj_hidden_dim=2048, proj_output_dim=128, proj_num_layers=3,
               proj_batch_norm=True, optimizer="lars", lr=1.2, weight_decay=1e-4, momentum=0.9,
               exclude_bias_and_norm=False, lars_eta=0.001, warmup_epochs=10.0,
               lr_schedule="cosine", min_lr_ratio=0.004, ema_momentum=0.99,
               ema_momentum_end=1.0, ema_schedule="constant"),
}


def _build(cls, **kw):
    if cls is GOCA:
        kw = {"num_prototypes": 4, "prototype_steps": 2, **kw}
    return cls(**TINY, **kw)


@pytest.mark.parametrize("cls", list(OLD_DEFAULTS), ids=lambda c: c.__name__)
def test_each_method_keeps_its_defaults(cls):
    m = _build(cls)
    assert {name: getattr(m, "optimizer_name" if name == "optimizer" else name)
            for name in OLD_DEFAULTS[cls]} == OLD_DEFAULTS[cls]


def test_a_group_changes_only_the_fields_it_sets():
    m = SimCLR(optim=Optimization(lr=0.1), **TINY)
    assert m.optim == Optimization(optimizer="sgd", lr=0.1, weight_decay=1e-6, momentum=0.9,
                                   exclude_bias_and_norm=True, lars_eta=0.001,
                                   warmup_epochs=0.0, lr_schedule="cosine", min_lr_ratio=0.0)
    ct = ClusterTriplet(head={"output_dim": 16}, **TINY)  # a dict, as from a checkpoint
    assert (ct.head.hidden_dim, ct.head.output_dim) == (2048, 16)
    assert ct.projection[-1].out_features == 16
    moco = MoCo(ema=EMASchedule(momentum=0.9), version=1, **TINY)
    assert moco.ema == EMASchedule(momentum=0.9, momentum_end=1.0, schedule="constant")
    assert moco.head.num_layers == 1  # v1's linear head: the version still picks it
    assert MoCo(head=Head(num_layers=3), version=1, **TINY).head.num_layers == 3
    # hidden_dim 0: the backbone's feature size, also where the method's default is 2048
    assert ClusterTriplet(head=Head(hidden_dim=0), **TINY).projection[0].out_features == (
        ClusterTriplet(**TINY).feature_dim)


def test_errors_name_the_grouped_key():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; valid: sgd, adamw, lars "
                                         r"\(model.init_args.optim.optimizer"):
        SimCLR(optim=Optimization(optimizer="adam"), **TINY)
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0.*model.init_args.optim"):
        SimCLR(optim={"weight_decay": -1.0}, **TINY)
    with pytest.raises(ValueError, match=r"unknown key 'learning_rate' under "
                                         r"model.init_args.optim; valid: optimizer, lr"):
        SimCLR(optim={"learning_rate": 0.1}, **TINY)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        SimCLR(temprature=0.1, **TINY)


def test_flat_legacy_arguments_work_with_a_future_warning():
    with pytest.warns(FutureWarning, match=r"SimCLR\(lr=...\) -> SimCLR\(optim=Optimization"
                                           r"\(lr=...\)\).*SimCLR\(head=Head\(output_dim"):
        old = SimCLR(lr=0.2, proj_output_dim=8, ema_momentum=0.5, **TINY)
    new = SimCLR(optim=Optimization(lr=0.2), head=Head(output_dim=8),
                 ema=EMASchedule(momentum=0.5), **TINY)
    assert (old.optim, old.head, old.ema) == (new.optim, new.head, new.ema)
    assert "lr" not in old.hparams and old.hparams["optim"]["lr"] == 0.2
    # Both: the flat one wins, as a resumed checkpoint's flat hyper-parameters over the config.
    with pytest.warns(FutureWarning, match=r"its 0.2 replaces optim.lr=0.1"):
        assert SimCLR(lr=0.2, optim=Optimization(lr=0.1), **TINY).lr == 0.2


def _old_checkpoint(tmp_path, cls, flat, **own):
    """A checkpoint as vidssl wrote it before the groups: flat hyper-parameters."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        method = cls(**TINY, **own, **flat)
    path = tmp_path / f"old_{cls.__name__}.ckpt"
    torch.save({"state_dict": method.state_dict(), "pytorch-lightning_version": pl.__version__,
                "hyper_parameters": {**TINY, "weights": None, **own, **flat}}, path)
    return method, path


@pytest.mark.parametrize("cls, own, flat", [
    (SimCLR, {"temperature": 0.2}, dict(proj_hidden_dim=None, proj_output_dim=8,
                                        proj_num_layers=2, proj_batch_norm=True,
                                        optimizer="lars", lr=0.07, weight_decay=1e-6,
                                        warmup_epochs=2.0)),
    (MoCo, {"queue_size": 16, "version": 2}, dict(proj_hidden_dim=None, proj_output_dim=8,
                                                  lr=0.02, ema_momentum=0.9)),
    # None was the feature size: it must not become ClusterTriplet's default 2048.
    (ClusterTriplet, {"margin": 0.3}, dict(proj_hidden_dim=None, proj_output_dim=8, lr=0.05,
                                           lr_schedule="cosine")),
], ids=["SimCLR", "MoCo", "ClusterTriplet"])
def test_checkpoint_with_flat_hparams_loads(tmp_path, cls, own, flat):
    method, path = _old_checkpoint(tmp_path, cls, flat, **own)
    with pytest.warns(FutureWarning, match="deprecated"):
        loaded = cls.load_from_checkpoint(path)
    assert (loaded.optim, loaded.head, loaded.ema) == (method.optim, method.head, method.ema)
    assert loaded.optim.lr == flat["lr"] and loaded.head.output_dim == 8
    # proj_hidden_dim None: a hidden layer as wide as the backbone's features, as before
    assert loaded.projection[0].out_features == loaded.feature_dim
    for k, v in method.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # Saved again, it holds the groups and loads without a warning.
    again = tmp_path / "again.ckpt"
    torch.save({"state_dict": loaded.state_dict(), "pytorch-lightning_version": pl.__version__,
                "hyper_parameters": dict(loaded.hparams)}, again)
    assert not set(flat) & set(loaded.hparams)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*flat head")
        reloaded = cls.load_from_checkpoint(again)
    assert (reloaded.optim, reloaded.head) == (method.optim, method.head)
    # vidssl's encoder loading (embed, index, retrieval) reads the same old checkpoint.
    encoder, info = load_encoder(path)
    clips = torch.rand(2, 3, 4, 32, 32)
    assert torch.allclose(encoder(clips), method.eval().backbone(clips), atol=1e-6)
    assert info["backbone"] == "r3d_18"


# ----------------------------------------------------------------------------- the command line
def _printed(capsys, *args):
    assert main(["fit", *args, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]


@pytest.mark.parametrize("model", ["SimCLR", "MoCo", "ClusterTriplet", "ClusterContrast",
                                   "GOCA", "CrossModalContrast"])
def test_print_config_lists_the_groups_of_every_method(model, capsys):
    args = _printed(capsys, "--model", model, "--data.init_args.train=x",
                    "--model.init_args.optim.lr", "0.2", "--model.init_args.ema.momentum=0.5")
    assert {"backbone", "backbone_kwargs", "weights"} <= set(args)
    assert set(args["head"]) == {"hidden_dim", "output_dim", "num_layers", "batch_norm"}
    assert set(args["optim"]) == {"optimizer", "lr", "weight_decay", "momentum", "lars_eta",
                                  "exclude_bias_and_norm", "warmup_epochs", "lr_schedule",
                                  "min_lr_ratio"}
    assert args["optim"]["lr"] == 0.2 and args["optim"]["weight_decay"] is None
    assert args["ema"] == {"momentum": 0.5, "momentum_end": None, "schedule": None}


def test_flat_config_keys_and_options_still_work(tmp_path, tiny_video_root, capsys):
    cfg = tmp_path / "old.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"class_path": "vidssl.methods.MoCo", "init_args": {
            **TINY, "queue_size": 8, "lr": 0.2, "proj_output_dim": 8, "ema_momentum": 0.9}},
        "data": {"class_path": "VideoDataModule", "init_args": {
            "train": str(tiny_video_root), "clip_len": 4, "crop_size": 32, "short_side": 40,
            "batch_size": 4, "num_workers": 0, "drop_last": True}},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt")}}]},
    }))
    with pytest.warns(FutureWarning, match=r"model.init_args.lr -> model.init_args.optim.lr"):
        args = _printed(capsys, "--config", str(cfg), "--model.init_args.weight_decay", "0.5")
    assert args["optim"]["lr"] == 0.2 and args["optim"]["weight_decay"] == 0.5
    assert args["head"]["output_dim"] == 8 and args["ema"]["momentum"] == 0.9
    # Trained from the old config, the checkpoint holds the groups, resolved.
    with pytest.warns(FutureWarning):
        assert main(["fit", "--config", str(cfg)]) == 0
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert "lr" not in hp and hp["optim"]["lr"] == 0.2 and hp["optim"]["momentum"] == 0.9
    assert hp["head"]["output_dim"] == 8 and hp["ema"]["momentum"] == 0.9
    loaded = MoCo.load_from_checkpoint(ckpt)
    assert (loaded.lr, loaded.head.output_dim, loaded.queue_size) == (0.2, 8, 8)
    # A checkpoint written before the groups (flat hyper-parameters) resumes with fit.
    state = torch.load(ckpt, weights_only=False)
    flat = {k: v for k, v in hp.items() if k not in ("head", "optim", "ema")}
    state["hyper_parameters"] = {**flat, "lr": 0.3, "proj_output_dim": 8, "ema_momentum": 0.9}
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    (tmp_path / "ckpt" / ckpt.name).unlink()
    with pytest.warns(FutureWarning, match=r"its 0.3 replaces optim.lr=0.2"):
        assert main(["fit", "--config", str(cfg), "--ckpt_path", str(old),
                     "--trainer.max_steps", "2"]) == 0
    (resumed,) = (tmp_path / "ckpt").glob("*.ckpt")
    out = torch.load(resumed, weights_only=True)
    assert out["global_step"] == 2 and out["hyper_parameters"]["optim"]["lr"] == 0.3


# ----------------------------------------------------------------------------- the MoCo queue
def test_moco_step_copies_only_the_queued_keys(monkeypatch):
    queue = KeyQueue(4, 3)
    keys = queue.snapshot_keys()
    keys += 1  # a copy: the queue is unchanged
    assert torch.equal(queue.keys, queue.snapshot()[0]) and not torch.equal(keys, queue.keys)

    def no_snapshot(self, filled_only=False):
        raise AssertionError("MoCo's step copied the queue's index too")

    monkeypatch.setattr(KeyQueue, "snapshot", no_snapshot)
    m = MoCo(queue_size=8, **TINY)
    views = [torch.rand(4, 3, 4, 32, 32) for _ in range(2)]
    loss = m.compute_loss({"views": views, "index": torch.arange(4)})
    assert torch.isfinite(loss)
