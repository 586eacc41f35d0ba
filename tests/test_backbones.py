"""Tests of the backbone zoo: registry, shapes, torchvision layout, parameter counts, weights."""

from __future__ import annotations

import argparse
import logging
import pickle

import pytest
import torch

import vidssl.backbones as vb
from vidssl.backbones import registry

ALL = [
    "mc3_18",
    "r2plus1d_18",
    "r3d_18",
    "r3d_18_hara",
    "r3d_34",
    "r3d_50",
    "s3d",
]
TINY = 1 / 16  # 64..512 channels -> 4..32
# Full-width feature size of each model; at TINY every channel count is divided by 16.
FEATURE_DIM = {name: 512 for name in ALL} | {"r3d_50": 2048, "s3d": 1024}

# Feature-map size (T', H'=W') for inputs (T, H=W), worked out by hand from the strides:
# ResNets halve T in layer2..4 (ceil, k=3 p=1) except MC3 (2D convs there), halve H in the stem
# and layer2..4; S3D halves T in its stem, 3x3x3 and 2x2x2 pools (ceil), H in stem and 4 pools.
FEATURE_MAP = {
    "r3d_18": {(4, 32): (1, 2), (8, 48): (1, 3), (1, 32): (1, 2)},
    "r3d_34": {(4, 32): (1, 2), (8, 48): (1, 3), (1, 32): (1, 2)},
    "r3d_50": {(4, 32): (1, 2), (8, 48): (1, 3), (1, 32): (1, 2)},
    "r2plus1d_18": {(4, 32): (1, 2), (8, 48): (1, 3), (1, 32): (1, 2)},
    "r3d_18_hara": {(4, 32): (1, 2), (8, 48): (1, 3), (1, 32): (1, 2)},
    "mc3_18": {(4, 32): (4, 2), (8, 48): (8, 3), (1, 32): (1, 2)},
    "s3d": {(4, 32): (1, 1), (8, 48): (1, 2), (1, 32): (1, 1)},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions gain nothing from 2 OpenMP threads and lose up to 50x when other
    # processes load the CPUs (threads wait on each other at every op's barrier).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clips(t: int, size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, t, size, size, generator=torch.Generator().manual_seed(t + size))


def _shapes_only(name: str, **kwargs) -> vb.VideoBackbone:
    """A full-size model on the meta device: shapes and counts, no memory or initialisation."""
    with torch.device("meta"):
        return vb.build(name, **kwargs)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# registry


def test_list_names_every_model_sorted():
    assert vb.list() == ALL
    assert vb.list_backbones() == ALL


def test_star_import_does_not_shadow_builtin_list():
    namespace: dict = {}
    exec("from vidssl.backbones import *", namespace)
    assert "list" not in namespace and "build" in namespace


def test_unknown_name_lists_known_names():
    with pytest.raises(vb.UnknownBackboneError) as info:
        vb.build("r3d_19")
    message = str(info.value)
    assert "'r3d_19'" in message
    assert all(name in message for name in ALL)
    assert "Did you mean 'r3d_18'" in message
    # Both exception types a caller might reasonably catch.
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_register_adds_a_builder_and_refuses_a_taken_name(monkeypatch):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))

    @vb.register(name="tiny_r3d")
    def tiny(width_mult: float = 1.0) -> vb.VideoBackbone:
        return vb.r3d_18(width_mult=width_mult / 16)

    assert "tiny_r3d" in vb.list()
    assert vb.build("tiny_r3d").feature_dim == 32
    with pytest.raises(ValueError, match="already registered"):
        vb.register(name="r3d_18")(tiny)


def test_width_mult_must_be_positive():
    with pytest.raises(ValueError, match="width_mult"):
        vb.build("r3d_18", width_mult=0)


