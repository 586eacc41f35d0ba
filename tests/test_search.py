"""Similarity search: the faiss index against an independent numpy computation."""

import os
import subprocess

import numpy as np
import pytest

from vidssl.evaluation.search import (
    SearchIndex,
    brute_force_search,
    default_nlist,
    l2_normalize,
)


def _features(n=300, d=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_l2_normalize_unit_rows_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    y = l2_normalize(x)
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]])
    assert y.dtype == np.float32


def test_flat_index_matches_cosine_similarity_computed_by_hand():
    x = _features()
    paths = [f"v{i}.mp4" for i in range(len(x))]
    index = SearchIndex.build(x, paths, kind="flat")
    q = _features(5, seed=1)
    scores, ids = index.search_arrays(q, k=7)
    # Independent reference: cosine similarity by its definition, full sort.
    cos = (q @ x.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(x, axis=1)[None]
    ref_ids = np.argsort(-cos, axis=1)[:, :7]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(cos, ref_ids, 1), rtol=1e-5, atol=1e-6)
    hits = index.search(q[0], k=3)[0]
    assert [h.path for h in hits] == [paths[i] for i in ref_ids[0, :3]]
    assert [h.rank for h in hits] == [1, 2, 3]


def test_brute_force_baseline_agrees_with_faiss():
    x, q = _features(), _features(4, seed=2)
    s1, i1 = brute_force_search(x, q, 10)
    s2, i2 = SearchIndex.build(x, [str(i) for i in range(len(x))], kind="flat").search_arrays(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)


def test_ivf_index_finds_a_stored_vector_first_and_reports_its_kind():
    x = _features(2000, 8)
    index = SearchIndex.build(x, [str(i) for i in range(len(x))], kind="ivf", nprobe=64)
    assert index.kind == "ivf"
    assert index.index.nlist == default_nlist(2000)
    scores, ids = index.search_arrays(x[:20], k=1)
    # Every vector is its own nearest neighbour at cosine 1 (its cell is always probed).
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_auto_kind_is_exact_for_small_sets():
    index = SearchIndex.build(_features(50), [str(i) for i in range(50)])
    assert index.kind == "flat" and index.meta["kind"] == "flat"


def test_save_load_round_trip_and_exclude_self(tmp_path):
    x = _features(100)
    paths = [f"/videos/{i}.mp4" for i in range(100)]
    SearchIndex.build(x, paths, meta={"source": "model.ckpt"}).save(tmp_path / "idx")
    index = SearchIndex.load(tmp_path / "idx")
    assert index.paths == paths and index.meta["source"] == "model.ckpt"
    np.testing.assert_allclose(index.feature_of(paths[3]), l2_normalize(x[3])[0], atol=1e-6)
    hits = index.search(x[3], k=5, exclude=[paths[3]])[0]
    assert len(hits) == 5 and paths[3] not in [h.path for h in hits]
    assert index.search(x[3], k=1)[0][0].path == paths[3]


def test_errors_say_what_is_wrong(tmp_path):
    x = _features(10)
    with pytest.raises(ValueError, match="unknown index kind 'hnsw'.*flat"):
        SearchIndex.build(x, [str(i) for i in range(10)], kind="hnsw")
    with pytest.raises(ValueError, match="10 feature rows but 3 paths"):
        SearchIndex.build(x, ["a", "b", "c"])
    index = SearchIndex.build(x, [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="size 4 but the index holds size 16"):
        index.search(np.ones(4))
    with pytest.raises(FileNotFoundError, match="not a vidssl search index"):
        SearchIndex.load(tmp_path)


# ---------------------------------------------------------------------- embedding export
@pytest.fixture(scope="module")
def tiny_encoder():
    from vidssl.evaluation.embed import load_encoder

    return load_encoder("r3d_18", backbone_kwargs={"width_mult": 0.0625}, random_init=True)


def _settings():
    from vidssl.evaluation.embed import ClipSettings

    return ClipSettings(num_clips=2, clip_len=4, crop_size=32)


def test_embed_resumes_after_an_interruption_and_records_failures(tmp_path, tiny_video_root,
                                                                  tiny_encoder):
    from vidssl.evaluation.embed import embed_videos, find_videos, read_clips

    encoder, info = tiny_encoder
    videos = find_videos(tiny_video_root / "UCF-101")[:9]
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"not a video")
    videos.insert(4, str(broken))
    reference = embed_videos(encoder, videos, tmp_path / "ref", _settings(), info,
                             shard_size=3, progress=False)
    assert len(reference.paths) == 9 and str(broken) in reference.failed[0]

    calls = []

    def interrupted(path, settings):
        if len(calls) == 7:
            raise KeyboardInterrupt  # the user presses Ctrl-C while the 8th video decodes
        calls.append(path)
        return read_clips(path, settings)

    with pytest.raises(KeyboardInterrupt):
        embed_videos(encoder, videos, tmp_path / "emb", _settings(), info, shard_size=3,
                     batch_size=1, progress=False, reader=interrupted)
    # Two shards of 3 were completed (videos 0-5, the broken one included); 6 is lost.
    calls.clear()

    def counting(path, settings):
        calls.append(path)
        return read_clips(path, settings)

    resumed = embed_videos(encoder, videos, tmp_path / "emb", _settings(), info, shard_size=3,
                           progress=False, reader=counting)
    assert calls == videos[6:]
    assert resumed.paths == reference.paths and resumed.failed == reference.failed
    np.testing.assert_allclose(resumed.features, reference.features, rtol=1e-5, atol=1e-6)


