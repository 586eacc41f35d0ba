"""`vidssl fit --ckpt_path last` after a SIGKILL mid-epoch continues the killed run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vidssl.cli import main
from vidssl.data.cluster_sampler import ClusterBatchSampler
from vidssl.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]

# Test-only callbacks, importable by the `python -m vidssl` subprocesses (PYTHONPATH).
HELPERS = '''
import os, time
import pytorch_lightning as pl
import torch


class Hold(pl.Callback):
    """At the start of step `at` (the checkpoint of step `at` is written): mark, then wait."""

    def __init__(self, at: int, marker: str):
        self.at, self.marker = at, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.at:
            open(self.marker, "w").close()
            time.sleep(600)


class Probe(pl.Callback):
    """Saves what the resumed run starts with, and the anchors of its first batch."""

    def __init__(self, out: str):
        self.out, self.seen = out, {}

    def on_train_start(self, trainer, pl_module):
        cb = [c for c in trainer.callbacks if type(c).__name__ == "PseudoLabels"][0]
        s = trainer.train_dataloader.batch_sampler
        self.seen = {
            "epoch": trainer.current_epoch, "global_step": trainer.global_step,
            "labels": cb.labels, "module_labels": pl_module.pseudo_labels.cpu(),
            "sampler_labels": s.labels, "sampler_seed": s.seed,
            "queue": pl_module.queue.clone(), "queue_ptr": pl_module.queue_ptr.clone(),
            "queue_index": pl_module.queue_index.clone(),
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "first_anchors" not in self.seen:
            self.seen["sampler_epoch"] = trainer.train_dataloader.batch_sampler.epoch
            self.seen["first_anchors"] = batch["index"].cpu().tolist()
            self.seen["first_batch_idx"] = batch_idx
            torch.save(self.seen, self.out)
'''

BATCH, STEPS_PER_EPOCH, HOLD_AT = 2, 6, 8  # killed at the start of step 9: epoch 1, batch 2


def _config(tmp_path, root, extra):
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "vidssl.methods.ClusterContrast",
            "init_args": {"backbone": "r3d_18", "backbone_kwargs": {"width_mult": 0.0625},
                          "queue_size": 8, "optim": {"lr": 0.01}},
        },
        "data": {
            "class_path": "vidssl.data.VideoDataModule",
            "init_args": {"train": str(root), "format": "class_folders", "clip_len": 4,
                          "stride": 1, "short_side": 40, "crop_size": 32, "batch_size": BATCH,
                          "num_workers": 0, "cache_dir": str(tmp_path / "cache")},
        },
        "trainer": {
            "max_epochs": 2, "accelerator": "cpu", "devices": 1, "precision": "32-true",
            "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "vidssl.callbacks.PseudoLabels",
                 "init_args": {"every_n_epochs": 1, "method": "kmeans", "num_clusters": 3}},
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"every_n_train_steps": 2, "save_last": True, "save_top_k": -1}},
                *extra,
            ],
        },
    }


def _write(tmp_path, name, cfg):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_last_restores_labels_queue_and_sampler(tmp_path):
    root = tmp_path / "videos"
    write_synthetic_dataset(root, num_classes=3, videos_per_class=4, num_frames=12, seed=2)
    (tmp_path / "helpers_resume.py").write_text(HELPERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    marker, probe = tmp_path / "held", tmp_path / "probe.pt"
    hold = {"class_path": "helpers_resume.Hold",
            "init_args": {"at": HOLD_AT, "marker": str(marker)}}
    first = _write(tmp_path, "first.yaml", _config(tmp_path, root / "UCF-101", [hold]))
    proc = subprocess.Popen([sys.executable, "-m", "vidssl", "fit", "--config", str(first)],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the first run never reached its checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    last = tmp_path / "run/lightning_logs/version_0/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == HOLD_AT and ckpt["epoch"] == 1  # mid-epoch 1

    probe_cb = {"class_path": "helpers_resume.Probe", "init_args": {"out": str(probe)}}
    second = _write(tmp_path, "second.yaml", _config(tmp_path, root / "UCF-101", [probe_cb]))
    done = subprocess.run(
        [sys.executable, "-m", "vidssl", "fit", "--config", str(second), "--ckpt_path", "last"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {last}" in done.stderr
    seen = torch.load(probe, weights_only=False)
    # the epoch count continues
    assert seen["epoch"] == 1 and seen["global_step"] == HOLD_AT
    # pseudo-labels: the checkpoint's, in the callback, the method and the sampler
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("PseudoLabels"))
    assert state["labels_epoch"] == 1 and state["keys"] is not None
    for key in ("labels", "module_labels", "sampler_labels"):
        assert torch.equal(seen[key], state["labels"]), key
    # the queue
    for key, saved in (("queue", "keys"), ("queue_ptr", "ptr"), ("queue_index", "index")):
        assert torch.equal(seen[key], ckpt["state_dict"]["key_queue." + saved]), key
    # the sampler: same epoch and seed, and it continues the epoch where the killed run stopped
    sampler_state = state["sampler"]
    done_batches = HOLD_AT - STEPS_PER_EPOCH
    assert sampler_state["batches_done"] == done_batches and sampler_state["epoch"] == 1
    assert seen["sampler_epoch"] == 1 and seen["sampler_seed"] == sampler_state["seed"]
    ref = ClusterBatchSampler(12, BATCH, labels=sampler_state["labels"],
                              seed=sampler_state["seed"], drop_last=True)
    ref.set_epoch(1)
    expected = np.asarray(list(ref))[done_batches][:, 0].tolist()
    assert seen["first_batch_idx"] == done_batches and seen["first_anchors"] == expected
    final = torch.load(tmp_path / "run/lightning_logs/version_1/checkpoints/last.ckpt",
                       map_location="cpu", weights_only=False)
    assert final["global_step"] == 2 * STEPS_PER_EPOCH


def test_ckpt_path_last_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    root = tmp_path / "videos"
    write_synthetic_dataset(root, num_classes=2, videos_per_class=2, num_frames=8, seed=0)
    cfg = _write(tmp_path, "cfg.yaml", _config(tmp_path, root / "UCF-101", []))
    assert main(["fit", "--config", str(cfg), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no last.ckpt under" in err[0] and "lightning_logs" in err[0]
