"""Step time of a vidssl method in the Lightning Trainer against a plain PyTorch loop.

Both run the same model (same initial weights), the same batch and the same work per step:
``compute_loss`` -> backward -> optimiser step -> LR scheduler step -> EMA update (for methods
with momentum encoders). The Trainer adds its loop, hooks, logging and batch transfer; the
ratio shows what that costs. Runs alternate (Lightning, plain, Lightning, plain, ...) so that a
changing machine load hits both alike; the median step time of each is reported.

    .venv/bin/python benchmarks/train_step.py                     # SimCLR and MoCo, CPU
    .venv/bin/python benchmarks/train_step.py --methods moco --width 0.5 --steps 40
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from vidssl.methods import MoCo, SimCLR, ema_update
from vidssl.methods.optim import warmup_cosine

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


class _Same(Dataset):
    """Yields the same ready-made batch ``n`` times (no collation, no decoding)."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


def _now():
    # Wall time and this process' CPU time: on a machine shared with other jobs the CPU time
    # per step is the steadier measure of the work each loop does.
    return time.perf_counter(), time.process_time()


def _diffs(stamps):
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


class _Clock(pl.Callback):
    def __init__(self):
        self.t = []

    def on_train_batch_end(self, *args):
        self.t.append(_now())


def build(method: str, width: float) -> pl.LightningModule:
    kw = dict(backbone="r3d_18", backbone_kwargs={"width_mult": width})
    if method == "simclr":
        return SimCLR(**kw)
    if method == "moco":
        return MoCo(queue_size=4096, **kw)
    raise SystemExit(f"unknown method {method!r}; valid: simclr, moco")


def lightning_steps(model, batch, steps, device) -> list:
    clock = _Clock()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(model, DataLoader(_Same(batch, steps), batch_size=None))
    return _diffs(clock.t)


def plain_steps(model, batch, steps, device) -> list:
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = model.optim
    opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 0, steps))
    batch = {**batch, "views": [v.to(device) for v in batch["views"]]}
    pairs = model.momentum_pairs()
    times = []
    for _ in range(steps):
        loss = model.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for online, target in pairs:
            ema_update(online, target, model.ema.momentum)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(_now())
    return _diffs(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["simclr", "moco"])
    ap.add_argument("--width", type=float, default=0.125, help="R3D-18 width multiplier")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="steps per run (first is dropped)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.frames, args.size, args.size)
    batch = {
        "views": [torch.randn(shape, generator=g) for _ in range(2)],
        "index": torch.arange(args.batch),
        "label": torch.full((args.batch,), -1),
    }
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, device={args.device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"R3D-18 width {args.width}, batch {args.batch} x 2 views x {shape[1:]}, "
          f"{args.steps} steps x {args.repeats} runs each")  # fmt: skip
    print(f"load average before: {os.getloadavg()}")
    print(f"{'method':8} {'wall: lightning ms':>18} {'plain ms':>9} {'ratio':>6}"
          f" {'cpu: lightning ms':>18} {'plain ms':>9} {'ratio':>6}")  # fmt: skip
    for method in args.methods:
        torch.manual_seed(0)
        init = build(method, args.width)
        light, plain = [], []
        for _ in range(args.repeats):
            light += lightning_steps(copy.deepcopy(init), batch, args.steps, args.device)
            plain += plain_steps(copy.deepcopy(init), batch, args.steps, args.device)
        cols = []
        for j in (0, 1):  # wall, cpu
            lm = statistics.median(x[j] for x in light) * 1e3
            pm = statistics.median(x[j] for x in plain) * 1e3
            cols.append(f"{lm:18.1f} {pm:9.1f} {lm / pm:6.3f}")
        print(f"{method:8} " + " ".join(cols))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