def test_embed_refuses_to_mix_settings(tmp_path, tiny_video_root, tiny_encoder):
    from vidssl.evaluation.embed import (
        ClipSettings,
        EmbeddingsMismatchError,
        embed_videos,
        find_videos,
    )

    encoder, info = tiny_encoder
    videos = find_videos(tiny_video_root / "UCF-101")[:2]
    embed_videos(encoder, videos, tmp_path, _settings(), info, progress=False)
    with pytest.raises(EmbeddingsMismatchError, match="clip settings"):
        embed_videos(encoder, videos, tmp_path, ClipSettings(num_clips=3, clip_len=4,
                                                             crop_size=32), info, progress=False)
    out = embed_videos(encoder, videos[:1], tmp_path, _settings(), info, progress=False,
                       overwrite=True)
    assert out.paths == videos[:1]


def test_multi_clip_feature_is_the_mean_of_single_clip_features(tiny_video_root, tiny_encoder):
    from vidssl.evaluation.embed import ClipSettings, embed_paths

    encoder, _ = tiny_encoder
    video = sorted((tiny_video_root / "UCF-101").rglob("*.avi"))[0]
    both = embed_paths(encoder, [video], ClipSettings(num_clips=2, clip_len=4, crop_size=32))

    # The two clips of num_clips=2 start at the first and the last possible frame
    # (uniform_clips); compute each alone with a reader returning that clip only.
    from vidssl.evaluation.embed import read_clips

    clips = read_clips(str(video), ClipSettings(num_clips=2, clip_len=4, crop_size=32))
    singles = [embed_paths(encoder, [video], ClipSettings(num_clips=1, clip_len=4, crop_size=32),
                           reader=lambda p, s, c=c: c[None]) for c in clips]
    np.testing.assert_allclose(both, (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-6)


def test_find_videos_reads_folders_and_list_files(tmp_path, tiny_video_root):
    from vidssl.evaluation.embed import find_videos

    found = find_videos(tiny_video_root)
    assert len(found) == 24 and found == sorted(found)
    (tmp_path / "list.txt").write_text(f"# two videos\n{found[0]}\n\n{found[1]}\n")
    assert find_videos(tmp_path / "list.txt") == found[:2]
    with pytest.raises(FileNotFoundError, match="no videos"):
        find_videos(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else "")


def _noise_video(path, width, height, num_frames=12, seed=0):
    from vidssl.data.synthetic import write_video

    rng = np.random.default_rng(seed)
    write_video(path, rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8))
    return str(path)


def test_embed_batches_videos_of_different_aspect_ratios(tmp_path, tiny_encoder):
    from vidssl.evaluation.embed import embed_paths, embed_videos

    encoder, info = tiny_encoder
    # Landscape 2:1, portrait 3:5 and 4:3: decoded at short side 32 they are 64x32, 32x53, 43x32.
    videos = [_noise_video(tmp_path / f"{w}x{h}.avi", w, h, seed=i)
              for i, (w, h) in enumerate([(96, 48), (48, 80), (64, 48)])]
    emb = embed_videos(encoder, videos, tmp_path / "emb", _settings(), info, batch_size=3,
                       progress=False)
    assert emb.paths == videos and emb.failed == []
    # Each video is cropped on its own: its feature is the one it has when embedded alone.
    alone = np.concatenate([embed_paths(encoder, [v], _settings()) for v in videos])
    np.testing.assert_allclose(emb.features, alone, rtol=1e-5, atol=1e-6)


