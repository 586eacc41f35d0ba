"""Motion sources: stored optical flow and compressed-stream motion vectors, checked against a
sprite that moves by a known vector per frame."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from vidssl.cli import main
from vidssl.data import motion_vectors as mv_module
from vidssl.data.flow import (
    FlowMissingError,
    compute_flow,
    dequantize_flow,
    flow_dataset,
    flow_path,
    load_flow_manifest,
    missing_flow,
    quantize_flow,
    read_flow,
)
from vidssl.data.motion_vectors import rasterize_motion_vectors, read_motion_vectors
from vidssl.data.synthetic import moving_sprite, write_video

pytest.importorskip("cv2")
ROOT = Path(__file__).resolve().parents[1]


def _interior(mask: np.ndarray, step: int = 1) -> np.ndarray:
    """The sprite minus a margin (edges mix sprite and background motion)."""
    return binary_erosion(mask[::step, ::step], iterations=max(2, 8 // step))


@pytest.fixture(scope="module")
def sprite_videos(tmp_path_factory):
    """Two sprite videos in a folder: ``a/right_down.avi`` (+2, +1) and ``left_up.avi`` (-3, -1)."""
    root = tmp_path_factory.mktemp("sprites")
    (root / "a").mkdir()
    videos = {}
    for rel, v in (("a/right_down.avi", (2, 1)), ("left_up.avi", (-3, -1))):
        frames, masks = moving_sprite(num_frames=8, width=96, height=64, velocity=v, sprite=32)
        write_video(root / rel, frames, codec="mpeg4")
        videos[rel] = (v, masks)
    return root, videos


def test_quantisation_maps_the_documented_codes():
    f = np.array([-25.0, -20.0, 0.0, 2.0, 20.0, 30.0])
    q = quantize_flow(f)
    # q = round((clip(f, -20, 20) + 20) * 255 / 40)
    assert q.tolist() == [0, 0, 128, 140, 255, 255]
    back = dequantize_flow(q, dtype=np.float32)
    assert np.allclose(back, [-20, -20, 0.0784, 1.9608, 20, 20], atol=1e-3)
    grid = np.linspace(-20, 20, 1001)
    assert np.abs(dequantize_flow(quantize_flow(grid), dtype=np.float32) - grid).max() <= 0.079


@pytest.mark.parametrize("method", ["tvl1", "dis"])
def test_flow_recovers_the_sprite_velocity(sprite_videos, method):
    root, videos = sprite_videos
    for rel, ((dx, dy), masks) in videos.items():
        codes, info = compute_flow(root / rel, method=method, short_side=None)
        assert codes.dtype == np.uint8 and codes.shape == (8, 64, 96, 2)
        assert info["frames"] == 8 and (info["width"], info["height"]) == (96, 64)
        flow = dequantize_flow(codes, dtype=np.float32)
        for t in range(7):  # flow t: frame t -> t + 1, on frame t's pixels
            med = np.median(flow[t][_interior(masks[t])], axis=0)
            assert np.allclose(med, (dx, dy), atol=0.5), (rel, method, t, med)
            background = binary_erosion(~(masks[t] | masks[t + 1]), iterations=6)
            assert np.abs(np.median(flow[t][background], axis=0)).max() < 0.5
        assert np.array_equal(codes[-1], codes[-2])  # last frame repeats the flow before it


def test_flow_command_stores_reads_and_resumes(sprite_videos, tmp_path, capsys):
    root, videos = sprite_videos
    dst = tmp_path / "flow"
    assert main(["flow", str(root), "-o", str(dst), "--method", "dis", "--short-side", "32",
                 "--workers", "1"]) == 0
    assert "flow of 2 videos written" in capsys.readouterr().out
    assert flow_path(dst, "a/right_down.avi") == dst / "a" / "right_down.npy"
    manifest = load_flow_manifest(dst)
    assert manifest["method"] == "dis" and manifest["bound"] == 20.0
    assert manifest["root"] == str(root.resolve()) and manifest["short_side"] == 32
    assert manifest["videos"]["a/right_down.avi"] == {"frames": 8, "width": 48, "height": 32,
                                                       "fps": 25.0}
    # Frames in any order with repeats, at the stored size and resized to the RGB size.
    idx = [5, 0, 5]
    small = read_flow(dst, "a/right_down.avi", idx)
    assert small.dtype == np.float16 and small.shape == (3, 32, 48, 2)
    codes = read_flow(dst, "a/right_down.avi", idx, quantized=True)
    assert codes.dtype == np.uint8 and np.array_equal(codes[0], codes[2])
    big = read_flow(dst, "a/right_down.avi", idx, size=(96, 64)).astype(np.float32)
    assert big.shape == (3, 64, 96, 2)
    _, masks = videos["a/right_down.avi"]
    med_big = np.median(big[1][_interior(masks[0])], axis=0)
    med_small = np.median(small[1][_interior(masks[0], 2)].astype(np.float32), axis=0)
    assert np.all(med_small > 0.3)
    assert np.allclose(med_big, 2 * med_small, atol=0.1), (med_big, med_small)  # scaled x2
    with pytest.raises(IndexError, match="8 frames"):
        read_flow(dst, "a/right_down.avi", [8])

    # A kill between the write and the rename leaves a hidden temporary; a kill before the
    # manifest flush leaves a finished file the manifest does not list. A re-run handles both.
    done = flow_path(dst, "left_up.avi")
    mtime = done.stat().st_mtime_ns
    redo = flow_path(dst, "a/right_down.avi")
    redo.unlink()
    leftover = redo.with_name(f".{redo.name}.tmp99999")
    leftover.write_bytes(b"half a file")
    (dst / "flow_manifest.json").write_text(json.dumps({**manifest, "videos": {}}))
    assert missing_flow(dst, [str(root / "a/right_down.avi"), "left_up.avi"]) == [
        str(root / "a/right_down.avi")]
    with pytest.raises(FlowMissingError, match="right_down.avi"):
        read_flow(dst, "a/right_down.avi", [0])
    assert main(["flow", str(root), "-o", str(dst), "--method", "dis", "--short-side", "32",
                 "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "flow of 1 videos written" in out and "(1 already there" in out
    assert done.stat().st_mtime_ns == mtime  # skipped, not recomputed
    assert redo.exists() and not leftover.exists()
    assert sorted(load_flow_manifest(dst)["videos"]) == ["a/right_down.avi", "left_up.avi"]
    assert missing_flow(dst, [str(root / "a/right_down.avi"), "left_up.avi"]) == []
    # Other settings in the same folder would mix two kinds of flow: refused.
    assert main(["flow", str(root), "-o", str(dst), "--method", "tvl1", "--short-side", "32"]) == 2
    assert "made with" in capsys.readouterr().err


def test_flow_is_a_listed_command(capsys):
    assert main([]) == 0
    assert "  flow " in capsys.readouterr().out


def test_damaged_videos_are_named_and_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    frames, _ = moving_sprite(num_frames=4, width=64, height=48, velocity=(1, 0), sprite=16)
    write_video(src / "good.avi", frames)
    (src / "noise.avi").write_bytes(np.random.default_rng(0).bytes(4096))
    args = ["flow", str(src), "-o", str(tmp_path / "flow"), "--method", "dis", "--workers", "1"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "flow of 1 videos written" in cap.out and "1 failed and skipped" in cap.out
    assert "noise.avi" in cap.err and "good.avi" not in cap.err
    assert main(args + ["--strict"]) == 1
    assert list(load_flow_manifest(tmp_path / "flow")["videos"]) == ["good.avi"]


def test_list_file_with_root_takes_paths_from_the_root(sprite_videos, tmp_path):
    root, _ = sprite_videos
    lst = tmp_path / "trainlist01.txt"
    lst.write_text("a/right_down.avi 1\n# a comment\n\n")
    results = flow_dataset(lst, tmp_path / "flow", method="farneback", short_side=16,
                           root=root, progress=False)
    assert [(r.rel, r.frames, r.error) for r in results] == [("a/right_down.avi", 8, "")]
    with pytest.raises(ValueError, match="holds flow of videos under"):  # rel paths would clash
        flow_dataset(lst, tmp_path / "flow", method="farneback", short_side=16, root=root / "a")
    # A symlinked video keeps its place under the root (its target may be anywhere).
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "l.avi").symlink_to(root / "left_up.avi")
    results = flow_dataset(tmp_path / "links", tmp_path / "flow3", method="farneback",
                           short_side=16, progress=False)
    assert [(r.rel, r.error) for r in results] == [("l.avi", "")]
    lst.write_text(f"{root / 'a/right_down.avi'}\n")  # absolute, outside the root given
    with pytest.raises(ValueError, match="not under the root"):
        flow_dataset(lst, tmp_path / "flow2", method="dis", root=tmp_path / "elsewhere")


@pytest.mark.slow
def test_killed_flow_command_leaves_only_complete_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # v0 is short and v1 long, so the kill after v0's file appears lands inside v1's work.
    for k, n in enumerate((4, 24, 4)):
        frames, _ = moving_sprite(num_frames=n, width=128, height=96, velocity=(1, 1), sprite=24)
        write_video(src / f"v{k}.avi", frames)
    dst = tmp_path / "flow"
    cmd = [sys.executable, "-m", "vidssl", "flow", str(src), "-o", str(dst), "--method", "tvl1",
           "--short-side", "48", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (dst / "v0.npy").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in dst.glob("*.npy")) == ["v0.npy"]  # v1 was not finished
    assert np.load(dst / "v0.npy").shape == (4, 48, 64, 2)
    assert len(list(dst.glob(".v1.npy.tmp*"))) <= 1  # hidden, never matched by a reader
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "flow of 2 videos written" in out.stdout and "(1 already there, 0 failed" in out.stdout
    assert sorted(p.name for p in dst.iterdir()) == [
        "flow_manifest.json", "v0.npy", "v1.npy", "v2.npy"]
    assert sorted(load_flow_manifest(dst)["videos"]) == ["v0.avi", "v1.avi", "v2.avi"]


# ---------------------------------------------------------------------------- motion vectors
def _sprite_file(tmp_path, codec: str, max_b_frames: int = 0, velocity=(2, 1), num_frames=12,
                 options=None):
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    frames, masks = moving_sprite(num_frames=num_frames, width=128, height=96, velocity=velocity,
                                  sprite=40 if num_frames <= 12 else 24)
    ext = {"libx264": "mp4", "mpeg2video": "mpg"}.get(codec, "avi")
    path = tmp_path / f"{codec}_{max_b_frames}_{num_frames}.{ext}"
    write_video(path, frames, codec=codec, max_b_frames=max_b_frames, options=options)
    return path, masks


@pytest.mark.parametrize("codec,velocity", [("mpeg4", (2, 1)), ("mpeg4", (-3, 2)),
                                            ("libx264", (2, 1)), ("libx264", (-3, 2))])
def test_motion_vectors_point_the_way_the_sprite_moves(tmp_path, codec, velocity):
    path, masks = _sprite_file(tmp_path, codec, velocity=velocity)
    idx = np.array([0, 3, 4, 5, 11])
    field, has = read_motion_vectors(str(path), idx, size=(64, 48), with_flags=True)
    assert field.dtype == np.float16 and field.shape == (5, 48, 64, 2)
    assert has.tolist() == [False, True, True, True, True]  # frame 0 is an I-frame
    assert not field[0].any()
    # Half the size: half the pixels per frame. Sign always right; H.264 blocks predicted from
    # an older reference report a multiple of the speed (docs/motion.md), so magnitude loosely.
    want = np.array(velocity) / 2
    for k, t in enumerate(idx[1:], start=1):
        med = np.median(field[k][_interior(masks[t], 2)].astype(np.float32), axis=0)
        assert np.all(np.sign(med) == np.sign(want)), (t, med)
        limit = 0.3 if codec == "mpeg4" else None
        if limit is not None:
            assert np.allclose(med, want, atol=limit), (t, med)
        else:
            assert np.all(np.abs(med) <= 3 * np.abs(want) + 0.3), (t, med)


def test_p_frame_vectors_are_divided_by_their_reference_distance(tmp_path):
    path, masks = _sprite_file(tmp_path, "mpeg4", max_b_frames=2)
    field, has = read_motion_vectors(str(path), [3, 1, 0], with_flags=True)
    # Frame 1 is a B-frame: FFmpeg's MPEG-4 Part 2 decoder exports zero vectors for every block
    # of a B-frame, which vidssl reports as "no vectors".
    assert has.tolist() == [True, False, False]
    # Frame 3 is a P-frame predicted from frame 0 (two B-frames between): 3 frames of motion.
    med = np.median(field[0][_interior(masks[3])].astype(np.float32), axis=0)
    assert np.allclose(med, (2, 1), atol=0.3), med


def test_b_frame_vectors_from_both_directions_agree(tmp_path):
    # MPEG-2 B-frames carry real vectors to the past and the future anchor (1-2 frames away
    # each): after the sign flip and the distance division every frame says (+2, +1).
    path, masks = _sprite_file(tmp_path, "mpeg2video", max_b_frames=2)
    with av.open(str(path)) as c:
        types = [int(f.pict_type) for f in c.decode(video=0)]
    assert types[1:3] == [3, 3]  # B-frames, so the test exercises them
    field = read_motion_vectors(str(path), range(1, 10)).astype(np.float32)
    for k, t in enumerate(range(1, 10)):
        med = np.median(field[k][_interior(masks[t])], axis=0)
        assert np.allclose(med, (2, 1), atol=0.3), (t, types[t], med)


def test_rasterize_paints_blocks_with_the_normalised_sign():
    dtype = [("source", "<i4"), ("w", "u1"), ("h", "u1"), ("dst_x", "<i2"), ("dst_y", "<i2"),
             ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")]
    # Block at x 0..16, y 0..16 whose content came from 4 px to the left in the previous frame
    # (src = dst + motion / scale): it moved right. A future-referenced block at x 16..32 whose
    # content goes 6 px up in the frame 2 ahead: it moves up 3 px per frame.
    mvs = np.array([(-1, 16, 16, 8, 8, -8, 0, 2), (1, 16, 16, 24, 8, 0, -12, 2)], dtype)
    field = rasterize_motion_vectors(mvs, (32, 32), (16, 16), distances=(1, 2))
    assert np.allclose(field[:8, :8], (2, 0))  # halved with the size
    assert np.allclose(field[:8, 8:], (0, -1.5))
    assert not field[8:].any()
    both = np.array([(-1, 16, 16, 8, 8, -8, 0, 2), (1, 16, 16, 8, 8, 4, 0, 2)], dtype)
    assert np.allclose(rasterize_motion_vectors(both, (16, 16), (16, 16)), (3, 0))  # mean


def test_motion_vectors_of_a_codec_without_them_are_flagged(tmp_path):
    if "mjpeg" not in av.codecs_available:
        pytest.skip("no mjpeg encoder")
    frames, _ = moving_sprite(num_frames=4, width=64, height=48, velocity=(1, 0), sprite=16)
    path = tmp_path / "v.avi"
    write_video(str(path), frames, codec="mjpeg")
    field, has = read_motion_vectors(str(path), [1, 2], with_flags=True)
    assert not has.any() and not field.any()
    with pytest.raises(IndexError, match="only 4 decodable frames"):
        read_motion_vectors(str(path), [4])


def _all_vectors(path, options: dict) -> list:
    """Every frame's raw motion-vector records (None without), decoded with ``options``."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = options
        out = []
        for frame in container.decode(stream):
            side = frame.side_data.get("MOTION_VECTORS")
            out.append(None if side is None else side.to_ndarray())
    return out


