"""The base LightningModule every vidssl method extends.

It owns what all methods share (backbone, projection head, optimiser and schedules, the EMA
update, logging, batch checks) so that a method only says how many views it needs, the loss on
a batch and its momentum pairs. See docs/adding_a_method.md.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from vidssl.methods.heads import ProjectionHead
from vidssl.methods.optim import LARS, cosine_momentum, warmup_cosine
from vidssl.methods.settings import (
    EMA_SCHEDULES,
    LEGACY_NAMES,
    LR_SCHEDULES,
    OPTIMIZERS,
    EMASchedule,
    Head,
    Optimization,
    as_group,
    merged,
    migrate_legacy_names,
    warn_legacy,
)

__all__ = [
    "ConfigError",
    "UsesPseudoLabels",
    "VideoSSLMethod",
    "ema_update",
    "log_decode_failures",
    "momentum_copy",
]



class ConfigError(ValueError):
    """A setting that cannot work, found when training starts, before the first step.

    Raised by the methods' start-up checks (views the data module cannot give, a queue that
    does not fit the batches); the message names the config keys to change, and ``vidssl fit``
    prints it as one line.
    """


def _check_choice(kind: str, value: str, valid: Sequence[str], key: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)} "
                         f"(model.init_args.{key} in a config)")
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


def _setting(group: str, field: str) -> property:
    """Return a flat attribute that reads and writes ``field`` of the resolved ``group``."""

    def get(self: Any) -> Any:
        return getattr(getattr(self, group), field)

    def set_(self: Any, value: Any) -> None:
        setattr(self, group, dataclasses.replace(getattr(self, group), **{field: value}))

    return property(get, set_, doc=f"``self.{group}.{field}`` (the flat name of before the "
                                   "groups).")


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
        head: the projection head (:class:`~vidssl.methods.settings.Head`: ``hidden_dim``,
            ``output_dim``, ``num_layers``, ``batch_norm``).
        optim: optimiser and schedule (:class:`~vidssl.methods.settings.Optimization`:
            ``optimizer``, ``lr``, ``weight_decay``, ``momentum``, ``exclude_bias_and_norm``,
            ``lars_eta``, ``warmup_epochs``, ``lr_schedule``, ``min_lr_ratio``).
        ema: EMA momentum of the momentum pairs (:class:`~vidssl.methods.settings.EMASchedule`:
            ``momentum``, ``momentum_end``, ``schedule``).
        **legacy: the flat names of before the groups (``lr``, ``proj_output_dim``,
            ``ema_momentum``, ...; ``settings.LEGACY_NAMES``), moved into their group with a
            ``FutureWarning``, so old code and old checkpoints still build.

    In each group a field left ``None`` takes the method's default (``default_head``,
    ``default_optim``, ``default_ema``, stated once per method from its paper), so
    ``optim=Optimization(lr=0.1)`` changes the learning rate only. After ``__init__``,
    ``self.head``, ``self.optim`` and ``self.ema`` hold the resolved groups, and the flat
    attributes (``self.lr``, ``self.proj_output_dim``, ``self.optimizer_name``, ...) read and
    write their fields.
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

    #: The head, optimisation and EMA defaults of this method (its paper's); a subclass states
    #: the fields it changes, the rest come from its parent classes.
    default_head: Head = Head(hidden_dim=None, output_dim=128, num_layers=2, batch_norm=True)
    default_optim: Optimization = Optimization(
        optimizer="sgd", lr=0.05, weight_decay=1e-4, momentum=0.9, exclude_bias_and_norm=False,
        lars_eta=0.001, warmup_epochs=0.0, lr_schedule="cosine", min_lr_ratio=0.0,
    )
    default_ema: EMASchedule = EMASchedule(momentum=0.99, momentum_end=1.0, schedule="constant")

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        # Frozen (immutable) defaults, all fields None: jsonargparse lists their fields.
        head: Head = Head(),  # noqa: B008
        optim: Optimization = Optimization(),  # noqa: B008
        ema: EMASchedule = EMASchedule(),  # noqa: B008
        **legacy: Any,
    ):
        super().__init__()
        given, moved = migrate_legacy_names({"head": head, "optim": optim, "ema": ema, **legacy})
        unknown = [k for k in given if k not in ("head", "optim", "ema")]
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                            f"{unknown[0]!r}")
        warn_legacy(moved, type(self).__name__)
        self.head = self._resolve(Head, given["head"], "head")
        self.optim = self._resolve(Optimization, given["optim"], "optim")
        self.ema = self._resolve(EMASchedule, given["ema"], "ema")
        o = self.optim
        if not o.lr > 0:  # also catches NaN
            raise ValueError(f"lr must be > 0, got {o.lr}: the peak learning rate "
                             "(model.init_args.optim.lr in a config)")
        if o.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {o.weight_decay} "
                             "(model.init_args.optim.weight_decay in a config)")
        _check_choice("optimizer", o.optimizer, OPTIMIZERS, "optim.optimizer")
        _check_choice("lr_schedule", o.lr_schedule, LR_SCHEDULES, "optim.lr_schedule")
        _check_choice("ema_schedule", self.ema.schedule, EMA_SCHEDULES, "ema.schedule")
        self._save_settings(backbone)
        self.backbone = self._build_backbone(backbone, backbone_kwargs or {}, weights)
        self.feature_dim = int(self.backbone.feature_dim)
        self.projection = self.build_projection_head(self.feature_dim)
        self._batch_checked = False
        self._last_ema_step = 0

    @classmethod
    def declared_arguments(cls) -> Set[str]:
        """Return the ``__init__`` argument names the method's own classes declare.

        Those of every class between ``cls`` and ``VideoSSLMethod`` (itself included, the base
        left out): a method's own knobs, where a legacy flat name is the method's, not a group's.
        """
        return {name for c in cls.__mro__ if issubclass(c, VideoSSLMethod)
                and c is not VideoSSLMethod and "__init__" in c.__dict__
                for name in inspect.signature(c.__init__).parameters}

    @classmethod
    def settings_defaults(cls, name: str) -> Any:
        """Return the method's default group ``name`` (``"head"``, ``"optim"``, ``"ema"``).

        The ``default_<name>`` of each class of the method, nearest first, filling each other's
        ``None`` fields (a field left ``None`` in all of them, such as ``head.hidden_dim``,
        keeps its meaning: the backbone's feature size).
        """
        attr = "default_" + name
        return merged(*[c.__dict__[attr] for c in cls.__mro__ if attr in c.__dict__])

    def _resolve(self, kind: type, given: Any, name: str) -> Any:
        """``given`` over :meth:`settings_defaults` ``(name)``."""
        return merged(as_group(kind, given, f"model.init_args.{name}"),
                      self.settings_defaults(name))

    def _save_settings(self, backbone: Any) -> None:
        # Lightning's record (every class's __init__ arguments, or the config under
        # LightningCLI), then the groups resolved (what this run used, not what was given) and
        # no legacy flat names: load_from_checkpoint rebuilds the method from it.
        frame = inspect.currentframe()
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else [],
                                  frame=frame.f_back if frame else None)
        # A subclass that takes a flat name itself (written before the groups) keeps it.
        own = self.declared_arguments()
        self.remove_ignored_hparams([n for n in LEGACY_NAMES if n not in own])
        self.save_hyperparameters({"head": dataclasses.asdict(self.head),
                                   "optim": dataclasses.asdict(self.optim),
                                   "ema": dataclasses.asdict(self.ema)})

    # The flat names of before the groups, as attributes (user code, Lightning's lr finder).
    proj_hidden_dim = _setting("head", "hidden_dim")
    proj_output_dim = _setting("head", "output_dim")
    proj_num_layers = _setting("head", "num_layers")
    proj_batch_norm = _setting("head", "batch_norm")
    optimizer_name = _setting("optim", "optimizer")
    lr = _setting("optim", "lr")
    weight_decay = _setting("optim", "weight_decay")
    momentum = _setting("optim", "momentum")
    exclude_bias_and_norm = _setting("optim", "exclude_bias_and_norm")
    lars_eta = _setting("optim", "lars_eta")
    warmup_epochs = _setting("optim", "warmup_epochs")
    lr_schedule = _setting("optim", "lr_schedule")
    min_lr_ratio = _setting("optim", "min_lr_ratio")
    ema_momentum = _setting("ema", "momentum")
    ema_momentum_end = _setting("ema", "momentum_end")
    ema_schedule = _setting("ema", "schedule")

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
        h = self.head
        if h.num_layers == 0:
            return nn.Identity()
        return ProjectionHead(feature_dim, hidden_dim=h.hidden_dim or feature_dim,
                              output_dim=h.output_dim, num_layers=h.num_layers,
                              batch_norm=h.batch_norm)

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
