"""``vidssl demo``: the whole journey on a synthetic collection, on the CPU in a few minutes.

Generates videos whose classes differ only by motion and each of which has its own look,
computes their optical flow, pretrains a narrow backbone with CrossModalContrast (an RGB and a
flow stream, contrasted within the flow stream and across the two; or SLIC's cluster-guided
method with its motion view, or GOCA) beside RGB-only SimCLR from the same starting weights,
compares their retrieval on RGB and on motion features with those starting weights, draws what
the motion features retrieve and how R@1 (and NMI) evolved, and builds a search index.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults finish in under 5 minutes on 2 CPU cores.

    The settings are those of ``benchmarks/retrieval_synthetic.py`` (docs/benchmarks.md,
    "Motion views"): AdamW at ``lr`` with a cosine schedule, batch 32, 32 px crops, no flip and
    no colour changes, re-clustering every 5 epochs from the first.

    Args:
        out_dir: where results go (checkpoint, table, pictures, index).
        cache_dir: where the synthetic collection and its optical flow are written (reused).
        method: ``"CrossModalContrast"`` (the default: RGB and flow streams, NT-Xent within
            the flow stream and across the two), ``"ClusterTriplet"`` (SLIC with its motion
            view: stored flow replaces a share ``motion_prob`` of the positives, pseudo-labels
            cluster the motion features), ``"SimCLR"`` (RGB only) or ``"GOCA"`` (RGB and flow,
            online clustering).
        baseline: also train RGB-only SimCLR for the same epochs from the same starting
            weights (never twice: not with ``method="SimCLR"``).
        epochs: pretraining epochs of each trained method.
        videos_per_class: videos of each of the 6 motion classes.
        width_mult: backbone width (R3D-18 channels x ``width_mult``).
        clip_len: frames per clip.
        crop_size: clip side in pixels (the videos are 40 x 40); also the flow's decode size.
        batch_size: training batch size.
        lr: AdamW learning rate (cosine schedule). The papers' SGD settings are tuned for
            hundreds of epochs: SimCLR with SGD at lr 0.1 was still at the chance loss after 75
            steps on this collection, AdamW at 1e-3 learned within 200.
        motion_prob: ClusterTriplet's share of positives (and, drawn apart, of re-augmented
            anchors) replaced by their flow: SLIC's official 0.25 (``PROB_POS_CHANNEL_REPLACE``
            of its flow config); 0.5 did no better in 20-epoch runs (docs/benchmarks.md).
        num_clips: clips averaged per video in the retrieval evaluation, in the table and in
            the curves (queries and gallery alike, so the curves start where the table's
            starting-weights rows are).
        num_workers: DataLoader workers.
        recluster_every: epochs between re-clusterings (cluster-guided method).
        cluster_start_epoch: first re-clustering. The motion view's features cluster by motion
            even at the starting weights (the flow carries the direction), so clustering starts
            at once.
        monitor_every: epochs between the R@1 measurements of the training curves.
        seed: seed of the data and the training.
    """

    out_dir: str = "vidssl-demo"
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "vidssl")
    method: str = "CrossModalContrast"
    baseline: bool = True
    epochs: int = 20
    videos_per_class: int = 40
    width_mult: float = 0.125
    clip_len: int = 8
    crop_size: int = 32
    batch_size: int = 32
    lr: float = 1e-3
    motion_prob: float = 0.25
    num_clips: int = 5
    num_workers: int = 1
    recluster_every: int = 5
    cluster_start_epoch: int = 0
    monitor_every: int = 5
    seed: int = 0


def _say(msg: str) -> None:
    print(f"[vidssl demo] {msg}", file=sys.stderr, flush=True)