@pytest.mark.parametrize("codec,b,options", [("mpeg4", 0, None), ("mpeg4", 2, None),
                                             ("mpeg2video", 2, None), ("libx264", 0, None),
                                             ("libx264", 0, {"bf": "0"})])
def test_decoding_without_pixels_exports_the_same_vectors(tmp_path, codec, b, options):
    # The reader asks FFmpeg to skip the inverse transform, motion compensation and deblocking
    # (mv_module._MV_OPTIONS): the vectors are bitstream syntax and must come out bit-identical.
    path, _ = _sprite_file(tmp_path, codec, b, velocity=(1, 1), num_frames=30, options=options)
    full = _all_vectors(path, {"flags2": "+export_mvs"})
    fast = _all_vectors(path, dict(mv_module._MV_OPTIONS))
    assert mv_module._MV_OPTIONS["skip_idct"] == "all"
    assert len(fast) == len(full) == 30
    assert sum(m is not None and bool(np.any(m["motion_x"])) for m in full) >= 5  # not vacuous
    for k, (a, b_) in enumerate(zip(full, fast)):
        assert (a is None) == (b_ is None), k
        assert a is None or np.array_equal(a, b_), k


def _decode_from_frame_0(monkeypatch):
    """Make ``read_motion_vectors`` decode every frame from frame 0 (its fallback path)."""
    def refuse(*args):
        raise mv_module._JumpFailed

    monkeypatch.setattr(mv_module, "_decode_wanted", refuse)
    monkeypatch.setattr(mv_module, "_packets_from_keyframe", refuse)


