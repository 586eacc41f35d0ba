"""Spatial augmentation of uint8 clips on the training device, with kornia.

One random draw per clip shared by all its frames, independent across clips and views; presets
with their sources; an evaluation transform (resize, centre crop, normalise). A clip's motion
field goes through the same crop and flip as its RGB frames (docs/motion.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "VideoAugmentation",
    "EvalTransform",
    "build_augmentation",
    "frame_difference",
    "motion_to_float",
    "to_float_clips",
]

#: ImageNet statistics (torchvision), used by SLIC and most video SSL code for normalisation.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_float_clips(clips: torch.Tensor) -> torch.Tensor:
    """uint8 ``B x T x H x W x C`` -> float ``B x T x C x H x W`` in ``[0, 1]``."""
    if clips.dtype != torch.uint8 or clips.dim() != 5:
        raise ValueError(
            f"Expected uint8 clips B x T x H x W x C, got {clips.dtype} {tuple(clips.shape)}."
        )
    return clips.permute(0, 1, 4, 2, 3).float().div_(255.0)


def motion_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 motion codes ``B x T x H x W x 2`` -> float ``B x T x 2 x H x W`` in ``[-1, 1]``.

    The codes are those of :func:`vidssl.data.flow.quantize_flow` (bound ``B = 20`` px/frame):
    the result is the displacement in pixels per frame divided by ``B``, ``q * 2 / 255 - 1``.
    """
    if codes.dtype != torch.uint8 or codes.dim() != 5 or codes.shape[-1] != 2:
        raise ValueError(
            f"Expected uint8 motion codes B x T x H x W x 2, got {codes.dtype} "
            f"{tuple(codes.shape)}."
        )
    return codes.permute(0, 1, 4, 2, 3).float().mul_(2.0 / 255.0).sub_(1.0)


def frame_difference(x: torch.Tensor) -> torch.Tensor:
    """RGB difference of consecutive frames (TSN's "RGB diff"): float ``B x C x T x H x W``.

    ``x`` is float ``B x T x C x H x W`` in ``[0, 1]`` (before normalisation); frame ``t`` of the
    result is ``x[t + 1] - x[t]``, the last frame repeats the one before (a one-frame clip gives
    zeros), so values lie in ``[-1, 1]``, aligned like stored flow (``t -> t + 1``).
    """
    d = torch.zeros_like(x)
    if x.shape[1] > 1:
        d[:, :-1] = x[:, 1:] - x[:, :-1]
        d[:, -1] = d[:, -2]
    return d.transpose(1, 2).contiguous()


