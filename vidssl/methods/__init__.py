"""Self-supervised methods: the ``VideoSSLMethod`` base and one LightningModule per method."""

from vidssl.methods.base import (
    ConfigError,
    UsesPseudoLabels,
    VideoSSLMethod,
    ema_update,
    momentum_copy,
)
from vidssl.methods.heads import ProjectionHead
from vidssl.methods.moco import MoCo
from vidssl.methods.optim import LARS, cosine_momentum, warmup_cosine
from vidssl.methods.settings import EMASchedule, Head, Optimization
from vidssl.methods.simclr import SimCLR

__all__ = [
    "ConfigError",
    "EMASchedule",
    "Head",
    "LARS",
    "MoCo",
    "Optimization",
    "ProjectionHead",
    "SimCLR",
    "UsesPseudoLabels",
    "VideoSSLMethod",
    "cosine_momentum",
    "ema_update",
    "momentum_copy",
    "warmup_cosine",
]

from vidssl.methods.cluster_contrast import ClusterContrast  # noqa: E402
from vidssl.methods.cluster_triplet import ClusterTriplet  # noqa: E402
from vidssl.methods.cross_modal import CrossModalContrast  # noqa: E402
from vidssl.methods.goca import GOCA  # noqa: E402

__all__ += ["ClusterContrast", "ClusterTriplet", "CrossModalContrast", "GOCA"]
