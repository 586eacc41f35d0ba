"""Retrieval R@k after a short pretraining on the synthetic motion collection, vs random init.

Writes the synthetic collection (classes differ only by motion; see vidssl.data.synthetic),
evaluates a randomly initialised backbone, then pretrains each method in ``--methods`` from the
same initial weights and evaluates it with the retrieval protocol (test videos query the
training videos, features averaged over ``--num-clips`` uniform clips, cosine, exact search).

    .venv/bin/python benchmarks/retrieval_synthetic.py                       # simclr, moco
    .venv/bin/python benchmarks/retrieval_synthetic.py --methods moco --epochs 30

A method is a name in ``METHODS`` or ``package.module:factory`` where ``factory(args)`` returns
``(method, callbacks)``; cluster-guided methods add themselves that way (with their
``PseudoLabels`` callback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Tuple

import pytorch_lightning as pl
import torch

from vidssl.data import VideoDataModule, write_synthetic_dataset
from vidssl.evaluation import evaluate_retrieval
from vidssl.methods import MoCo, SimCLR

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def _backbone(args) -> dict:
    return dict(backbone="r3d_18", backbone_kwargs={"width_mult": args.width})


def _simclr(args) -> Tuple[pl.LightningModule, List[pl.Callback]]:
    return SimCLR(lr=args.lr, weight_decay=1e-4, **_backbone(args)), []


def _moco(args) -> Tuple[pl.LightningModule, List[pl.Callback]]:
    # The queue holds 16 batches: about 3 epochs of keys on this small collection.
    return MoCo(lr=args.lr, queue_size=16 * args.batch, **_backbone(args)), []


#: name -> factory(args) returning (method, callbacks).
METHODS: Dict[str, Callable] = {"simclr": _simclr, "moco": _moco}


def _factory(name: str) -> Callable:
    if name in METHODS:
        return METHODS[name]
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    raise SystemExit(f"unknown method {name!r}; valid: {', '.join(METHODS)} or module:factory")


def _datamodule(root: str, args) -> VideoDataModule:
    return VideoDataModule(
        train=root,
        clip_len=args.clip_len,
        stride=2,
        short_side=args.crop,
        crop_size=args.crop,
        batch_size=args.batch,
        num_workers=args.workers,
        backend="pyav",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["simclr", "moco"])
    ap.add_argument("--root", default=None, help="where to write the collection (default: tmp)")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--videos-per-class", type=int, default=20)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--clip-len", type=int, default=8)
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--width", type=float, default=0.25, help="R3D-18 width multiplier")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--num-clips", type=int, default=5, help="eval clips per video")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    root = args.root or tempfile.mkdtemp(prefix="vidssl_synth_")
    if not os.path.isdir(os.path.join(root, "ucfTrainTestlist")):
        write_synthetic_dataset(root, num_classes=args.classes,
                                videos_per_class=args.videos_per_class,
                                num_frames=args.frames, seed=args.seed)  # fmt: skip
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, no GPU used; torch "
          f"{torch.__version__}; load average {os.getloadavg()}")  # fmt: skip
    print(f"collection: {args.classes} motion classes x {args.videos_per_class} videos of "
          f"{args.frames} frames; R3D-18 width {args.width}, clips {args.clip_len} x "
          f"{args.crop}px, batch {args.batch}, {args.epochs} epochs, eval {args.num_clips} clips")

    rows = []
    pl.seed_everything(args.seed, verbose=False)
    random_init, _ = _simclr(args)
    dm = _datamodule(root, args)
    res = evaluate_retrieval(random_init, dm, num_clips=args.num_clips)
    rows.append(("random init", 0.0, res))
    for name in args.methods:
        # The same seed before building: every method starts from the same backbone weights.
        pl.seed_everything(args.seed, verbose=False)
        method, callbacks = _factory(name)(args)
        dm = _datamodule(root, args)
        trainer = pl.Trainer(
            max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=callbacks,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(method, datamodule=dm)
        minutes = (time.perf_counter() - start) / 60
        rows.append((name, minutes, evaluate_retrieval(method, dm, num_clips=args.num_clips)))

    ks = list(rows[0][2].recall)
    r = rows[0][2]
    print(f"queries (test) {r.num_queries}, gallery (train) {r.num_gallery}, "
          f"{r.similarity}, centre={r.center}, chance R@1 ~ {1 / args.classes:.3f}")
    print(f"{'method':14} {'train min':>9} " + " ".join(f"{'R@' + str(k):>6}" for k in ks)
          + f" {'R@1 / random':>12}")  # fmt: skip
    base = rows[0][2].recall[1]
    for name, minutes, res in rows:
        ratio = res.recall[1] / base if base > 0 else float("nan")
        print(f"{name:14} {minutes:9.1f} " + " ".join(f"{res.recall[k]:6.3f}" for k in ks)
              + f" {ratio:12.2f}")  # fmt: skip
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
