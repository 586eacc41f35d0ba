"""Index readers, probing and the manifest cache, synthetic data writer."""

from __future__ import annotations

import numpy as np
import pytest

from vidssl.data import index as vindex
from vidssl.data.index import (
    read_class_folders,
    read_csv,
    read_folder,
    read_hmdb51,
    read_index,
    read_ucf101,
    split_list_line,
)
from vidssl.data.synthetic import MOTIONS, render_video, write_synthetic_dataset


def test_synthetic_is_deterministic_and_differs_by_motion():
    a = render_video("MoveLeft", np.random.default_rng(3), num_frames=8)
    b = render_video("MoveLeft", np.random.default_rng(3), num_frames=8)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 48, 64, 3) and a.dtype == np.uint8
    # Same appearance draw, different motion: first frames differ only by the motion's offset.
    right = render_video("MoveRight", np.random.default_rng(3), num_frames=8)
    assert not np.array_equal(a[-1], right[-1])
    # The blob moves: frames are not all the same.
    assert np.abs(a[0].astype(int) - a[-1]).mean() > 1
    with pytest.raises(ValueError, match="MoveLeft"):
        render_video("Jump", np.random.default_rng(0))


def test_shared_appearance_leaves_only_motion_to_tell_videos_apart():
    from vidssl.data.synthetic import draw_appearance

    look = draw_appearance(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    a, b = (render_video(m, rng, num_frames=8, appearance=look) for m in ("MoveLeft", "ZoomIn"))
    # Same background colour in the corner, and the same texture colours in both videos ...
    np.testing.assert_array_equal(a[0, 0, 0], look[1])
    np.testing.assert_array_equal(b[0, 0, 0], look[1])
    colours = lambda v: {tuple(c) for c in v.reshape(-1, 3)}  # noqa: E731
    assert colours(a) == colours(b) <= colours(look[0][None]) | {tuple(look[1])}
    # ... while each video without a shared look has its own background.
    c, d = (render_video("MoveLeft", np.random.default_rng(s), num_frames=2) for s in (2, 3))
    assert not np.array_equal(c[0, 0, 0], d[0, 0, 0])


def test_ucf101_layout_and_reader(tiny_video_root):
    ann = tiny_video_root / "ucfTrainTestlist"
    lines = (ann / "classInd.txt").read_text().split()
    assert lines[:4] == ["1", MOTIONS[0], "2", MOTIONS[1]]
    train = read_ucf101(tiny_video_root, split=1, subset="train")
    test = read_ucf101(tiny_video_root / "UCF-101", split=1, subset="test")
    assert len(train) == 16 and len(test) == 8
    assert set(train.paths) & set(test.paths) == set()
    # Labels: 0-based, from the class folder, matching the 1-based trainlist labels.
    first = (ann / "trainlist01.txt").read_text().split("\n")[0].split()
    assert train.labels[0] == int(first[1]) - 1
    for p, y in zip(test.paths, test.labels):
        assert f"/{train.class_names[y]}/" in p
    assert read_index(tiny_video_root, subset="test").paths.tolist() == test.paths.tolist()


def test_hmdb51_reader(tmp_path):
    root = write_synthetic_dataset(
        tmp_path, num_classes=2, videos_per_class=4, num_frames=4, layout="hmdb51"
    )
    # Mark one video "unused" (0) in split 2 to check that 0 lines are skipped.
    f = tmp_path / "testTrainMulti_7030_splits" / f"{MOTIONS[0]}_test_split2.txt"
    lines = f.read_text().split("\n")
    lines[0] = lines[0].split()[0] + " 0"
    f.write_text("\n".join(lines))
    train = read_hmdb51(tmp_path, split=1, subset="train")
    test = read_hmdb51(root, split=1, subset="test")
    assert len(train) == 6 and len(test) == 2
    assert train.class_names == sorted([MOTIONS[0], MOTIONS[1]])
    assert len(read_hmdb51(tmp_path, split=2, subset="train")) == 5
    assert read_index(tmp_path).class_names == train.class_names


def test_folder_class_folder_and_csv_readers(tiny_video_root, tmp_path):
    classes = read_class_folders(tiny_video_root / "UCF-101")
    assert len(classes) == 24 and classes.class_names == sorted(MOTIONS[:4])
    assert np.bincount(classes.labels).tolist() == [6, 6, 6, 6]
    flat = read_folder(tiny_video_root / "UCF-101")
    assert (flat.labels == -1).all() and sorted(flat.paths) == sorted(classes.paths)
    csv = tmp_path / "m.csv"
    rel = [str(p) for p in classes.paths[:3]]
    csv.write_text(f"path,label\n{rel[0]},MoveUp\n{rel[1]},\n{rel[2]},MoveDown\n")
    idx = read_csv(csv)
    assert idx.class_names == ["MoveDown", "MoveUp"] and idx.labels.tolist() == [1, -1, 0]
    csv.write_text(f"{rel[0]},3\n{rel[1]},1\n")
    assert read_csv(csv).labels.tolist() == [3, 1]
    with pytest.raises(ValueError, match="class_folders"):
        read_index(tiny_video_root, format="nope")


def test_split_list_line_keeps_spaces_and_takes_only_an_integer_label():
    assert split_list_line("my videos/a b.mp4 3") == ("my videos/a b.mp4", 3)
    assert split_list_line("  my videos/a b.mp4  ") == ("my videos/a b.mp4", None)
    assert split_list_line("clip 2.mp4") == ("clip 2.mp4", None)  # "2.mp4" is no label
    assert split_list_line("a.avi\t-1") == ("a.avi", -1)
    assert split_list_line("a.avi") == ("a.avi", None)


def test_paths_with_spaces_survive_every_list_reader(tmp_path):
    from vidssl.evaluation.embed import find_videos

    ucf = tmp_path / "UCF-101"
    for rel in ("Jump/v a b.avi", "Run Fast/v c d.avi", "Run Fast/v e.avi"):
        (ucf / rel).parent.mkdir(parents=True, exist_ok=True)
        (ucf / rel).write_bytes(b"")
    ann = tmp_path / "ucfTrainTestlist"
    ann.mkdir()
    (ann / "classInd.txt").write_text("1 Jump\n2 Run Fast\n")
    (ann / "trainlist01.txt").write_text("Jump/v a b.avi 1\nRun Fast/v c d.avi 2\n")
    (ann / "testlist01.txt").write_text("Run Fast/v e.avi\n")
    train = read_ucf101(tmp_path, split=1, subset="train")
    assert train.paths.tolist() == [str(ucf / "Jump/v a b.avi"), str(ucf / "Run Fast/v c d.avi")]
    assert train.labels.tolist() == [0, 1] and train.class_names == ["Jump", "Run Fast"]
    assert read_ucf101(tmp_path, split=1, subset="test").paths.tolist() == [
        str(ucf / "Run Fast/v e.avi")
    ]
    # A plain list (.txt, read as a CSV without commas) and find_videos read the same lines.
    lst = tmp_path / "list.txt"
    lst.write_text("UCF-101/Jump/v a b.avi 3\n# comment\nUCF-101/Run Fast/v e.avi\n")
    idx = read_index(lst)
    assert idx.paths.tolist() == [str(ucf / "Jump/v a b.avi"), str(ucf / "Run Fast/v e.avi")]
    assert idx.labels.tolist() == [3, -1]
    assert find_videos(lst) == idx.paths.tolist()
    # CSV columns keep spaces too.
    (tmp_path / "m.csv").write_text("path,label\nUCF-101/Jump/v a b.avi,Jump\n")
    assert read_csv(tmp_path / "m.csv").paths.tolist() == [str(ucf / "Jump/v a b.avi")]
    # HMDB51 split lines "<file> <0|1|2>" with spaces in the file name.
    hmdb = tmp_path / "hmdb"
    (hmdb / "testTrainMulti_7030_splits").mkdir(parents=True)
    (hmdb / "testTrainMulti_7030_splits" / "wave_test_split1.txt").write_text(
        "my clip 1.avi 1\nother clip.avi 2\n"
    )
    assert read_hmdb51(hmdb, 1, "train").paths.tolist() == [str(hmdb / "wave" / "my clip 1.avi")]
    assert read_hmdb51(hmdb, 1, "test").paths.tolist() == [str(hmdb / "wave" / "other clip.avi")]


def test_probe_fills_metadata_and_caches(tiny_video_root, tmp_path, monkeypatch):
    idx = read_ucf101(tiny_video_root, subset="test")
    assert isinstance(idx.paths, np.ndarray) and idx.paths.dtype.kind == "U"
    idx.probe(cache_dir=tmp_path)
    assert (idx.num_frames == 16).all() and (idx.width == 64).all() and (idx.height == 48).all()
    assert np.allclose(idx.fps, 25) and not idx.exact.any()
    # Second start: served from the manifest, the prober is not called.
    calls = []
    monkeypatch.setattr(vindex, "probe_video", lambda p: calls.append(p))
    again = read_ucf101(tiny_video_root, subset="test").probe(cache_dir=tmp_path)
    assert calls == [] and again.num_frames.tolist() == idx.num_frames.tolist()


def test_probe_reprobes_changed_and_flags_unreadable(tmp_path):
    from vidssl.data.synthetic import write_video

    good = tmp_path / "a.avi"
    write_video(good, np.zeros((6, 16, 16, 3), np.uint8))
    bad = tmp_path / "b.avi"
    bad.write_bytes(b"not a video at all" * 10)
    idx = read_folder(tmp_path).probe(cache_dir=tmp_path / "c")
    assert idx.num_frames.tolist() == [6, 0]
    write_video(good, np.zeros((9, 16, 16, 3), np.uint8))  # size/mtime change -> re-probe
    assert read_folder(tmp_path).probe(cache_dir=tmp_path / "c").num_frames.tolist() == [9, 0]
    assert len(read_folder(tmp_path).probe(cache_dir=tmp_path / "c", drop_unreadable=True)) == 1


def test_probe_real_videos_frame_counts(real_videos, tmp_path):
    idx = read_folder(real_videos).probe(cache_dir=tmp_path)
    by_name = {p.rsplit("/", 1)[1]: (n, e) for p, n, e in zip(idx.paths, idx.num_frames, idx.exact)}
    # Counts from the README of the sample folder (tree.avi's header claims 444 frames).
    assert by_name["tree.avi"][0] == 68 and by_name["vtest.avi"][0] == 795
    assert by_name["Megamind.avi"] == (270, True)
    assert not by_name["vtest.avi"][1]
