"""Projection heads: the small networks between backbone features and the loss."""

from __future__ import annotations

from torch import nn

__all__ = ["ProjectionHead"]


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
