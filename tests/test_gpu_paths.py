"""GPU code paths testable on the CPU: the torchcodec decoder's logic, exact search on a device."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import av
import numpy as np
import pytest
import torch

from vidssl.clustering import first_neighbours
from vidssl.data import gpu_decode
from vidssl.data.decoding import build_decoder
from vidssl.data.gpu_decode import TorchCodecDecoder, ffmpeg_library_dir
from vidssl.data.synthetic import numbered_frames, read_frame_numbers, write_video

# -- exact first neighbours on a torch device --------------------------------------------------


@pytest.mark.skipif(
    not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"),
    reason="torch < 2.9 has no per-backend float32 matmul precision",
)
def test_torch_search_runs_ieee_float32_under_reduced_global_precision(monkeypatch):
    knob = torch.backends.mkldnn.matmul
    seen = []
    real_topk = torch.topk

    def spy(*args, **kwargs):
        seen.append(knob.fp32_precision)
        return real_topk(*args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    x = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    old = knob.fp32_precision
    knob.fp32_precision = "bf16"  # what torch.set_float32_matmul_precision("medium") sets
    try:
        first_neighbours(x, device="cpu", chunk_size=64)
        after = knob.fp32_precision
    finally:
        knob.fp32_precision = old
    assert seen and set(seen) == {"ieee"}  # every search product in IEEE float32
    assert after == "bf16"  # the user's setting is given back


def test_torch_path_re_searches_ties_on_its_device_without_faiss(monkeypatch):
    base = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    x = np.repeat(base, 10, axis=0)  # 9 exact copies of every row: top-4 lists are all ties
    expected, _ = first_neighbours(x)  # faiss, re-searched with longer lists
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    nn, dist = first_neighbours(x, device="cpu", chunk_size=64)
    np.testing.assert_array_equal(nn, expected)
    rows = np.arange(len(x))
    lowest_copy = np.where(rows % 10 == 0, rows + 1, rows - rows % 10)
    np.testing.assert_array_equal(nn, lowest_copy)
    assert dist.max() <= 1e-6


# -- the torchcodec decoder ------------------------------------------------------------------


def test_unknown_backend_lists_torchcodec():
    with pytest.raises(ValueError, match="decord, pyav, torchcodec"):
        build_decoder("opencv")


def test_torchcodec_missing_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    with pytest.raises(RuntimeError, match="torchcodec.*decord, pyav, torchcodec"):
        build_decoder("torchcodec", device="cuda")
    assert not gpu_decode.torchcodec_available()


@pytest.fixture
def fake_torchcodec(monkeypatch):
    """A torchcodec stand-in: PyAV's sequential frames behind torchcodec's VideoDecoder API."""
    state = {"fallback": False, "opened": []}

    class VideoDecoder:
        def __init__(self, path, device, seek_mode, dimension_order, num_ffmpeg_threads):
            assert seek_mode == "exact" and dimension_order == "NHWC"
            state["opened"].append((path, device))
            with av.open(path) as c:
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            self.frames = torch.from_numpy(np.stack(frames))
            self.cpu_fallback = state["fallback"]

        def __len__(self):
            return len(self.frames)

        def get_frames_at(self, indices):
            assert list(indices) == sorted(set(indices))  # unique, sorted: one pass
            return SimpleNamespace(data=self.frames[list(indices)])

    pkg, sub = ModuleType("torchcodec"), ModuleType("torchcodec.decoders")
    sub.VideoDecoder = VideoDecoder
    pkg.decoders = sub
    monkeypatch.setitem(sys.modules, "torchcodec", pkg)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", sub)
    return state


@pytest.fixture(scope="module")
def barcode_avi(tmp_path_factory):
    path = tmp_path_factory.mktemp("tc") / "bframes.avi"
    write_video(path, numbered_frames(40, 96, 64), codec="mpeg4", max_b_frames=2)
    return str(path)


def test_torchcodec_decoder_order_repeats_and_resize(fake_torchcodec, barcode_avi):
    dec = build_decoder("torchcodec", device="cpu")
    assert isinstance(dec, TorchCodecDecoder)
    idx = [33, 2, 33, 0, 17]
    frames = dec.read(barcode_avi, idx, exact=True)
    assert frames.dtype == np.uint8 and frames.shape == (5, 64, 96, 3)
    assert read_frame_numbers(frames) == idx
    small = dec.read_tensor(barcode_avi, idx, size=(48, 32))
    assert tuple(small.shape) == (5, 32, 48, 3) and small.dtype == torch.uint8
    assert read_frame_numbers(small.numpy()) == idx
    with pytest.raises(IndexError, match="40 frames"):
        dec.read(barcode_avi, [39, 40])


def test_torchcodec_decoder_device_errors(fake_torchcodec, barcode_avi, monkeypatch):
    with pytest.raises(ValueError, match="cpu.*cuda"):
        TorchCodecDecoder(device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        TorchCodecDecoder(device="cuda")
    # NVDEC unavailable: torchcodec would quietly decode on the CPU; vidssl says so instead.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    fake_torchcodec["fallback"] = True
    dec = TorchCodecDecoder(device="cuda")
    with pytest.raises(RuntimeError, match="on the CPU, not with NVDEC"):
        dec.read(barcode_avi, [1])
    ok = TorchCodecDecoder(device="cuda", allow_cpu_fallback=True)
    assert read_frame_numbers(ok.read(barcode_avi, [3])) == [3]


def test_ffmpeg_library_dir_links_pyav_ffmpeg_under_plain_sonames(tmp_path):
    folder = ffmpeg_library_dir(tmp_path)
    if folder is None:
        pytest.skip("this PyAV wheel bundles no FFmpeg libraries")
    names = {p.name for p in folder.iterdir()}
    for lib in ("avutil", "avcodec", "avformat", "swscale"):
        plain = [n for n in names if n.startswith(f"lib{lib}.so.")]
        assert len(plain) == 1, (lib, sorted(names))
        assert (folder / plain[0]).resolve().is_file()
    # The bundled dependencies resolve from the same folder ($ORIGIN of the linked libraries).
    assert any(n.startswith("libavcodec-") for n in names)