def _dataset(s: DemoSettings) -> Path:
    """Write (once) the synthetic motion collection in the UCF101 layout; return its root."""
    from vidssl.data.synthetic import MOTIONS, write_synthetic_dataset

    name = f"synthetic-motion-v2-per_video-{s.videos_per_class}x{len(MOTIONS)}-seed{s.seed}"
    root = Path(s.cache_dir) / name
    done = root / ".complete"
    if not done.exists():
        _say(f"generating {s.videos_per_class * len(MOTIONS)} synthetic videos into {root}")
        # A look of its own per video: appearance tells videos apart, only motion tells the
        # classes apart, so what a method learns about motion shows in retrieval.
        write_synthetic_dataset(root, num_classes=len(MOTIONS),
                                videos_per_class=s.videos_per_class, num_frames=32, width=40,
                                height=40, seed=s.seed, appearance="per_video")
        done.write_text("ok\n")
    else:
        _say(f"using the synthetic videos in {root}")
    return root


def _flow(s: DemoSettings, root: Path) -> Tuple[Path, float]:
    """Compute (once; it resumes) the collection's DIS flow; return its folder and the seconds."""
    from vidssl.data.flow import flow_dataset

    flow_dir = root / f"flow_dis_{s.crop_size}"
    t0 = time.time()
    flow_dataset(root / "UCF-101", flow_dir, method="dis", short_side=s.crop_size,
                 progress=False)
    took = time.time() - t0
    _say(f"optical flow (DIS) of the collection in {flow_dir}: {took:.0f} s (kept for later runs)")
    return flow_dir, took


def _history(epochs: int, monitor: Any, pseudo_labels: Any,
             motion_monitor: Any = None) -> List[Dict[str, float]]:
    """One row per epoch trained: its R@1 and the NMI of its pseudo-labels, where measured.

    R@1 is ``RetrievalMonitor.history``'s, measured at the end of the epoch on RGB features
    (``"R@1"``) and, with ``motion_monitor``, on motion features (``"R@1 motion"``); NMI is
    ``PseudoLabels.history``'s, of the labels made at the start of the epoch.
    """
    def r1(m: Any) -> Dict[int, float]:
        return {} if m is None else {
            h["epoch"]: float(h["recall"][1]) for h in m.history if 1 in h["recall"]}

    series = {"R@1": r1(monitor), "R@1 motion": r1(motion_monitor)}
    series["NMI"] = {} if pseudo_labels is None else {
        h["epoch"]: float(h["nmi"]) for h in pseudo_labels.history if "nmi" in h}
    rows: List[Dict[str, float]] = []
    for epoch in range(epochs):
        row: Dict[str, float] = {"epoch": epoch}
        for key, values in series.items():
            if epoch in values:
                row[key] = values[epoch]
        rows.append(row)
    return rows


#: Line styles of the curves: R@1 on RGB and on motion features, pseudo-label NMI.
_CURVES = (("R@1", "o-", 1, "R@1 (RGB)"), ("R@1 motion", "^-", 1, "R@1 (motion)"),
           ("NMI", "s--", 0, "pseudo-label NMI"))


def _plot_history(histories: Dict[str, List[Dict[str, float]]], path: Path,
                  starts: Dict[str, float]) -> None:
    """Draw each run's R@1 (RGB, motion) and NMI over epochs; the starting weights as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for run, rows in histories.items():
        colour = next(colours)
        # x = epochs trained when measured: R@1 after its epoch, NMI before its epoch's training.
        for key, style, shift, what in _CURVES:
            pts = [(r["epoch"] + shift, r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=f"{run}: {what}", markersize=4)
    # The starting weights measured as the curves are (RetrievalMonitor with the table's clips
    # per video), so the curves and the lines compare like with like.
    for (what, r1), style in zip(starts.items(), (":", "-.")):
        ax.axhline(r1, color="grey", linestyle=style, label=f"starting weights: R@1 ({what})")
    ax.set_xlabel("epochs trained")
    ax.set_ylim(0, 1.02)
    ax.set_title("R@1 during training (RetrievalMonitor) and pseudo-label NMI", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keep the outside legend and the title
    plt.close(fig)


def _middle_frame(path: str) -> np.ndarray:
    from vidssl.data.decoding import PyAVDecoder
    from vidssl.data.index import probe_video

    n = max(1, probe_video(path).num_frames)
    return PyAVDecoder().read(path, [n // 2])[0]


def _plot_results(queries: List[str], hits: List[List[Any]], class_of, path: Path,
                  features: str = "rgb") -> None:
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
    fig.suptitle(f"query (left) and its nearest training videos by {features} features "
                 "(green: same motion class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: Methods ``vidssl demo --method`` trains.
DEMO_METHODS = ("CrossModalContrast", "ClusterTriplet", "SimCLR", "GOCA")


def _check_method(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of :data:`DEMO_METHODS`."""
    if name not in DEMO_METHODS:
        raise ValueError(f"unknown demo method {name!r}; choose one of "
                         f"{', '.join(DEMO_METHODS)}")