@pytest.mark.parametrize("codec,b,options,path_taken", [
    ("mpeg4", 0, None, "wanted frames"),   # no B-frames: frame 0 and the wanted frames only
    ("libx264", 0, {"bf": "0"}, "key 36"),  # no B-frames: from the keyframe 36 on
    ("mpeg4", 2, None, "frame 0"),          # B-frames: every frame from frame 0
    ("libx264", 0, None, "frame 0"),
])
def test_a_clip_late_in_the_video_equals_the_sequential_decode(tmp_path, monkeypatch, codec, b,
                                                               options, path_taken):
    path, masks = _sprite_file(tmp_path, codec, b, velocity=(1, 1), num_frames=60,
                               options=options)
    idx = [49, 41, 45, 43, 41, 39]  # any order, a repeat; keyframes at 0, 12, 24, 36, 48
    taken = []
    wanted, jump = mv_module._decode_wanted, mv_module._packets_from_keyframe

    def spy_wanted(packets, want, last):
        taken.append("wanted frames")
        return wanted(packets, want, last)

    def spy_jump(packets, start):
        out = jump(packets, start)
        taken.append(f"key {out[1]}")
        return out

    monkeypatch.setattr(mv_module, "_decode_wanted", spy_wanted)
    monkeypatch.setattr(mv_module, "_packets_from_keyframe", spy_jump)
    field, has = read_motion_vectors(str(path), idx, size=(64, 48), with_flags=True)
    codes = read_motion_vectors(str(path), idx, size=(64, 48), quantized=True)
    assert taken == ([path_taken] * 2 if path_taken != "frame 0" else [])
    _decode_from_frame_0(monkeypatch)
    seq_field, seq_has = read_motion_vectors(str(path), idx, size=(64, 48), with_flags=True)
    assert np.array_equal(field, seq_field) and np.array_equal(has, seq_has)
    assert np.array_equal(codes, quantize_flow(seq_field))
    assert has.sum() >= 2 and field[has].any()  # vectors to compare: not vacuous
    if codec == "mpeg4" and not b:  # P-frames after the keyframe: the sprite's (+1, +1) / 2
        meds = [np.median(field[k][_interior(masks[t], 2)].astype(np.float32), axis=0)
                for k, t in enumerate(idx)]
        assert np.all(np.array(meds) > 0), meds
        assert np.allclose(np.median(meds, axis=0), (0.5, 0.5), atol=0.2), meds


