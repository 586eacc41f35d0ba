"""The backbone registry: ``register`` a builder under a name, ``build`` a model by name.

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models``.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Mapping, Optional, TypeVar, Union

from torch import Tensor

from vidssl.backbones.base import VideoBackbone

__all__ = ["UnknownBackboneError", "build", "list_backbones", "register"]

_BUILDERS: dict[str, Callable[..., VideoBackbone]] = {}

F = TypeVar("F", bound=Callable[..., VideoBackbone])


class UnknownBackboneError(KeyError, ValueError):
    """Raised by :func:`build` for a name that is not registered; the message lists the known ones.

    It is both a ``KeyError`` (a failed look-up) and a ``ValueError`` (a bad argument value), so
    either ``except`` clause catches it.
    """

    def __str__(self) -> str:
        # KeyError's own __str__ would print the message in quotes, escaped.
        return str(self.args[0])


def register(fn: Optional[F] = None, *, name: Optional[str] = None) -> Any:
    """Register a backbone builder under ``name`` (default: the function's name).

    Use as ``@register`` or ``@register(name="my_net")``, as timm's ``register_model``. The builder
    takes keyword arguments (``width_mult`` and the model's own) and returns a
    :class:`~vidssl.backbones.base.VideoBackbone`. Registering a taken name raises ``ValueError``.
    """

    def decorator(builder: F) -> F:
        key = name or builder.__name__
        if key in _BUILDERS and _BUILDERS[key] is not builder:
            raise ValueError(f"backbone {key!r} is already registered by {_BUILDERS[key]!r}")
        _BUILDERS[key] = builder
        return builder

    return decorator(fn) if fn is not None else decorator


def list_backbones() -> list[str]:
    """Return the registered backbone names, sorted (exported as ``vidssl.backbones.list``)."""
    return sorted(_BUILDERS)


def build(
    name: str,
    weights: Union[str, os.PathLike, Mapping[str, Tensor], None] = None,
    **kwargs: Any,
) -> VideoBackbone:
    """Build the backbone registered as ``name`` and optionally load weights into it.

    Args:
        name: one of :func:`list_backbones` (e.g. ``"r3d_18"``).
        weights: ``None`` (random initialisation), or a path to a torchvision state dict, a
            Hara-style checkpoint or a vidssl Lightning checkpoint, or an in-memory state dict;
            see :func:`vidssl.backbones.load_backbone_weights`.
        **kwargs: passed to the builder, e.g. ``width_mult=0.25`` or ``in_channels=2``.

    Raises:
        UnknownBackboneError: ``name`` is not registered (the message lists the known names).
        WeightsMismatchError: the weights do not fit the model (keys and shapes listed).
    """
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownBackboneError(
            f"unknown backbone {name!r}.{hint} Known backbones: {', '.join(list_backbones())}"
        )
    model = _BUILDERS[name](**kwargs)
    if weights is not None:
        # Imported here: weights.py needs nothing from the registry, and keeping the import local
        # avoids a cycle should it ever do.
        from vidssl.backbones.weights import load_backbone_weights

        load_backbone_weights(model, weights)
    return model