def _build_method(name: str, s: DemoSettings):
    """Return the method ``name`` and whether it is cluster-guided (needs PseudoLabels)."""
    from vidssl import methods

    _check_method(name)
    common = dict(backbone="r3d_18", backbone_kwargs={"width_mult": s.width_mult})
    optim = dict(optimizer="adamw", lr=s.lr, weight_decay=1e-4, lr_schedule="cosine")
    if name == "ClusterTriplet":
        # SLIC's multi-view: flow (x copied to 3 channels, through the RGB stem) replaces a
        # share of the positives; a smaller head than SLIC's 2048 hidden units for the CPU.
        return methods.ClusterTriplet(motion_prob=s.motion_prob, motion_input="x3",
                                      motion_channels=2, head=methods.Head(hidden_dim=128),
                                      optim=methods.Optimization(**optim), **common), True
    if name == "CrossModalContrast":
        # RGB and flow streams, contrasted within the flow stream and across the two (its
        # defaults); a smaller head than its 2048 hidden units for the CPU.
        return methods.CrossModalContrast(motion_channels=2, head=methods.Head(hidden_dim=128),
                                          optim=methods.Optimization(**optim), **common), False
    if name == "GOCA":
        # RGB and the stored flow (the cue that lifts GOCA's motion stream in
        # docs/benchmarks.md, well above frame differences), 30 prototypes for a few hundred
        # clips (the paper's 1000 are for Kinetics), short clips cut from the long ones, the
        # cross-view prior from the middle of training.
        return methods.GOCA(motion_channels=2, num_prototypes=30, prototype_steps=2000,
                            prior_start_epoch=max(1, s.epochs // 2), num_short_clips=2,
                            short_clips_from="long", head=methods.Head(hidden_dim=128),
                            optim=methods.Optimization(warmup_epochs=0.0, **optim),
                            **common), False
    return methods.SimCLR(optim=methods.Optimization(**optim), **common), False


def _reads_motion(model: Any) -> bool:
    return bool(tuple(getattr(model, "motion_views", ()) or ()))


def _label(model: Any, s: DemoSettings) -> str:
    """Return the row name of a trained method: what it saw and for how long."""
    seen = "RGB + flow" if _reads_motion(model) else "RGB only"
    return f"{type(model).__name__} ({seen}, {s.epochs} epochs)"


def _datamodule(s: DemoSettings, root: Path, model: Any, flow_dir: Optional[Path]):
    """Return ``model``'s data module: the benchmark's settings, plus flow if it reads motion.

    The settings are those of benchmarks/retrieval_synthetic.py.
    """
    from vidssl.data import VideoAugmentation, VideoDataModule

    motion: Dict[str, Any] = {}
    if _reads_motion(model):
        motion = {"motion": "flow", "flow_dir": str(flow_dir),
                  "motion_views": list(model.motion_views)}
    # The classes differ by direction of motion: a horizontal flip turns MoveLeft into
    # MoveRight, so no flip; no colour changes (the look is not what is learned); crops keep
    # 40-100 % of the frame (SimCLR's 8 % leaves a small frame without the blob).
    augmentation = VideoAugmentation(s.crop_size, scale=(0.4, 1.0), flip_p=0.0, jitter_p=0.0,
                                     grayscale_p=0.0, blur_p=0.0)
    return VideoDataModule(
        train=str(root), format="ucf101", clip_len=s.clip_len, stride=2,
        short_side=s.crop_size, crop_size=s.crop_size, train_augmentation=augmentation,
        views=list(model.views), **motion,
        batch_size=s.batch_size, eval_num_clips=s.num_clips, num_workers=s.num_workers,
        persistent_workers=s.num_workers > 0, cache_dir=str(Path(s.cache_dir) / "manifests"),
    )


@dataclass
class _Run:
    """One trained method: the model, its data module, trainer and what its callbacks recorded."""

    name: str
    model: Any
    dm: Any
    trainer: Any
    history: List[Dict[str, float]]
    monitor: Any
    motion_monitor: Any


def _train(name: str, s: DemoSettings, root: Path, flow_dir: Optional[Path],
           keep_start: bool = False) -> Tuple[_Run, Any]:
    """Train ``name`` from the seed's starting weights; return the run and its start.

    The start is a copy of the method before training with ``keep_start``, else ``None``.
    """
    import pytorch_lightning as pl

    from vidssl.callbacks import PseudoLabels, RetrievalMonitor

    # The same seed before building: every method starts from the same backbone weights.
    pl.seed_everything(s.seed, verbose=False)
    model, clustered = _build_method(name, s)
    start = copy.deepcopy(model).eval() if keep_start else None
    dm = _datamodule(s, root, model, flow_dir)
    # The curves measure what the table does (num_clips clips of every video): a motion
    # feature of one centre clip is far noisier than the mean over a few.
    monitor = RetrievalMonitor(every_n_epochs=s.monitor_every, ks=(1, 5), at_start=keep_start,
                               gallery_clips=s.num_clips)
    callbacks: List[Any] = [monitor]
    motion_monitor = None
    if _reads_motion(model):
        motion_monitor = RetrievalMonitor(every_n_epochs=s.monitor_every, ks=(1, 5),
                                          at_start=keep_start, features="motion",
                                          gallery_clips=s.num_clips)
        callbacks.append(motion_monitor)
    pseudo_labels = None
    if clustered:
        # Clusters of the motion view's features: positives are videos that move alike.
        pseudo_labels = PseudoLabels(
            modality="motion" if _reads_motion(model) else "rgb",
            every_n_epochs=s.recluster_every, start_epoch=s.cluster_start_epoch, p_same=0.2,
            seed=s.seed)
        callbacks.append(pseudo_labels)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=s.epochs, logger=False,
        enable_checkpointing=False, callbacks=callbacks, num_sanity_val_steps=0,
        limit_val_batches=0, enable_model_summary=False, log_every_n_steps=1,
        enable_progress_bar=False,
    )
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    _say(f"  {_label(model, s)}: {time.time() - t0:.0f} s")
    history = _history(trainer.current_epoch, monitor, pseudo_labels, motion_monitor)
    return _Run(_label(model, s), model, dm, trainer, history, monitor, motion_monitor), start


