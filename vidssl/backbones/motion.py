"""Motion inputs for the zoo: one shared encoder fed motion fields (``MotionStem``), two streams.

Motion fields arrive as float ``B x M x T x H x W`` (docs/motion.md): flow or motion vectors
``M = 2`` (x, y in pixels per frame divided by the bound 20, in [-1, 1]), frame differences
``M = 3``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from vidssl.backbones.registry import build
from vidssl.backbones.weights import cross_modality_stem

__all__ = [
    "MOTION_INPUTS",
    "MotionStem",
    "SharedEncoder",
    "TwoStream",
    "build_two_stream",
]

#: How a shared RGB encoder takes a motion field (see :class:`MotionStem`).
MOTION_INPUTS: Tuple[str, ...] = ("x3", "xy")

# ImageNet statistics, the RGB views' default normalisation (vidssl.data.augment.IMAGENET_*);
# repeated here because backbones import nothing from the data package.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _stem_conv(backbone: nn.Module) -> nn.Conv3d:
    name = getattr(backbone, "stem_conv", None)
    conv = backbone.get_submodule(name) if name else None
    if not isinstance(conv, nn.Conv3d):
        raise ValueError(
            f"{type(backbone).__name__} does not name its first convolution (`stem_conv`), so "
            "no second stem can be built for it; every zoo backbone names it. Use "
            "motion_input='x3' (the motion field through the RGB stem)"
        )
    return conv


class MotionStem(nn.Module):
    """How ONE shared RGB backbone takes motion fields, beside RGB clips in the same batch.

    Two modes:

    - ``"x3"`` (SLIC's official input; ``datasets/dataset_utils.py construct_net_input`` of
      github.com/rvl-lab-utoronto/video_similarity_search): the x component alone, as the
      grey image SLIC stores (``optical_u``, TV-L1 ``u`` clipped to +-20 px and mapped to
      [0, 1]): ``u = (x + 1) / 2`` for ``x`` in [-1, 1], copied to 3 channels and normalised
      with the RGB views' mean and std (ImageNet), so it goes through the RGB stem unchanged.
      The y component is dropped, as in SLIC. Needs ``M = 2``.
    - ``"xy"``: every one of the ``M`` motion channels, unnormalised, through a second first
      convolution (``self.conv``, the backbone's stem convolution with ``M`` input channels,
      same kernel, stride and padding) whose output replaces the RGB stem's for the motion
      rows; everything after it (stem BN, all layers, the head) stays shared. This is the
      two-channel stem for a shared encoder: a stem made for motion sees the sign and the y
      component, while one trunk still embeds RGB and motion clips into one space, as SLIC
      wants. ``self.conv`` starts from the RGB stem by TSN's cross-modality initialisation
      (:func:`vidssl.backbones.cross_modality_stem`). Works for any ``M`` (frame differences
      too); needs a backbone that names its ``stem_conv`` (every zoo backbone does).

    The module holds no reference to the backbone (it would put the backbone's weights twice
    in a state dict): pass the backbone to each call.

    Args:
        backbone: the shared RGB backbone (read once: its stem convolution, for ``"xy"``).
        mode: ``"x3"`` or ``"xy"``.
        in_channels: ``M``, channels of the motion fields.
        mean, std: normalisation of the ``"x3"`` images (the RGB views'; ImageNet).
    """

    def __init__(
        self,
        backbone: nn.Module,
        mode: str = "x3",
        in_channels: int = 2,
        mean: Sequence[float] = _IMAGENET_MEAN,
        std: Sequence[float] = _IMAGENET_STD,
    ):
        super().__init__()
        if mode not in MOTION_INPUTS:
            raise ValueError(f"unknown motion_input {mode!r}; valid: {', '.join(MOTION_INPUTS)}")
        if mode == "x3" and in_channels != 2:
            raise ValueError(
                f"motion_input='x3' copies the x component of a 2-channel field (flow or motion "
                f"vectors), got {in_channels} channels; use motion_input='xy' (an own stem)"
            )
        self.mode = mode
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1, 1), persistent=False)
        self.conv: Optional[nn.Conv3d] = None
        if mode == "xy":
            stem = _stem_conv(backbone)
            self.conv = nn.Conv3d(
                in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                stem.dilation, stem.groups, bias=stem.bias is not None,
            )
            with torch.no_grad():
                self.conv.weight.copy_(cross_modality_stem(stem.weight, in_channels))
                if stem.bias is not None:
                    self.conv.bias.copy_(stem.bias)

    def x3(self, motion: Tensor) -> Tensor:
        """Return SLIC's input ``B x 3 x T x H x W`` for fields ``B x 2 x T x H x W`` in [-1, 1]."""
        u = (motion[:, :1] + 1.0) / 2.0
        return (u.expand(-1, self.mean.shape[1], -1, -1, -1) - self.mean) / self.std

    def forward(self, backbone: nn.Module, rgb: Tensor, motion: Tensor, mask: Tensor) -> Tensor:
        """Return ``backbone`` features ``N x D`` of a batch mixing RGB clips and motion fields.

        Args:
            backbone: the shared backbone.
            rgb: float ``N x 3 x T x H x W``; rows where ``mask`` is set are not used.
            motion: float ``K x M x T x H x W``, the fields of the ``K`` rows where ``mask`` is
                set, in row order.
            mask: bool ``N``, the rows that take the motion field.
        """
        if self.mode == "x3":
            return backbone(rgb.index_put((mask,), self.x3(motion).to(rgb.dtype)))
        with self._replace_stem_rows(backbone, motion, mask):
            return backbone(rgb)

    def encode(self, backbone: nn.Module, motion: Tensor) -> Tensor:
        """Return ``backbone`` features ``B x D`` of motion fields ``B x M x T x H x W`` alone."""
        if self.mode == "x3":
            return backbone(self.x3(motion))
        b, _, t, h, w = motion.shape
        rgb = motion.new_zeros(b, int(getattr(backbone, "in_channels", 3)), t, h, w)
        mask = torch.ones(b, dtype=torch.bool, device=motion.device)
        return self.forward(backbone, rgb, motion, mask)

    @contextmanager
    def _replace_stem_rows(self, backbone: nn.Module, motion: Tensor, mask: Tensor) -> Iterator:
        conv = self.conv
        assert conv is not None

        def hook(module: nn.Module, inputs: Tuple[Tensor, ...], out: Tensor) -> Tensor:
            return out.index_put((mask,), conv(motion).to(out.dtype))

        handle = _stem_conv(backbone).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


class SharedEncoder(nn.Module):
    """One backbone for RGB and motion: ``forward(rgb)`` and ``encode_motion(motion)``.

    What ``vidssl.evaluation.load_encoder`` returns for a checkpoint trained with motion views
    through a shared encoder (``ClusterTriplet(motion_prob > 0)``), so that evaluation can embed
    motion clips the way training did.

    Args:
        backbone: the RGB backbone.
        motion_stem: how it takes motion fields (:class:`MotionStem`).
    """

    def __init__(self, backbone: nn.Module, motion_stem: MotionStem):
        super().__init__()
        self.backbone = backbone
        self.motion_stem = motion_stem
        self.feature_dim = int(backbone.feature_dim)
        self.in_channels = int(getattr(backbone, "in_channels", 3))
        self.motion_channels = motion_stem.in_channels

    def forward(self, rgb: Tensor) -> Tensor:
        """Return features ``B x D`` of float RGB clips ``B x C x T x H x W``."""
        return self.backbone(rgb)

    def encode_motion(self, motion: Tensor) -> Tensor:
        """Return features ``B x D`` of float motion fields ``B x M x T x H x W``."""
        return self.motion_stem.encode(self.backbone, motion)


class TwoStream(nn.Module):
    """An RGB backbone and a motion backbone of the same layout, e.g. for GOCA.

    ``forward(rgb, motion)`` returns ``(rgb features B x D, motion features B x D')``; ``D`` and
    ``D'`` are equal for two builds of one zoo name (:func:`build_two_stream`), and then
    ``feature_dim`` is that size (``None`` otherwise). Evaluation reads ``encode_rgb`` and
    ``encode_motion``.

    Args:
        rgb: backbone of ``B x 3 x T x H x W`` clips.
        motion: backbone of ``B x M x T x H x W`` motion fields.
    """

    def __init__(self, rgb: nn.Module, motion: nn.Module):
        super().__init__()
        self.rgb = rgb
        self.motion = motion
        d_rgb, d_motion = int(rgb.feature_dim), int(motion.feature_dim)
        self.feature_dim: Optional[int] = d_rgb if d_rgb == d_motion else None
        self.in_channels = int(getattr(rgb, "in_channels", 3))
        self.motion_channels = int(getattr(motion, "in_channels", 2))

    def forward(self, rgb: Tensor, motion: Tensor) -> Tuple[Tensor, Tensor]:
        """Return ``(rgb stream features, motion stream features)``, each ``B x D``."""
        return self.rgb(rgb), self.motion(motion)

    def encode_rgb(self, rgb: Tensor) -> Tensor:
        """Return the RGB stream's features ``B x D``."""
        return self.rgb(rgb)

    def encode_motion(self, motion: Tensor) -> Tensor:
        """Return the motion stream's features ``B x D``."""
        return self.motion(motion)


def build_two_stream(
    name: str,
    motion_channels: int = 2,
    weights: Union[str, None, dict] = None,
    motion_weights: Union[str, None, dict] = None,
    **kwargs,
) -> TwoStream:
    """Build a :class:`TwoStream` of the zoo backbone ``name``: RGB and ``motion_channels``.

    Both streams have the same layout (``build(name, **kwargs)``; the motion one with
    ``in_channels=motion_channels``). ``weights`` load into the RGB stream and, unless
    ``motion_weights`` are given, into the motion stream too, whose stem then gets TSN's
    cross-modality initialisation (see :func:`vidssl.backbones.load_backbone_weights`).
    """
    rgb = build(name, weights=weights, **kwargs)
    motion = build(
        name,
        weights=motion_weights if motion_weights is not None else weights,
        in_channels=motion_channels,
        **kwargs,
    )
    return TwoStream(rgb, motion)
