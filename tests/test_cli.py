"""The vidssl command: LightningCLI subcommands, start-up errors and the plain tools."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vidssl.cli import main

TINY = {"backbone": "r3d_18", "backbone_kwargs": {"width_mult": 0.0625}}


def _config(tmp_path, root, model="SimCLR", **model_args):
    cfg = {
        "model": {"class_path": model, "init_args": {**TINY, **model_args}},
        "data": {
            "class_path": "VideoDataModule",
            "init_args": {
                "train": str(root),
                "clip_len": 4,
                "crop_size": 32,
                "short_side": 40,
                "batch_size": 4,
                "num_workers": 0,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_train_batches": 1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(tmp_path),
        },
    }
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_video_root):
    """A SimCLR checkpoint trained for one step through `vidssl fit`."""
    tmp = tmp_path_factory.mktemp("fit")
    cfg = _config(tmp, tiny_video_root)
    assert main(["fit", "--config", str(cfg), "--trainer.callbacks+=ModelCheckpoint",
                 f"--trainer.callbacks.dirpath={tmp / 'ckpt'}"]) == 0
    (ckpt,) = (tmp / "ckpt").glob("*.ckpt")
    return ckpt


def test_overview_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "embed", "index", "search",
                "export-backbone", "demo", "retrieval", "check-videos", "transcode"):
        assert f"  {cmd} " in out, cmd


def test_unknown_command_fails_with_the_list(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "embed" in err


def test_print_config_is_complete(tmp_path, tiny_video_root, capsys):
    cfg = _config(tmp_path, tiny_video_root, model="MoCo", queue_size=8)
    assert main(["fit", "--config", str(cfg), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data = printed["model"], printed["data"]
    assert model["class_path"] == "vidssl.methods.MoCo"
    assert model["init_args"]["queue_size"] == 8
    # every typed argument is there, defaults included
    assert model["init_args"]["version"] == 2 and "temperature" in model["init_args"]
    assert data["class_path"] == "vidssl.data.VideoDataModule"
    assert data["init_args"]["clip_len"] == 4 and data["init_args"]["stride"] == 2
    assert "max_epochs" in printed["trainer"]


def test_fit_builds_the_checkpoint_with_hyper_parameters(trained):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] == "r3d_18"
    assert ckpt["datamodule_hyper_parameters"]["clip_len"] == 4
    assert any(k.startswith("backbone.") for k in ckpt["state_dict"])


def test_unknown_backbone_fails_at_start_up_listing_the_known_ones(tmp_path, tiny_video_root,
                                                                   capsys):
    cfg = _config(tmp_path, tiny_video_root)
    assert main(["fit", "--config", str(cfg), "--model.init_args.backbone", "r3d_19"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'r3d_19'" in err and "r3d_18" in err
    assert "Traceback" not in err


def test_unknown_method_lists_the_valid_class_paths(tmp_path, tiny_video_root, capsys):
    cfg = _config(tmp_path, tiny_video_root)
    assert main(["fit", "--config", str(cfg), "--model", "SimCRL"]) == 2
    assert "vidssl.methods.SimCLR" in capsys.readouterr().err


def test_missing_data_folder_fails_before_training(tmp_path, tiny_video_root, capsys):
    cfg = _config(tmp_path, tiny_video_root)
    missing = tmp_path / "nope"
    assert main(["fit", "--config", str(cfg), f"--data.init_args.train={missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


def test_moco_queue_must_be_a_multiple_of_the_batch(tmp_path, tiny_video_root, capsys):
    cfg = _config(tmp_path, tiny_video_root, model="MoCo", queue_size=10)
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "queue_size=10" in err and "4 x 1 = 4" in err


def test_moco_without_drop_last_fails_at_start_up(tmp_path, tiny_video_root, capsys):
    cfg = _config(tmp_path, tiny_video_root, model="MoCo", queue_size=8)
    assert main(["fit", "--config", str(cfg), "--data.init_args.drop_last=false"]) == 2
    err = capsys.readouterr().err
    assert "needs data.drop_last=true" in err and "Traceback" not in err


def test_cluster_contrast_trains_with_any_queue_size(tmp_path, tiny_video_root, capsys):
    # 10 keys, batches of 4: MoCo's K % batch rule does not apply to its wrapping queue.
    cfg = _config(tmp_path, tiny_video_root, model="ClusterContrast", queue_size=10)
    assert main(["fit", "--config", str(cfg), "--data.init_args.drop_last=false",
                 "--trainer.limit_train_batches=3"]) == 0, capsys.readouterr().err


def test_cluster_triplet_config_needs_no_view_settings(tmp_path, tiny_video_root, capsys):
    # Pair sampling (PseudoLabels installs ClusterBatchSampler) and no repeat_anchor in the
    # config: the data module still gives the third view the temporal loss reads.
    cfg = _config(tmp_path, tiny_video_root, model="ClusterTriplet")
    callback = ("--trainer.callbacks={class_path: vidssl.callbacks.PseudoLabels, init_args: "
                "{method: kmeans, num_clusters: 2, every_n_epochs: 1}}")
    assert main(["fit", "--config", str(cfg), callback]) == 0, capsys.readouterr().err
    # A setting that contradicts the method's views is refused at start-up, naming the key.
    assert main(["fit", "--config", str(cfg), "--data.init_args.num_views=3"]) == 2
    err = capsys.readouterr().err
    assert "data.num_views=3 disagrees" in err and "anchor_repeat" in err


@pytest.mark.parametrize("section,key,typo,suggestion", [
    ("model", "init_args", "temprature", "temperature"),
    ("data", "init_args", "clip_lenn", "clip_len"),
    ("trainer", None, "max_epoch", "max_epochs"),
])
def test_config_key_typo_is_one_line_with_the_closest_keys(
    tmp_path, tiny_video_root, capsys, section, key, typo, suggestion
):
    cfg_path = _config(tmp_path, tiny_video_root)
    cfg = yaml.safe_load(cfg_path.read_text())
    (cfg[section][key] if key else cfg[section])[typo] = 1
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    where = f"{section}.init_args" if key else section
    assert len(err) == 1, err
    assert f"unknown key '{typo}' under {where}" in err[0] and repr(suggestion) in err[0]
    assert "usage" not in err[0] and "valid data class_path" not in err[0]


def test_unknown_data_class_suggests_the_right_one(tmp_path, tiny_video_root, capsys):
    cfg = _config(tmp_path, tiny_video_root)
    assert main(["fit", "--config", str(cfg), "--data", "VideoDataModul"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'vidssl.data.VideoDataModule'" in err and "usage" not in err


def test_non_positive_learning_rate_is_one_line(tmp_path, tiny_video_root, capsys):
    cfg = _config(tmp_path, tiny_video_root)
    assert main(["fit", "--config", str(cfg), "--model.init_args.optim.lr=-0.1"]) == 2
    err = capsys.readouterr().err
    assert "lr must be > 0, got -0.1" in err and "Traceback" not in err


def test_views_follow_the_method(tmp_path, tiny_video_root):
    from vidssl.cli import VidsslCLI

    # No repeat_anchor / num_views in the config: the data module follows the method.
    cfg = _config(tmp_path, tiny_video_root, model="ClusterTriplet")
    cli = VidsslCLI(["--config", str(cfg)], run=False)
    assert cli.datamodule.views == cli.model.views == ("anchor", "positive", "anchor_repeat")
    cli = VidsslCLI(["--config", str(cfg), "--model.init_args.temporal_weight=0"], run=False)
    assert cli.datamodule.views == cli.model.views == ("anchor", "positive")


def test_export_backbone_round_trips_through_build(trained, tmp_path, capsys):
    from vidssl.backbones import build

    out = tmp_path / "r3d.pth"
    assert main(["export-backbone", str(trained), "-o", str(out)]) == 0
    assert "build('r3d_18'" in capsys.readouterr().out
    state = torch.load(trained, map_location="cpu", weights_only=True)["state_dict"]
    model = build("r3d_18", weights=str(out), width_mult=0.0625)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[f"backbone.{k}"], rtol=0, atol=0)


def test_export_backbone_rejects_other_files(tmp_path, capsys):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "x.pth")
    assert main(["export-backbone", str(tmp_path / "x.pth"), "-o", str(tmp_path / "y")]) == 2
    assert "not a vidssl Lightning checkpoint" in capsys.readouterr().err
    assert main(["export-backbone", str(tmp_path / "missing.ckpt"), "-o", "y"]) == 2


def test_embed_index_search_from_a_checkpoint(trained, tiny_video_root, tmp_path, capsys):
    emb, videos = tmp_path / "emb", tiny_video_root / "UCF-101"
    args = ["embed", str(trained), str(videos), "-o", str(emb), "--num-clips", "2",
            "--num-workers", "0"]
    assert main(args) == 0
    meta = json.loads((emb / "meta.json").read_text())
    # clip settings come from the checkpoint's data module unless given
    assert meta["settings"] == {"num_clips": 2, "clip_len": 4, "stride": 2, "crop_size": 32}
    assert main(["index", str(emb)]) == 0
    capsys.readouterr()

    query = sorted(videos.rglob("*.avi"))[0]
    assert main(["search", str(emb / "index"), str(query), "-k", "3", "--json",
                 "--include-self"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # By default an indexed query is left out of its own results.
    assert main(["search", str(emb / "index"), str(query), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert str(query) not in [h["path"] for h in hits] and len(hits) == 3

    # A video outside the index is embedded with the model recorded in the index: a copy of an
    # indexed video finds the original at cosine 1.
    copy = tmp_path / "copy.avi"
    shutil.copy(query, copy)
    assert main(["search", str(emb / "index"), str(copy), "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)["results"][0]
    assert hit["path"] == str(query) and hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_embed_errors_are_one_line(tmp_path, tiny_video_root, capsys):
    assert main(["embed", "r3d_18", str(tiny_video_root), "-o", str(tmp_path / "e")]) == 2
    assert "--random-init" in capsys.readouterr().err
    assert main(["embed", "missing.ckpt", str(tiny_video_root), "-o", str(tmp_path / "e")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["embed", "r3d_18", "--random-init", str(tmp_path / "none"), "-o", "e"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["index", str(tmp_path)]) == 2
    assert "not an embeddings folder" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "q.mp4"]) == 2
    assert "not a vidssl search index" in capsys.readouterr().err


def test_console_script_and_python_m(tmp_path):
    exe = Path(sys.executable).with_name("vidssl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vidssl"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "export-backbone" in out.stdout
    out = subprocess.run([sys.executable, "-m", "vidssl", "nope"], capture_output=True,
                         text=True, timeout=120, env={**os.environ})
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_transcode_keeps_the_layout_and_frame_counts(tiny_video_root, tmp_path, capsys):
    from vidssl.data.index import probe_video

    dst = tmp_path / "mp4"
    assert main(["transcode", str(tiny_video_root), str(dst), "--num-workers", "1"]) == 0
    src = sorted((tiny_video_root / "UCF-101").rglob("*.avi"))
    out = sorted((dst / "UCF-101").rglob("*.mp4"))
    assert [p.relative_to(dst).with_suffix("") for p in out] == \
        [p.relative_to(tiny_video_root).with_suffix("") for p in src]
    assert probe_video(str(out[0])).num_frames == probe_video(str(src[0])).num_frames
    assert (dst / "ucfTrainTestlist" / "classInd.txt").exists()
    assert f"transcoded {len(src)} videos" in capsys.readouterr().out


def test_check_videos_lists_unreadable_and_inexact_files(tmp_path, capsys):
    import numpy as np

    from vidssl.data.synthetic import write_video

    frames = np.zeros((12, 32, 32, 3), np.uint8)
    write_video(tmp_path / "ok.mp4", frames, codec="libx264")
    write_video(tmp_path / "bframes.avi", frames, codec="mpeg4", max_b_frames=2)
    (tmp_path / "broken.avi").write_bytes(b"\x00" * 100)
    report = tmp_path / "report.json"
    assert main(["check-videos", str(tmp_path), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "3 videos: 1 unreadable, 1 with inexact random access" in out
    rows = {Path(r["path"]).name: r for r in json.loads(report.read_text())}
    assert rows["broken.avi"]["error"] and not rows["ok.mp4"]["error"]
    assert rows["bframes.avi"]["inexact"] and not rows["ok.mp4"]["inexact"]


def test_check_videos_decode_finds_streams_whose_decoder_logs_errors(tmp_path, capsys):
    import numpy as np

    from vidssl.data.decoding import scan_video
    from vidssl.data.synthetic import render_video, write_video

    frames = render_video("MoveLeft", np.random.default_rng(0), num_frames=32)
    write_video(tmp_path / "ok.avi", frames)
    data = bytearray((tmp_path / "ok.avi").read_bytes())
    mid = len(data) // 2  # overwrite 2 kB mid-stream: FFmpeg conceals it and logs errors
    data[mid : mid + 2000] = np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes()
    (tmp_path / "damaged.avi").write_bytes(bytes(data))
    assert scan_video(str(tmp_path / "ok.avi")) == (32, 0, [])
    frames_decoded, errors, messages = scan_video(str(tmp_path / "damaged.avi"))
    assert errors > 0 and len(messages) == min(errors, 5)
    # Without --decode the damage is invisible (the container probes fine) ...
    assert main(["check-videos", str(tmp_path)]) == 0
    assert "add --decode" in capsys.readouterr().out
    # ... with it, the damaged file is listed with the decoder's first message.
    assert main(["check-videos", str(tmp_path), "--decode"]) == 1
    out = capsys.readouterr().out
    assert "2 videos: 0 unreadable, 1 damaged" in out
    assert f"damaged     {tmp_path / 'damaged.avi'}" in out and "decoder errors" in out


def _no_moov_mp4(path) -> None:
    """An MP4 cut off before its index (the moov atom): what an interrupted download leaves."""
    import numpy as np

    from vidssl.data.synthetic import write_video

    write_video(path, np.zeros((12, 32, 32, 3), np.uint8), codec="libx264")
    data = path.read_bytes()
    path.write_bytes(data[: data.find(b"moov") - 4])


def _check_videos(*args) -> tuple:
    """Run ``python -m vidssl check-videos`` as a user does: a terminal sees raw stderr.

    In-process, pytest's logging handlers would swallow what Python's last-resort handler
    prints to a user's terminal. Returns ``(returncode, stdout, stderr lines that are not the
    progress bar)``: the bar's redraws are cut out, whatever is printed between them is kept.
    """
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "vidssl", "check-videos", *map(str, args)],
                         capture_output=True, text=True, timeout=300, env=env)
    bar = r"checking videos: *\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]"
    noise = re.sub(bar, "\n", run.stderr.replace("\r", "\n"))
    return run.returncode, run.stdout, [ln for ln in noise.splitlines() if ln.strip()]


def test_check_videos_keeps_ffmpeg_messages_out_of_the_progress_bar(tmp_path):
    import numpy as np

    from vidssl.data.synthetic import write_video

    # One thread scans a0 (long) while the other probes the truncated files: FFmpeg's log level
    # was raised for the scan, and the probes' "moov atom not found" went to stderr.
    rng = np.random.default_rng(0)
    write_video(tmp_path / "a0.avi", rng.integers(0, 256, (100, 240, 320, 3), np.uint8))
    write_video(tmp_path / "a1.avi", rng.integers(0, 256, (8, 24, 32, 3), np.uint8))
    _no_moov_mp4(tmp_path / "z00.mp4")
    for k in range(1, 20):
        shutil.copy(tmp_path / "z00.mp4", tmp_path / f"z{k:02d}.mp4")
    rc, out, noise = _check_videos(tmp_path, "--decode", "--num-workers", "2")
    assert rc == 1 and noise == []
    assert "22 videos: 20 unreadable, 0 damaged" in out
    bad = [ln for ln in out.splitlines() if ln.startswith("unreadable")]
    assert len(bad) == 20 and all("moov atom not found" in ln for ln in bad)


def test_check_videos_on_real_videos_and_a_truncated_mp4(real_videos, tmp_path):
    for name in ("Megamind.avi", "Megamind_bugy.avi", "tree.avi"):
        (tmp_path / name).symlink_to(real_videos / name)
    _no_moov_mp4(tmp_path / "trunc.mp4")
    rc, out, noise = _check_videos(tmp_path, "--decode")
    assert rc == 1 and noise == []
    assert f"unreadable  {tmp_path / 'trunc.mp4'}" in out and "moov atom not found" in out
    # FFmpeg 8 (PyAV 18) decodes all 270 frames of Megamind_bugy.avi and logs only warnings
    # (as for Megamind.avi); older FFmpeg builds log decoder errors and list it as damaged.
    assert "4 videos: 1 unreadable" in out


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_of_a_self_supervised_method_say_what_to_run(
    stage, tmp_path, tiny_video_root, capsys
):
    cfg = _config(tmp_path, tiny_video_root)
    assert main([stage, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"SimCLR defines no {'validation' if stage == 'validate' else 'test'}_step" in err
    assert "vidssl retrieval CKPT ROOT" in err and "Traceback" not in err


def test_augmentation_is_configurable_from_yaml(tmp_path, tiny_video_root):
    """Every knob of the training augmentation can be set in a config, not only a preset."""
    from vidssl.cli import VidsslCLI
    from vidssl.data import VideoAugmentation

    cfg = _config(tmp_path, tiny_video_root)
    data = yaml.safe_load(cfg.read_text())
    data["data"]["init_args"]["train_augmentation"] = {
        "class_path": "vidssl.data.VideoAugmentation",
        "init_args": {"crop_size": 32, "scale": [0.4, 1.0], "flip_p": 0.0, "jitter_p": 0.0},
    }
    cfg.write_text(yaml.safe_dump(data))
    cli = VidsslCLI(["--config", str(cfg)], run=False)
    aug = cli.datamodule.train_augmentation
    assert isinstance(aug, VideoAugmentation) and aug.crop_size == 32
    assert aug.flip_p == 0.0 and tuple(aug.scale) == (0.4, 1.0)
    # checkpoints keep its settings as plain values (readable with weights_only=True)
    saved = cli.datamodule.hparams["train_augmentation"]
    assert saved["init_args"]["flip_p"] == 0.0 and saved["init_args"]["scale"] == [0.4, 1.0]
    data["data"]["init_args"]["train_augmentation"]["init_args"]["crop_size"] = 48
    cfg.write_text(yaml.safe_dump(data))
    assert main(["fit", "--config", str(cfg)]) == 2  # a crop that disagrees: one-line error