def _scale_vectors(field: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """Multiply x / y of float ``B x T x 2 x H x W`` by per-frame ``B x T`` factors; -> BMTHW."""
    field[:, :, 0] *= sx[..., None, None]
    field[:, :, 1] *= sy[..., None, None]
    return field.transpose(1, 2).contiguous()


def _check_field(clips: torch.Tensor, field: torch.Tensor | None) -> None:
    if field is not None and field.shape[:4] != clips.shape[:4]:
        raise ValueError(f"motion field {tuple(field.shape)} does not match its clips "
                         f"{tuple(clips.shape)}: B x T x H x W must agree.")


class _Normalise(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``B x T x C x H x W`` and return ``B x C x T x H x W``."""
        mean = self.mean.to(x.device, x.dtype)
        std = self.std.to(x.device, x.dtype)
        return ((x - mean) / std).transpose(1, 2).contiguous()


class VideoAugmentation(nn.Module):
    """Random resized crop, flip, colour jitter, grayscale, blur and normalisation of clips.

    Input uint8 ``B x T x H x W x C`` (what the workers return), output float
    ``B x C x T x H x W``. Parameters are drawn once per clip and applied to all its frames
    (kornia ``VideoSequential(same_on_frame=True)``), independently for every clip of the batch;
    call it once per view for independent views.

    Args:
        crop_size: output side (square crops).
        scale: area range of the random resized crop.
        ratio: aspect-ratio range of the random resized crop.
        flip_p: horizontal flip probability.
        jitter: colour jitter (brightness, contrast, saturation, hue) strengths.
        jitter_p: probability of colour jitter.
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of Gaussian blur.
        blur_kernel: blur kernel side (odd).
        blur_sigma: blur sigma range (a fixed sigma when both ends are equal).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        cpu_chunk: on the CPU, augment this many clips per kornia call (``0``: all at once).
            Measured in docs/benchmarks.md: one call on 8 x 16 frames was 1.0-2.5x slower on a
            CPU than per-clip calls (the working set falls out of cache); on GPUs the batch is
            processed in one call. Draws are per clip either way.
    """

    def __init__(
        self,
        crop_size: int = 112,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_kernel: int = 11,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        cpu_chunk: int = 1,
    ) -> None:
        super().__init__()
        import kornia.augmentation as K

        if blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {blur_kernel}.")
        ops: list[nn.Module] = [
            K.RandomResizedCrop((crop_size, crop_size), scale=scale, ratio=ratio)
        ]
        if flip_p > 0:
            ops.append(K.RandomHorizontalFlip(p=flip_p))
        if jitter_p > 0 and any(jitter):
            ops.append(K.ColorJitter(*jitter, p=jitter_p))
        if grayscale_p > 0:
            ops.append(K.RandomGrayscale(p=grayscale_p))
        if blur_p > 0:
            ops.append(K.RandomGaussianBlur((blur_kernel, blur_kernel), blur_sigma, p=blur_p))
        self.crop_size = crop_size
        # The settings, readable (configs, plots, the demo): the ops below are built from them.
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), flip_p
        self.jitter, self.jitter_p, self.grayscale_p = tuple(jitter), jitter_p, grayscale_p
        self.blur_p, self.blur_kernel, self.blur_sigma = blur_p, blur_kernel, tuple(blur_sigma)
        self.cpu_chunk = cpu_chunk
        self._settings = dict(
            crop_size=crop_size, scale=list(scale), ratio=list(ratio), flip_p=flip_p,
            jitter=list(jitter), jitter_p=jitter_p, grayscale_p=grayscale_p, blur_p=blur_p,
            blur_kernel=blur_kernel, blur_sigma=list(blur_sigma), mean=list(mean), std=list(std),
            cpu_chunk=cpu_chunk,
        )
        self.spatial = K.VideoSequential(*ops, data_format="BTCHW", same_on_frame=True)
        self.normalise = _Normalise(mean, std)
        # The ops a motion field shares with its RGB clip: the geometric ones (crop, flip).
        geometric = ops[: 1 + (flip_p > 0)]
        self._geometric = [f"{type(op).__name__}_{k}" for k, op in enumerate(geometric)]

    def settings(self) -> dict:
        """Return the constructor's arguments as plain values (what a config would hold)."""
        return {"class_path": "vidssl.data.VideoAugmentation", "init_args": dict(self._settings)}

    def _chunks(self, clips: torch.Tensor) -> int:
        on_cpu = clips.device.type == "cpu"
        return self.cpu_chunk if on_cpu and 0 < self.cpu_chunk < len(clips) else 0

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Augment uint8 ``B x T x H x W x C`` clips into float ``B x C x T x H x W``."""
        if self._chunks(clips):
            return torch.cat([self(c) for c in clips.split(self.cpu_chunk)])
        x = self.spatial(to_float_clips(clips))
        return self.normalise(x.clamp_(0.0, 1.0))

    @torch.no_grad()
    def forward_with_motion(
        self, clips: torch.Tensor, field: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment clips and their motion with ONE random draw per clip: ``(rgb, motion)``.

        ``rgb`` is what :meth:`forward` returns. ``field`` (uint8 codes ``B x T x H x W x 2``, see
        :func:`motion_to_float`) gets the clip's own resized crop and horizontal flip, not the
        colour ops; a flip negates x, and the vectors are scaled by the crop's resize factors, so
        ``motion`` (float ``B x 2 x T x S x S``) is in output pixels per frame / 20. With
        ``field=None``, ``motion`` is the :func:`frame_difference` of the augmented clip before
        normalisation (``B x 3 x T x S x S``).
        """
        _check_field(clips, field)
        if self._chunks(clips):
            n = self.cpu_chunk
            fields = field.split(n) if field is not None else [None] * -(-len(clips) // n)
            parts = [self.forward_with_motion(c, f) for c, f in zip(clips.split(n), fields)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        x = self.spatial(to_float_clips(clips)).clamp_(0.0, 1.0)
        if field is None:
            return self.normalise(x), frame_difference(x)
        params = [p for p in self.spatial._params if p.name in self._geometric]
        moved = self.spatial(motion_to_float(field), params=params)
        b, t = field.shape[:2]
        # Corners (x, y) of each crop box, B*T x 4. kornia resizes them with aligned corners:
        # pixel centres from the first to the last column map onto 0 .. S - 1.
        src = params[0].data["src"].to(moved.device)
        out = max(self.crop_size - 1, 1)
        sx = out / (src[:, 1, 0] - src[:, 0, 0]).clamp(min=1)
        sy = out / (src[:, 2, 1] - src[:, 1, 1]).clamp(min=1)
        if len(params) > 1:  # a flipped clip's content moves the other way
            sx = torch.where(params[1].data["batch_prob"].to(moved.device).bool(), -sx, sx)
        return self.normalise(x), _scale_vectors(moved, sx.view(b, t), sy.view(b, t))


class EvalTransform(nn.Module):
    """Resize the short side to ``resize`` (default ``crop_size``), centre crop and normalise.

    Input uint8 ``B x T x H x W x C``, output float ``B x C x T x H x W``; deterministic.

    Args:
        crop_size: side of the centre crop.
        resize: short side before cropping (SLIC and 3D-ResNets resize to the crop size).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    def __init__(
        self,
        crop_size: int = 112,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.resize = resize or crop_size
        self.normalise = _Normalise(mean, std)

    def _resize_crop(self, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """Resize and centre-crop float ``B x T x C x H x W``; also the x and y resize factors."""
        b, t, c, h, w = x.shape
        scale = self.resize / min(h, w)
        nh, nw = max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(
                x.reshape(b * t, c, h, w),
                size=(nh, nw),
                mode="bilinear",
                align_corners=False,
                antialias=scale < 1,
            ).reshape(b, t, c, nh, nw)
        top, left = (nh - self.crop_size) // 2, (nw - self.crop_size) // 2
        return x[..., top : top + self.crop_size, left : left + self.crop_size], nw / w, nh / h

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Transform uint8 ``B x T x H x W x C`` clips into float ``B x C x T x H x W``."""
        x, _, _ = self._resize_crop(to_float_clips(clips))
        return self.normalise(x.clamp(0.0, 1.0))

    @torch.no_grad()
    def forward_with_motion(
        self, clips: torch.Tensor, field: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform clips and their motion alike: ``(rgb, motion)``.

        As :meth:`VideoAugmentation.forward_with_motion`, with the centre crop and no flip.
        """
        _check_field(clips, field)
        x, _, _ = self._resize_crop(to_float_clips(clips))
        x = x.clamp(0.0, 1.0)
        if field is None:
            return self.normalise(x), frame_difference(x)
        moved, sx, sy = self._resize_crop(motion_to_float(field))
        ones = moved.new_ones(moved.shape[:2])
        return self.normalise(x), _scale_vectors(moved.contiguous(), ones * sx, ones * sy)


def _simclr(crop_size: int) -> VideoAugmentation:
    # SimCLR (Chen et al. 2020, appendix A): crop area 0.08-1, ratio 3/4-4/3, flip 0.5, colour
    # jitter strength 1 = (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, blur p 0.5 with a kernel
    # 10% of the image side and sigma in [0.1, 2.0].
    kernel = int(0.1 * crop_size) // 2 * 2 + 1
    return VideoAugmentation(crop_size, blur_kernel=max(3, kernel))


def _slic(crop_size: int) -> VideoAugmentation:
    # SLIC (Khorasgani et al., CVPR 2022), rvl-lab-utoronto/video_similarity_search,
    # datasets/data_loader.py build_spatial_transformation: RandomResizedCrop(SAMPLE_SIZE=128,
    # scale (0.25, 1), ratio (0.75, 1/0.75)), flip 0.5, ColorJitter(0.5, 0.5, 0.5, 0.5, p=0.8),
    # ColorDrop (grayscale) p 0.2, GaussianBlur p 0.2 (datasets/spatial_transforms.py:
    # cv2.GaussianBlur((15, 15), 2)); ImageNet mean/std (get_mean_std for UCF101). Its transforms
    # re-draw parameters once per clip (randomize_parameters), as VideoSequential does here.
    return VideoAugmentation(
        crop_size,
        scale=(0.25, 1.0),
        ratio=(0.75, 1 / 0.75),
        flip_p=0.5,
        jitter=(0.5, 0.5, 0.5, 0.5),
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.2,
        blur_kernel=15,
        blur_sigma=(2.0, 2.0),
    )


def _crop_flip(crop_size: int) -> VideoAugmentation:
    # Spatial-only light augmentation for supervised fine-tuning: random resized crop and flip.
    return VideoAugmentation(
        crop_size, scale=(0.25, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
    )


#: Training augmentation presets by name.
PRESETS = {"simclr": _simclr, "slic": _slic, "crop_flip": _crop_flip}


def build_augmentation(preset: str, crop_size: int = 112) -> VideoAugmentation:
    """Build a training augmentation preset: ``simclr``, ``slic`` or ``crop_flip``."""
    if preset not in PRESETS:
        raise ValueError(
            f"Unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}."
        )
    return PRESETS[preset](crop_size)
