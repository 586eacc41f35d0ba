"""Motion sources: `vidssl flow` against a plain OpenCV loop, and per-clip reading costs.

Prints, each measured side by side in one run:

1. frames/s of ``flow_dataset`` (decode, grey + resize on decode, flow, quantise, atomic write,
   manifest) for TV-L1 and DIS against a plain OpenCV loop computing the same flow on the same
   frames already decoded into memory (the limit: flow computation alone), alternated video by
   video; then ``flow_dataset`` with ``--workers`` processes over all videos;
2. per-clip cost of reading stored flow (``read_flow``, memory-mapped) and of extracting
   compressed-stream motion vectors (``read_motion_vectors``, float16 fields and uint8 codes)
   against decoding the RGB frames of the same clips at the same size (decord, and PyAV
   sequentially, the exact path);
3. time per clip of training batches of ``VideoDataModule`` with each motion view (``flow``,
   ``mv``, ``diff``) against RGB only, the same module and settings otherwise: the loader
   (decode, motion read, collate) and the augmentation of one batch (on this CPU), interleaved.

    .venv/bin/python benchmarks/flow.py            # 4 synthetic 320x240 videos of 48 frames
    .venv/bin/python benchmarks/flow.py --quick    # smaller counts
    .venv/bin/python benchmarks/flow.py --only views   # section 3 alone (DIS flow for it)
    .venv/bin/python benchmarks/flow.py --only views --cpu-time   # the work, on a busy machine
    .venv/bin/python benchmarks/flow.py --only clips   # section 2 alone
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from vidssl.data.decoding import PyAVDecoder, build_decoder, resized_size
from vidssl.data.flow import flow_dataset, flow_estimator, read_flow
from vidssl.data.motion_vectors import read_motion_vectors
from vidssl.data.sampling import random_clip
from vidssl.data.synthetic import render_video, write_video


def make_videos(root: Path, n: int, frames: int) -> list[Path]:
    rng = np.random.default_rng(0)
    motions = ["MoveLeft", "MoveRight", "RotateClockwise", "ZoomIn"]
    paths = []
    for k in range(n):
        path = root / f"v{k:03d}.avi"
        video = render_video(motions[k % 4], rng, num_frames=frames, width=320, height=240)
        write_video(path, video, codec="mpeg4", max_b_frames=0, gop_size=12)
        paths.append(path)
    return paths


def grey_frames(path: Path, short_side: int) -> list[np.ndarray]:
    frames = PyAVDecoder().read(str(path), np.arange(_count(path)))
    h, w = frames.shape[1:3]
    size = resized_size(w, h, short_side)
    import cv2

    return [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA)
            for f in frames]


def _count(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def bench_compute(paths, src: Path, method: str, short_side: int, workers: int):
    """Frames/s of the plain loop and of flow_dataset, alternated video by video (A B A B)."""
    counts = [_count(p) for p in paths]
    calc = flow_estimator(method)
    keep = Path(tempfile.mkdtemp(prefix="flowbench-"))
    plain_s = ours_s = 0.0
    for path in paths:
        greys = grey_frames(path, short_side)
        t = time.perf_counter()
        for a, b in zip(greys[:-1], greys[1:]):
            calc(a, b)
        plain_s += time.perf_counter() - t
        lst = keep.parent / f"{keep.name}.txt"
        lst.write_text(f"{path.name}\n")
        t = time.perf_counter()
        res = flow_dataset(lst, keep, method=method, short_side=short_side, root=src,
                           workers=1, progress=False)
        ours_s += time.perf_counter() - t
        assert not any(r.error for r in res), res
        lst.unlink()
    total = sum(counts)
    dst = Path(tempfile.mkdtemp(prefix="flowbench-"))
    t = time.perf_counter()
    flow_dataset(src, dst, method=method, short_side=short_side, workers=workers, progress=False)
    parallel = total / (time.perf_counter() - t)
    shutil.rmtree(dst)
    return total / plain_s, {1: total / ours_s, workers: parallel}, keep


def bench_clips(paths, src: Path, flow_dir: Path, args):
    rng = np.random.default_rng(1)
    counts = [_count(p) for p in paths]
    plan = []
    for _ in range(args.clips):
        i = int(rng.integers(len(paths)))
        plan.append((i, random_clip(counts[i], args.clip_len, args.stride, rng)))
    import av

    with av.open(str(paths[0])) as c:
        s = c.streams.video[0]
        size = resized_size(s.codec_context.width, s.codec_context.height, args.short_side)
    decord = build_decoder("decord")
    pyav = PyAVDecoder()

    def rgb_decord():
        for i, idx in plan:
            decord.read(str(paths[i]), idx, size)

    def rgb_pyav():
        for i, idx in plan:
            pyav.read(str(paths[i]), idx, size)

    def flow():
        for i, idx in plan:
            read_flow(flow_dir, paths[i].relative_to(src), idx, size=size)

    def mvs():
        for i, idx in plan:
            read_motion_vectors(str(paths[i]), idx, size=size)

    def mvs_codes():  # what a training batch carries: uint8 codes
        for i, idx in plan:
            read_motion_vectors(str(paths[i]), idx, size=size, quantized=True)

    fns = [rgb_decord, rgb_pyav, flow, mvs]
    if "quantized" in read_motion_vectors.__code__.co_varnames:  # older vidssl: float16 only
        fns.append(mvs_codes)
    times: dict[str, list[float]] = {}
    for fn in fns * args.repeats:  # interleaved against load
        t = time.perf_counter()
        fn()
        times.setdefault(fn.__name__, []).append((time.perf_counter() - t) / len(plan))
    return times


def bench_views(src: Path, flow_dir: Path, args) -> dict[str, dict[str, float]]:
    """Seconds per clip of VideoDataModule training batches per motion view: loader, augment."""
    import torch

    from vidssl.data import VideoDataModule

    modules = {}
    for motion in ("none", "flow", "mv", "diff"):
        dm = VideoDataModule(
            train=str(src), format="folder", clip_len=args.clip_len, stride=args.stride,
            short_side=args.short_side, crop_size=112, batch_size=args.batch_size,
            num_workers=args.loader_workers, motion=motion, flow_dir=str(flow_dir),
            pin_memory=False, cache_dir=str(src / ".cache"),
        )
        dm.setup()
        # The same videos in every module: args.batches batches drawn at random.
        rng = np.random.default_rng(2)
        n = len(dm.train_dataset)
        dm.set_train_batch_sampler(
            [rng.integers(n, size=args.batch_size).tolist() for _ in range(args.batches)])
        modules[motion] = dm
    # One intra-op thread, as in a DataLoader worker: with two on a busy 2-core machine, OpenMP's
    # waiting made torch.stack of a batch 25-100x slower and the collate dominated the loader.
    torch.set_num_threads(1)
    # CPU time of this process (--cpu-time) counts the work alone, not the waits for a busy core.
    clock = time.process_time if args.cpu_time else time.perf_counter
    loader_s: dict[str, list[float]] = {}
    augment_s: dict[str, list[float]] = {}
    clips = args.batches * args.batch_size * 2  # two views a sample
    for r in range(args.repeats + 1):  # the first pass warms up (imports, kornia, caches)
        order = list(modules.items())
        for motion, dm in order[r % 4:] + order[: r % 4]:  # interleaved, rotated: load drifts
            torch.manual_seed(0)
            t = clock()
            batches = list(dm.train_dataloader())
            loaded = clock()
            assert len(batches) == args.batches
            if not args.loader_only:
                dm.augment(batches[0], train=True)  # one batch: the CPU is not the device
            if r:
                loader_s.setdefault(motion, []).append((loaded - t) / clips)
                augment_s.setdefault(motion, []).append((clock() - loaded) / (args.batch_size * 2))
    return {"loader": loader_s, "augment": augment_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--short-side", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--clip-len", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="section 3 batch size")
    p.add_argument("--batches", type=int, default=5, help="section 3 batches per measurement")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="section 3 DataLoader workers (0: all in this process)")
    p.add_argument("--only", choices=["views", "clips"],
                   help="run section 3 (views) or 2 (clips) only, with DIS flow")
    p.add_argument("--cpu-time", action="store_true",
                   help="section 3: CPU time of this process instead of wall time "
                        "(with --loader-workers 0: the work, whatever the load)")
    p.add_argument("--loader-only", action="store_true",
                   help="section 3: time the loader only (no augmentation)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.videos, args.frames, args.clips, args.repeats, args.batches = 2, 24, 10, 1, 2
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.videos} synthetic 320x240 MPEG-4 videos of "
          f"{args.frames} frames; short side {args.short_side}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        paths = make_videos(src, args.videos, args.frames)
        if args.only:
            flow_dir = Path(tmp) / "flow"
            flow_dataset(src, flow_dir, method="dis", short_side=args.short_side, progress=False)
            if args.only == "views":
                _print_views(bench_views(src, flow_dir, args), args)
            else:
                _print_clips(bench_clips(paths, src, flow_dir, args), args)
            print(f"load average at the end: {os.getloadavg()[0]:.1f}")
            return
        print("\n1. flow computation, frames/s (the plain loop has the frames decoded already)")
        print(f"{'method':<8} {'plain cv2':>10} {'vidssl w=1':>11} {'ratio':>6} "
              f"{'vidssl w=' + str(args.workers):>11} {'ratio':>6}")
        flow_dir = None
        for method in ("tvl1", "dis"):
            plain, ours, keep = bench_compute(paths, src, method, args.short_side, args.workers)
            w = args.workers
            print(f"{method:<8} {plain:>10.1f} {ours[1]:>11.1f} {ours[1] / plain:>6.2f} "
                  f"{ours[w]:>11.1f} {ours[w] / plain:>6.2f}")
            if flow_dir is None:
                flow_dir = keep
            else:
                shutil.rmtree(keep)
        _print_clips(bench_clips(paths, src, flow_dir, args), args)
        _print_views(bench_views(src, flow_dir, args), args)
        shutil.rmtree(flow_dir)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def _ratios(times: list[float], base: list[float]) -> str:
    """Median of the per-pass ratios (each pass against the baseline of the same pass), range."""
    r = np.array(times) / np.array(base)
    return f"{np.median(r):>6.2f} [{r.min():.2f}-{r.max():.2f}]"


def _print_clips(times: dict[str, list[float]], args) -> None:
    print(f"\n2. per clip of {args.clip_len} frames (stride {args.stride}), ms (median of "
          f"{args.repeats} interleaved passes); ratio to RGB decode with decord: median of the "
          "passes [range]")
    for name, t in times.items():
        print(f"{name:<12} {1000 * np.median(t):>8.2f} ms {_ratios(t, times['rgb_decord'])}")


def _print_views(times: dict[str, dict[str, list[float]]], args) -> None:
    print(f"\n3. VideoDataModule training batches ({args.batch_size} x 2 views of "
          f"{args.clip_len} frames, {args.loader_workers} loader workers): ms per clip of the "
          "loader (decode, motion, collate) and of the augmentation on this CPU (crop 112); "
          "ratio to RGB only: median of the per-pass ratios [range]")
    print(f"{'motion':<8} {'loader':>8} {'ratio [range]':>18} {'augment':>8} {'ratio [range]':>18}")
    loader, augment = times["loader"], times["augment"]
    for motion in loader:
        aug = (f"{1000 * np.median(augment[motion]):>8.2f} "
               f"{_ratios(augment[motion], augment['none']):>18}") if not args.loader_only else "-"
        print(f"{motion:<8} {1000 * np.median(loader[motion]):>8.2f} "
              f"{_ratios(loader[motion], loader['none']):>18} {aug}")


if __name__ == "__main__":
    main()
