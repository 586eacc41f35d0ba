"""`vidssl embed` killed with SIGKILL mid-shard, then run again: every video embedded once."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe (POSIX)")
def test_embed_killed_mid_shard_resumes_with_every_video_once(tmp_path, tiny_video_root):
    from vidssl.cli import main
    from vidssl.evaluation.embed import (
        ClipSettings,
        embed_videos,
        find_videos,
        load_embeddings,
        load_encoder,
    )

    videos = find_videos(tiny_video_root / "UCF-101")[:6]
    # The last video is a named pipe at first: opening it blocks until someone writes to it, so
    # the run stops there for sure, with shards 0 and 1 (videos 0-3) written and video 4 only
    # in memory. No timing decides where the kill lands.
    blocked = tmp_path / "last.avi"
    os.mkfifo(blocked)
    listed = videos[:5] + [str(blocked)]
    (tmp_path / "videos.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "vidssl", "embed", "r3d_18", "--random-init", "--width-mult",
           "0.0625", str(tmp_path / "videos.txt"), "-o", str(out), "--num-clips", "2",
           "--clip-len", "4", "--crop-size", "32", "--num-workers", "0", "--batch-size", "1",
           "--shard-size", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
        while not (out / "shard-000001.npz").exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no second shard was written"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "shard-000002.npz").exists()

    # The same command again, now that the last video is a real file.
    blocked.unlink()
    shutil.copy(videos[5], blocked)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    shards = sorted(out.glob("*shard*"))
    assert [s.name for s in shards] == [f"shard-{i:06d}.npz" for i in range(3)]
    positions = np.concatenate([np.load(s)["positions"] for s in shards])
    assert sorted(positions.tolist()) == list(range(6))  # each video exactly once

    # Identical to an uninterrupted run (the random-init model is seeded).
    encoder, info = load_encoder("r3d_18", backbone_kwargs={"width_mult": 0.0625},
                                 random_init=True)
    reference = embed_videos(encoder, listed, tmp_path / "ref",
                             ClipSettings(num_clips=2, clip_len=4, crop_size=32), info,
                             progress=False)
    resumed = load_embeddings(out)
    assert resumed.paths == listed and not resumed.failed
    np.testing.assert_allclose(resumed.features, reference.features, rtol=1e-5, atol=1e-6)
    assert main(["index", str(out)]) == 0
