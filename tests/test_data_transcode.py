"""transcode: H.264 MP4 copies keep every frame in order and take decord's fast exact path."""

from __future__ import annotations

import numpy as np

from vidssl.data.decoding import DecordDecoder
from vidssl.data.index import probe_video, read_ucf101
from vidssl.data.synthetic import (
    numbered_frames,
    read_frame_numbers,
    write_synthetic_dataset,
    write_video,
)
from vidssl.data.transcode import transcode_dataset, transcode_video


def test_transcode_video_keeps_frames_in_order(tmp_path):
    src = tmp_path / "numbered.avi"
    write_video(src, numbered_frames(40), codec="mpeg4", max_b_frames=2)
    assert probe_video(str(src)).exact
    dst = tmp_path / "out.mp4"
    assert transcode_video(src, dst, short_side=24, keyframe_interval=8) == 40
    info = probe_video(str(dst))
    assert (info.num_frames, info.width, info.height, info.exact) == (40, 36, 24, False)
    assert info.codec == "h264" and abs(info.fps - 25) < 1e-6
    idx = np.array([39, 0, 17, 8, 25])
    got = DecordDecoder().read(str(dst), idx, exact=info.exact)
    assert read_frame_numbers(got) == idx.tolist()


def test_transcode_dataset_keeps_layout_and_splits(tmp_path):
    write_synthetic_dataset(tmp_path / "src", num_classes=2, videos_per_class=3, num_frames=8)
    results = transcode_dataset(tmp_path / "src", tmp_path / "dst", num_workers=1)
    assert len(results) == 6 and all(r.error == "" and r.frames == 8 for r in results)
    train = read_ucf101(tmp_path / "dst", subset="train")
    assert len(train) == 4 and all(p.endswith(".mp4") for p in train.paths)
    assert train.labels.tolist() == read_ucf101(tmp_path / "src", subset="train").labels.tolist()
    again = transcode_dataset(tmp_path / "src", tmp_path / "dst", num_workers=1)
    assert {r.error for r in again} == {"skipped"}