def run_demo(s: Optional[DemoSettings] = None) -> Dict[str, Any]:
    """Run the demo with settings ``s``; return the paths it wrote and the R@k results.

    ``results`` is a list of ``(row name, RetrievalResult)``: the first method on RGB (and, when
    it reads motion, on motion) features, the baseline on RGB, the starting weights on RGB
    (and motion); ``history`` maps each run's name to its rows (:func:`_history`).
    """
    import torch

    from vidssl.evaluation.embed import (
        ClipSettings,
        MotionClipReader,
        embed_videos,
        find_videos,
        load_encoder,
    )
    from vidssl.evaluation.retrieval import evaluate_retrieval, format_recall_table
    from vidssl.evaluation.search import SearchIndex

    s = s or DemoSettings()
    _check_method(s.method)  # an unknown method fails before any work
    t0 = time.time()
    out = Path(s.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = _dataset(s)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    names = [s.method] + (["SimCLR"] if s.baseline and s.method != "SimCLR" else [])
    flow_dir, flow_seconds = None, 0.0
    if s.method != "SimCLR":
        flow_dir, flow_seconds = _flow(s, root)

    _say(f"pretraining {' and '.join(names)} (R3D-18 x {s.width_mult}) for {s.epochs} epochs "
         "each on the CPU, from the same starting weights")
    main, start = _train(names[0], s, root, flow_dir, keep_start=True)
    runs = [main] + [_train(n, s, root, flow_dir)[0] for n in names[1:]]
    ckpt = out / "model.ckpt"
    main.trainer.save_checkpoint(ckpt)

    _say(f"retrieval: test videos query training videos, {s.num_clips} clips per video")
    motion = _reads_motion(main.model)
    trained, info = load_encoder(ckpt)
    results: List[Tuple[str, Any]] = []

    def score(name: str, model: Any, dm: Any, features: str = "rgb") -> None:
        results.append((name, evaluate_retrieval(model, dm, num_clips=s.num_clips,
                                                 features=features)))

    score(main.name, trained, main.dm)
    if motion:
        score(main.name, trained, main.dm, "motion")
    for run in runs[1:]:
        score(run.name, run.model, run.dm)
    # The very weights training started from (every run's): what was learned, and nothing else.
    score("starting weights", start, main.dm)
    if motion:
        score("starting weights", start, main.dm, "motion")
    table = format_recall_table(results)
    print(table)
    (out / "retrieval.txt").write_text(table + "\n")

    histories = {run.name: run.history for run in runs}
    starts: Dict[str, float] = {}
    for what, mon in (("RGB", main.monitor), ("motion", main.motion_monitor)):
        if mon is not None and mon.initial:
            starts[what] = float(mon.initial[1])
    (out / "history.json").write_text(json.dumps(
        {"starting weights": starts, "runs": histories}, indent=1))
    _plot_history(histories, out / "training_curves.png", starts)

    # The index holds the features that retrieve by motion: the motion view's, when the
    # method has one (at the demo's budget RGB features stay near chance on this collection,
    # CrossModalContrast's too: its RGB stream needs more steps, docs/benchmarks.md).
    features = "motion" if motion else "rgb"
    _say(f"embedding every video ({features} features) and building the search index")
    settings = ClipSettings.for_encoder(info, num_clips=s.num_clips)
    emb = embed_videos(trained, find_videos(root / "UCF-101"), out / "embeddings", settings,
                       info, num_workers=s.num_workers, overwrite=True, progress=False,
                       features=features,
                       motion_reader=MotionClipReader("flow", flow_dir) if motion else None)
    meta = {"encoder": info, "settings": emb.meta["settings"],
            "embeddings": str(out / "embeddings")}
    if emb.meta.get("features"):
        meta["features"] = emb.meta["features"]
    index = SearchIndex.build(emb.features, emb.paths, meta=meta)
    index.save(out / "index")

    test_paths = [str(p) for p in main.dm.test_dataset.index.paths]
    train_set = set(str(p) for p in main.dm.train_dataset.index.paths)
    rng = np.random.default_rng(s.seed)
    queries = list(rng.choice(test_paths, size=min(6, len(test_paths)), replace=False))
    # Query against training videos only, as the protocol does: search deeper, keep train hits.
    feats = np.stack([index.feature_of(q) for q in queries])
    hits = [[h for h in row if h.path in train_set][:5]
            for row in index.search(feats, k=min(len(index), 30))]
    _plot_results(queries, hits, lambda p: Path(p).parent.name, out / "retrieval_examples.png",
                  features)

    took = time.time() - t0
    _say(f"done in {took:.0f} s (optical flow {flow_seconds:.0f} s of it). Wrote:")
    for name, what in (("retrieval.txt", "R@k table"),
                       ("retrieval_examples.png", f"queries and their top-5 ({features})"),
                       ("training_curves.png", "R@1 and NMI over epochs"),
                       ("history.json", "the curves' numbers"),
                       ("model.ckpt", f"the trained {type(main.model).__name__}"),
                       ("index", f"search index ({features} features)")):
        _say(f"  {out / name}  ({what})")
    _say(f"try: vidssl search {out / 'index'} {queries[0]} -k 5")
    return {"out_dir": str(out), "results": results, "history": histories, "starts": starts,
            "seconds": took, "flow_seconds": flow_seconds, "checkpoint": str(ckpt),
            "index": str(out / "index"), "features": features}