def test_a_late_clip_of_a_real_video_equals_the_sequential_decode(real_videos, monkeypatch):
    # vtest.avi: MS-MPEG4 v3 (DivX 3), 795 frames, keyframes 0, 250, 500, 750, no B-frames:
    # only the wanted frames are decoded, across the keyframe 750 too.
    path = str(real_videos / "vtest.avi")
    idx = np.concatenate([np.arange(600, 632, 2), np.arange(740, 772, 2)])
    fast, has = read_motion_vectors(path, idx, size=(171, 128), with_flags=True)
    _decode_from_frame_0(monkeypatch)
    seq, seq_has = read_motion_vectors(path, idx, size=(171, 128), with_flags=True)
    assert has.sum() == len(idx) - 1 and np.array_equal(has, seq_has)  # 750 is an I-frame
    assert np.array_equal(fast, seq) and np.abs(fast).max() > 0.5


def _paint_by_hand(mvs, coded, size, distances):
    """Reference rasteriser: each block painted pixel by pixel at the coded size, then sampled."""
    acc = np.zeros((coded[1], coded[0], 2))
    cnt = np.zeros((coded[1], coded[0]))
    for r in mvs:
        d = distances[0] if r["source"] < 0 else distances[1]
        v = np.sign(r["source"]) / d * np.array([r["motion_x"], r["motion_y"]]) / max(
            int(r["motion_scale"]), 1)
        w, h, x, y = (int(r[n]) for n in ("w", "h", "dst_x", "dst_y"))
        acc[max(y - h // 2, 0):y + h // 2, max(x - w // 2, 0):x + w // 2] += v
        cnt[max(y - h // 2, 0):y + h // 2, max(x - w // 2, 0):x + w // 2] += 1
    field = acc / np.maximum(cnt, 1)[..., None]
    sx, sy = size[0] / coded[0], size[1] / coded[1]
    gx = ((np.arange(size[0]) + 0.5) / sx).astype(int)
    gy = ((np.arange(size[1]) + 0.5) / sy).astype(int)
    return field[gy][:, gx] * (sx, sy)


def _check_rasterized(records, coded, size):
    """The vectorised rasteriser against ``_paint_by_hand``; returns the uint8 codes."""
    distances = ([(1, 1), (2, 1), (1, 3)] * len(records))[:len(records)]
    fields = mv_module._rasterize_frames(records, distances, coded, size, np.float32)
    codes = mv_module._rasterize_frames(records, distances, coded, size, quantized=True)
    for k, mvs in enumerate(records):
        want = _paint_by_hand(mvs, coded, size, distances[k])
        assert np.allclose(fields[k], want, atol=1e-5), k
        assert np.array_equal(fields[k] == 0, want == 0), k  # still blocks read exactly 0
        assert np.array_equal(codes[k], quantize_flow(want.astype(np.float16))), k
        assert np.array_equal(rasterize_motion_vectors(mvs, coded, size, distances[k]), fields[k])
    return codes


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])  # 16x16/8x8 blocks; down to 4x4
def test_rasterized_frames_equal_blocks_painted_by_hand(tmp_path, codec):
    path, _ = _sprite_file(tmp_path, codec, velocity=(-3, 2))
    records = [m for m in _all_vectors(path, {"flags2": "+export_mvs"}) if m is not None]
    codes = _check_rasterized(records, (128, 96), (64, 48))
    assert (codes == 128).mean() > 0.5  # the background: no motion is code 128, never 127


def test_rasterized_frames_of_a_real_video_equal_blocks_painted_by_hand(real_videos):
    # 768x576 MS-MPEG4 blocks scaled to 171x128. A still block must read exactly 0 (code 128):
    # a running sum over the frame once left +-1e-7 there, coded 127 or 128 by its sign.
    records = _all_vectors(real_videos / "vtest.avi", {"flags2": "+export_mvs"})[1:9]
    _check_rasterized(records, (768, 576), (171, 128))


# ---------------------------------------------------------------------------- reader shortcuts
def _read_all_ways(path, idx, size):
    """Field, flags and codes of ``idx``: what the reader returns."""
    field, has = read_motion_vectors(str(path), idx, size=size, with_flags=True)
    return field, has, read_motion_vectors(str(path), idx, size=size, quantized=True)


def _assert_same_reads(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("codec,b", [("mpeg4", 0), ("mpeg4", 2), ("msmpeg4", 0), ("msmpeg4v2", 0),
                                     ("mpeg2video", 2), ("mpeg1video", 0), ("h263", 0),
                                     ("flv", 0)])
def test_a_low_resolution_decode_gives_the_full_resolution_fields(tmp_path, monkeypatch, codec,
                                                                    b):
    # MPEG-family decoders parse at 1/8 size (FFmpeg lowres): the same vectors, and the coded
    # size (the fields' scale) comes from the decoder, not from the small frames.
    path, _ = _sprite_file(tmp_path, codec, b, velocity=(1, 1), num_frames=30)
    idx = [27, 3, 4, 6, 21, 4, 18, 9]  # with B-frames: 3, 6, 9, 18, 21, 27 are P-frames
    seen = []
    coded_size = mv_module._coded_size

    def spy(decoded, ctx, low):
        seen.append((tuple(decoded), low))
        return coded_size(decoded, ctx, low)

    monkeypatch.setattr(mv_module, "_coded_size", spy)
    low = _read_all_ways(path, idx, (64, 48))
    assert seen and all(s == ((16, 12), True) for s in seen), seen  # 128x96 decoded at 1/8
    monkeypatch.setattr(mv_module, "_LOWRES_DECODERS", frozenset())
    seen.clear()
    full = _read_all_ways(path, idx, (64, 48))
    assert seen and all(s == ((128, 96), False) for s in seen), seen
    _assert_same_reads(low, full)
    assert low[1].sum() >= 3 and low[0][low[1]].any()  # vectors to compare: not vacuous
    _assert_same_reads(_read_all_ways(path, idx, None)[:2], (
        read_motion_vectors(str(path), idx, with_flags=True)))


def test_a_low_resolution_decode_that_fails_its_size_check_falls_back(tmp_path, monkeypatch):
    path, _ = _sprite_file(tmp_path, "mpeg4", 0, velocity=(1, 1), num_frames=30)
    idx = [3, 4, 20]
    want = _read_all_ways(path, idx, (64, 48))
    lows = []
    coded_size = mv_module._coded_size

    def refuse_lowres(decoded, ctx, low):
        lows.append(low)
        if low:
            raise mv_module._LowresFailed
        return coded_size(decoded, ctx, low)

    monkeypatch.setattr(mv_module, "_coded_size", refuse_lowres)
    _assert_same_reads(_read_all_ways(path, idx, (64, 48)), want)
    assert lows == [True, False] * 2  # tried at low resolution, then decoded in full


def test_the_motion_vector_records_have_pyav_s_layout(tmp_path):
    path, _ = _sprite_file(tmp_path, "mpeg4", velocity=(1, 1))
    with av.open(str(path)) as container:
        container.streams.video[0].codec_context.options = {"flags2": "+export_mvs"}
        sides = [f.side_data.get("MOTION_VECTORS") for f in container.decode(video=0)]
    sides = [s for s in sides if s is not None]
    assert len(sides) >= 5
    for side in sides:
        mine, theirs = mv_module._records(side), side.to_ndarray()
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)


def test_repeated_frames_painted_once_equal_each_frame_painted(tmp_path, real_videos):
    # The views of a sample share frames: each distinct frame is painted once and gathered.
    records = _all_vectors(real_videos / "vtest.avi", {"flags2": "+export_mvs"})[1:6]
    distances = [(1, 1), (2, 1), (1, 3), (1, 1), (2, 2)]
    select = np.array([4, 0, 0, 2, 4, 1, 3, 2])
    for kw in ({"dtype": np.float32}, {"quantized": True}):
        once = mv_module._rasterize_frames(records, distances, (768, 576), (171, 128),
                                           select=select, **kw)
        each = mv_module._rasterize_frames([records[k] for k in select],
                                           [distances[k] for k in select], (768, 576),
                                           (171, 128), **kw)
        assert once.dtype == each.dtype and np.array_equal(once, each)
        assert len({once[k].tobytes() for k in range(len(select))}) == 5  # 5 distinct fields
    # Through the reader: any order, repeats, each equal to reading its frame alone.
    path, _ = _sprite_file(tmp_path, "mpeg2video", 2, velocity=(1, 1), num_frames=30)
    idx = [7, 3, 7, 13, 3, 0, 5, 13]
    got = _read_all_ways(path, idx, (64, 48))
    alone = [_read_all_ways(path, [k], (64, 48)) for k in idx]
    _assert_same_reads(got, [np.concatenate([a[i] for a in alone]) for i in range(3)])
    assert got[1].sum() >= 6 and got[0][got[1]].any()  # B-frames with vectors too


def test_rasterize_takes_a_strided_slice_of_records(real_videos):
    records = _all_vectors(real_videos / "vtest.avi", {"flags2": "+export_mvs"})[3]
    every_other = records[::2]
    assert not every_other.flags.c_contiguous
    field = rasterize_motion_vectors(every_other, (768, 576), (171, 128))
    assert np.array_equal(field, rasterize_motion_vectors(every_other.copy(), (768, 576),
                                                          (171, 128)))
    assert field.any()
