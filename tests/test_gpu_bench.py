"""benchmarks/gpu.py: the tiny CPU mode reports every section; a failing section never stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
SECTIONS = ("env", "decode", "kornia", "train", "finch", "ddp")


def run(args, tmp_path, **env):
    environ = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), *args],
        capture_output=True, text=True, env=environ, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    return report, (tmp_path / "gpu.md").read_text()


@pytest.mark.slow
def test_tiny_cpu_run_reports_every_section(tmp_path):
    report, table = run(["--tiny", "--isolate", "none", "--device", "cpu"], tmp_path)
    secs = report["sections"]
    assert set(secs) == set(SECTIONS)
    for name in SECTIONS:
        assert secs[name]["status"] == "ok", (name, secs[name]["error"])
        assert secs[name]["figures"], name
    # What needs CUDA is skipped with a reason, not silently missing.
    assert "CUDA" in secs["decode"]["skipped"]["GPU decode"]
    assert "CUDA" in secs["train"]["skipped"]["torch.compile"]
    figs = {name: secs[name]["figures"] for name in SECTIONS}
    barcodes = {k: v for k, v in figs["decode"].items() if k.startswith("frame barcodes wrong")}
    assert barcodes and all(v.startswith("0 of ") for v in barcodes.values()), barcodes
    assert figs["kornia"]["one draw per clip (frames alike, clips differ)"] is True
    assert figs["train"]["TFLOP per step (forward + backward, FlopCounterMode)"] > 0
    recall = next(v for k, v in figs["finch"].items() if "recall" in k)
    assert recall.startswith("1.0000, 1.0000"), recall
    assert figs["finch"]["PseudoLabels: cluster seconds (FINCH on the device)"] > 0
    assert figs["ddp"]["MoCo DDP shuffle-BN keys = unshuffled keys (max abs diff)"] < 1e-4
    assert figs["ddp"]["SimCLR forced-DDP (gather_with_grad) loss finite"] is True
    assert table.startswith("# vidssl GPU check")
    assert "| section | figure | value |" in table
    for name in SECTIONS:
        assert f"| {name} | status " in table


def test_failing_sections_are_recorded_and_the_run_goes_on(tmp_path):
    fault = "kornia=hang,finch=raise,ddp=crash"
    report, table = run(
        ["--tiny", "--device", "cpu", "--sections", "kornia,finch,ddp", "--cap-s", "4"],
        tmp_path,
        VIDSSL_GPU_BENCH_FAULT=fault,
    )
    secs = report["sections"]
    assert secs["kornia"]["status"] == "timeout" and "time cap of 4 s" in secs["kornia"]["error"]
    assert secs["finch"]["status"] == "error" and "fault injected" in secs["finch"]["error"]
    assert secs["ddp"]["status"] == "error" and "code 3" in secs["ddp"]["error"]
    for name in ("env", "decode", "train"):
        assert secs[name]["status"] == "skipped"
        assert "not selected" in secs[name]["skipped"]["section"]
    assert "| kornia | status" in table and "timeout: stopped at its time cap" in table
