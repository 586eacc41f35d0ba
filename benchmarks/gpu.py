"""GPU pass: GPU decode, kornia on the device, a bf16 training step, exact FINCH, DDP paths.

One command writes ``gpu.json``, ``gpu.md`` (the table) and ``gpu.log`` into ``--out``:

    bash tools/gpu_check.sh OUT                        # = make gpu-check; installs carried wheels
    python benchmarks/gpu.py --out OUT                 # on a CUDA machine: < 8 min on an H200
    python benchmarks/gpu.py --tiny --out OUT          # tiny sizes on the CPU (the tests run it)

Sections (each in its own process with a time cap; an error, crash or overrun is recorded with
what it measured so far, and the next section runs):

- env: versions, GPU, NVDEC library, measured bf16 / fp32 matrix-product rates.
- decode: frame barcodes on B-frame files (MPEG-4 Part 2 AVI/MP4, H.264 MP4/AVI) through every
  backend (the CPU tests' check), and clips/s of NVDEC (torchcodec) against the CPU backend with
  ``--workers`` DataLoader workers on the same clips.
- kornia: the SimCLR preset on B x T x H x W clips on the device, ms per view batch, one draw
  per clip checked.
- train: SimCLR on R3D-18, bf16 autocast, channels-last-3d: FLOPs per step (FlopCounterMode),
  clips/s, TFLOP/s and MFU, eager and torch.compile; steps/s of the real data pipelines (CPU
  workers; NVDEC in the main process) against a batch held on the device.
- finch: exact FINCH of N x 128 and N x 512 features with ``device="cuda"``, first-neighbour
  recall against float64 brute force on a sample (also under global TF32), and the PseudoLabels
  pass (embedding + clustering) of a bank of clips through a real Trainer.
- ddp: MoCo (shuffle-BN) and SimCLR under Lightning DDP on a 1-process NCCL group, then their
  multi-process code paths (all_gather, broadcast, gather_with_grad) forced on that group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "decode", "kornia", "train", "finch", "ddp")
#: Dense bf16 tensor-core peak (datasheet, SXM parts) by GPU name, for MFU.
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
#: Section time caps on a full run (seconds), and the least each needs to be worth starting.
CAPS = {"env": 40, "decode": 110, "kornia": 30, "train": 170, "finch": 120, "ddp": 60}
MINIMA = {"env": 10, "decode": 30, "kornia": 10, "train": 40, "finch": 30, "ddp": 15}
FAULT_ENV = "VIDSSL_GPU_BENCH_FAULT"  # tests only: "section=hang|raise|crash,..."


@dataclass
class Sizes:
    """Problem sizes of one run (``FULL`` on a GPU, ``TINY`` for the CPU test)."""

    videos: int
    frames: int
    width: int
    height: int
    clip_len: int
    stride: int
    short_side: int
    decode_clips: int
    workers: int
    gpu_threads: tuple
    barcode_frames: int
    barcode_w: int
    barcode_h: int
    aug_batch: int
    aug_t: int
    aug_h: int
    aug_w: int
    crop: int
    train_batch: int
    train_t: int
    width_mult: float
    train_steps: int
    pipeline_steps: int
    finch_n: int
    finch_dims: tuple
    finch_centres: int
    recall_sample: int
    tf32_n: int
    bank_n: int
    bank_batch: int
    bank_t: int
    ddp_batch: int
    ddp_t: int
    ddp_size: int
    ddp_width: float
    ddp_steps: int


FULL = Sizes(
    videos=48, frames=120, width=320, height=240, clip_len=16, stride=2, short_side=128,
    decode_clips=1536, workers=16, gpu_threads=(1, 8), barcode_frames=64, barcode_w=192,
    barcode_h=128, aug_batch=64, aug_t=16, aug_h=128, aug_w=171, crop=112, train_batch=64,
    train_t=16, width_mult=1.0, train_steps=20, pipeline_steps=12, finch_n=1_000_000,
    finch_dims=(128, 512), finch_centres=20_000, recall_sample=1000, tf32_n=200_000,
    bank_n=100_000, bank_batch=256, bank_t=16, ddp_batch=16, ddp_t=8, ddp_size=112,
    ddp_width=0.5, ddp_steps=3,
)  # fmt: skip
TINY = Sizes(
    videos=3, frames=24, width=64, height=48, clip_len=4, stride=2, short_side=32,
    decode_clips=12, workers=2, gpu_threads=(1, 2), barcode_frames=24, barcode_w=96,
    barcode_h=64, aug_batch=2, aug_t=4, aug_h=40, aug_w=48, crop=32, train_batch=2, train_t=4,
    width_mult=0.125, train_steps=2, pipeline_steps=2, finch_n=3000, finch_dims=(16,),
    finch_centres=100, recall_sample=200, tf32_n=1000, bank_n=48, bank_batch=16, bank_t=4,
    ddp_batch=4, ddp_t=4, ddp_size=32, ddp_width=0.125, ddp_steps=2,
)  # fmt: skip


# -- recording ------------------------------------------------------------------------------------


class Rec:
    """Figures of one section; written to ``path`` after every change, so a crash keeps them."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.data = {"status": "running", "figures": {}, "skipped": {}, "notes": [], "error": None}

    def _flush(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, default=_jsonable))
            tmp.replace(self.path)

    def put(self, key: str, value) -> None:
        """Record figure ``key``."""
        self.data["figures"][key] = value
        print(f"  {key}: {_fmt(value)}", flush=True)
        self._flush()

    def skip(self, item: str, reason: str) -> None:
        """Record that ``item`` was not measured, and why."""
        self.data["skipped"][item] = reason
        print(f"  skipped {item}: {reason}", flush=True)
        self._flush()

    def note(self, text: str) -> None:
        """Record a remark that belongs under the table."""
        self.data["notes"].append(text)
        self._flush()

    def finish(self, status: str, error: str | None = None) -> None:
        """Set the final status (``ok``, ``error``, ...)."""
        self.data["status"] = status
        self.data["error"] = error
        self._flush()


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        if v == 0 or 0.01 <= abs(v) < 1e6:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:.3g}"
    return str(v)


