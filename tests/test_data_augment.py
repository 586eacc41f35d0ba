"""kornia augmentation: one draw per clip shared by its frames, independent across clips/views."""

from __future__ import annotations

import pytest
import torch

from vidssl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    VideoAugmentation,
    build_augmentation,
)


def static_clips(b: int, t: int, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    """uint8 B x T x H x W x C clips whose frames are all identical (a static scene)."""
    g = torch.Generator().manual_seed(seed)
    frame = torch.randint(0, 256, (b, 1, h, w, 3), generator=g, dtype=torch.uint8)
    return frame.expand(b, t, h, w, 3).contiguous()


@pytest.mark.parametrize("preset", ["simclr", "slic", "crop_flip"])
@pytest.mark.parametrize("cpu_chunk", [1, 0], ids=["per-clip", "one-call"])
def test_same_draw_on_every_frame_of_a_clip(preset, cpu_chunk):
    torch.manual_seed(0)
    aug = build_augmentation(preset, crop_size=24)
    aug.cpu_chunk = cpu_chunk
    out = aug(static_clips(6, 5))
    assert out.shape == (6, 3, 5, 24, 24) and out.dtype == torch.float32
    # Identical input frames must stay identical: the crop, flip, jitter, grayscale and blur
    # parameters were drawn once per clip.
    assert torch.equal(out, out[:, :, :1].expand_as(out))


@pytest.mark.parametrize("cpu_chunk", [1, 0], ids=["per-clip", "one-call"])
def test_independent_draws_across_clips_and_views(cpu_chunk):
    torch.manual_seed(0)
    aug = build_augmentation("slic", crop_size=24)
    aug.cpu_chunk = cpu_chunk
    same = static_clips(1, 4).expand(8, 4, 40, 56, 3).contiguous()  # 8 copies of one clip
    v1, v2 = aug(same), aug(same)
    # Different draws across the clips of a batch...
    distinct = {tuple(v1[i].flatten()[:50].tolist()) for i in range(8)}
    assert len(distinct) >= 6
    # ... and across views of the same clip.
    assert not any(torch.allclose(v1[i], v2[i]) for i in range(8))


def test_normalisation_matches_imagenet_statistics():
    aug = VideoAugmentation(
        crop_size=40,
        scale=(1.0, 1.0),
        ratio=(56 / 40, 56 / 40),
        flip_p=0,
        jitter_p=0,
        grayscale_p=0,
        blur_p=0,
    )
    grey = torch.full((2, 3, 40, 56, 3), 128, dtype=torch.uint8)
    out = aug(grey)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, :, 0, 5, 5], expected.expand(2, 3), atol=1e-4)


def test_eval_transform_resizes_short_side_and_centre_crops():
    x = torch.zeros(1, 2, 40, 80, 3, dtype=torch.uint8)
    x[..., 30:50, :] = 255  # bright centre columns 30..49 of 80 -> 15..24 of 40 after resize
    out = EvalTransform(crop_size=20)(x)  # resize to 20x40, crop columns 10..29
    assert out.shape == (1, 3, 2, 20, 20)
    row = out[0, 0, 0, 10]
    hi = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    lo = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert torch.allclose(row[6:14], torch.full((8,), hi), atol=1e-4)
    assert torch.allclose(row[:4], torch.full((4,), lo), atol=1e-4)
    assert torch.equal(EvalTransform(20)(x), out)  # deterministic


def test_errors():
    with pytest.raises(ValueError, match="simclr, slic"):
        build_augmentation("autoaugment")
    with pytest.raises(ValueError, match="uint8"):
        EvalTransform(8)(torch.zeros(1, 2, 8, 8, 3))