# --------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("name", ALL)
def test_output_shapes(name):
    model = vb.build(name, width_mult=TINY).eval()
    dim = FEATURE_DIM[name] // 16
    assert model.feature_dim == dim
    for (t, size), (t_out, hw) in FEATURE_MAP[name].items():
        x = _clips(t, size)
        with torch.no_grad():
            features = model.forward_features(x)
            pooled = model(x)
        assert features.shape == (2, dim, t_out, hw, hw), (t, size)
        assert pooled.shape == (2, dim)
        torch.testing.assert_close(pooled, features.mean(dim=(2, 3, 4)))


def test_full_width_r3d_18_shapes():
    model = vb.build("r3d_18").eval()
    assert model.feature_dim == 512
    with torch.no_grad():
        assert model.forward_features(_clips(4, 32, batch=1)).shape == (1, 512, 1, 2, 2)
        assert model(_clips(8, 48, batch=1)).shape == (1, 512)


def test_s3d_does_not_hard_code_224px_or_16_frames():
    # torchvision's fixed AvgPool3d((2, 7, 7)) would fail on this clip.
    model = vb.build("s3d", width_mult=TINY).eval()
    with torch.no_grad():
        assert model(_clips(3, 40)).shape == (2, 64)


def test_rejects_dataloader_layout():
    model = vb.build("r3d_18", width_mult=TINY)
    clips = torch.zeros(2, 4, 32, 32, 3, dtype=torch.uint8)  # B x T x H x W x C
    with pytest.raises(ValueError, match="B x C x T x H x W"):
        model(clips)


# --------------------------------------------------------------------------------------------
# torchvision parity: parameter counts and state-dict layout


@pytest.mark.parametrize(
    "name,published",
    # torchvision's published num_params (400-class classifier included).
    [
        ("r3d_18", 33_371_472),
        ("mc3_18", 11_695_440),
        ("r2plus1d_18", 31_505_325),
        ("s3d", 8_320_048),
    ],
)
def test_parameter_counts_match_torchvision(name, published):
    model = _shapes_only(name)
    classifier = model.feature_dim * 400 + 400
    assert _n_params(model) + classifier == published


def test_hara_r3d_18_differs_from_torchvision_only_in_its_7x7x7_stem():
    # Same residual layers; Hara's stem is 64x3x7x7x7 where torchvision's is 64x3x3x7x7.
    extra = 64 * 3 * 7 * 7 * 7 - 64 * 3 * 3 * 7 * 7
    assert _n_params(_shapes_only("r3d_18_hara")) == _n_params(_shapes_only("r3d_18")) + extra


def _bn(sd, prefix, c):
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{prefix}.{suffix}"] = (c,)
    sd[f"{prefix}.num_batches_tracked"] = ()


