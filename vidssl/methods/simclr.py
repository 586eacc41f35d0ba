"""SimCLR for video (videoSimCLR): NT-Xent between two clips of the same video."""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from vidssl.losses import nt_xent
from vidssl.methods.base import VideoSSLMethod

__all__ = ["SimCLR"]


class SimCLR(VideoSSLMethod):
    """SimCLR on video clips (videoSimCLR): NT-Xent between two clips of one video.

    SimCLR is Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations". On video the two views are two clips of one video, each augmented with
    one random spatial draw shared by its frames, the video recipe of CVRL (Qian et al. 2021,
    "Spatiotemporal Contrastive Video Representation Learning"). The temporal part (where the
    clips are sampled, temporal jitter) is the data module's job.

    The loss is NT-Xent over the 2N views; under DDP the negatives come from every GPU through
    the gradient-correct ``vidssl.distributed.gather_with_grad`` (SimCLR gathers across TPU
    cores for the same reason: negatives from the global batch).

    Defaults and sources:

    - ``temperature=0.1``: SimCLR reference code (google-research/simclr ``--temperature``) and
      CVRL (0.1).
    - head: 2-layer MLP with BN, hidden = backbone feature size, output 128 (SimCLR sec. 2.1 and
      reference code; SimCLR v2 uses BN in every head layer).
    - ``optimizer="lars"`` with ``lr = 0.3 * batch / 256``, weight decay 1e-6, momentum 0.9, 10
      warm-up epochs then cosine, biases and BN excluded from decay and LARS (SimCLR appendix
      B.6). The default here is ``"sgd"`` with a small ``lr`` because LARS pays off at large
      batches; set ``optimizer="lars"`` to follow the paper.

    Args:
        temperature: NT-Xent temperature.
        gather_negatives: use negatives from every rank under DDP.
        backbone, ...: as ``VideoSSLMethod`` (backbone, head sizes, optimiser, schedule).
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        temperature: float = 0.1,
        gather_negatives: bool = True,
        proj_hidden_dim: Optional[int] = None,
        proj_output_dim: int = 128,
        proj_num_layers: int = 2,
        proj_batch_norm: bool = True,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        exclude_bias_and_norm: bool = True,
        lars_eta: float = 0.001,
        warmup_epochs: float = 0.0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
    ):
        super().__init__(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            weights=weights,
            proj_hidden_dim=proj_hidden_dim,
            proj_output_dim=proj_output_dim,
            proj_num_layers=proj_num_layers,
            proj_batch_norm=proj_batch_norm,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            exclude_bias_and_norm=exclude_bias_and_norm,
            lars_eta=lars_eta,
            warmup_epochs=warmup_epochs,
            lr_schedule=lr_schedule,
            min_lr_ratio=min_lr_ratio,
        )
        self.temperature = temperature
        self.gather_negatives = gather_negatives

    def compute_loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        """NT-Xent between the projections of views 0 and 1 (``B x C x T x H x W`` each)."""
        v1, v2 = batch["views"][0], batch["views"][1]
        # One backbone pass over both views: one BN batch of 2B, as SimCLR encodes them.
        z = self.projection(self.backbone(torch.cat([v1, v2], dim=0)))
        z1, z2 = z.chunk(2, dim=0)
        return nt_xent(z1, z2, self.temperature, gather=self.gather_negatives)