def _err(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


class Ctx:
    """What a section gets: sizes, device, a work folder shared by sections, its deadline."""

    def __init__(self, args, sizes: Sizes, cap_s: float) -> None:
        self.args = args
        self.sizes = sizes
        self.device_name = args.device
        self.tiny = args.tiny
        self.work = Path(args.work)
        self.start = time.monotonic()
        self.deadline = self.start + max(1.0, cap_s - max(3.0, 0.05 * cap_s))

    def left(self) -> float:
        """Seconds left before this section should stop measuring."""
        return self.deadline - time.monotonic()

    @property
    def cuda(self) -> bool:
        """Whether this run measures on a CUDA device."""
        return self.device_name.startswith("cuda")


# -- shared helpers (import torch lazily: the orchestrator stays light) ---------------------------


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, device, reps: int, warmup: int = 2, ctx: Ctx | None = None) -> list:
    """Seconds of each of ``reps`` calls of ``fn`` (device-synchronised), after ``warmup``."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    cuda = str(device).startswith("cuda")
    for _ in range(reps):
        if ctx is not None and ctx.left() < 0:
            break
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def _render(args):
    """Render one synthetic video and write it (a worker function: picklable arguments)."""
    import numpy as np

    from vidssl.data.synthetic import render_video, write_video

    path, motion, seed, frames, w, h, codec, bframes = args
    video = render_video(motion, np.random.default_rng(seed), num_frames=frames, width=w, height=h)
    tmp = Path(str(path) + ".part" + Path(path).suffix)
    write_video(tmp, video, codec=codec, max_b_frames=bframes, gop_size=12)
    tmp.replace(path)


#: The two throughput sets: UCF101-like MPEG-4 Part 2 AVI with B-frames, and H.264 MP4.
VIDEO_SETS = {"mpeg4-bframes.avi": ("mpeg4", 2, ".avi"), "h264.mp4": ("libx264", 0, ".mp4")}


def ensure_videos(ctx: Ctx) -> dict:
    """Write the throughput videos once per run (idempotent); return ``{set: folder}``."""
    from concurrent.futures import ProcessPoolExecutor

    from vidssl.data.synthetic import MOTIONS

    s = ctx.sizes
    jobs, out = [], {}
    for name, (codec, bframes, ext) in VIDEO_SETS.items():
        folder = ctx.work / "videos" / name.replace(".", "-")
        folder.mkdir(parents=True, exist_ok=True)
        out[name] = folder
        for k in range(s.videos):
            path = folder / f"v{k:03d}{ext}"
            if not path.exists():
                motion = MOTIONS[k % len(MOTIONS)]
                jobs.append((path, motion, k, s.frames, s.width, s.height, codec, bframes))
    if jobs:
        workers = min(len(jobs), os.cpu_count() or 1, 16)
        if workers > 1 and not ctx.tiny:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_render, jobs))
        else:
            for job in jobs:
                _render(job)
    return out


def probed_index(folder: Path, ctx: Ctx):
    """Probe a folder of videos with vidssl's index (manifest cached in the work folder)."""
    from vidssl.data.index import read_folder

    return read_folder(folder).probe(cache_dir=ctx.work / "manifests", progress=False)


# -- section: env ---------------------------------------------------------------------------------


def section_env(rec: Rec, ctx: Ctx) -> None:
    """Versions, the device, NVDEC and FFmpeg for torchcodec, measured matrix-product rates."""
    import importlib

    import torch

    from vidssl.data.gpu_decode import nvdec_library, torchcodec_available

    rec.put("python", platform.python_version())
    rec.put("torch", torch.__version__)
    rec.put("CUDA (torch build)", torch.version.cuda)
    rec.put("CPU cores", os.cpu_count())
    for mod in ("torchcodec", "decord", "av", "kornia", "faiss", "pytorch_lightning", "numpy"):
        try:
            m = importlib.import_module(mod)
            rec.put(f"{mod} version", getattr(m, "__version__", "?"))
        except Exception as exc:  # noqa: BLE001
            rec.skip(f"{mod} version", f"not importable ({_err(exc)})")
    rec.put("torchcodec loads", torchcodec_available())
    rec.put("LD_LIBRARY_PATH has PyAV's FFmpeg", "ffmpeg-from-pyav" in os.environ.get(
        "LD_LIBRARY_PATH", ""))  # fmt: skip
    rec.put("NVDEC library", nvdec_library() or "not found")
    if not ctx.cuda:
        rec.skip("GPU", f"device is {ctx.device_name}")
        rec.skip("matrix-product rates", "need CUDA")
        return
    props = torch.cuda.get_device_properties(0)
    rec.put("GPU", props.name)
    rec.put("GPU memory GiB", props.total_memory / 2**30)
    rec.put("multiprocessors", props.multi_processor_count)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        rec.put("driver, SM clock, max SM clock, power limit", q.stdout.strip())
    n = 8192
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32 (IEEE)")):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        from vidssl.clustering.neighbours import _ieee_float32

        with _ieee_float32("cuda"):
            t = _median(time_calls(lambda a=a, b=b: a @ b, "cuda", reps=10, warmup=3))
        rec.put(f"matmul {label} TFLOP/s (8192^3, random)", 2 * n**3 / t / 1e12)
        del a, b


# -- section: decode ------------------------------------------------------------------------------


def barcode_files(ctx: Ctx) -> dict:
    """Frame-barcode videos (vidssl.data.synthetic.numbered_frames) with and without B-frames."""
    from vidssl.data.synthetic import numbered_frames, write_video

    s = ctx.sizes
    frames = numbered_frames(s.barcode_frames, s.barcode_w, s.barcode_h)
    folder = ctx.work / "barcodes"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, codec, bframes in (
        ("mpeg4-bframes.avi", "mpeg4", 2),
        ("mpeg4-bframes.mp4", "mpeg4", 2),
        ("h264-bframes.mp4", "libx264", 0),
        ("h264-bframes.avi", "libx264", 0),
    ):
        path = folder / name
        if not path.exists():
            write_video(path, frames, codec=codec, max_b_frames=bframes, gop_size=12)
        files[name] = path
    return files