def torchvision_resnet18_layout(arch: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of torchvision's video ResNet-18s without ``fc``, from its source.

    Transcribed from torchvision/models/video/resnet.py (BasicStem / R2Plus1dStem, BasicBlock
    with conv1 = Sequential(conv, bn, relu), conv2 = Sequential(conv, bn), downsample =
    Sequential(1x1x1 conv, bn); Conv2Plus1D = Sequential(conv, bn, relu, conv) whose midplanes
    come from the block's (inplanes, planes) for both of its convs).
    """
    sd: dict[str, tuple[int, ...]] = {}
    if arch == "r2plus1d_18":
        sd["stem.0.weight"] = (45, 3, 1, 7, 7)
        _bn(sd, "stem.1", 45)
        sd["stem.3.weight"] = (64, 45, 3, 1, 1)
        _bn(sd, "stem.4", 64)
    else:
        sd["stem.0.weight"] = (64, 3, 3, 7, 7)
        _bn(sd, "stem.1", 64)
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            cin = inplanes if block == 0 else planes
            mid = (cin * planes * 27) // (cin * 9 + 3 * planes)
            for conv, (i, o) in enumerate(((cin, planes), (planes, planes)), start=1):
                p = f"layer{layer}.{block}.conv{conv}"
                if arch == "r3d_18" or (arch == "mc3_18" and layer == 1):
                    sd[f"{p}.0.weight"] = (o, i, 3, 3, 3)
                elif arch == "mc3_18":
                    sd[f"{p}.0.weight"] = (o, i, 1, 3, 3)
                else:
                    sd[f"{p}.0.0.weight"] = (mid, i, 1, 3, 3)
                    _bn(sd, f"{p}.0.1", mid)
                    sd[f"{p}.0.3.weight"] = (o, mid, 3, 1, 1)
                _bn(sd, f"{p}.1", o)
        if layer > 1:
            sd[f"layer{layer}.0.downsample.0.weight"] = (planes, inplanes, 1, 1, 1)
            _bn(sd, f"layer{layer}.0.downsample.1", planes)
        inplanes = planes
    return sd


def torchvision_s3d_layout() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of torchvision's S3D without ``classifier``, from models/video/s3d.py."""
    sd: dict[str, tuple[int, ...]] = {}

    def conv_bn(p, i, o, k=(1, 1, 1)):  # Conv3dNormActivation: 0 = conv, 1 = bn
        sd[f"{p}.0.weight"] = (o, i, *k)
        _bn(sd, f"{p}.1", o)

    def sep(p, i, o, k):  # TemporalSeparableConv
        conv_bn(f"{p}.0", i, o, (1, k, k))
        conv_bn(f"{p}.1", o, o, (k, 1, 1))

    sep("features.0", 3, 64, 7)
    conv_bn("features.2", 64, 64)
    sep("features.3", 64, 192, 3)
    blocks = {  # index in `features`: SepInceptionBlock3D arguments, as torchvision writes them
        5: (192, 64, 96, 128, 16, 32, 32),
        6: (256, 128, 128, 192, 32, 96, 64),
        8: (480, 192, 96, 208, 16, 48, 64),
        9: (512, 160, 112, 224, 24, 64, 64),
        10: (512, 128, 128, 256, 24, 64, 64),
        11: (512, 112, 144, 288, 32, 64, 64),
        12: (528, 256, 160, 320, 32, 128, 128),
        14: (832, 256, 160, 320, 32, 128, 128),
        15: (832, 384, 192, 384, 48, 128, 128),
    }
    for index, (i, b0, b1m, b1o, b2m, b2o, b3o) in blocks.items():
        p = f"features.{index}"
        conv_bn(f"{p}.branch0", i, b0)
        conv_bn(f"{p}.branch1.0", i, b1m)
        sep(f"{p}.branch1.1", b1m, b1o, 3)
        conv_bn(f"{p}.branch2.0", i, b2m)
        sep(f"{p}.branch2.1", b2m, b2o, 3)
        conv_bn(f"{p}.branch3.1", i, b3o)
    return sd


def _layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_resnet_state_dict_layout_is_torchvisions(name):
    assert _layout(_shapes_only(name)) == torchvision_resnet18_layout(name)


def test_s3d_state_dict_layout_is_torchvisions():
    assert _layout(_shapes_only("s3d")) == torchvision_s3d_layout()


def test_layout_spot_checks():
    assert _layout(_shapes_only("r3d_18"))["layer1.0.conv1.0.weight"] == (64, 64, 3, 3, 3)
    # R(2+1)D midplanes: 64*128*27 // (64*9 + 3*128) = 230, used by both convs of the block.
    r21d = _layout(_shapes_only("r2plus1d_18"))
    assert r21d["layer2.0.conv1.0.0.weight"] == (230, 64, 1, 3, 3)
    assert r21d["layer2.0.conv2.0.0.weight"] == (230, 128, 1, 3, 3)
    hara = _layout(_shapes_only("r3d_18_hara"))
    assert hara["conv1.weight"] == (64, 3, 7, 7, 7)
    assert hara["layer2.0.downsample.0.weight"] == (128, 64, 1, 1, 1)
    assert "layer1.0.downsample.0.weight" not in hara  # shortcut B: identity where shapes match
    r50 = _layout(_shapes_only("r3d_50"))
    assert r50["layer1.0.conv3.0.weight"] == (256, 64, 1, 1, 1)
    assert r50["layer4.2.conv3.1.weight"] == (2048,)


def test_hara_has_no_max_pool_and_stride_1_2_2_stem():
    model = vb.build("r3d_18_hara", width_mult=TINY)
    assert model.conv1.stride == (1, 2, 2) and model.conv1.kernel_size == (7, 7, 7)
    with torch.no_grad():
        # No max-pool: layer1 sees H/2 (Hara's default stem with the pool would give H/4).
        stem = model.maxpool(model.relu(model.bn1(model.conv1(_clips(4, 32)))))
    assert stem.shape[2:] == (4, 16, 16)
    with_pool = vb.build("r3d_18_hara", width_mult=TINY, no_max_pool=False)
    assert with_pool.forward_features(_clips(4, 32)).shape[2:] == (1, 1, 1)


# --------------------------------------------------------------------------------------------
# memory format and mixed precision


@pytest.mark.parametrize("name", ALL)
def test_channels_last_3d_and_bf16_autocast(name):
    torch.manual_seed(0)
    model = vb.build(name, width_mult=TINY).eval()
    x = _clips(4, 32)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        channels_last = model(x.to(memory_format=torch.channels_last_3d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feature_map = model.forward_features(x)
            bf16 = model(x)
    torch.testing.assert_close(channels_last, reference, rtol=1e-4, atol=1e-5)
    assert feature_map.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    assert torch.isfinite(bf16).all()
    scale = reference.abs().max()
    assert (bf16.float() - reference).abs().max() <= 0.05 * scale


# --------------------------------------------------------------------------------------------
# weights


def _trained_tiny(name: str) -> vb.VideoBackbone:
    """A tiny model whose BN statistics moved away from their initial values."""
    torch.manual_seed(1)
    model = vb.build(name, width_mult=TINY)
    with torch.no_grad():
        model.train()(_clips(4, 32))
    return model.eval()


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_clips(4, 32))


@pytest.mark.parametrize("name", ALL)
def test_weight_round_trip(name, tmp_path):
    model = _trained_tiny(name)
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    torch.manual_seed(2)  # a fresh model with other random weights
    fresh = vb.build(name, width_mult=TINY)
    assert not torch.equal(_outputs(fresh), _outputs(model))
    loaded = vb.build(name, weights=path, width_mult=TINY)
    assert torch.equal(_outputs(loaded), _outputs(model))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name,classifier", [("r3d_18", "fc"), ("s3d", "classifier.1")])
def test_torchvision_file_with_classifier_loads(name, classifier, tmp_path, caplog):
    model = _trained_tiny(name)
    state = dict(model.state_dict())
    state[f"{classifier}.weight"] = torch.zeros(400, model.feature_dim)
    state[f"{classifier}.bias"] = torch.zeros(400)
    torch.save(state, tmp_path / "tv.pth")
    with caplog.at_level(logging.DEBUG, logger="vidssl.backbones.weights"):
        loaded = vb.build(name, weights=tmp_path / "tv.pth", width_mult=TINY)
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert f"{classifier}.weight" in caplog.text


def test_old_checkpoint_without_num_batches_tracked_loads(tmp_path):
    model = _trained_tiny("r3d_18")
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pth")
    loaded = vb.build("r3d_18", weights=str(tmp_path / "old.pth"), width_mult=TINY)
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_hara_style_checkpoint_loads(tmp_path):
    model = _trained_tiny("r3d_18_hara")
    checkpoint = {
        "epoch": 200,
        "arch": "resnet-18",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}
        | {"module.fc.weight": torch.zeros(101, 32), "module.fc.bias": torch.zeros(101)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    }
    torch.save(checkpoint, tmp_path / "save_200.pth")
    loaded = vb.build("r3d_18_hara", weights=tmp_path / "save_200.pth", width_mult=TINY)
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_lightning_checkpoint_loads_backbone_only(tmp_path):
    model = _trained_tiny("r2plus1d_18")
    other = vb.build("r2plus1d_18", width_mult=TINY)  # e.g. a momentum encoder: not taken
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state |= {f"momentum_backbone.{k}": v for k, v in other.state_dict().items()}
    state |= {"projector.0.weight": torch.zeros(8, 32), "queue": torch.zeros(8, 16)}
    checkpoint = {
        "epoch": 3,
        "global_step": 42,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": state,
        "hyper_parameters": {"backbone": "r2plus1d_18", "lr": 0.1},
        "callbacks": {"PseudoLabels": {"labels": torch.zeros(10, dtype=torch.long)}},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded = vb.build("r2plus1d_18", weights=tmp_path / "last.ckpt", width_mult=TINY)
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_in_memory_state_dict_loads():
    model = _trained_tiny("mc3_18")
    loaded = vb.build("mc3_18", weights=model.state_dict(), width_mult=TINY)
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_mismatched_weights_list_missing_unexpected_and_shapes(tmp_path):
    state = dict(_trained_tiny("r3d_18").state_dict())
    del state["layer4.1.conv2.1.running_var"]
    state["layer5.0.conv1.0.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(vb.WeightsMismatchError) as info:
        vb.build("r3d_18", weights=tmp_path / "bad.pth", width_mult=TINY)
    message = str(info.value)
    assert "missing keys (1)" in message and "layer4.1.conv2.1.running_var" in message
    assert "unexpected keys (1)" in message and "layer5.0.conv1.0.weight" in message
    assert str(tmp_path / "bad.pth") in message
    assert info.value.missing_keys == ["layer4.1.conv2.1.running_var"]
    assert info.value.unexpected_keys == ["layer5.0.conv1.0.weight"]

    # Another width: every tensor has another shape; each is named with both shapes.
    with pytest.raises(vb.WeightsMismatchError) as info:
        vb.build("r3d_18", weights=_trained_tiny("r3d_18").state_dict(), width_mult=1 / 8)
    message = str(info.value)
    assert "stem.0.weight: [4, 3, 3, 7, 7] vs [8, 3, 3, 7, 7]" in message
    assert "shape mismatches" in message and "missing keys" not in message


def test_layout_mix_up_is_explained():
    with pytest.raises(vb.WeightsMismatchError, match="build 'r3d_18_hara'"):
        vb.build("r3d_18", weights=_trained_tiny("r3d_18_hara").state_dict(), width_mult=TINY)
    with pytest.raises(vb.WeightsMismatchError, match="torchvision's layout"):
        vb.build("r3d_18_hara", weights=_trained_tiny("r3d_18").state_dict(), width_mult=TINY)


def test_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        vb.build("r3d_18", weights=tmp_path / "nope.pth", width_mult=TINY)
    torch.save({"epoch": 1, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="found no state dict.*'epoch'"):
        vb.build("r3d_18", weights=tmp_path / "empty.pth", width_mult=TINY)


def test_unsafe_pickle_is_refused_unless_trusted(tmp_path):
    model = _trained_tiny("r3d_18")
    checkpoint = {"state_dict": model.state_dict(), "hparams": argparse.Namespace(lr=0.1)}
    torch.save(checkpoint, tmp_path / "pickled.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        vb.build("r3d_18", weights=tmp_path / "pickled.ckpt", width_mult=TINY)
    fresh = vb.build("r3d_18", width_mult=TINY)
    vb.load_backbone_weights(fresh, tmp_path / "pickled.ckpt", weights_only=False)
    assert torch.equal(_outputs(fresh), _outputs(model))


def test_width_mult_scales_every_channel_count():
    assert vb.scale_width(45, 1 / 16) == 3  # R(2+1)D's stem: round(2.8)
    assert vb.scale_width(16, 1 / 32) == 1  # never zero channels
    half = _layout(_shapes_only("r2plus1d_18", width_mult=0.5))
    assert half["stem.0.weight"] == (22, 3, 1, 7, 7)  # round(22.5) = 22, banker's rounding
    assert half["layer4.1.conv2.1.weight"] == (256,)
    assert _shapes_only("s3d", width_mult=0.5).feature_dim == 512
