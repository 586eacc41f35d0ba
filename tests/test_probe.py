"""Linear probe and fine-tuning: frozen vs trained parameters, learning rates, video-level top-1."""

import pytest
import torch
import yaml

from vidssl.backbones import build
from vidssl.evaluation.probe import FineTune, LinearProbe, video_probs

TINY = {"backbone": "r3d_18", "backbone_kwargs": {"width_mult": 0.0625}}


def test_video_probs_average_clip_softmax():
    # Two clips of one video: clip 1 is confident in class 0, clip 2 mildly prefers class 1.
    logits = [torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    p0 = torch.tensor([1.0, torch.exp(torch.tensor(-4.0))]) / (1 + torch.exp(torch.tensor(-4.0)))
    p1 = torch.tensor([1.0, torch.e]) / (1 + torch.e)
    torch.testing.assert_close(video_probs(logits), ((p0 + p1) / 2)[None])
    assert video_probs(logits).argmax(1).item() == 0


def test_validation_accuracy_is_counted_per_video(monkeypatch):
    model = LinearProbe(num_classes=2, **TINY)
    # Video 0: clips say class 1 (weak) and class 0 (strong) -> video predicts 0 (label 0: hit).
    # Video 1: both clips say class 0 -> miss (label 1). Clip level: 2 of 4 correct.
    outputs = iter([torch.tensor([[0.0, 0.5], [3.0, 0.0]]), torch.tensor([[3.0, 0.0], [3.0, 0.0]])])
    monkeypatch.setattr(model, "forward", lambda clips: next(outputs))
    batch = {"views": [torch.zeros(2), torch.zeros(2)], "label": torch.tensor([0, 1])}
    model.validation_step(batch, 0)
    assert model.val_top1.compute().item() == pytest.approx(0.5)
    assert model.val_clip_top1.compute().item() == pytest.approx(0.25)


def test_linear_probe_freezes_the_backbone_and_its_bn_statistics():
    model = LinearProbe(num_classes=3, **TINY)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = model.configure_optimizers()["optimizer"]
    model.train()
    model.on_train_epoch_start()
    batch = {"views": [torch.randn(4, 3, 4, 32, 32)], "label": torch.tensor([0, 1, 2, 0])}
    w = model.classifier.weight.detach().clone()
    loss = model.training_step(batch, 0)
    loss.backward()
    opt.step()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(w, model.classifier.weight)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in model.backbone.parameters())


def test_fine_tune_trains_the_backbone_at_a_tenth_of_the_rate():
    model = FineTune(num_classes=3, lr=0.01, **TINY)
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.001)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert model.dropout.p == 0.9 and isinstance(model.final_bn, torch.nn.Identity)


def test_probe_loads_pretrained_weights(tmp_path):
    src = build("r3d_18", width_mult=0.0625)
    torch.save(src.state_dict(), tmp_path / "bb.pth")
    model = LinearProbe(num_classes=3, weights=str(tmp_path / "bb.pth"), **TINY)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v, rtol=0, atol=0)


def test_linear_probe_through_the_cli(tmp_path, tiny_video_root):
    from vidssl.cli import main

    cfg = {
        "model": {"class_path": "LinearProbe", "init_args": {"num_classes": 4, **TINY}},
        "data": {"class_path": "VideoDataModule", "init_args": {
            "train": str(tiny_video_root), "clip_len": 4, "crop_size": 32, "short_side": 40,
            "batch_size": 4, "num_workers": 0, "eval_num_clips": 2,
            "train_preset": "crop_flip"}},
        "trainer": {"accelerator": "cpu", "fast_dev_run": 1, "enable_progress_bar": False,
                    "enable_model_summary": False},
    }
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(tmp_path / "probe.yaml")]) == 0
