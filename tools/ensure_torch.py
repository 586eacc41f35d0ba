"""Make sure torch is importable in this interpreter without ever pulling a CUDA build onto a
machine that has no GPU.

Order of preference:
1. an installed torch (the virtual environment sees the system site-packages) is reused;
2. a wheel already on this machine (pip's find-links, ``--no-index``) is installed;
3. on a machine without an NVIDIA GPU, the CPU build from PyTorch's CPU index;
4. on a machine with a GPU, the default (CUDA) build from PyPI.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys

SPEC = "torch>=2.1"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _pip(*args: str) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd) == 0


def main() -> int:
    if importlib.util.find_spec("torch") is not None:
        import torch

        print(f"torch {torch.__version__} already installed: reusing it")
        return 0
    # A wheel on this machine's find-links: take torch from it, then its small dependencies from
    # the usual index (they are rarely on disk beside it).
    if _pip("--no-index", "--no-deps", SPEC):
        version = importlib.metadata.version("torch")
        return 0 if _pip(f"torch=={version}") else 1
    has_gpu = shutil.which("nvidia-smi") is not None
    if not has_gpu:
        # PyPI's Linux torch wheel is a multi-GB CUDA build; the CPU index has the small one.
        if _pip("--index-url", CPU_INDEX, SPEC):
            return 0
        print("error: no local torch wheel and the PyTorch CPU index is unreachable; install a "
              "CPU build of torch yourself, then run make again", file=sys.stderr)
        return 1
    return 0 if _pip(SPEC) else 1


if __name__ == "__main__":
    sys.exit(main())
