"""``vidssl demo``: the whole journey on a synthetic collection, on the CPU in a few minutes.

Generates videos whose classes differ only by motion, pretrains a narrow backbone with the
cluster-guided method, compares its retrieval with a random backbone, draws what it retrieves
and how NMI / R@1 evolved, and builds a search index.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores.

    Args:
        out_dir: where results go (checkpoint, table, pictures, index).
        cache_dir: where the synthetic collection is generated (reused when present).
        method: ``"ClusterTriplet"`` (SLIC, the default), ``"SimCLR"`` or ``"GOCA"`` (RGB and
            frame differences, online clustering).
        epochs: pretraining epochs.
        videos_per_class: videos of each of the 6 motion classes.
        width_mult: backbone width (R3D-18 channels x ``width_mult``).
        clip_len: frames per clip.
        crop_size: clip side in pixels (the videos are 40 x 40).
        batch_size: training batch size.
        lr: AdamW learning rate (cosine schedule). The papers' SGD settings are tuned for
            hundreds of epochs: SimCLR with SGD at lr 0.1 was still at the chance loss after 75
            steps on this collection, AdamW at 1e-3 learned within 200.
        num_clips: clips averaged per video in the retrieval evaluation.
        num_workers: DataLoader workers.
        recluster_every: epochs between re-clusterings (cluster-guided method).
        cluster_start_epoch: first re-clustering. Until then every video is its own class
            (instance discrimination), so the first pseudo-labels come from a trained network
            rather than a random one, whose clusters mix classes (docs/benchmarks.md).
        monitor_every: epochs between the R@1 measurements of the training curve.
        seed: seed of the data and the training.
    """

    out_dir: str = "vidssl-demo"
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "vidssl")
    method: str = "ClusterTriplet"
    epochs: int = 24
    videos_per_class: int = 40
    width_mult: float = 0.125
    clip_len: int = 8
    crop_size: int = 32
    batch_size: int = 16
    lr: float = 1e-3
    num_clips: int = 5
    num_workers: int = 1
    recluster_every: int = 4
    cluster_start_epoch: int = 12
    monitor_every: int = 4
    seed: int = 0


def _say(msg: str) -> None:
    print(f"[vidssl demo] {msg}", file=sys.stderr, flush=True)


def _dataset(s: DemoSettings) -> Path:
    """Write (once) the synthetic motion collection in the UCF101 layout; return its root."""
    from vidssl.data.synthetic import MOTIONS, write_synthetic_dataset

    name = f"synthetic-motion-v2-shared-{s.videos_per_class}x{len(MOTIONS)}-seed{s.seed}"
    root = Path(s.cache_dir) / name
    done = root / ".complete"
    if not done.exists():
        _say(f"generating {s.videos_per_class * len(MOTIONS)} synthetic videos into {root}")
        # One look for every video: with a look per video, instance discrimination learns the
        # look instead of the motion (docs/data.md, "Synthetic data").
        write_synthetic_dataset(root, num_classes=len(MOTIONS),
                                videos_per_class=s.videos_per_class, num_frames=32, width=40,
                                height=40, seed=s.seed, appearance="shared")
        done.write_text("ok\n")
    else:
        _say(f"using the synthetic videos in {root}")
    return root


def _history(epochs: int, monitor: Any, pseudo_labels: Any) -> List[Dict[str, float]]:
    """One row per epoch trained: its R@1 and the NMI of its pseudo-labels, where measured.

    R@1 is ``RetrievalMonitor.history``'s, measured at the end of the epoch; NMI is
    ``PseudoLabels.history``'s, of the labels made at the start of the epoch.
    """
    r1 = {h["epoch"]: float(h["recall"][1]) for h in monitor.history if 1 in h["recall"]}
    nmi = {} if pseudo_labels is None else {
        h["epoch"]: float(h["nmi"]) for h in pseudo_labels.history if "nmi" in h}
    rows: List[Dict[str, float]] = []
    for epoch in range(epochs):
        row: Dict[str, float] = {"epoch": epoch}
        if epoch in r1:
            row["R@1"] = r1[epoch]
        if epoch in nmi:
            row["NMI"] = nmi[epoch]
        rows.append(row)
    return rows


