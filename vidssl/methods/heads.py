"""Projection heads: the small networks between backbone features and the loss."""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["HeadedEncoder", "ProjectionHead", "projection_head_from_state_dict"]


class ProjectionHead(nn.Sequential):
    """An MLP ``D -> hidden -> ... -> out`` (a single linear layer when ``num_layers == 1``).

    Hidden layers are ``Linear -> [BatchNorm1d] -> ReLU``. SimCLR uses 2 layers with BN (Chen et
    al. 2020, the reference code puts BN in every layer of its head); MoCo v2 uses 2 layers
    without BN (facebookresearch/moco ``--mlp``); MoCo v1 a single linear layer.

    Args:
        input_dim: backbone feature size ``D``.
        hidden_dim: width of the hidden layers.
        output_dim: embedding size the loss sees.
        num_layers: number of linear layers (>= 1).
        batch_norm: BatchNorm1d after every hidden linear layer.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 2048,
        output_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
    ):
        if num_layers < 1:
            raise ValueError(f"ProjectionHead needs num_layers >= 1, got {num_layers}")
        layers = []
        dim = input_dim
        for _ in range(num_layers - 1):
            # No bias before BN: BN's shift makes it redundant.
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, output_dim))
        super().__init__(*layers)
        self.output_dim = output_dim


def projection_head_from_state_dict(
    state: Mapping[str, Any], prefix: str = "projection.", random_init: bool = False
) -> nn.Sequential:
    """Rebuild a method's projection head from its weights in a checkpoint's ``state_dict``.

    The layout is read from the keys under ``prefix``: a 2-D ``weight`` is a ``Linear`` (with a
    bias if the state has one), a 1-D ``weight`` with ``running_mean`` a ``BatchNorm1d``, and a
    position without weights a ``ReLU`` (:class:`ProjectionHead`'s layers). ``random_init``
    gives the same layout with fresh weights (seed 0), e.g. for a randomly initialised baseline.

    Raises:
        ValueError: when the state has no weights under ``prefix`` (a method without a head).
    """
    layers: dict[int, dict[str, torch.Tensor]] = {}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\w+)$")
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        raise ValueError(
            f"no projection head in this checkpoint (no '{prefix}N.weight' entries): it was "
            "trained without one, so only backbone features exist; use the backbone's"
        )
    modules: list[nn.Module] = []
    for i in range(max(layers) + 1):
        w = layers.get(i, {})
        if "weight" not in w:
            modules.append(nn.ReLU(inplace=True))
        elif w["weight"].dim() == 2:
            out_dim, in_dim = w["weight"].shape
            modules.append(nn.Linear(in_dim, out_dim, bias="bias" in w))
        else:
            modules.append(nn.BatchNorm1d(w["weight"].shape[0]))
    head = nn.Sequential(*modules)
    if random_init:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for module in head:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    else:
        head.load_state_dict({f"{i}.{k}": v for i, w in layers.items() for k, v in w.items()})
    return head.eval()


class HeadedEncoder(nn.Module):
    """A backbone with its projection head beside it: ``forward`` gives backbone features.

    The shape retrieval code expects of a trained method (``model(clips)`` and
    ``model.projection``), for a backbone and head loaded from a checkpoint.

    Args:
        backbone: maps float ``B x C x T x H x W`` clips to ``B x D``.
        projection: the head, ``B x D -> B x d``.
    """

    def __init__(self, backbone: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Return backbone features ``B x D``."""
        return self.backbone(clips)
