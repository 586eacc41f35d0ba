"""SimCLR for video (videoSimCLR): NT-Xent between two clips of the same video."""

from __future__ import annotations

from typing import Any, Dict

import torch

from vidssl.losses import nt_xent
from vidssl.methods.base import VideoSSLMethod
from vidssl.methods.settings import Head, Optimization

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

    Defaults and sources (``default_head``, ``default_optim``; change them with ``head`` and
    ``optim``, e.g. ``optim: {optimizer: lars, lr: 0.3}``):

    - ``temperature=0.1``: SimCLR reference code (google-research/simclr ``--temperature``) and
      CVRL (0.1).
    - head: 2-layer MLP with BN, hidden = backbone feature size, output 128 (SimCLR sec. 2.1 and
      reference code; SimCLR v2 uses BN in every head layer).
    - optimiser: the paper's is LARS with ``lr = 0.3 * batch / 256``, weight decay 1e-6,
      momentum 0.9, 10 warm-up epochs then cosine, biases and BN excluded from decay and LARS
      (SimCLR appendix B.6). The default here is SGD with ``lr=0.05`` (the rest as the paper,
      no warm-up) because LARS pays off at large batches; set ``optim.optimizer="lars"`` to
      follow the paper.

    Args:
        temperature: NT-Xent temperature.
        gather_negatives: use negatives from every rank under DDP.
        **kwargs: ``VideoSSLMethod``'s (``backbone``, ``head``, ``optim``).
    """

    # Sources: the class docstring ("Defaults and sources").
    default_head = Head(hidden_dim=None, output_dim=128, num_layers=2, batch_norm=True)
    default_optim = Optimization(
        optimizer="sgd", lr=0.05, weight_decay=1e-6, momentum=0.9, exclude_bias_and_norm=True,
        lars_eta=0.001, warmup_epochs=0.0, lr_schedule="cosine", min_lr_ratio=0.0,
    )

    def __init__(self, temperature: float = 0.1, gather_negatives: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.gather_negatives = gather_negatives

    def compute_loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        """NT-Xent between the projections of views 0 and 1 (``B x C x T x H x W`` each)."""
        v1, v2 = batch["views"][0], batch["views"][1]
        # One backbone pass over both views: one BN batch of 2B, as SimCLR encodes them.
        z = self.projection(self.backbone(torch.cat([v1, v2], dim=0)))
        z1, z2 = z.chunk(2, dim=0)
        return nt_xent(z1, z2, self.temperature, gather=self.gather_negatives)