def _plot_history(rows: List[Dict[str, float]], path: Path, start_r1: Optional[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    # x = epochs trained when measured: R@1 after its epoch, NMI before its epoch's training.
    for key, style, shift in (("R@1", "o-", 1), ("NMI", "s--", 0)):
        pts = [(r["epoch"] + shift, r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), style, label=key)
    if start_r1 is not None:
        # The starting weights under the curve's own protocol (RetrievalMonitor: one centre
        # clip per gallery video), so the curve and the line compare like with like.
        ax.axhline(start_r1, color="grey", linestyle=":", label="R@1 before training")
    ax.set_xlabel("epochs trained")
    ax.set_ylim(0, 1.02)
    ax.set_title("R@1 during training (RetrievalMonitor) and pseudo-label NMI", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _middle_frame(path: str) -> np.ndarray:
    from vidssl.data.decoding import PyAVDecoder
    from vidssl.data.index import probe_video

    n = max(1, probe_video(path).num_frames)
    return PyAVDecoder().read(path, [n // 2])[0]


def _plot_results(queries: List[str], hits: List[List[Any]], class_of, path: Path) -> None:
    """Draw each query's middle frame beside its top-k (green: same class, red: other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(len(h) for h in hits)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.6 * (k + 1), 1.5 * len(queries)))
    axes = np.atleast_2d(axes)
    for r, (q, row) in enumerate(zip(queries, hits)):
        cells = [(q, "query", "black")] + [
            (h.path, f"{h.score:.2f}", "green" if class_of(h.path) == class_of(q) else "red")
            for h in row
        ]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            p, title, colour = cells[c]
            ax.imshow(_middle_frame(p))
            ax.set_title(f"{class_of(p)}\n{title}", fontsize=7, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2 if c else 1)
    fig.suptitle("query (left) and its nearest training videos (green: same motion class)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: Methods ``vidssl demo --method`` trains.
DEMO_METHODS = ("ClusterTriplet", "SimCLR", "GOCA")


def _motion_settings(model: Any) -> Dict[str, Any]:
    """Data-module settings of a method that reads motion (GOCA): frame differences."""
    views = tuple(getattr(model, "motion_views", ()) or ())
    return {"motion": "diff", "motion_views": list(views)} if views else {}


def _build_method(s: DemoSettings):
    """Return the demo's method and whether it is cluster-guided (needs PseudoLabels)."""
    from vidssl import methods

    if s.method not in DEMO_METHODS:
        raise ValueError(f"unknown demo method {s.method!r}; choose one of "
                         f"{', '.join(DEMO_METHODS)}")
    common = dict(backbone="r3d_18", backbone_kwargs={"width_mult": s.width_mult})
    optim = dict(optimizer="adamw", lr=s.lr, weight_decay=1e-4, lr_schedule="cosine")
    if s.method == "ClusterTriplet":
        # A smaller head than SLIC's 2048 hidden units for the CPU.
        return methods.ClusterTriplet(head=methods.Head(hidden_dim=128),
                                      optim=methods.Optimization(**optim), **common), True
    if s.method == "GOCA":
        # Frame differences as the motion view (made on the device: nothing to precompute), 30
        # prototypes for a few hundred clips (the paper's 1000 are for Kinetics), short clips
        # cut from the long ones, the cross-view prior from the middle of training.
        return methods.GOCA(motion_channels=3, num_prototypes=30, prototype_steps=2000,
                            prior_start_epoch=max(1, s.epochs // 2), num_short_clips=2,
                            short_clips_from="long", head=methods.Head(hidden_dim=128),
                            optim=methods.Optimization(warmup_epochs=0.0, **optim),
                            **common), False
    return methods.SimCLR(optim=methods.Optimization(**optim), **common), False


def run_demo(s: Optional[DemoSettings] = None) -> Dict[str, Any]:
    """Run the demo with settings ``s``; return the paths it wrote and the R@k results."""
    import pytorch_lightning as pl
    import torch

    from vidssl.callbacks import PseudoLabels, RetrievalMonitor
    from vidssl.data import VideoAugmentation, VideoDataModule
    from vidssl.evaluation.embed import ClipSettings, embed_videos, find_videos, load_encoder
    from vidssl.evaluation.retrieval import evaluate_retrieval, format_recall_table
    from vidssl.evaluation.search import SearchIndex

    s = s or DemoSettings()
    t0 = time.time()
    out = Path(s.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = _dataset(s)
    pl.seed_everything(s.seed, verbose=False)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    model, clustered = _build_method(s)
    # The classes differ by direction of motion: a horizontal flip turns MoveLeft into
    # MoveRight, so the demo's augmentation has no flip, and no colour changes (every video has
    # the same look); crops keep 40-100 % of the frame, as benchmarks/retrieval_synthetic.py.
    augmentation = VideoAugmentation(s.crop_size, scale=(0.4, 1.0), flip_p=0.0, jitter_p=0.0,
                                     grayscale_p=0.0, blur_p=0.0)
    dm = VideoDataModule(
        train=str(root), format="ucf101", clip_len=s.clip_len, stride=2,
        short_side=s.crop_size, crop_size=s.crop_size, train_augmentation=augmentation,
        views=list(model.views), **_motion_settings(model),
        batch_size=s.batch_size, eval_num_clips=s.num_clips, num_workers=s.num_workers,
        persistent_workers=s.num_workers > 0, cache_dir=str(Path(s.cache_dir) / "manifests"),
    )
    monitor = RetrievalMonitor(every_n_epochs=s.monitor_every, ks=(1, 5), at_start=True)
    callbacks: List[Any] = [monitor]
    pseudo_labels = None
    if clustered:
        pseudo_labels = PseudoLabels(every_n_epochs=s.recluster_every,
                                     start_epoch=s.cluster_start_epoch, p_same=0.2, seed=s.seed)
        callbacks.append(pseudo_labels)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=s.epochs, logger=False,
        enable_checkpointing=False, callbacks=callbacks, num_sanity_val_steps=0,
        limit_val_batches=0, enable_model_summary=False, log_every_n_steps=1,
    )
    _say(f"pretraining {type(model).__name__} (R3D-18 x {s.width_mult}) for {s.epochs} epochs "
         "on the CPU")
    initial = copy.deepcopy(model.backbone).eval()
    trainer.fit(model, datamodule=dm)
    ckpt = out / "model.ckpt"
    trainer.save_checkpoint(ckpt)

    _say(f"retrieval: test videos query training videos, {s.num_clips} clips per video")
    trained, info = load_encoder(ckpt)
    results = {
        f"{type(model).__name__} ({s.epochs} epochs)": evaluate_retrieval(
            trained, dm, num_clips=s.num_clips),
        # The very weights training started from: the comparison isolates what was learned.
        "random init": evaluate_retrieval(initial, dm, num_clips=s.num_clips),
    }
    table = format_recall_table(results)
    print(table)
    (out / "retrieval.txt").write_text(table + "\n")
    history = _history(trainer.current_epoch, monitor, pseudo_labels)
    start_r1 = monitor.initial.get(1) if monitor.initial else None
    if start_r1 is not None:
        history.insert(0, {"epoch": -1, "R@1": float(start_r1)})  # 0 epochs trained
    (out / "history.json").write_text(json.dumps(history, indent=1))
    _plot_history(history, out / "training_curves.png", start_r1)

    _say("embedding every video and building the search index")
    settings = ClipSettings.for_encoder(info, num_clips=s.num_clips)
    emb = embed_videos(trained, find_videos(root / "UCF-101"), out / "embeddings", settings,
                       info, num_workers=s.num_workers, overwrite=True)
    index = SearchIndex.build(emb.features, emb.paths, meta={
        "encoder": info, "settings": emb.meta["settings"],
        "embeddings": str(out / "embeddings")})
    index.save(out / "index")

    test_paths = [str(p) for p in dm.test_dataset.index.paths]
    train_set = set(str(p) for p in dm.train_dataset.index.paths)
    rng = np.random.default_rng(s.seed)
    queries = list(rng.choice(test_paths, size=min(6, len(test_paths)), replace=False))
    # Query against training videos only, as the protocol does: search deeper, keep train hits.
    feats = np.stack([index.feature_of(q) for q in queries])
    hits = [[h for h in row if h.path in train_set][:5]
            for row in index.search(feats, k=min(len(index), 30))]
    _plot_results(queries, hits, lambda p: Path(p).parent.name, out / "retrieval_examples.png")

    took = time.time() - t0
    _say(f"done in {took:.0f} s. Wrote:")
    for name, what in (("retrieval.txt", "R@k table"),
                       ("retrieval_examples.png", "queries and their top-5"),
                       ("training_curves.png", "NMI and R@1 over epochs"),
                       ("model.ckpt", "the trained model"),
                       ("index", "search index")):
        _say(f"  {out / name}  ({what})")
    _say(f"try: vidssl search {out / 'index'} {queries[0]} -k 5")
    return {"out_dir": str(out), "results": results, "history": history,
            "seconds": took, "checkpoint": str(ckpt), "index": str(out / "index")}