def check_barcodes(read, files: dict, ctx: Ctx, size) -> tuple[int, int, list]:
    """Decode unsorted, repeated indices of every barcode file; return (wrong, total, files)."""
    import numpy as np

    from vidssl.data.index import probe_video
    from vidssl.data.synthetic import read_frame_numbers

    n = ctx.sizes.barcode_frames
    rng = np.random.default_rng(0)
    wrong = total = 0
    bad = []
    for name, path in files.items():
        exact = probe_video(str(path)).exact
        idx = np.concatenate([rng.permutation(n)[: max(4, n // 2)], [0, n - 1, 5, 5]])
        frames = np.asarray(read(str(path), idx, size, exact))
        got = np.array(read_frame_numbers(frames))
        miss = int((got != idx).sum())
        wrong += miss
        total += len(idx)
        if miss:
            bad.append(f"{name} ({miss})")
    return wrong, total, bad


def real_video(ctx: Ctx) -> Path | None:
    """A real UCF101-style AVI (packed MPEG-4 Part 2 with B-frames) if one travelled along."""
    candidates = [ctx.args.real_video] if ctx.args.real_video else []
    candidates += [ROOT / ".cache/gpu-videos/Megamind.avi",
                   ROOT.parent / "shared/data/real-videos/Megamind.avi"]  # fmt: skip
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def check_real_video(read, path: Path, ctx: Ctx) -> tuple[int, int, float]:
    """Nearest reference frame (PyAV sequential decode) of random frames; (right, total, MAE)."""
    import av
    import numpy as np

    from vidssl.data.decoding import resized_size

    with av.open(str(path)) as c:
        st = c.streams.video[0]
        w, h = resized_size(st.codec_context.width, st.codec_context.height, 64)
        ref = []
        for f in c.decode(st):
            ref.append(f.to_ndarray(format="rgb24", width=w, height=h).astype(np.float32))
            if len(ref) >= 120:
                break
    ref = np.stack(ref)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(ref), min(24, len(ref)), replace=False)
    frames = np.asarray(read(str(path), idx, (w, h), True)).astype(np.float32)
    right, maes = 0, []
    for k, i in enumerate(idx):
        d = np.abs(ref - frames[k][None]).mean(axis=(1, 2, 3))
        right += int(np.argmin(d) == i)
        maes.append(float(d[i]))
    return right, len(idx), float(np.mean(maes))


class _PlanClips:
    """Dataset over a fixed clip plan: decode each clip with a named vidssl backend."""

    def __init__(self, plan, backend: str, size) -> None:
        self.plan, self.backend, self.size = plan, backend, size
        self._dec = None

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int):
        import torch

        from vidssl.data.decoding import build_decoder

        if self._dec is None:
            self._dec = build_decoder(self.backend)
        path, idx, exact = self.plan[k]
        return torch.from_numpy(self._dec.read(path, idx, self.size, exact))


def _as_list(batch):
    return batch


def make_plan(index, n: int, ctx: Ctx, seed: int = 0) -> list:
    """``n`` random clips ``(path, frame indices, exact)`` of ``index``."""
    import numpy as np

    from vidssl.data.sampling import random_clip

    rng = np.random.default_rng(seed)
    plan = []
    for i in rng.integers(0, len(index), n):
        idx = random_clip(int(index.num_frames[i]), ctx.sizes.clip_len, ctx.sizes.stride, rng)
        plan.append((str(index.paths[i]), idx, bool(index.exact[i])))
    return plan


def cpu_clips_per_s(plan, backend: str, size, workers: int, ctx: Ctx, limit_s: float) -> float:
    """Clips/s of ``backend`` in ``workers`` DataLoader workers (start-up excluded)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_PlanClips(plan, backend, size), batch_size=8, num_workers=workers,
                        collate_fn=_as_list)  # fmt: skip
    it = iter(loader)
    next(it)
    t, count = time.perf_counter(), 0
    stop = time.perf_counter() + limit_s
    for b in it:
        count += len(b)
        if time.perf_counter() > stop or ctx.left() < 0:
            break
    dt = time.perf_counter() - t
    del it, loader
    return count / dt


def gpu_clips_per_s(dec, plan, size, threads: int, ctx: Ctx, limit_s: float) -> float:
    """Clips/s of a TorchCodecDecoder over ``plan`` in the main process with ``threads``."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        path, idx, exact = item
        return dec.read_tensor(path, idx, size, exact)

    one(plan[0])  # NVDEC decoder creation and first-use costs excluded
    _sync(dec.device)
    t, count = time.perf_counter(), 0
    stop = t + limit_s
    with ThreadPoolExecutor(threads) as pool:
        for lo in range(0, len(plan), 4 * threads):
            out = list(pool.map(one, plan[lo : lo + 4 * threads]))
            count += len(out)
            if time.perf_counter() > stop or ctx.left() < 0:
                break
    _sync(dec.device)
    return count / (time.perf_counter() - t)


def section_decode(rec: Rec, ctx: Ctx) -> None:
    """Frame accuracy of every backend on B-frame files; NVDEC vs CPU-worker clips/s."""
    from vidssl.data.decoding import build_decoder, decord_available, resized_size
    from vidssl.data.gpu_decode import TorchCodecDecoder, torchcodec_available

    s = ctx.sizes
    t = time.perf_counter()
    sets = ensure_videos(ctx)
    files = barcode_files(ctx)
    rec.put("test videos written (s)", time.perf_counter() - t)
    cpu_backend = "decord" if decord_available() else "pyav"
    rec.put("CPU backend", cpu_backend + ("" if cpu_backend == "decord" else " (no decord)"))
    decoders = {"pyav": build_decoder("pyav")}
    if decord_available():
        decoders["decord"] = build_decoder("decord")
    if torchcodec_available():
        decoders["torchcodec cpu"] = TorchCodecDecoder(device="cpu")
    else:
        rec.skip("torchcodec", "not importable (install torchcodec>=0.15 with FFmpeg 4-8)")
    gpu = None
    if not ctx.cuda:
        rec.skip("GPU decode", f"needs CUDA (device is {ctx.device_name})")
    elif torchcodec_available():
        try:
            gpu = TorchCodecDecoder(device=ctx.device_name)
            gpu.read_tensor(str(files["h264-bframes.mp4"]), [0, 1])  # raises on CPU fallback
            decoders["torchcodec cuda (NVDEC)"] = gpu
        except Exception as exc:  # noqa: BLE001
            rec.skip("GPU decode", _err(exc))
            gpu = None
    small = resized_size(s.barcode_w, s.barcode_h, s.barcode_h // 2)
    for name, dec in decoders.items():
        for size, label in ((None, "native"), (small, "resized")):
            try:
                wrong, total, bad = check_barcodes(dec.read, files, ctx, size)
                where = f" ({', '.join(bad)})" if bad else ""
                rec.put(f"frame barcodes wrong, {name}, {label}", f"{wrong} of {total}{where}")
            except Exception as exc:  # noqa: BLE001
                rec.put(f"frame barcodes wrong, {name}, {label}", f"error: {_err(exc)}")
    real = real_video(ctx)
    if real is None:
        rec.skip("real AVI (Megamind.avi)", "not found (tools/fetch_gpu_wheels.sh copies it)")
    else:
        for name, dec in decoders.items():
            try:
                right, total, mae = check_real_video(dec.read, real, ctx)
                rec.put(f"{real.name}: nearest reference frame right, {name}",
                        f"{right} of {total} (mean abs diff to it {mae:.2f})")  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                rec.put(f"{real.name}: nearest reference frame right, {name}",
                        f"error: {_err(exc)}")  # fmt: skip
    # Throughput on the same clips: CPU workers against NVDEC in the main process.
    for set_name, folder in sets.items():
        index = probed_index(folder, ctx)
        plan = make_plan(index, s.decode_clips, ctx)
        size = resized_size(s.width, s.height, s.short_side)
        budget = max(2.0, min(12.0, ctx.left() / 8))
        try:
            cps = cpu_clips_per_s(plan, cpu_backend, size, s.workers, ctx, budget)
            rec.put(f"CPU {cpu_backend} clips/s, {s.workers} workers, {set_name}", cps)
        except Exception as exc:  # noqa: BLE001
            rec.put(f"CPU {cpu_backend} clips/s, {set_name}", f"error: {_err(exc)}")
            cps = None
        if gpu is None:
            continue
        for threads in s.gpu_threads:
            try:
                g = gpu_clips_per_s(gpu, plan, size, threads, ctx, budget)
                rec.put(f"NVDEC clips/s, {threads} threads, {set_name}", g)
                if cps:
                    rec.put(f"NVDEC / CPU, {threads} threads, {set_name}", g / cps)
            except Exception as exc:  # noqa: BLE001
                rec.put(f"NVDEC clips/s, {threads} threads, {set_name}", f"error: {_err(exc)}")
    rec.note(f"decode: clips of {s.clip_len} frames at stride {s.stride}, {s.width}x{s.height} "
             f"videos of {s.frames} frames resized to short side {s.short_side}; NVDEC decodes "
             "native frames and resizes on the GPU (bilinear, antialiased); the decord backend "
             "decodes files flagged exact (the MPEG-4 B-frame AVIs) sequentially with PyAV, as "
             "in training.")  # fmt: skip


# -- section: kornia ------------------------------------------------------------------------------


def section_kornia(rec: Rec, ctx: Ctx) -> None:
    """ms per augmented view batch; one draw per clip (frames alike, clips different)."""
    import torch

    from vidssl.data.augment import build_augmentation

    s = ctx.sizes
    dev = torch.device(ctx.device_name)
    torch.manual_seed(0)
    aug = build_augmentation("simclr", s.crop).to(dev)
    aug.cpu_chunk = 0  # one call for the whole batch, as on a GPU
    x = torch.randint(0, 256, (s.aug_batch, s.aug_t, s.aug_h, s.aug_w, 3), dtype=torch.uint8,
                      device=dev)  # fmt: skip
    times = time_calls(lambda: aug(x), dev, reps=10 if not ctx.tiny else 2, ctx=ctx)
    ms = _median(times) * 1e3
    rec.put(f"ms per view batch ({s.aug_batch} x {s.aug_t} x {s.aug_h} x {s.aug_w} -> "
            f"{s.crop})", ms)  # fmt: skip
    rec.put("ms per SimCLR step (2 views)", 2 * ms)
    rec.put("clips/s augmented", s.aug_batch / (ms / 1e3))
    # One draw per clip: a clip of identical frames stays identical across frames after
    # augmentation, and two copies of one clip in a batch come out different.
    same = x[:1, :1].expand(2, s.aug_t, -1, -1, -1).contiguous()
    y = aug(same)
    frames_alike = bool((y[:, :, :1] - y).abs().amax() < 1e-5)
    clips_differ = bool((y[0] - y[1]).abs().amax() > 1e-3)
    rec.put("one draw per clip (frames alike, clips differ)", frames_alike and clips_differ)


# -- section: train -------------------------------------------------------------------------------


def _simclr(width: float, dev):
    import torch

    from vidssl.methods import SimCLR

    torch.manual_seed(0)
    model = SimCLR(backbone="r3d_18", backbone_kwargs={"width_mult": width})
    return model.to(dev).to(memory_format=torch.channels_last_3d).train()


def _stepper(model, loss_fn, dev):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-6)

    def step(views):
        views = [v.contiguous(memory_format=torch.channels_last_3d) for v in views]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = loss_fn({"views": views})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _pipeline_cpu(step, aug, ctx: Ctx, folder: Path, dev) -> float:
    """Steps/s with VideoDataModule's workers feeding the step (decode, pin, copy, kornia)."""
    from vidssl.data.datamodule import VideoDataModule

    s = ctx.sizes
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix in (".avi", ".mp4"))
    reps = -(-(s.pipeline_steps + 3) * s.train_batch // len(paths))
    csv = ctx.work / f"pipeline-{folder.name}.csv"
    csv.write_text("path,label\n" + "".join(f"{p},0\n" for p in paths * reps))
    dm = VideoDataModule(
        train=str(csv), format="csv", clip_len=s.clip_len, stride=s.stride, num_views=2,
        short_side=s.short_side, crop_size=s.crop, batch_size=s.train_batch,
        num_workers=s.workers, cache_dir=str(ctx.work / "manifests"), pin_memory=dev.type == "cuda",
    )  # fmt: skip
    dm.setup("fit")
    dm.train_augmentation = aug
    it = iter(dm.train_dataloader())

    def one():
        batch = next(it)
        batch["views"] = [v.to(dev, non_blocking=True) for v in batch["views"]]
        dm.augment(batch, train=True)
        step(batch["views"])

    one()
    one()  # workers started, first batches out
    _sync(dev)
    t, n = time.perf_counter(), 0
    for _ in range(s.pipeline_steps):
        one()
        n += 1
        if ctx.left() < 0:
            break
    _sync(dev)
    return n / (time.perf_counter() - t)


def _pipeline_gpu(step, aug, ctx: Ctx, folder: Path, dev) -> float:
    """Steps/s with NVDEC decoding in the main process (8 threads), kornia, then the step."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from vidssl.data.decoding import resized_size
    from vidssl.data.gpu_decode import TorchCodecDecoder
    from vidssl.data.sampling import random_clip

    s = ctx.sizes
    index = probed_index(folder, ctx)
    dec = TorchCodecDecoder(device=ctx.device_name)
    size = resized_size(s.width, s.height, s.short_side)
    rng = np.random.default_rng(0)

    def video(item):
        path, a, b = item
        frames = dec.read_tensor(path, np.concatenate([a, b]), size)
        return frames[: len(a)], frames[len(a) :]

    pool = ThreadPoolExecutor(8)

    def one():
        plan = []  # drawn here: numpy's Generator is not thread-safe
        for i in rng.integers(0, len(index), s.train_batch):
            n = int(index.num_frames[i])
            clips = [random_clip(n, s.clip_len, s.stride, rng) for _ in range(2)]
            plan.append((str(index.paths[i]), *clips))
        pairs = list(pool.map(video, plan))
        views = [torch.stack([p[v] for p in pairs]) for v in (0, 1)]
        step([aug(v) for v in views])

    one()
    _sync(dev)
    t, n = time.perf_counter(), 0
    for _ in range(s.pipeline_steps):
        one()
        n += 1
        if ctx.left() < 0:
            break
    _sync(dev)
    pool.shutdown()
    return n / (time.perf_counter() - t)


def section_train(rec: Rec, ctx: Ctx) -> None:
    """SimCLR R3D-18 step: FLOPs, clips/s, MFU eager and compiled; real-data pipelines."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vidssl.data.augment import build_augmentation
    from vidssl.data.gpu_decode import torchcodec_available

    s = ctx.sizes
    dev = torch.device(ctx.device_name)
    model = _simclr(s.width_mult, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (s.train_batch, 3, s.train_t, s.crop, s.crop)
    views = [torch.randn(shape, device=dev, generator=g) for _ in range(2)]
    rec.put("setting", f"SimCLR, R3D-18 width {s.width_mult}, batch {s.train_batch} x 2 "
            f"views x 3 x {s.train_t} x {s.crop}^2, bf16 autocast, channels-last-3d, SGD")
    step = _stepper(model, model.compute_loss, dev)
    step(views)
    with FlopCounterMode(display=False) as counter:
        step(views)
    flops = counter.get_total_flops()
    rec.put("TFLOP per step (forward + backward, FlopCounterMode)", flops / 1e12)
    name = torch.cuda.get_device_properties(0).name if ctx.cuda else platform.processor()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    if peak is None:
        rec.skip("MFU", f"no bf16 peak known for {name or 'this device'}")
    steps = s.train_steps

    def report(label: str, times: list) -> float:
        dt = _median(times)
        rec.put(f"{label}: ms per step (median of {len(times)})", dt * 1e3)
        rec.put(f"{label}: clips/s (2 views each)", s.train_batch / dt)
        rec.put(f"{label}: TFLOP/s", flops / dt / 1e12)
        if peak:
            rec.put(f"{label}: MFU vs {peak / 1e12:.0f} dense bf16", flops / dt / peak)
        return dt

    held = report("eager", time_calls(lambda: step(views), dev, steps, warmup=2, ctx=ctx))
    if ctx.cuda:
        rec.put("peak memory GiB (eager)", torch.cuda.max_memory_allocated() / 2**30)
    # Real data: can the pipelines keep the (eager) step fed?
    aug = build_augmentation("simclr", s.crop).to(dev)
    aug.cpu_chunk = 0
    folder = ensure_videos(ctx)["mpeg4-bframes.avi"]
    rec.put("held batch: steps/s (eager)", 1 / held)
    for label, fn, needs in (
        (f"CPU workers ({s.workers}) + kornia", _pipeline_cpu, None),
        ("NVDEC (8 threads) + kornia", _pipeline_gpu, "gpu"),
    ):
        if needs == "gpu" and not (ctx.cuda and torchcodec_available()):
            rec.skip(f"real data, {label}", "needs CUDA and torchcodec")
            continue
        if ctx.left() < 20 and not ctx.tiny:
            rec.skip(f"real data, {label}", "section time cap")
            continue
        try:
            sps = fn(step, aug, ctx, folder, dev)
            rec.put(f"real data, {label}: steps/s", sps)
            rec.put(f"real data, {label}: / held batch", sps * held)
        except Exception as exc:  # noqa: BLE001
            rec.put(f"real data, {label}", f"error: {_err(exc)}")
    rec.note("train: real data = the MPEG-4 B-frame AVI set (UCF101-like), 2 random clips "
             "per video; held batch = the same step on random views already on the device.")
    if not ctx.cuda:
        rec.skip("torch.compile", "timed on CUDA only (compilation dominates a tiny CPU run)")
        return
    if ctx.left() < 30:
        rec.skip("torch.compile", f"section time cap ({ctx.left():.0f} s left)")
        return
    cmodel = _simclr(s.width_mult, dev)
    cstep = _stepper(cmodel, torch.compile(cmodel.compute_loss), dev)
    t = time.perf_counter()
    cstep(views)
    cstep(views)
    _sync(dev)
    rec.put("compiled: first two steps incl. compilation (s)", time.perf_counter() - t)
    report("compiled", time_calls(lambda: cstep(views), dev, steps, warmup=1, ctx=ctx))


# -- section: finch -------------------------------------------------------------------------------


def _features(n: int, d: int, centres: int, dev):
    """Clustered features: ``centres`` Gaussian centres, each point one centre plus noise."""
    import torch

    g = torch.Generator(device=dev).manual_seed(d)
    c = torch.randn(centres, d, device=dev, generator=g)
    which = torch.randint(0, centres, (n,), device=dev, generator=g)
    x = c[which] + 0.5 * torch.randn(n, d, device=dev, generator=g)
    return x.float().cpu().numpy()


def recall_vs_brute_force(x, nn, sample: int, dev) -> tuple[float, float]:
    """First-neighbour recall of ``nn`` against float64 brute force on ``sample`` rows.

    Returns (share of rows whose neighbour is the exact one, lowest index among exact ties;
    share whose neighbour is at the exact least distance).
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))
    bank = torch.from_numpy(x).to(dev, torch.float64)
    bank = bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-300)
    same = at_best = 0
    for lo in range(0, len(rows), 100):
        r = torch.from_numpy(rows[lo : lo + 100]).to(dev)
        sims = bank[r] @ bank.T
        sims[torch.arange(len(r), device=dev), r] = -math.inf
        best = sims.max(dim=1).values
        ref = torch.argmax((sims == best[:, None]).int(), dim=1)  # first (lowest) index
        got = torch.from_numpy(nn[rows[lo : lo + 100]]).to(dev)
        same += int((got == ref).sum())
        at_best += int((sims.gather(1, got[:, None])[:, 0] >= best).sum())
    return same / len(rows), at_best / len(rows)


class _DeviceClips:
    """A bank loader of smooth random uint8 clips made on the device (no decoding)."""

    def __init__(self, n: int, batch: int, t: int, side: int, dev) -> None:
        self.n, self.batch, self.t, self.side, self.dev = n, batch, t, side, dev

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self):
        import torch
        import torch.nn.functional as F

        g = torch.Generator(device=self.dev).manual_seed(0)
        w = self.side * 4 // 3
        for lo in range(0, self.n, self.batch):
            b = min(self.batch, self.n - lo)
            coarse = torch.rand(b, 3, 4, 6, 8, device=self.dev, generator=g) * 255
            clips = F.interpolate(coarse, size=(self.t, self.side, w), mode="trilinear")
            yield {
                "views": [clips.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()],
                "index": torch.arange(lo, lo + b, device=self.dev),
                "label": torch.full((b,), -1, device=self.dev),
            }


def _bank_parts(ctx: Ctx, dev):
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from vidssl.data.augment import EvalTransform
    from vidssl.methods import SimCLR

    s = ctx.sizes

    class Bf16Embed(SimCLR):
        """SimCLR whose ``embed`` runs the backbone under bf16 autocast, channels-last-3d."""

        def embed(self, clips, projection=False):
            clips = clips.contiguous(memory_format=torch.channels_last_3d)
            # bf16 on CUDA only: CPUs without bf16 convolution kernels run it far slower.
            with torch.autocast(clips.device.type, dtype=torch.bfloat16, enabled=clips.is_cuda):
                feats = self.backbone(clips)
            feats = feats.float()
            if projection:
                feats = self.projection(feats)
            return F.normalize(feats, dim=1)

    class Bank(pl.LightningDataModule):
        """Bank loader + evaluation transform of the PseudoLabels protocol; one tiny train batch."""

        def __init__(self) -> None:
            super().__init__()
            self.num_train_videos = s.bank_n
            self.eval_transform = EvalTransform(s.crop)
            g = torch.Generator().manual_seed(0)
            self.batch = {
                "views": [torch.randn(2, 3, s.bank_t, s.crop, s.crop, generator=g)
                          for _ in range(2)],  # fmt: skip
                "index": torch.arange(2),
                "label": torch.full((2,), -1),
            }

        def train_dataloader(self):
            return DataLoader([self.batch], batch_size=None)

        def bank_dataloader(self, rank=None, world_size=None):
            return _DeviceClips(s.bank_n, s.bank_batch, s.bank_t, s.short_side, dev)

        def augment(self, batch, train=True):
            self.eval_transform.to(batch["views"][0].device)
            batch["views"] = [self.eval_transform(v) for v in batch["views"]]
            return batch

    torch.manual_seed(0)
    model = Bf16Embed(backbone="r3d_18", backbone_kwargs={"width_mult": s.width_mult})
    return model.to(memory_format=torch.channels_last_3d), Bank()


def section_finch(rec: Rec, ctx: Ctx) -> None:
    """Exact FINCH on the device: seconds, levels, recall; PseudoLabels pass of a clip bank."""
    import importlib
    from unittest import mock

    import pytorch_lightning as pl
    import torch

    from vidssl.callbacks.pseudo_labels import PseudoLabels
    from vidssl.clustering import finch, first_neighbours

    finch_mod = importlib.import_module("vidssl.clustering.finch")  # the package shadows it
    s = ctx.sizes
    dev = torch.device(ctx.device_name)

    def one_bank(d: int) -> None:
        if ctx.left() < (25 if d <= 128 else 45) and not ctx.tiny:
            rec.skip(f"FINCH {s.finch_n} x {d}", f"section time cap ({ctx.left():.0f} s left)")
            return
        x = _features(s.finch_n, d, s.finch_centres, dev)
        level0 = []  # FINCH's own level-0 first neighbours, for the recall check

        def spy(feats, _orig=finch_mod.first_neighbours, level0=level0, **kw):
            out = _orig(feats, **kw)
            if not level0:
                level0.append(out[0])
            return out

        t = time.perf_counter()
        with mock.patch.object(finch_mod, "first_neighbours", spy):
            res = finch(x, device=str(dev))
        rec.put(f"FINCH {s.finch_n} x {d}: seconds end to end", time.perf_counter() - t)
        rec.put(f"FINCH {s.finch_n} x {d}: level 0 seconds", res.diagnostics["level_seconds"][0])
        rec.put(f"FINCH {s.finch_n} x {d}: clusters per level", res.num_clusters)
        same, at_best = recall_vs_brute_force(x, level0[0], s.recall_sample, dev)
        rec.put(f"FINCH {s.finch_n} x {d}: first-neighbour recall (index, distance)",
                f"{same:.4f}, {at_best:.4f} on {min(s.recall_sample, s.finch_n)} rows")  # fmt: skip
        if d == s.finch_dims[0] and not ctx.cuda:
            rec.skip("first neighbours under global TF32", "TF32 is a CUDA mode")
        elif d == s.finch_dims[0]:
            sub = x[: s.tf32_n]
            ieee, _ = first_neighbours(sub, device=str(dev))
            knob = torch.backends.cuda.matmul
            attr = "fp32_precision" if hasattr(knob, "fp32_precision") else "allow_tf32"
            old = getattr(knob, attr)
            setattr(knob, attr, "tf32" if attr == "fp32_precision" else True)
            try:
                tf32, _ = first_neighbours(sub, device=str(dev))
            finally:
                setattr(knob, attr, old)
            rec.put(f"first neighbours of {len(sub)} x {d} under global TF32 = IEEE result",
                    bool((tf32 == ieee).all()))  # fmt: skip
        del x

    def pseudo_labels() -> None:
        if ctx.left() < 30 and not ctx.tiny:
            rec.skip("PseudoLabels pass", f"section time cap ({ctx.left():.0f} s left)")
            return
        model, bank = _bank_parts(ctx, dev)
        cb = PseudoLabels(cluster_before_training=True, install_sampler=False, progress_bar=False,
                          clustering_kwargs={"device": str(dev)})  # fmt: skip
        trainer = pl.Trainer(
            accelerator="gpu" if ctx.cuda else "cpu", devices=1, max_steps=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[cb],
        )  # fmt: skip
        t = time.perf_counter()
        trainer.fit(model, datamodule=bank)
        rec.put(f"PseudoLabels pass of {s.bank_n} clips: seconds (fit with 1 step)",
                time.perf_counter() - t)  # fmt: skip
        diag = cb.diagnostics
        rec.put("PseudoLabels: embed seconds (bf16 autocast on CUDA)", diag.get("embed_seconds"))
        rec.put("PseudoLabels: cluster seconds (FINCH on the device)", diag.get("cluster_seconds"))
        rec.put("PseudoLabels: clusters", diag.get("num_clusters", int(cb.labels.max()) + 1))

    # 1M x 128 first (the goal: under 60 s), then the PseudoLabels pass, the largest last.
    one_bank(s.finch_dims[0])
    pseudo_labels()
    for d in s.finch_dims[1:]:
        one_bank(d)
    rec.note(f"finch: features are {s.finch_centres} Gaussian centres plus noise; recall is "
             "against float64 brute force, ties to the lowest index; the PseudoLabels bank is "
             f"smooth random {s.bank_t}-frame clips made on the device, R3D-18 width "
             f"{s.width_mult}, one centre crop {s.crop}.")  # fmt: skip


# -- section: ddp ---------------------------------------------------------------------------------


def section_ddp(rec: Rec, ctx: Ctx) -> None:
    """MoCo and SimCLR on a 1-process NCCL (gloo on the CPU) group, DDP paths forced on."""
    from unittest import mock

    import pytorch_lightning as pl
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from pytorch_lightning.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from vidssl import distributed as vdist
    from vidssl.methods import MoCo, SimCLR

    s = ctx.sizes
    dev = torch.device(ctx.device_name)
    backend = "nccl" if ctx.cuda else "gloo"
    kw = dict(backbone="r3d_18", backbone_kwargs={"width_mult": s.ddp_width})
    g = torch.Generator().manual_seed(0)
    shape = (s.ddp_batch, 3, s.ddp_t, s.ddp_size, s.ddp_size)
    batch = {
        "views": [torch.randn(shape, generator=g) for _ in range(2)],
        "index": torch.arange(s.ddp_batch),
        "label": torch.full((s.ddp_batch,), -1),
    }
    for name, make in (
        ("MoCo (shuffle-BN)", lambda: MoCo(queue_size=4 * s.ddp_batch, shuffle_bn=True, **kw)),
        ("SimCLR (gathered negatives)", lambda: SimCLR(**kw)),
    ):
        torch.manual_seed(0)
        trainer = pl.Trainer(
            accelerator="gpu" if ctx.cuda else "cpu", devices=1, max_steps=s.ddp_steps,
            strategy=DDPStrategy(process_group_backend=backend),
            precision="bf16-mixed" if ctx.cuda else "32-true", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(make(), DataLoader([batch] * s.ddp_steps, batch_size=None))
        loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
        rec.put(f"Lightning DDP ({backend}, 1 process), {name}: steps, last loss",
                f"{trainer.global_step}, {loss:.4f}")  # fmt: skip
    if not dist.is_initialized():  # Lightning tore its group down: make a 1-process one
        store = ctx.work / "ddp-rendezvous"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    rec.put("process group", f"{dist.get_backend()}, world size {dist.get_world_size()}")
    # The multi-process code paths, forced on the 1-process group.
    views = [v.to(dev) for v in batch["views"]]
    with mock.patch.object(vdist, "is_distributed", return_value=True):
        x = torch.randn(4, 8, device=dev)
        same = bool(torch.equal(vdist.all_gather(x), x))
        rec.put("all_gather on the group returns the tensor", same)
        torch.manual_seed(0)
        moco = MoCo(queue_size=4 * s.ddp_batch, shuffle_bn=True, **kw).to(dev).train()
        with torch.no_grad():
            shuffled = moco._keys(views[1])  # DDP shuffle: all_gather, broadcast, unshuffle
            plain = F.normalize(moco.key_projection(moco.key_backbone(views[1])), dim=1)
        rec.put("MoCo DDP shuffle-BN keys = unshuffled keys (max abs diff)",
                float((shuffled - plain).abs().max()))  # fmt: skip
        opt = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.01)
        losses = []
        for _ in range(s.ddp_steps):
            loss = moco.compute_loss({**batch, "views": views})
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        rec.put("MoCo forced-DDP steps: losses finite, queue pointer",
                f"{all(math.isfinite(v) for v in losses)}, {int(moco.queue_ptr)}")  # fmt: skip
        simclr = SimCLR(**kw).to(dev).train()
        loss = simclr.compute_loss({**batch, "views": views})
        loss.backward()
        rec.put("SimCLR forced-DDP (gather_with_grad) loss finite", math.isfinite(float(loss)))


# -- running sections -----------------------------------------------------------------------------

RUNNERS = {
    "env": section_env,
    "decode": section_decode,
    "kornia": section_kornia,
    "train": section_train,
    "finch": section_finch,
    "ddp": section_ddp,
}


def _inject_fault(name: str) -> None:
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        section, _, kind = item.partition("=")
        if section == name:
            if kind == "hang":
                time.sleep(3600)
            if kind == "crash":
                os._exit(3)
            raise RuntimeError(f"fault injected into {name} ({FAULT_ENV})")


def run_section(name: str, args, cap_s: float, part: Path | None) -> dict:
    """Run one section in this process; its record (also written to ``part``)."""
    rec = Rec(part)
    sizes = TINY if args.tiny else FULL
    try:
        _inject_fault(name)
        if name in ("decode", "train"):
            os.environ.setdefault("OMP_NUM_THREADS", "1")  # DataLoader workers: one thread each
        RUNNERS[name](rec, Ctx(args, sizes, cap_s))
        rec.finish("ok")
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        rec.finish("error", _err(exc))
    return rec.data


def _child_env() -> dict:
    """Environment of section processes: PyAV's FFmpeg on LD_LIBRARY_PATH for torchcodec."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    try:
        sys.path.insert(0, str(ROOT))
        from vidssl.data.gpu_decode import ffmpeg_library_dir

        ffmpeg = ffmpeg_library_dir()
    except Exception:  # noqa: BLE001
        ffmpeg = None
    if ffmpeg is not None and str(ffmpeg) not in env.get("LD_LIBRARY_PATH", ""):
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(ffmpeg)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        )
    return env


def run_isolated(name: str, args, cap_s: float, log, env: dict) -> dict:
    """Run one section in a child process killed after ``cap_s``; keep what it recorded."""
    part = Path(args.work) / f"{name}.json"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--part", str(part),
           "--cap-s", f"{cap_s:.1f}", "--out", args.out, "--work", args.work,
           "--device", args.device] + (["--tiny"] if args.tiny else [])  # fmt: skip
    if args.real_video:
        cmd += ["--real-video", args.real_video]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    status, error = None, None
    try:
        rc = proc.wait(timeout=cap_s)
        if rc != 0:
            status, error = "error", f"section process exited with code {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status, error = "timeout", f"stopped at its time cap of {cap_s:.0f} s"
    data = json.loads(part.read_text()) if part.exists() else Rec().data
    if status is not None:
        if data.get("status") in ("ok", "error") and status == "error":
            status = data["status"]  # the section finished; only the exit failed (teardown)
            error = data.get("error") or error
        data["status"], data["error"] = status, error
        if status == "timeout" and data["figures"]:
            data["error"] += " (figures measured before then are kept)"
    return data


def derive(sections: dict) -> dict:
    """Figures that combine sections: kornia's share of a step, MFU against measured matmul."""
    out = {}
    aug = sections.get("kornia", {}).get("figures", {}).get("ms per SimCLR step (2 views)")
    tf = sections.get("train", {}).get("figures", {})
    mm = sections.get("env", {}).get("figures", {}).get("matmul bf16 TFLOP/s (8192^3, random)")
    for label in ("eager", "compiled"):
        step_ms = next((v for k, v in tf.items() if k.startswith(f"{label}: ms per step")), None)
        if isinstance(aug, (int, float)) and isinstance(step_ms, (int, float)):
            out[f"kornia share of a {label} step (augment / (augment + step))"] = aug / (
                aug + step_ms)  # fmt: skip
        tflops = tf.get(f"{label}: TFLOP/s")
        if isinstance(mm, (int, float)) and isinstance(tflops, (int, float)):
            out[f"{label}: TFLOP/s / measured bf16 matmul rate"] = tflops / mm
    return out


def markdown(report: dict) -> str:
    """The report as one Markdown table (section | figure | value) plus notes."""

    def cell(v) -> str:
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = [
        "# vidssl GPU check (`benchmarks/gpu.py`)",
        "",
        f"mode: {report['mode']}; device: {report['device']}; "
        f"{report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget; {report['when']}",
        "",
        "| section | figure | value |",
        "| --- | --- | --- |",
    ]
    for name in SECTIONS:
        sec = report["sections"][name]
        status = sec["status"] + (f": {sec['error']}" if sec.get("error") else "")
        lines.append(f"| {name} | status ({sec.get('seconds', 0):.0f} s) | {cell(status)} |")
        for k, v in sec["figures"].items():
            lines.append(f"| {name} | {cell(k)} | {cell(v)} |")
        for k, v in sec["skipped"].items():
            lines.append(f"| {name} | skipped: {cell(k)} | {cell(v)} |")
    for k, v in report["derived"].items():
        lines.append(f"| derived | {cell(k)} | {cell(v)} |")
    notes = [n for name in SECTIONS for n in report["sections"][name]["notes"]]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Parse arguments; run one section (``--section``) or all of them and write the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".cache" / "gpu-check"), help="report folder")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU test mode)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole-run time budget (default 450 s; 600 s with --tiny)")  # fmt: skip
    ap.add_argument("--isolate", choices=("process", "none"), default="process",
                    help="run each section in its own process (default) or all in this one")
    ap.add_argument("--real-video", default=None, help="a real B-frame AVI (default: Megamind)")
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap-s", type=float, default=None, help="time cap of every section")
    args = ap.parse_args(argv)
    if args.device is None:
        try:
            import torch

            args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
        except ImportError:
            args.device = "cpu"
    if args.section:  # a child process: one section, then leave without teardown (gloo, NCCL)
        sys.path.insert(0, str(ROOT))
        run_section(args.section, args, args.cap_s or 60.0, Path(args.part))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="vidssl-gpu-")
    budget = args.budget_s or (600.0 if args.tiny else 450.0)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    t0 = time.monotonic()
    env = _child_env()
    sections = {}
    mode = "tiny" if args.tiny else "full"
    print(f"benchmarks/gpu.py: {mode} run on {args.device}, budget {budget:.0f} s, "
          f"sections {', '.join(chosen)}; log: {out / 'gpu.log'}", flush=True)  # fmt: skip
    with open(out / "gpu.log", "w") as log:
        for i, name in enumerate(SECTIONS):
            if name not in chosen:
                sections[name] = {**Rec().data, "status": "skipped", "skipped": {
                    "section": "not selected (--sections)"}, "seconds": 0.0}  # fmt: skip
                continue
            # Tiny CPU runs: generous caps (a loaded CPU), one second as the least worth starting.
            least = {n: 1.0 if args.tiny else MINIMA[n] for n in SECTIONS}
            later = sum(least[n] for n in SECTIONS[i + 1 :] if n in chosen)
            left = budget - (time.monotonic() - t0)
            cap = min(args.cap_s or CAPS[name] * (10 if args.tiny else 1), left - later)
            start = time.monotonic()
            if cap < least[name]:
                data = {**Rec().data, "status": "skipped",
                        "skipped": {"section": f"time budget ({left:.0f} s left)"}}  # fmt: skip
            elif args.isolate == "process":
                log.write(f"\n===== {name} (cap {cap:.0f} s) =====\n")
                log.flush()
                data = run_isolated(name, args, cap, log, env)
            else:
                print(f"== {name}", flush=True)
                data = run_section(name, args, cap, None)
            data["seconds"] = time.monotonic() - start
            sections[name] = data
            print(f"{name}: {data['status']} in {data['seconds']:.0f} s"
                  + (f" ({data['error']})" if data.get("error") else ""), flush=True)  # fmt: skip
    report = {
        "mode": mode,
        "device": args.device,
        "budget_s": budget,
        "total_s": time.monotonic() - t0,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sizes": asdict(TINY if args.tiny else FULL),
        "sections": sections,
        "derived": derive(sections),
    }
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=_jsonable))
    table = markdown(report)
    (out / "gpu.md").write_text(table)
    print(table, flush=True)
    if own_work:
        shutil.rmtree(args.work, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if args.isolate == "none":
        os._exit(0)  # a gloo/NCCL group from the ddp section: skip its teardown at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
