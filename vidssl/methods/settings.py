"""The settings every method shares, as three typed groups: head, optimisation, EMA schedule.

A method states its paper defaults once (``default_head``, ``default_optim``, ``default_ema``);
a config sets only the fields it changes (``optim: {lr: 0.1}``), the others keep the method's.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

__all__ = [
    "EMA_SCHEDULES",
    "EMASchedule",
    "Head",
    "LEGACY_NAMES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "Optimization",
    "migrate_legacy_names",
]

OPTIMIZERS = ("sgd", "adamw", "lars")
LR_SCHEDULES = ("cosine", "constant")
EMA_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Head:
    """The projection head (``model.init_args.head``); a ``None`` field keeps the method's.

    Args:
        hidden_dim: hidden width; ``0`` (or a method default of ``None``) uses the backbone's
            feature size (as SimCLR's and MoCo v2's heads do).
        output_dim: embedding size the loss sees (SimCLR, MoCo: 128).
        num_layers: linear layers; 0 means no head (identity).
        batch_norm: BatchNorm1d in the hidden layers.
    """

    hidden_dim: Optional[int] = None
    output_dim: Optional[int] = None
    num_layers: Optional[int] = None
    batch_norm: Optional[bool] = None


@dataclass(frozen=True)
class Optimization:
    """Optimiser and lr schedule (``model.init_args.optim``); a ``None`` field keeps the method's.

    Args:
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
    """

    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    exclude_bias_and_norm: Optional[bool] = None
    lars_eta: Optional[float] = None
    warmup_epochs: Optional[float] = None
    lr_schedule: Optional[str] = None
    min_lr_ratio: Optional[float] = None


@dataclass(frozen=True)
class EMASchedule:
    """EMA momentum of the momentum pairs (``model.init_args.ema``); ``None`` keeps the method's.

    Args:
        momentum: EMA momentum (its start value for a cosine schedule).
        momentum_end: final EMA momentum of the cosine schedule.
        schedule: ``"constant"`` (MoCo) or ``"cosine"`` (BYOL, MoCo v3).
    """

    momentum: Optional[float] = None
    momentum_end: Optional[float] = None
    schedule: Optional[str] = None


G = TypeVar("G", Head, Optimization, EMASchedule)


def as_group(kind: type, value: Union[None, Mapping[str, Any], Any], key: str) -> Any:
    """Return ``value`` (``None``, a dict or a ``kind``) as a ``kind``; raise on unknown fields."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        names = [f.name for f in dataclasses.fields(kind)]
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} under {key}; valid: {', '.join(names)}")
        return kind(**value)
    raise TypeError(f"{key} must be a {kind.__name__} or a dict, got {type(value).__name__}")


def merged(*layers: G) -> G:
    """Return the first layer with each ``None`` field taken from the next layer that sets it.

    ``merged(given, method_default, base_default)``: what a config gives wins, then the
    method's paper defaults, then the base's.
    """
    out = layers[-1]
    for layer in reversed(layers[:-1]):
        set_fields = {k: v for k, v in dataclasses.asdict(layer).items() if v is not None}
        out = dataclasses.replace(out, **set_fields)
    return out


#: The flat ``__init__`` names methods took before the groups, and where each lives now:
#: ``name -> (group, field)`` (``lr`` is ``optim.lr``).
LEGACY_NAMES: Dict[str, Tuple[str, str]] = {
    "proj_hidden_dim": ("head", "hidden_dim"),
    "proj_output_dim": ("head", "output_dim"),
    "proj_num_layers": ("head", "num_layers"),
    "proj_batch_norm": ("head", "batch_norm"),
    **{name: ("optim", name) for name in (
        "optimizer", "lr", "weight_decay", "momentum", "exclude_bias_and_norm", "lars_eta",
        "warmup_epochs", "lr_schedule", "min_lr_ratio")},
    "ema_momentum": ("ema", "momentum"),
    "ema_momentum_end": ("ema", "momentum_end"),
    "ema_schedule": ("ema", "schedule"),
}


def migrate_legacy_names(
    args: Mapping[str, Any], keep: Sequence[str] = ()
) -> Tuple[Dict[str, Any], List[str]]:
    """Move the flat legacy names of ``args`` into their groups; return ``(args, moved)``.

    ``moved`` lists ``"old -> new"`` per name moved (``lr -> optim.lr``); names in ``keep`` (a
    method's own arguments) stay. Where a group already sets the same field to another value
    the flat one wins and ``moved`` says so: Lightning lays a checkpoint's hyper-parameters
    (flat, in one written before the groups) over the config's when ``fit --ckpt_path``
    resumes, and the checkpoint's win there. ``proj_hidden_dim: None`` (the feature size,
    before) becomes ``head.hidden_dim: 0``, since a ``None`` field now means "the method's
    default".
    """
    out = dict(args)
    moved: List[str] = []
    for old in [k for k in args if k in LEGACY_NAMES and k not in keep]:
        group, field = LEGACY_NAMES[old]
        value = out.pop(old)
        if old == "proj_hidden_dim" and value is None:
            value = 0
        current = out.get(group)
        fields = dataclasses.asdict(current) if dataclasses.is_dataclass(current) else dict(
            current or {})
        note = ""
        if fields.get(field) is not None and fields[field] != value:
            note = f" (its {value!r} replaces {group}.{field}={fields[field]!r})"
        fields[field] = value
        out[group] = fields
        moved.append(f"{old} -> {group}.{field}{note}")
    return out, moved


def warn_legacy(moved: Sequence[str], where: str = "model.init_args") -> None:
    """Emit one ``FutureWarning`` naming the new key of each moved legacy name.

    ``where`` prefixes the keys: ``model.init_args`` (a config), ``--model.init_args`` (the
    command line) or a class name (Python, a checkpoint's hyper-parameters).
    """
    if moved:
        pairs = [m.split(" -> ", 1) for m in moved]
        if where.isidentifier():  # a class: Python arguments
            kinds = {"head": "Head", "optim": "Optimization", "ema": "EMASchedule"}
            keys = "; ".join(
                f"{where}({old}=...) -> {where}({new.split('.')[0]}="
                f"{kinds[new.split('.')[0]]}({new.split('.', 1)[1].split(' ')[0]}=...))"
                + new[len(new.split(" ")[0]):] for old, new in pairs)
        else:
            keys = "; ".join(f"{where}.{old} -> {where}.{new}" for old, new in pairs)
        warnings.warn(f"flat head / optimisation / EMA keys are deprecated, use their groups: "
                      f"{keys}", FutureWarning, stacklevel=3)
