"""Load weights into a backbone from torchvision, Hara-style or vidssl Lightning checkpoints.

One entry point, :func:`load_backbone_weights`; ``build(name, weights=...)`` calls it.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

__all__ = [
    "WeightsMismatchError",
    "cross_modality_stem",
    "extract_state_dict",
    "load_backbone_weights",
]

log = logging.getLogger(__name__)

# Wrappers that prefix every key: nn.DataParallel / DistributedDataParallel ("module.", as in
# Hara's and SLIC's checkpoints) and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# vidssl methods keep their encoder in the attribute `backbone` (docs/concepts.md).
_LIGHTNING_PREFIX = "backbone."
_MAX_LISTED = 25


class WeightsMismatchError(RuntimeError):
    """The weights do not fit the model; the message lists missing, unexpected and misshapen keys.

    The full lists are kept in ``missing_keys``, ``unexpected_keys`` and ``shape_mismatches``
    (``(key, shape in file, shape in model)``).
    """

    def __init__(
        self,
        message: str,
        missing_keys: list[str],
        unexpected_keys: list[str],
        shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        super().__init__(message)
        self.missing_keys = missing_keys
        self.unexpected_keys = unexpected_keys
        self.shape_mismatches = shape_mismatches


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def extract_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """Return the backbone's state dict held in a loaded checkpoint, with wrapper prefixes removed.

    Accepts a plain state dict (torchvision's files), a dict with a ``"state_dict"`` (Hara's and
    Lightning's checkpoints) or ``"model"`` entry. ``module.`` (DataParallel) and ``_orig_mod.``
    (torch.compile) prefixes are dropped; if keys start with ``backbone.`` (a vidssl Lightning
    checkpoint), only those are kept, without the prefix (heads, momentum copies and queues are
    left out).

    Raises:
        ValueError: no mapping of tensors was found (the message lists the top-level keys).
    """
    state: Any = checkpoint
    for entry in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(entry), Mapping):
            state = state[entry]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        keys = list(checkpoint)[:20] if isinstance(checkpoint, Mapping) else type(checkpoint)
        raise ValueError(
            "found no state dict (a mapping of names to tensors) in the checkpoint; expected a "
            "torchvision state dict or a dict with a 'state_dict' entry, got top-level keys "
            f"{keys}"
        )
    state = {_strip_wrappers(k): v for k, v in state.items()}
    if any(k.startswith(_LIGHTNING_PREFIX) for k in state):
        state = {
            _strip_wrappers(k[len(_LIGHTNING_PREFIX) :]): v
            for k, v in state.items()
            if k.startswith(_LIGHTNING_PREFIX)
        }
    return state


def _listed(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}):\n    {shown}{more}"


def _layout_hint(model_keys: set[str], file_keys: set[str]) -> str:
    # The two ResNet layouts of the zoo are easy to mix up; say which one the file has.
    if "stem.0.weight" in file_keys and "stem.0.weight" not in model_keys:
        return (
            "\n  The file has torchvision's layout (stem.*): build 'r3d_18', 'mc3_18' or similar."
        )
    if "conv1.weight" in file_keys and "conv1.weight" not in model_keys:
        return "\n  The file has Hara's 3D-ResNet layout (conv1.*, bn1.*): build 'r3d_18_hara'."
    return ""


def cross_modality_stem(weight: Tensor, in_channels: int) -> Tensor:
    """Return a stem weight for ``in_channels`` inputs made from one for other inputs (e.g. RGB).

    The cross-modality initialisation of TSN (Wang et al., "Temporal Segment Networks", ECCV
    2016, Sec. 3.2): average the weights over the input channels and repeat the average
    ``in_channels`` times, ``w'[o, m] = mean_c w[o, c]`` for every ``m``. A motion clip whose
    ``in_channels`` channels all hold the same value then gives the response an RGB clip of that
    grey value gives (up to the factor ``in_channels / C``).

    Args:
        weight: convolution weight ``O x C x k...`` (any kernel rank).
        in_channels: ``M``, the input channels of the new stem.

    Returns:
        ``O x M x k...``, a new tensor of ``weight``'s dtype.
    """
    if weight.ndim < 3 or in_channels < 1:
        raise ValueError(
            f"expected a convolution weight O x C x k... and in_channels >= 1, got shape "
            f"{tuple(weight.shape)} and in_channels={in_channels}"
        )
    mean = weight.float().mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, *([1] * (weight.ndim - 2))).to(weight.dtype)


def _adapt_stem(model: nn.Module, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Fit the stem of ``state`` to the model's input channels by :func:`cross_modality_stem`."""
    stem = getattr(model, "stem_conv", None)
    if not stem:
        return state
    key = f"{stem}.weight"
    expected = model.state_dict().get(key)
    weight = state.get(key)
    if expected is None or weight is None or weight.shape == expected.shape:
        return state
    # Only the input channels may differ: any other difference is a real mismatch (reported).
    if weight.ndim != expected.ndim or weight.shape[:1] + weight.shape[2:] != (
        expected.shape[:1] + expected.shape[2:]
    ):
        return state
    log.info(
        "%s: stem %s has %d input channels, the model %d; loaded by TSN's cross-modality "
        "initialisation (mean over input channels, repeated)",
        source, key, weight.shape[1], expected.shape[1],
    )
    return {**state, key: cross_modality_stem(weight, int(expected.shape[1]))}


def load_backbone_weights(
    model: nn.Module,
    weights: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    weights_only: bool = True,
) -> None:
    """Load a checkpoint into ``model`` in place, checking every key and shape.

    Args:
        model: the backbone (a :class:`~vidssl.backbones.base.VideoBackbone`; any module works).
        weights: a path, or an already loaded checkpoint. Accepted contents (see
            :func:`extract_state_dict`): a torchvision state dict such as ``r3d_18-b3b3357e.pth``;
            a Hara-style checkpoint ``{"state_dict": {"module.conv1.weight": ...}, ...}``; a vidssl
            Lightning checkpoint, whose ``backbone.*`` keys are taken.
        weights_only: passed to ``torch.load``; the default refuses pickled code. Set ``False``
            only for a file you trust that holds other Python objects.

    The classifier of the reference model (``model.classifier_prefixes``, e.g. torchvision's
    ``fc.*``) is skipped, reported at debug level. When the model's stem
    (``model.stem_conv``) has another number of input channels than the file's (an RGB
    checkpoint into a 2-channel motion backbone, ``build(name, in_channels=2)``), the stem is
    loaded by TSN's cross-modality initialisation (:func:`cross_modality_stem`: mean over the
    file's input channels, repeated), reported at info level; every other key must fit. BatchNorm
    ``num_batches_tracked`` counters may be absent (older checkpoints lack them).

    Raises:
        FileNotFoundError: the path does not exist.
        pickle.UnpicklingError: the file holds objects ``weights_only=True`` refuses.
        WeightsMismatchError: keys are missing, unexpected or of another shape (all listed).
    """
    source = "the given state dict"
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights).expanduser()
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights file not found: {path}")
        try:
            weights = torch.load(path, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(
                f"{path} holds objects that torch.load(weights_only=True) refuses ({err}). If you "
                "trust the file, call vidssl.backbones.load_backbone_weights(model, path, "
                "weights_only=False), or re-save only its state dict."
            ) from err
    state = _adapt_stem(model, extract_state_dict(weights), source)

    expected = model.state_dict()
    skip_prefixes = tuple(getattr(model, "classifier_prefixes", ()))
    skipped = {
        k for k in state if k not in expected and skip_prefixes and k.startswith(skip_prefixes)
    }
    if skipped:
        log.debug("ignoring classifier weights of %s: %s", source, ", ".join(sorted(skipped)))
        state = {k: v for k, v in state.items() if k not in skipped}

    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        message = f"the weights in {source} do not fit {type(model).__name__}:"
        if missing:
            message += _listed("missing keys", missing)
        if unexpected:
            message += _listed("unexpected keys", unexpected)
        if mismatched:
            message += _listed(
                "shape mismatches (file vs model; another width_mult or model?)",
                [f"{k}: {list(f)} vs {list(m)}" for k, f, m in mismatched],
            )
        message += _layout_hint(set(expected), set(state))
        raise WeightsMismatchError(message, missing, unexpected, mismatched)
    # Every key was checked above; strict=False only lets absent num_batches_tracked through.
    model.load_state_dict(state, strict=False)
