"""Data pipeline: the vidssl dataset against raw decord decoding of the same frame indices.

Prints, each measured side by side in one run:

1. clips/s of ``VideoDataset`` + ``collate_videos`` through a DataLoader (decode, sample, collate;
   no augmentation) against a plain dataset that calls decord ``get_batch`` on the same frame
   indices, with the same workers, batch size and decode size; on the real sample videos and on
   synthetic 320x240 videos (MPEG-4 AVI without B-frames, and with B-frames, where vidssl takes
   the exact sequential path and raw decord returns wrong frames);
2. decord decoding with resize-on-decode against decoding native frames and resizing after;
3. kornia augmentation of a batch of 8 x 16 x 112 x 112 clips (one call) against a per-clip loop;
4. worker RSS at the start and the end of >= 1000 clips with 2 workers.

    .venv/bin/python benchmarks/data_pipeline.py            # full run (a few minutes)
    .venv/bin/python benchmarks/data_pipeline.py --quick    # smaller counts
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vidssl.data import VideoDataset, collate_videos
from vidssl.data.augment import build_augmentation
from vidssl.data.decoding import resized_size
from vidssl.data.index import VideoIndex, read_folder
from vidssl.data.sampling import random_clip
from vidssl.data.synthetic import render_video, write_video

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-videos"


class FixedClips(VideoDataset):
    """``VideoDataset`` whose clip indices are fixed per item, so both sides decode the same."""

    def __init__(self, index: VideoIndex, plan: list[tuple[int, np.ndarray]], **kw) -> None:
        super().__init__(index, num_views=1, **kw)
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, item: int) -> dict:
        """Decode planned clip ``item`` through the normal decode path."""
        i, idx = self.plan[item]
        return {"views": self._read(i, [idx]), "index": i, "label": int(self.index.labels[i])}


class RawDecord(Dataset):
    """Baseline: open a decord reader and ``get_batch`` the planned indices, nothing else."""

    def __init__(self, index: VideoIndex, plan: list[tuple[int, np.ndarray]], short_side: int):
        self.index, self.plan, self.short_side = index, plan, short_side

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, item: int) -> torch.Tensor:
        import decord

        i, idx = self.plan[item]
        w, h = resized_size(int(self.index.width[i]), int(self.index.height[i]), self.short_side)
        vr = decord.VideoReader(str(self.index.paths[i]), num_threads=1, width=w, height=h)
        return torch.from_numpy(vr.get_batch(idx.tolist()).asnumpy())


def raw_collate(clips: list[torch.Tensor]) -> list[torch.Tensor]:
    return clips  # no stacking: the baseline does the least work possible


def make_plan(index: VideoIndex, n: int, clip_len: int, stride: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vids = rng.integers(0, len(index), n)
    return [(int(i), random_clip(int(index.num_frames[i]), clip_len, stride, rng)) for i in vids]


def clips_per_s(ds: Dataset, collate, workers: int, batch: int) -> float:
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate)
    it = iter(loader)
    first = next(it)  # worker start-up excluded
    n = len(first if isinstance(first, list) else first["index"])
    t = time.perf_counter()
    count = 0
    for b in it:
        count += len(b) if isinstance(b, list) else len(b["index"])
    dt = time.perf_counter() - t
    del n
    return count / dt


def synthetic_folder(root: Path, n: int, frames: int, bframes: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    motions = ["MoveLeft", "MoveRight", "RotateClockwise", "ZoomIn"]
    for k in range(n):
        path = root / f"v{k:03d}.avi"
        if not path.exists():
            video = render_video(motions[k % 4], rng, num_frames=frames, width=320, height=240)
            write_video(path, video, codec="mpeg4", max_b_frames=bframes, gop_size=12)
    return root


def bench_throughput(name, index, args, rows):
    plan = make_plan(index, args.clips, args.clip_len, args.stride)
    kw = dict(short_side=args.short_side, backend="decord", on_error="raise")
    # Interleave the two sides (A B A B) so load changes from other processes hit both.
    ours, raw = [], []
    for _ in range(args.repeats):
        ours.append(
            clips_per_s(FixedClips(index, plan, **kw), collate_videos, args.workers, args.batch)
        )
        raw.append(
            clips_per_s(
                RawDecord(index, plan, args.short_side), raw_collate, args.workers, args.batch
            )
        )
    o, r = float(np.median(ours)), float(np.median(raw))
    exact = int(index.exact[[i for i, _ in plan]].sum())
    rows.append((name, len(index), f"{exact}/{len(plan)}", r, o, o / r))


def check_same_frames(index, args) -> str:
    plan = make_plan(index, 8, args.clip_len, args.stride, seed=1)
    ours = FixedClips(index, plan, short_side=args.short_side)
    raw = RawDecord(index, plan, args.short_side)
    same = sum(bool(torch.equal(ours[k]["views"][0], raw[k])) for k in range(len(plan)))
    return f"{same}/{len(plan)}"


def bench_resize(index, args) -> tuple[float, float]:
    import decord
    import torch.nn.functional as F

    plan = make_plan(index, args.resize_clips, args.clip_len, args.stride, seed=2)

    def on_decode():
        for i, idx in plan:
            w, h = resized_size(int(index.width[i]), int(index.height[i]), args.short_side)
            vr = decord.VideoReader(str(index.paths[i]), num_threads=1, width=w, height=h)
            vr.get_batch(idx.tolist()).asnumpy()

    def after():
        for i, idx in plan:
            w, h = resized_size(int(index.width[i]), int(index.height[i]), args.short_side)
            vr = decord.VideoReader(str(index.paths[i]), num_threads=1)
            x = torch.from_numpy(vr.get_batch(idx.tolist()).asnumpy()).permute(0, 3, 1, 2)
            F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True).to(torch.uint8)

    times = {}
    for fn in (on_decode, after, on_decode, after):
        t = time.perf_counter()
        fn()
        times.setdefault(fn.__name__, []).append(time.perf_counter() - t)
    return min(times["on_decode"]), min(times["after"])


def bench_augment(args) -> tuple[float, float]:
    torch.manual_seed(0)
    aug = build_augmentation("slic", crop_size=112)
    x = torch.randint(0, 256, (8, 16, 128, 171, 3), dtype=torch.uint8)
    aug(x[:1])  # warm-up

    def batched():  # one kornia call on the whole batch
        aug.cpu_chunk = 0
        aug(x)

    def default():  # vidssl's CPU default: one kornia call per clip inside forward
        aug.cpu_chunk = 1
        aug(x)

    def loop():  # the baseline: a Python loop over clips, one call each
        aug.cpu_chunk = 0
        for k in range(len(x)):
            aug(x[k : k + 1])

    times = {}
    for fn in (batched, default, loop) * args.repeats:
        t = time.perf_counter()
        fn()
        times.setdefault(fn.__name__, []).append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def plain_stack_collate(samples):
    """Baseline collate: ``collate_videos`` stacking into ordinary (not shared) memory."""
    from vidssl.data import dataset as vds

    shared = vds._stack
    vds._stack = torch.stack
    try:
        return collate_videos(samples)
    finally:
        vds._stack = shared


def bench_memory(index, args, collate=collate_videos) -> list[tuple[int, float, float]]:
    ds = VideoDataset(
        index, clip_len=args.clip_len, stride=args.stride, num_views=2, short_side=args.short_side
    )
    loader = DataLoader(
        ds,
        batch_size=args.batch,
        num_workers=2,
        collate_fn=collate,
        sampler=torch.utils.data.RandomSampler(ds, replacement=True, num_samples=args.mem_clips),
    )
    it = iter(loader)
    next(it)
    pids = [w.pid for w in it._workers]
    start = [rss_mib(p) for p in pids]
    for _ in it:
        end = [rss_mib(p) for p in pids]  # read before workers exit
    return [(p, s, e) for p, s, e in zip(pids, start, end)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts for a smoke run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip-len", type=int, default=16)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--short-side", type=int, default=128)
    ap.add_argument("--clips", type=int, default=400, help="clips per throughput measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-clips", type=int, default=1200)
    ap.add_argument("--resize-clips", type=int, default=40)
    ap.add_argument("--work-dir", default=None, help="where synthetic videos are written")
    ap.add_argument(
        "--sections", default="1234", help="which sections to run, e.g. 1 or 34 (default 1234)"
    )
    args = ap.parse_args()
    if args.quick:
        args.clips, args.repeats, args.mem_clips, args.resize_clips = 64, 1, 200, 8
    torch.set_num_threads(1)  # workers and main process share 2 cores: no oversubscription
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vidssl_bench_"))
    cache = work / "cache"
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"load average before: {os.getloadavg()}")
    print(
        f"clip {args.clip_len} frames, stride {args.stride}, short side {args.short_side}, "
        f"{args.workers} workers, batch {args.batch}, {args.clips} clips x {args.repeats}"
    )

    sets = {
        "synthetic 320x240 mpeg4 AVI": synthetic_folder(work / "syn", 24, 150, 0),
        "synthetic 320x240 mpeg4 AVI 2 B-frames": synthetic_folder(work / "synb", 24, 150, 2),
    }
    if REAL.is_dir():
        sets["real samples (tree, vtest, Megamind)"] = REAL
    indexes = {}
    for name, root in sets.items():
        idx = read_folder(root).probe(cache_dir=cache)
        indexes[name] = idx.subset(np.array(["bugy" not in p for p in idx.paths]))

    syn = indexes["synthetic 320x240 mpeg4 AVI"]
    if "1" in args.sections:
        section_throughput(indexes, args)
    if "2" in args.sections:
        section_resize(indexes, syn, args)
    if "3" in args.sections:
        section_augment(args)
    if "4" in args.sections:
        section_memory(syn, args)
    print(f"\nload average after: {os.getloadavg()}")


def section_throughput(indexes, args):
    rows = []
    for name, idx in indexes.items():
        bench_throughput(name, idx, args, rows)
    print("\n## 1. Throughput: decode + sample + collate, clips/s (median of repeats)")
    print("| set | videos | exact-path clips | raw decord | vidssl | ratio | same frames |")
    print("|---|---|---|---|---|---|---|")
    for (name, n, ex, r, o, ratio), idx in zip(rows, indexes.values()):
        print(
            f"| {name} | {n} | {ex} | {r:.1f} | {o:.1f} | {ratio:.2f}x | "
            f"{check_same_frames(idx, args)} |"
        )


def section_resize(indexes, syn, args):
    on_dec, after = bench_resize(syn, args)
    print(
        f"\n## 2. Resize on decode vs decode native + resize after ({args.resize_clips} clips, "
        "1 process, synthetic 320x240)"
    )
    print(
        f"resize on decode: {1e3 * on_dec / args.resize_clips:.1f} ms/clip; native + "
        f"torch resize: {1e3 * after / args.resize_clips:.1f} ms/clip; "
        f"speed-up {after / on_dec:.2f}x"
    )
    if REAL.is_dir():
        real = indexes["real samples (tree, vtest, Megamind)"]
        fast = real.subset(~real.exact)
        on_dec, after = bench_resize(fast, args)
        print(
            f"real samples (decord path): resize on decode {1e3 * on_dec / args.resize_clips:.1f}"
            f" ms/clip; native + resize {1e3 * after / args.resize_clips:.1f} ms/clip; "
            f"speed-up {after / on_dec:.2f}x"
        )


def section_augment(args):
    t = bench_augment(args)
    print("\n## 3. kornia augmentation (SLIC preset) of 8 x 16 x 128x171 -> 112x112 on CPU")
    print(f"torch threads: {torch.get_num_threads()}; median of {args.repeats}")
    print(f"per-clip Python loop (baseline): {1e3 * t['loop']:.0f} ms")
    print(
        f"one kornia call on the batch: {1e3 * t['batched']:.0f} ms "
        f"({t['loop'] / t['batched']:.2f}x the loop's speed)"
    )
    print(
        f"vidssl default on CPU (cpu_chunk=1): {1e3 * t['default']:.0f} ms "
        f"({t['loop'] / t['default']:.2f}x)"
    )


def section_memory(syn, args):
    print(f"\n## 4. Worker RSS over {args.mem_clips} clips (2 views each), 2 workers")
    for name, collate in (
        ("vidssl (collate into shared memory)", collate_videos),
        ("baseline (same collate, ordinary torch.stack)", plain_stack_collate),
    ):
        mem = bench_memory(syn, args, collate)
        print(
            name
            + ": "
            + "; ".join(
                f"worker {k}: start {s:.0f} MiB, end {e:.0f} MiB ({e - s:+.0f} MiB)"
                for k, (_, s, e) in enumerate(mem)
            )
        )


if __name__ == "__main__":
    main()