def test_embed_real_clips_of_different_aspect_ratios(tmp_path, real_videos, tiny_encoder):
    from vidssl.evaluation.embed import embed_videos

    encoder, info = tiny_encoder
    videos = [str(real_videos / "Megamind.avi"), str(real_videos / "tree.avi")]  # 720x528, 4:3
    emb = embed_videos(encoder, videos, tmp_path, _settings(), info, progress=False)
    assert emb.paths == videos and emb.features.shape[0] == 2


def test_resume_and_index_ignore_a_half_written_shard(tmp_path, tiny_video_root, tiny_encoder,
                                                      capsys):
    from vidssl.cli import main
    from vidssl.evaluation.embed import embed_videos, find_videos, load_embeddings

    encoder, info = tiny_encoder
    videos = find_videos(tiny_video_root / "UCF-101")[:4]
    emb = tmp_path / "emb"
    reference = embed_videos(encoder, videos, emb, _settings(), info, shard_size=2,
                             batch_size=2, progress=False)
    # A run killed while writing its second shard: the shard is missing and a torn temporary
    # file is left, under the name older versions used and under the current one.
    (emb / "shard-000001.npz").unlink()
    for torn in ("shard-000001.tmp.npz", ".shard-000001.npz.tmp"):
        (emb / torn).write_bytes(b"PK\x03\x04 half a zip")
    partial = load_embeddings(emb)
    assert partial.paths == videos[:2] and partial.meta["incomplete"] == 2
    assert main(["index", str(emb)]) == 0
    assert "2 videos of" in capsys.readouterr().err  # the "not embedded yet" warning

    resumed = embed_videos(encoder, videos, emb, _settings(), info, shard_size=2,
                           batch_size=2, progress=False)
    assert resumed.paths == videos
    np.testing.assert_allclose(resumed.features, reference.features, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in emb.iterdir() if p.is_file()) == \
        ["meta.json", "shard-000000.npz", "shard-000001.npz", "videos.txt"]

    # A finished shard that is damaged is named in a one-line error.
    (emb / "shard-000001.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert main(["index", str(emb)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vidssl index: error:") and "shard-000001.npz is damaged" in err
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------------- CLI errors
@pytest.fixture
def unwritable(tmp_path):
    """An existing folder the OS refuses writes into (mode 555; immutable when run as root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores modes; the immutable flag stops root too
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root where chattr +i is not allowed: no unwritable folder")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def _cli_embed_args(videos, out):
    return ["embed", "r3d_18", "--random-init", "--width-mult", "0.0625", str(videos), "-o",
            str(out), "--num-clips", "2", "--clip-len", "4", "--crop-size", "32",
            "--num-workers", "0"]


def _one_line_error(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"vidssl {command}: error: ")
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_unwritable_output_folders_are_one_line_errors(tmp_path, tiny_video_root, unwritable,
                                                       capsys):
    from vidssl.cli import main

    videos = tiny_video_root / "UCF-101"
    for out in (unwritable, unwritable / "emb"):  # an existing folder, a new one inside
        assert main(_cli_embed_args(videos, out)) == 2
        line = _one_line_error(capsys, "embed")
        assert str(unwritable) in line and "-o DIR" in line
    assert not list(unwritable.iterdir())

    emb = tmp_path / "emb"
    assert main(_cli_embed_args(videos, emb)) == 0
    for out in (unwritable, unwritable / "index"):
        assert main(["index", str(emb), "-o", str(out)]) == 2
        line = _one_line_error(capsys, "index")
        assert str(unwritable) in line and "-o INDEX" in line


def test_unreadable_query_videos_are_one_line_errors(tmp_path, tiny_video_root, capsys):
    from vidssl.cli import main

    videos = sorted((tiny_video_root / "UCF-101").rglob("*.avi"))
    emb = tmp_path / "emb"
    assert main(_cli_embed_args(videos[0].parent, emb)) == 0
    assert main(["index", str(emb)]) == 0
    text = tmp_path / "notes.mp4"
    text.write_text("a text file, renamed\n")
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(videos[0].read_bytes()[:300])
    for query in (text, truncated):
        capsys.readouterr()
        assert main(["search", str(emb / "index"), str(query)]) == 2
        line = _one_line_error(capsys, "search")
        assert f"cannot read {query}" in line and "re-encode" in line
