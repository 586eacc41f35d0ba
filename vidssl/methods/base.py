"""The base LightningModule every vidssl method extends.

It owns what all methods share (backbone, projection head, optimiser and schedules, the EMA
update, logging, batch checks) so that a method only says how many views it needs, the loss on
a batch and its momentum pairs. See docs/adding_a_method.md.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from vidssl.methods.heads import ProjectionHead
from vidssl.methods.optim import LARS, cosine_momentum, warmup_cosine

__all__ = [
    "ConfigError",
    "UsesPseudoLabels",
    "VideoSSLMethod",
    "ema_update",
    "log_decode_failures",
    "momentum_copy",
]

OPTIMIZERS = ("sgd", "adamw", "lars")
LR_SCHEDULES = ("cosine", "constant")
EMA_SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A setting that cannot work, found when training starts, before the first step.

    Raised by the methods' start-up checks (views the data module cannot give, a queue that
    does not fit the batches); the message names the config keys to change, and ``vidssl fit``
    prints it as one line.
    """


def _check_choice(kind: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value


def log_decode_failures(module: pl.LightningModule, batch: Dict[str, Any]) -> None:
    """Log ``train/decode_failures``: videos replaced because they failed to decode, per epoch.

    Reads the batch's optional ``decode_failures`` key (``LongTensor B``, videos replaced while
    making each sample, see docs/concepts.md) and logs its sum over the epoch's batches and all
    processes (``reduce_fx="sum"``, ``sync_dist=True``). Counting in the batch, not in the
    dataset, is what adds up DataLoader workers, which are separate processes. Does nothing for
    batches without the key.
    """
    if not isinstance(batch, dict) or "decode_failures" not in batch:
        return
    n = batch["decode_failures"]
    module.log("train/decode_failures", n.sum().float(), on_step=False, on_epoch=True,
               reduce_fx="sum", sync_dist=True, batch_size=int(n.shape[0]))


def momentum_copy(module: nn.Module) -> nn.Module:
    """Return a frozen deep copy of ``module`` to be updated by EMA (a key / target encoder)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """Set ``target = momentum * target + (1 - momentum) * online``, parameter by parameter.

    Buffers (BN running statistics) are not averaged: as in the official MoCo code
    (``_momentum_update_key_encoder``) the target keeps the statistics of its own forward passes.
    """
    t = [p for p in target.parameters()]
    o = [p.detach() for p in online.parameters()]
    if len(t) != len(o):
        raise ValueError(
            f"momentum pair has different parameter counts ({len(o)} online, {len(t)} target); "
            "build the target with momentum_copy(online)"
        )
    torch._foreach_lerp_(t, o, 1.0 - momentum)


class UsesPseudoLabels:
    """Mixin of the methods whose loss reads pseudo-labels (the consumer side of the contract).

    It implements :class:`~vidssl.pseudo_labels.PseudoLabelConsumer`: the labeller (the
    ``PseudoLabels`` callback) calls :meth:`set_pseudo_labels` with a
    :class:`~vidssl.pseudo_labels.PseudoLabelState`, and the loss reads ``self.pseudo_labels``
    (``LongTensor N`` on the method's device, ``-1`` = none; ``None`` before the first labels:
    every video is then its own class). The buffer is not saved with the model: the labeller's
    state is the source of truth after a resume. Subclasses call :meth:`init_pseudo_labels` in
    their ``__init__`` and may set ``pseudo_label_defaults`` (the callback's defaults for them).
    Methods that do not use labels carry nothing for them.
    """

    pseudo_label_defaults: Dict[str, Any] = {}

    def init_pseudo_labels(self) -> None:
        """Register the (unsaved) ``pseudo_labels`` buffer, empty until the first hand-over."""
        self.register_buffer("pseudo_labels", None, persistent=False)  # type: ignore[attr-defined]

    def set_pseudo_labels(self, state: Any) -> None:
        """Take ``state`` (a ``PseudoLabelState``, or ``N`` ints) as ``self.pseudo_labels``."""
        from vidssl.pseudo_labels import labels_of

        self.pseudo_labels = labels_of(state).to(self.device)  # type: ignore[attr-defined]


class VideoSSLMethod(pl.LightningModule):
    """Base class of the self-supervised methods: backbone + projection head + optimisation.

    A method subclasses it and provides:

    - ``views`` (class or instance attribute): what each entry of ``batch["views"]`` must hold,
      in order, from the data module's vocabulary: ``"anchor"`` (a clip of the sample's video),
      ``"positive"`` (another clip of it, or of the pair's positive video),
      ``"anchor_repeat"`` (the anchor's frames again, augmented independently). The data module
      follows it (``VideoDataModule(views=...)``; ``vidssl fit`` links it) and ``setup("fit")``
      checks it. ``num_views`` is ``len(views)``; a subclass that sets only ``num_views = n``
      (the older API) gets an anchor and ``n - 1`` positives;
    - ``required_keys`` (class attribute): further batch keys it reads (checked on the first
      batch), e.g. ``("positive_index",)``;
    - ``motion_views`` (class or instance attribute): the positions in ``views`` whose motion
      field it reads, ``batch["motion"][pos]`` (float ``B x M x T x H x W``, docs/motion.md);
      ``()`` (the default) reads none. The data module follows it
      (``VideoDataModule(motion_views=...)``), ``setup("fit")`` checks that it gives motion and
      the first batch that the fields are there; ``motion_option`` names the setting that
      turns them on, for the error message;
    - ``compute_loss(batch) -> Tensor | dict`` on an augmented batch (a dict carries ``"loss"``
      and any extra values to log);
    - ``momentum_pairs() -> list[(online, target)]`` when it keeps EMA encoders; the base updates
      them once per optimiser step in ``on_train_batch_end``.

    The batch (docs/concepts.md): ``views: list[float B x C x T x H x W]``, ``index: LongTensor
    B``, ``label: LongTensor B``.

    Args:
        backbone: a name for ``vidssl.backbones.build`` or an ``nn.Module`` with ``feature_dim``
            whose ``forward(B x C x T x H x W)`` returns ``B x feature_dim``.
        backbone_kwargs: extra arguments for ``vidssl.backbones.build`` (e.g. ``width_mult``).
        weights: weights for the named backbone (see ``vidssl.backbones.build``).
        proj_hidden_dim: hidden width of the projection head; ``None`` uses the backbone's
            feature size (as SimCLR's and MoCo v2's heads do).
        proj_output_dim: embedding size the loss sees (SimCLR, MoCo: 128).
        proj_num_layers: linear layers in the head; 0 means no head (identity).
        proj_batch_norm: BatchNorm1d in the hidden layers of the head.
        optimizer: ``"sgd"``, ``"adamw"`` or ``"lars"``.
        lr: peak learning rate (after warm-up).
        weight_decay: weight decay.
        momentum: SGD / LARS momentum (AdamW ignores it).
        exclude_bias_and_norm: no weight decay (and no LARS adaptation) for biases and
            normalisation parameters (SimCLR does this; MoCo's SGD does not).
        lars_eta: LARS trust coefficient.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        lr_schedule: after warm-up, ``"cosine"`` decay to ``min_lr_ratio * lr`` or ``"constant"``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        ema_momentum: EMA momentum of the momentum pairs (its start value for a cosine schedule).
        ema_momentum_end: final EMA momentum of the cosine schedule.
        ema_schedule: ``"constant"`` (MoCo) or ``"cosine"`` (BYOL, MoCo v3).
    """

    views: Tuple[str, ...] = ("anchor", "positive")
    required_keys: Tuple[str, ...] = ()
    motion_views: Tuple[int, ...] = ()
    motion_option: str = "the method's motion settings"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The older API: a class attribute num_views = n, no views.
        n = cls.__dict__.get("num_views")
        if isinstance(n, int) and "views" not in cls.__dict__:
            cls.views = ("anchor",) + ("positive",) * (n - 1)
            del cls.num_views

    @property
    def num_views(self) -> int:
        """Views this method reads from a batch: ``len(self.views)``."""
        return len(self.views)

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        proj_hidden_dim: Optional[int] = None,
        proj_output_dim: int = 128,
        proj_num_layers: int = 2,
        proj_batch_norm: bool = True,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        exclude_bias_and_norm: bool = False,
        lars_eta: float = 0.001,
        warmup_epochs: float = 0.0,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
        ema_momentum: float = 0.99,
        ema_momentum_end: float = 1.0,
        ema_schedule: str = "constant",
    ):
        super().__init__()
        if not lr > 0:  # also catches NaN
            raise ValueError(f"lr must be > 0, got {lr}: the peak learning rate "
                             "(model.init_args.lr in a config)")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay} "
                             "(model.init_args.weight_decay in a config)")
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        _check_choice("ema_schedule", ema_schedule, EMA_SCHEDULES)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else [])
        self.backbone = self._build_backbone(backbone, backbone_kwargs or {}, weights)
        self.proj_hidden_dim = proj_hidden_dim
        self.proj_output_dim = proj_output_dim
        self.proj_num_layers = proj_num_layers
        self.proj_batch_norm = proj_batch_norm
        self.feature_dim = int(self.backbone.feature_dim)
        self.projection = self.build_projection_head(self.feature_dim)
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.exclude_bias_and_norm = exclude_bias_and_norm
        self.lars_eta = lars_eta
        self.warmup_epochs = warmup_epochs
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.ema_momentum = ema_momentum
        self.ema_momentum_end = ema_momentum_end
        self.ema_schedule = ema_schedule
        self._batch_checked = False
        self._last_ema_step = 0

    # ----------------------------------------------------------------- building blocks
    @staticmethod
    def _build_backbone(
        backbone: Union[str, nn.Module], kwargs: Dict[str, Any], weights: Optional[str]
    ) -> nn.Module:
        if isinstance(backbone, str):
            from vidssl.backbones import build

            module = build(backbone, weights=weights, **kwargs)
        elif isinstance(backbone, nn.Module):
            if kwargs or weights is not None:
                raise ValueError(
                    "backbone_kwargs and weights apply only to a backbone given by name; "
                    "configure the module yourself or pass its name"
                )
            module = backbone
        else:
            raise TypeError(f"backbone must be a name or an nn.Module, got {type(backbone)}")
        if not hasattr(module, "feature_dim"):
            raise ValueError(
                f"backbone {type(module).__name__} has no `feature_dim`; a vidssl backbone "
                "returns B x feature_dim from forward(B x C x T x H x W)"
            )
        return module

    def build_projection_head(self, feature_dim: int) -> nn.Module:
        """Return the projection head (override for a different head); called in ``__init__``."""
        if self.proj_num_layers == 0:
            return nn.Identity()
        return ProjectionHead(
            feature_dim,
            hidden_dim=self.proj_hidden_dim or feature_dim,
            output_dim=self.proj_output_dim,
            num_layers=self.proj_num_layers,
            batch_norm=self.proj_batch_norm,
        )

    # ----------------------------------------------------------------- the override surface
    def compute_loss(self, batch: Dict[str, Any]) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return the loss on an augmented batch, or a dict with ``"loss"`` and values to log."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss(batch)")

    def momentum_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """Return ``(online, target)`` module pairs updated by EMA after each optimiser step."""
        return []

    # ----------------------------------------------------------------- user API
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Return backbone features ``B x D`` of float clips ``B x C x T x H x W``."""
        return self.backbone(clips)

    def embed(self, clips: torch.Tensor, projection: bool = False) -> torch.Tensor:
        """Return L2-normalised features ``B x D`` (of the projection head if ``projection``)."""
        feats = self.backbone(clips)
        if projection:
            feats = self.projection(feats)
        return F.normalize(feats, dim=1)

    def encode_motion(self, motion: torch.Tensor) -> torch.Tensor:
        """Return backbone features ``B x D`` of motion fields ``B x M x T x H x W``.

        Evaluation on motion (``vidssl retrieval --features motion``) calls it. A method that
        encodes motion overrides it; the base raises ``NotImplementedError``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no motion encoder; evaluate it with features='rgb'"
        )

    def backbone_with_weights(self, weights: str) -> nn.Module:
        """Return a copy of this method's backbone loaded with ``weights`` (this one unchanged).

        What a labeller uses to embed with a pre-trained network of the same architecture
        (``PseudoLabels(initial_weights=...)``); ``weights`` is any file
        ``vidssl.backbones.load_backbone_weights`` reads.
        """
        from vidssl.backbones import load_backbone_weights

        backbone = copy.deepcopy(self.backbone)
        load_backbone_weights(backbone, weights)
        return backbone

    # ----------------------------------------------------------------- batch checks
    def check_batch(self, batch: Dict[str, Any]) -> None:
        """Raise a clear error if ``batch`` lacks the views or keys this method needs."""
        name = type(self).__name__
        if not isinstance(batch, dict) or "views" not in batch:
            raise ValueError(
                f"{name} expects a dict batch with 'views' (docs/concepts.md), got "
                f"{type(batch).__name__}{' with keys ' + str(list(batch)) if isinstance(batch, dict) else ''}"  # noqa: E501
            )
        views = batch["views"]
        if len(views) < self.num_views:
            raise ValueError(
                f"{name} needs {self.num_views} views per batch ({', '.join(self.views)}) but "
                f"the batch has {len(views)}; build the data module with views=model.views "
                "(vidssl fit does)"
            )
        for v in views[: self.num_views]:
            if v.ndim != 5 or not v.is_floating_point():
                raise ValueError(
                    f"{name} expects augmented float views B x C x T x H x W, got "
                    f"{tuple(v.shape)} {v.dtype}; the data module's on_after_batch_transfer "
                    "(or VideoDataModule.augment) turns uint8 clips into float views"
                )
        missing = [k for k in self.required_keys if k not in batch]
        if missing:
            raise ValueError(f"{name} needs batch keys {missing}; the batch has {list(batch)}")
        if self.motion_views:
            self._check_motion_batch(batch)

    def _check_motion_batch(self, batch: Dict[str, Any]) -> None:
        name = type(self).__name__
        motion = batch.get("motion")
        have = sorted(motion) if isinstance(motion, dict) else []
        lacking = [p for p in self.motion_views if p not in have]
        if lacking:
            raise ValueError(
                f"{name} reads the motion of views {list(self.motion_views)} but the batch has "
                f"motion for {have}; build the data module with motion=... and "
                "motion_views=model.motion_views (vidssl fit links it)"
            )
        for p in self.motion_views:
            m, v = motion[p], batch["views"][p]
            if m.ndim != 5 or not m.is_floating_point() or m.shape[0] != v.shape[0] or (
                m.shape[2:] != v.shape[2:]
            ):
                raise ValueError(
                    f"{name} expects batch['motion'][{p}] as float B x M x T x H x W beside its "
                    f"view {tuple(v.shape)}, got {tuple(m.shape)} {m.dtype}; the data module's "
                    "on_after_batch_transfer (VideoDataModule.augment) makes it"
                )

    def setup(self, stage: str) -> None:
        """Check, before training, that the data module gives the views this method needs.

        A data module with a ``views`` attribute (``VideoDataModule``) must give ``self.views``
        as its first views; one with only ``num_views`` at least ``self.num_views`` views.
        Raises :class:`ConfigError` naming the keys to change.
        """
        if stage != "fit":
            return
        dm = self._datamodule()
        name = type(self).__name__
        if self.motion_views and dm is not None:
            self.check_motion_source(dm)
        provided = getattr(dm, "views", None)
        if isinstance(provided, (tuple, list)):
            if tuple(provided[: self.num_views]) != tuple(self.views):
                raise ConfigError(
                    f"{name} needs the views ({', '.join(self.views)}) but the data module "
                    f"gives ({', '.join(provided)}); leave data.num_views and "
                    "data.repeat_anchor unset (the views follow the method), or pass "
                    "VideoDataModule(views=model.views)"
                )
            return
        count = getattr(dm, "num_views", None)
        if isinstance(count, int) and count < self.num_views:
            raise ConfigError(
                f"{name} needs {self.num_views} views per sample but the data module gives "
                f"{count}; set num_views={self.num_views} on the data module"
            )

    def check_motion_source(self, dm: Any) -> None:
        """Raise :class:`ConfigError` unless ``dm`` gives motion for every ``motion_views``.

        ``dm.motion_channels`` must be positive (``VideoDataModule(motion="flow" | "mv" |
        "diff")``) and ``dm.motion_views``, when set, must hold every position this method
        reads. Called by :meth:`setup` when ``motion_views`` is not empty.
        """
        name = type(self).__name__
        channels = getattr(dm, "motion_channels", 0)
        if not isinstance(channels, int) or channels <= 0:
            raise ConfigError(
                f"{name} reads motion fields of views {list(self.motion_views)} "
                f"({self.motion_option}) but the data module gives no motion; set "
                "data.init_args.motion to 'flow' (with data.init_args.flow_dir), 'mv' or 'diff', "
                "or turn the method's motion off"
            )
        given = getattr(dm, "motion_views", None)
        if given is not None and not set(self.motion_views) <= set(given):
            raise ConfigError(
                f"{name} reads motion fields of views {list(self.motion_views)} but the data "
                f"module gives them for views {list(given)}; leave data.init_args.motion_views "
                "unset (it follows the method)"
            )

    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def train_batches(self) -> Optional[Tuple[int, Optional[bool]]]:
        """Return ``(batch size per process, drop_last)`` of training; ``None`` if unknown.

        Read from the data module when training starts: the batch sampler it was given
        (``train_batch_sampler``, e.g. the ``PseudoLabels`` callback's ``ClusterBatchSampler``)
        if any, else its own ``batch_size`` and ``drop_last`` (``None`` when it has none).
        """
        dm = self._datamodule()
        source = getattr(dm, "train_batch_sampler", None) or dm
        size = getattr(source, "batch_size", None)
        drop_last = getattr(source, "drop_last", None)
        if not isinstance(size, int):
            return None
        return size, drop_last if isinstance(drop_last, bool) else None

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Compute and log the loss of one batch (the method's ``compute_loss``)."""
        if not self._batch_checked:
            self.check_batch(batch)
            self._batch_checked = True
        out = self.compute_loss(batch)
        extras: Dict[str, torch.Tensor] = {}
        if isinstance(out, dict):
            extras = {k: v for k, v in out.items() if k != "loss"}
            out = out["loss"]
        bs = batch["views"][0].shape[0]
        # Step values for the progress bar; epoch means synced across ranks.
        self.log("train/loss", out, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=bs)
        for k, v in extras.items():
            self.log(f"train/{k}", v, on_epoch=True, sync_dist=True, batch_size=bs)
        log_decode_failures(self, batch)
        return out

    def on_train_start(self) -> None:
        """Remember the optimiser step count (restored on resume) for the EMA update."""
        self._last_ema_step = self.trainer.global_step

    def current_ema_momentum(self) -> float:
        """Return the EMA momentum for the current optimiser step (constant or cosine)."""
        if self.ema_schedule == "constant":
            return self.ema_momentum
        return cosine_momentum(
            self.trainer.global_step,
            int(self.trainer.estimated_stepping_batches),
            self.ema_momentum,
            self.ema_momentum_end,
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the momentum pairs by EMA, once per optimiser step."""
        # global_step counts optimiser steps: with gradient accumulation it does not move on
        # every batch, and the target must follow the weights, not the batches.
        if self.trainer.global_step == self._last_ema_step:
            return
        self._last_ema_step = self.trainer.global_step
        pairs = self.momentum_pairs()
        if not pairs:
            return
        m = self.current_ema_momentum()
        for online, target in pairs:
            ema_update(online, target, m)
        if self.ema_schedule != "constant":
            self.log("train/ema_momentum", m, on_step=True, on_epoch=False)

    # ----------------------------------------------------------------- optimisation
    def param_groups(self) -> List[Dict[str, Any]]:
        """Return the optimiser's parameter groups (trainable parameters only).

        With ``exclude_bias_and_norm`` biases and normalisation weights (every parameter of
        ndim <= 1) go to a group without weight decay and without LARS adaptation.
        """
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not self.exclude_bias_and_norm:
            return [{"params": [p for _, p in params]}]
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        return [
            {"params": decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_adaptation": False},
        ]

    def configure_optimizers(self):
        """Build the optimiser and the per-step warm-up + cosine (or constant) schedule."""
        groups = self.param_groups()
        if self.optimizer_name == "sgd":
            for g in groups:
                g.pop("lars_adaptation", None)
            opt = torch.optim.SGD(
                groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        elif self.optimizer_name == "adamw":
            for g in groups:
                g.pop("lars_adaptation", None)
            opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = LARS(
                groups,
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                eta=self.lars_eta,
            )
        total = int(self.trainer.estimated_stepping_batches)  # also loads the train loader
        batches = self.trainer.num_training_batches
        # Optimiser steps per epoch; an iterable loader of unknown length counts as one epoch.
        steps_per_epoch = (
            math.ceil(batches / self.trainer.accumulate_grad_batches)
            if math.isfinite(batches) and batches > 0
            else total
        )
        warmup = int(round(self.warmup_epochs * steps_per_epoch))
        min_ratio = self.min_lr_ratio if self.lr_schedule == "cosine" else 1.0

        def factor(step: int) -> float:
            return warmup_cosine(step, warmup, total, min_ratio)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
