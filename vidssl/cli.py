"""The ``vidssl`` command: LightningCLI training subcommands plus embed, index, search and tools.

``vidssl fit|validate|test|predict --config FILE.yaml`` run a method on a data module chosen by
class path; the other subcommands (``vidssl --help`` lists them) are plain argparse programs.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["CLIError", "VidsslCLI", "main"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def __getattr__(name: str) -> Any:
    # format_recall_table lives with the retrieval protocol; kept importable from here, loaded
    # on first use (importing vidssl.cli must not import torch).
    if name == "format_recall_table":
        from vidssl.evaluation.retrieval import format_recall_table

        return format_recall_table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CLIError(Exception):
    """A mistake the user can fix; printed as ``vidssl CMD: error: MESSAGE`` without a traceback."""


# Exceptions that are the user's to fix (bad path, bad name, bad value). Anything else is a bug
# and keeps its traceback. VIDSSL_TRACEBACK=1 shows tracebacks for these too.
def _user_errors() -> tuple:
    from vidssl.backbones.registry import UnknownBackboneError
    from vidssl.backbones.weights import WeightsMismatchError

    return (CLIError, FileNotFoundError, NotADirectoryError, ValueError, UnknownBackboneError,
            WeightsMismatchError)


# ============================================================================ LightningCLI
def _lightning_cli_class() -> type:
    """Build the LightningCLI subclass (imported lazily: Lightning is slow to import)."""
    from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
    from pytorch_lightning.utilities.model_helpers import is_overridden

    class _Parser(LightningArgumentParser):
        """Reports config mistakes in a few lines (see :func:`_config_error`), not the usage."""

        def error(self, message: str, ex: Optional[Exception] = None):  # type: ignore[override]
            if not self.exit_on_error or os.environ.get("VIDSSL_TRACEBACK"):
                return super().error(message, ex)
            raise CLIError(_config_error(message, ex, self))

    class _VidsslCLI(LightningCLI):
        """``LightningCLI`` with vidssl's links and start-up checks.

        - ``data.views`` follows the method's ``views`` (what its loss reads, set by the method),
          and ``data.motion_views`` its ``motion_views`` (every view when it has none).
        - Errors building the model or the data module (unknown backbone, missing data folder)
          and the methods' start-up checks (``ConfigError``: a MoCo queue that does not fit the
          batches) are reported as one line.
        """

        def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
            # Every parser (the main one and each subcommand's) reads YAML through vidssl's
            # loader, which moves a method's legacy flat keys into their groups.
            kwargs.setdefault("parser_mode", _legacy_yaml_mode())
            return super().init_parser(**kwargs)

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            try:
                super().parse_arguments(parser, args)
            except _LegacyOption as e:
                # Flat legacy options of a method (--model.init_args.lr): moved into their
                # groups and parsed again; a config file's are moved by its loader.
                if isinstance(args, dict):
                    raise
                given = list(sys.argv[1:] if args is None else args)
                renamed = rename_legacy_options(given, e.class_path)
                if renamed == given:
                    raise
                super().parse_arguments(parser, renamed)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            # The method knows which views its loss reads; the data module has to produce
            # exactly those. Linking on instantiation reads the attribute of whichever method
            # the config names, after its arguments (ClusterTriplet's temporal_weight) are set.
            parser.link_arguments(
                "model", "data.init_args.views", compute_fn=_views, apply_on="instantiate"
            )
            parser.link_arguments(
                "model", "data.init_args.motion_views", compute_fn=_motion_views,
                apply_on="instantiate",
            )

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except _user_errors() as e:
                raise CLIError(
                    f"could not build the model / data module from the config: {_clean(e)}"
                ) from e

        def _early_setup(self, stage: str) -> None:
            # Read the video indexes now, so a wrong data path fails before the trainer starts
            # (the data module's setup is idempotent: Lightning's own call then does nothing).
            try:
                self.datamodule.setup(stage)
            except (FileNotFoundError, NotADirectoryError, ValueError) as e:
                raise CLIError(f"data: {e}") from e

        def before_fit(self) -> None:
            self._early_setup("fit")
            kwargs = self.config_init[self.subcommand]
            if kwargs.get("ckpt_path") == "last":
                kwargs["ckpt_path"] = _resolve_last_checkpoint(self.trainer)

        def _require_step(self, stage: str, hook: str) -> None:
            # Lightning would fail only after building the trainer, with a message about its own
            # hooks; the self-supervised methods have no labels to validate against.
            if not is_overridden(hook, self.model):
                raise CLIError(
                    f"{type(self.model).__name__} defines no {hook}: a self-supervised method "
                    f"is evaluated by retrieval, not by `vidssl {stage}`. Run `vidssl retrieval "
                    "CKPT ROOT` on a checkpoint, add the vidssl.callbacks.RetrievalMonitor "
                    "callback to `fit`, or `vidssl "
                    f"{stage}` a vidssl.evaluation.LinearProbe / FineTune model."
                )

        def before_validate(self) -> None:
            self._require_step("validate", "validation_step")
            self._early_setup("validate")

        def before_test(self) -> None:
            self._require_step("test", "test_step")
            self._early_setup("test")

    _VidsslCLI.parser_class_for_vidssl = _Parser
    return _VidsslCLI


_LEGACY_MODE = "vidssl_yaml"


def _legacy_yaml_mode() -> str:
    """Register (once) and return the parser mode that loads YAML with :func:`migrate_config`."""
    from jsonargparse import get_loader, set_loader

    try:
        get_loader(_LEGACY_MODE)
    except KeyError:
        import yaml

        yaml_load = get_loader("yaml")
        set_loader(_LEGACY_MODE, lambda text: migrate_config(yaml_load(text)),
                   exceptions=(yaml.YAMLError,))
    return _LEGACY_MODE


def _method_class(class_path: str) -> Optional[type]:
    """Return the ``VideoSSLMethod`` subclass ``class_path`` names (short names too), or None."""
    import importlib

    from vidssl.methods import VideoSSLMethod

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "vidssl.methods"), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, VideoSSLMethod) else None


def migrate_config(value: Any) -> Any:
    """Return ``value`` (loaded YAML) with each method's legacy flat keys in their groups.

    Every ``{class_path: <a VideoSSLMethod>, init_args: {...}}`` in it has its flat names
    (``lr``, ``proj_output_dim``, ``ema_momentum``, ...) moved into ``optim`` / ``head`` /
    ``ema`` with a ``FutureWarning`` naming the new keys, unless the class takes the name
    itself. Everything else is returned as it is.
    """
    if isinstance(value, list):
        return [migrate_config(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: migrate_config(v) for k, v in value.items()}
    cls = _method_class(out["class_path"]) if isinstance(out.get("class_path"), str) else None
    if cls is not None and isinstance(out.get("init_args"), dict):
        from vidssl.methods.settings import migrate_legacy_names, warn_legacy

        out["init_args"], moved = migrate_legacy_names(out["init_args"],
                                                       keep=cls.declared_arguments())
        warn_legacy(moved)
    return out


def _clean(error: Exception) -> str:
    """Keep the informative line of jsonargparse's "does not validate against Union" wrapping."""
    text = str(error)
    if "Errors:" not in text:
        return text
    items = [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ")]
    items = [i for i in items if not i.startswith("Expected a <class 'NoneType'>")]
    return "; ".join(items) or text


def _subclasses(base: type) -> List[str]:
    """Return the class paths of the public subclasses of ``base`` (vidssl's by package)."""
    found, todo = set(), list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__name__.startswith("_"):
            continue
        module = cls.__module__
        # vidssl classes are exported by their package: vidssl.methods.simclr -> vidssl.methods
        if module.startswith("vidssl."):
            module = ".".join(module.split(".")[:2])
        found.add(f"{module}.{cls.__name__}")
    return sorted(found)


def _views(model: Any) -> List[str]:
    """Return the views ``model`` reads: its ``views``, else an anchor + ``num_views - 1``."""
    views = getattr(model, "views", None)
    if views is None:
        views = ("anchor",) + ("positive",) * (int(getattr(model, "num_views", 2)) - 1)
    return list(views)


def _motion_views(model: Any) -> Optional[List[int]]:
    """Return the view positions ``model`` reads motion for, or ``None`` (every view).

    ``None`` when the model declares no ``motion_views``: a method written before motion views
    existed gets a motion field in every view when ``data.motion`` is set.
    """
    positions = getattr(model, "motion_views", None)
    return None if positions is None else [int(p) for p in positions]


def _resolve_last_checkpoint(trainer: Any) -> str:
    """Return the newest ``last.ckpt`` of the run's log folder (``fit --ckpt_path last``).

    Lightning looks for ``last.ckpt`` in the new run's own ``version_N+1`` folder and silently
    starts over. This looks in every ``version_*/checkpoints/`` of the logger's folder
    (``default_root_dir/lightning_logs`` by default; ``default_root_dir/checkpoints`` without a
    logger) and in the ``dirpath`` of each ``ModelCheckpoint``, takes the newest by modification
    time, and says which in one line; none is a :class:`CLIError`.
    """
    logger = getattr(trainer, "logger", None)
    base = Path(getattr(logger, "root_dir", None) or trainer.default_root_dir)
    found = list(base.glob("version_*/checkpoints/last.ckpt")) + [base / "checkpoints/last.ckpt"]
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        if getattr(cb, "dirpath", None):
            found.append(Path(cb.dirpath) / "last.ckpt")
    found = [p for p in found if p.is_file()]
    if not found:
        raise CLIError(
            f"--ckpt_path last: no last.ckpt under {base}/version_*/checkpoints/ (nor in a "
            "ModelCheckpoint dirpath); pass a checkpoint file, or save one with "
            "ModelCheckpoint(save_last=True)."
        )
    newest = max(found, key=lambda p: p.stat().st_mtime)
    print(f"vidssl fit: resuming from {newest} (the newest last.ckpt under {base})",
          file=sys.stderr)
    return str(newest)


# jsonargparse's wording of the mistakes _config_error rewrites.
_CLASS_OPTION = re.compile(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not "
                           r"accepted")
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*(.+)", re.S)
_SECTION = re.compile(r'Parser key "([^"]+)"')
_UNKNOWN_KEY = re.compile(r"(?:does not accept option|Option) '([^']+)'(?: is not accepted)?")


def _config_error(message: str, ex: Optional[Exception], parser: Any) -> str:
    """Rewrite a jsonargparse error as a few lines: the key, its section, the closest keys.

    An unknown key names its section and the nearest valid keys (``difflib``); an unknown
    ``class_path`` lists vidssl's classes for that section; other errors keep their innermost
    message, without the Union wrapping and the usage text.
    """
    section = (_SECTION.findall(message) or [""])[0]
    m = _CLASS_OPTION.search(message)
    if m:
        class_path, key = m.groups()
        moved = _legacy_key(class_path, key)
        if moved:
            raise _LegacyOption(
                f"{section}.init_args.{key} is now {section}.init_args.{moved} ({class_path}: "
                "the head, optimisation and EMA settings are groups)", class_path)
        return _unknown_key(key, f"{section}.init_args ({class_path})", _init_args(class_path))
    m = _CLASS_PROBLEM.search(message)
    if m:
        detail = " ".join(m.group(2).split()).split(" - Expected a <class 'NoneType'>")[0]
        inner = re.match(r'Parser key "([^"]+)":\s*(.*)', detail)
        if inner:
            return f"{section}.init_args.{inner.group(1)} ({m.group(1)}): {inner.group(2)}"
        return f"{section}.init_args ({m.group(1)}): {detail}"
    m = _UNKNOWN_KEY.search(message)
    if m and "class_path" not in message:
        sub = getattr(ex, "subcommand_parser", None) or parser
        parts = m.group(1).split(".")
        for i, part in enumerate(parts):  # the first part that is not a key where it stands
            where = ".".join(parts[:i])
            valid = _parser_keys(sub, where)
            if part not in valid or i == len(parts) - 1:
                return _unknown_key(part, where or "the top level", valid)
    if section in ("model", "data"):
        given = re.search(r"(?:import path string|Import path):? '?([\w.]+)", message)
        names = _valid_classes(section)
        if given:
            short = {n.rsplit(".", 1)[1]: n for n in names}
            close = difflib.get_close_matches(given.group(1).rsplit(".", 1)[-1], list(short), 3)
            hint = f"; did you mean {' or '.join(repr(short[c]) for c in close)}?" if close else ""
            return (f"unknown {section} class_path {given.group(1)!r}{hint}\n"
                    f"valid {section} class_path values: {', '.join(names)}")
        return (f"{_clean_union(message)}\n"
                f"valid {section} class_path values: {', '.join(names)}")
    return _clean_union(message) + "\n(vidssl fit --help lists every option)"


class _LegacyOption(CLIError):
    """A method's flat legacy key on the command line (``--model.init_args.lr``)."""

    def __init__(self, message: str, class_path: str) -> None:
        super().__init__(message)
        self.class_path = class_path


def _legacy_key(class_path: str, key: str) -> Optional[str]:
    """Return ``group.field`` when ``key`` is a legacy flat name of method ``class_path``."""
    from vidssl.methods.settings import LEGACY_NAMES

    cls = _method_class(class_path)
    if cls is None or key not in LEGACY_NAMES or key in cls.declared_arguments():
        return None
    return ".".join(LEGACY_NAMES[key])


_FLAT_OPTION = re.compile(r"^--model\.(?:init_args\.)?(\w+)(=.*)?$")


def rename_legacy_options(args: Sequence[str], class_path: str) -> List[str]:
    """Return ``args`` with method ``class_path``'s flat options moved into their groups.

    ``--model.init_args.lr 0.1`` (or ``--model.lr=0.1``) becomes
    ``--model.init_args.optim.lr 0.1``, with a ``FutureWarning`` naming each; a flat
    ``proj_hidden_dim`` of ``null`` becomes ``head.hidden_dim`` 0 (the feature size).
    """
    from vidssl.methods.settings import warn_legacy

    out, moved = list(args), []
    for i, arg in enumerate(out):
        m = _FLAT_OPTION.match(arg)
        new = _legacy_key(class_path, m.group(1)) if m else None
        if not new:
            continue
        value = m.group(2)
        out[i] = f"--model.init_args.{new}{value or ''}"
        if m.group(1) == "proj_hidden_dim":
            if value is not None and value[1:] in ("null", "None", "~"):
                out[i] = f"--model.init_args.{new}=0"
            elif value is None and i + 1 < len(out) and out[i + 1] in ("null", "None", "~"):
                out[i + 1] = "0"
        moved.append(f"{m.group(1)} -> {new}")
    warn_legacy(moved, "--model.init_args")
    return out


def _unknown_key(key: str, where: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else (
        f"; valid keys: {', '.join(sorted(valid))}" if valid else "")
    return f"unknown key {key!r} under {where}{hint}"


def _init_args(class_path: str) -> List[str]:
    """Return the ``__init__`` argument names of ``class_path``'s class (empty if unknown)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, ValueError, TypeError, AttributeError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _parser_keys(parser: Any, section: str) -> List[str]:
    """Return the keys ``parser`` accepts directly under ``section`` ('': the top level)."""
    prefix = f"{section}." if section else ""
    keys = set()
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", "") or ""
        if dest.startswith(prefix) and dest != "help":
            keys.add(dest[len(prefix):].split(".")[0])
    return sorted(keys)


def _clean_union(message: str) -> str:
    lines = [ln for ln in message.splitlines() if not ln.strip().startswith(
        ("Given value", "Subtypes:", "- Expected a <class 'NoneType'>"))]
    return " ".join(" ".join(lines).split())


def _valid_classes(section: str) -> List[str]:
    """Return the class paths vidssl has for ``model`` (LightningModules) or ``data``."""
    import pytorch_lightning as pl

    from vidssl.data import VideoDataModule

    base = pl.LightningModule if section == "model" else VideoDataModule
    names = [n for n in _subclasses(base) if n.startswith("vidssl.")]
    return names if section == "model" else ["vidssl.data.VideoDataModule", *names]


def VidsslCLI(args: Optional[Sequence[str]] = None, run: bool = True) -> Any:  # noqa: N802
    """Run (or, with ``run=False``, just build) the LightningCLI of vidssl on ``args``.

    The model is any LightningModule (vidssl's methods, ``LinearProbe``, ``FineTune``, or your
    own), the data module a :class:`vidssl.data.VideoDataModule` subclass, both chosen by
    ``class_path`` in the config (short names such as ``SimCLR`` work for classes vidssl ships).
    """
    import pytorch_lightning as pl

    import vidssl.callbacks  # noqa: F401  (callbacks by short name in configs)
    import vidssl.evaluation.probe  # noqa: F401  (LinearProbe / FineTune by short name)
    import vidssl.methods  # noqa: F401  (registers the method classes for short class paths)
    from vidssl.data import VideoDataModule

    cls = _lightning_cli_class()
    with warnings.catch_warnings():
        # main(args) is also called in-process (tests, notebooks) where sys.argv is the host's.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cls(
            pl.LightningModule,
            VideoDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=cls.parser_class_for_vidssl,
            args=list(args) if args is not None else None,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "prog": "vidssl",
                "description": "Train or evaluate a vidssl method (LightningCLI).",
            },
        )


# ============================================================================ plain commands
class _Command:
    """One plain subcommand: its help line, argument set-up and the function that runs it."""

    def __init__(self, name: str, help: str, add: Callable, run: Callable) -> None:
        self.name, self.help, self.add, self.run = name, help, add, run


_COMMANDS: Dict[str, _Command] = {}


def _command(name: str, help: str, add: Callable) -> Callable:
    def decorator(run: Callable) -> Callable:
        _COMMANDS[name] = _Command(name, help, add, run)
        return run

    return decorator


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="backbone name, for a state-dict .pth (checkpoints say it)")
    p.add_argument("--width-mult", type=float, help="the backbone's width_mult (state dicts)")
    p.add_argument("--random-init", action="store_true",
                   help="CKPT is a backbone name: embed with a randomly initialised model")


def _add_clip_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clips (default: the checkpoint's data settings, else 10 x 16 @ 112)")
    g.add_argument("--num-clips", type=int, help="clips per video, features averaged (10)")
    g.add_argument("--clip-len", type=int, help="frames per clip (16)")
    g.add_argument("--stride", type=int, help="frame step inside a clip (2)")
    g.add_argument("--crop-size", type=int, help="centre crop side in pixels (112)")


def _encoder_from_args(a: argparse.Namespace, source: str):
    from vidssl.evaluation.embed import load_encoder

    kwargs = {"width_mult": a.width_mult} if a.width_mult is not None else {}
    return load_encoder(source, backbone=a.backbone, backbone_kwargs=kwargs,
                        random_init=a.random_init)


def _settings_from_args(a: argparse.Namespace, info: Dict[str, Any]):
    from vidssl.evaluation.embed import ClipSettings

    return ClipSettings.for_encoder(info, num_clips=a.num_clips, clip_len=a.clip_len,
                                    stride=a.stride, crop_size=a.crop_size)


def _device(name: Optional[str]) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


# Writes that fail for a reason the user can fix: no permission, read-only file system, disk full.
_WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                 getattr(errno, "EDQUOT", errno.ENOSPC))


@contextmanager
def _writing_to(folder: Any, option: str) -> Iterator[None]:
    """Turn an ``OSError`` the user can fix while writing into ``folder`` into a ``CLIError``."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise CLIError(f"cannot write {e.filename or folder} ({e.strerror}); choose another "
                       f"output folder with {option} (one you can write to, with free space)"
                       ) from e


# ---------------------------------------------------------------------------- embed
def _add_embed(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT",
                   help="vidssl .ckpt, state-dict .pth (with --backbone), or a backbone name "
                        "with --random-init")
    p.add_argument("videos", metavar="VIDEOS", nargs="+",
                   help="video files, folders (searched recursively) or text files of paths")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="embeddings folder")
    _add_encoder_args(p)
    _add_clip_args(p)
    p.add_argument("--batch-size", type=int, default=4, help="videos per forward pass (4)")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decoding worker processes")
    p.add_argument("--shard-size", type=int, default=256, help="videos per shard file (256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    _add_motion_args(p)


@_command("embed", "embed videos with a checkpoint (multi-clip averaged, resumable)", _add_embed)
def _run_embed(a: argparse.Namespace) -> int:
    from vidssl.evaluation.embed import MotionClipReader, embed_videos, find_videos
    from vidssl.evaluation.retrieval import describe_features

    motion = _motion_source(a)
    if motion == "diff":
        raise CLIError("--motion diff is not available for `vidssl embed`; use --flow-dir DIR "
                       "(stored flow) or --motion mv")
    videos = find_videos(a.videos)
    encoder, info = _encoder_from_args(a, a.ckpt)
    settings = _settings_from_args(a, info)
    motion_reader = MotionClipReader(motion, a.flow_dir) if motion else None
    print(f"embedding {len(videos)} videos with {info['backbone']} ({info['source']}); clips: "
          f"{settings.num_clips} x {settings.clip_len} frames (stride {settings.stride}) at "
          f"{settings.crop_size}px; features of {describe_features(a.features, a.combine)}"
          f"{f' ({motion})' if motion else ''}", file=sys.stderr)
    with _writing_to(a.output, "-o DIR"):
        emb = embed_videos(encoder, videos, a.output, settings, info, batch_size=a.batch_size,
                           num_workers=a.num_workers, shard_size=a.shard_size,
                           device=_device(a.device), overwrite=a.overwrite,
                           features=a.features, combine=a.combine, motion_reader=motion_reader)
    print(f"wrote {len(emb.paths)} embeddings (D={emb.features.shape[1]}) to {a.output}")
    if emb.failed:
        print(f"{len(emb.failed)} videos could not be read and were left out:", file=sys.stderr)
        for line in emb.failed[:20]:
            print(f"  {line}", file=sys.stderr)
    print(f"next: vidssl index {a.output}")
    return 0


# ---------------------------------------------------------------------------- index
def _add_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", metavar="DIR", help="embeddings folder from `vidssl embed`")
    p.add_argument("-o", "--output", metavar="INDEX", help="index folder (default: DIR/index)")
    p.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf"),
                   help="flat: exact; ivf: approximate, for very large sets; auto: flat up to "
                        "200k videos")
    p.add_argument("--nlist", type=int, help="IVF cells (default 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=16, help="IVF cells searched per query (16)")


@_command("index", "build a faiss search index from an embeddings folder", _add_index)
def _run_index(a: argparse.Namespace) -> int:
    from vidssl.evaluation.embed import load_embeddings
    from vidssl.evaluation.search import SearchIndex

    emb = load_embeddings(a.embeddings)
    if emb.meta.get("incomplete"):
        print(f"warning: {emb.meta['incomplete']} videos of {a.embeddings} are not embedded yet "
              "(re-run the same `vidssl embed` to finish)", file=sys.stderr)
    meta = {"encoder": emb.meta.get("encoder", {}), "settings": emb.meta.get("settings", {}),
            "embeddings": str(Path(a.embeddings).resolve())}
    if emb.meta.get("features"):
        meta["features"] = emb.meta["features"]
    index = SearchIndex.build(emb.features, emb.paths, kind=a.kind, nlist=a.nlist,
                              nprobe=a.nprobe, meta=meta)
    out = a.output or Path(a.embeddings) / "index"
    with _writing_to(out, "-o INDEX"):
        out = index.save(out)
    print(f"indexed {len(index)} videos ({index.kind}, D={index.dim}) in {out}")
    print(f"next: vidssl search {out} QUERY.mp4 -k 10")
    return 0


# ---------------------------------------------------------------------------- search
def _add_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", metavar="INDEX", help="index folder from `vidssl index`")
    p.add_argument("queries", metavar="QUERY", nargs="+", help="query video(s)")
    p.add_argument("-k", type=int, default=10, help="results per query (10)")
    p.add_argument("--nprobe", type=int, help="IVF cells searched (overrides the index's)")
    p.add_argument("--include-self", action="store_true",
                   help="keep a query that is itself in the index among its results")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--device", help="where query videos are embedded")


@_command("search", "find the indexed videos most similar to query videos", _add_search)
def _run_search(a: argparse.Namespace) -> int:
    import numpy as np

    from vidssl.evaluation.search import SearchIndex

    index = SearchIndex.load(a.index, nprobe=a.nprobe)
    queries = [str(Path(q).resolve()) if os.path.exists(q) else q for q in a.queries]
    known = set(index.paths)
    feats: List[Optional[np.ndarray]] = [
        index.feature_of(q) if q in known else None for q in queries
    ]
    todo = [q for q, f in zip(queries, feats) if f is None]
    if todo:
        missing = [q for q in todo if not os.path.isfile(q)]
        if missing:
            raise CLIError(f"query video not found: {', '.join(missing)}")
        try:
            embedded = iter(_embed_like_index(index, todo, a.device))
        except OSError as e:  # embed_paths names the video that cannot be read
            raise CLIError(f"query video: {e}; give a readable video, or re-encode this one "
                           "(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)") from e
        feats = [f if f is not None else next(embedded) for f in feats]
    exclude = None if a.include_self else [q if q in known else None for q in queries]
    results = index.search(np.stack(feats), k=a.k, exclude=exclude)
    for q, hits in zip(queries, results):
        if a.json:
            print(json.dumps({"query": q, "results": [
                {"rank": h.rank, "score": round(h.score, 6), "path": h.path} for h in hits]}))
            continue
        print(f"query: {q}")
        print(f"{'rank':>4}  {'score':>6}  path")
        for h in hits:
            print(f"{h.rank:>4}  {h.score:>6.3f}  {h.path}")
    return 0


def _embed_like_index(index: Any, paths: List[str], device: Optional[str]):
    """Embed query videos with the encoder and clip settings recorded in the index."""
    from vidssl.evaluation.embed import ClipSettings, embed_paths, load_encoder

    enc = index.meta.get("encoder") or {}
    if index.meta.get("features"):
        raise CLIError(f"{paths[0]} is not in the index, whose features are of "
                       f"{index.meta['features']}; a query is embedded from its RGB clips only, "
                       "so search with indexed videos")
    if not enc.get("source"):
        raise CLIError(f"{paths[0]} is not in the index and the index does not record which model "
                       "made it, so the query cannot be embedded; search with indexed videos")
    encoder, _ = load_encoder(enc["source"], backbone=enc.get("backbone"),
                              backbone_kwargs=enc.get("backbone_kwargs"),
                              random_init=bool(enc.get("random_init")))
    settings = ClipSettings(**(index.meta.get("settings") or {}))
    return list(embed_paths(encoder, paths, settings, device=_device(device)))


# ---------------------------------------------------------------------------- retrieval
def _add_retrieval(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="vidssl .ckpt, state-dict .pth (with --backbone) "
                   "or a backbone name with --random-init")
    p.add_argument("root", metavar="ROOT",
                   help="dataset: UCF101 / HMDB51 root (official split lists), class folders or "
                        "CSV of the training (gallery) videos")
    p.add_argument("--test", metavar="PATH", help="test (query) videos, when ROOT is not an "
                   "official layout")
    p.add_argument("--format", default="auto",
                   choices=("auto", "class_folders", "csv", "ucf101", "hmdb51"))
    p.add_argument("--split", type=int, default=1, help="official split 1-3 (1)")
    p.add_argument("--annotations", help="folder of the official split files, if elsewhere")
    _add_encoder_args(p)
    _add_clip_args(p)
    p.add_argument("--center", action="store_true", help="mean-centre features (CoCLR)")
    _add_motion_args(p)
    p.add_argument("--features-from", choices=("backbone", "projection"), default="backbone",
                   help="compare backbone features (default) or the checkpoint's projection-head "
                        "outputs (SLIC's published numbers use its 128-d head)")
    p.add_argument("--protocol", choices=("uniform", "slic_evaluate"), default="uniform",
                   help="uniform: --num-clips spread clips of every video (the field's, default); "
                        "slic_evaluate: SLIC's evaluate.py, all back-to-back clips of a test "
                        "video against one centre clip per training video")
    p.add_argument("--baseline", action="store_true",
                   help="also evaluate a randomly initialised backbone of the same architecture")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch (8)")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _add_motion_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("motion (features of the clips' motion fields; docs/evaluation.md)")
    g.add_argument("--features", default="rgb", choices=("rgb", "motion", "both"),
                   help="embed the RGB clips, their motion fields, or both (rgb)")
    g.add_argument("--combine", default="mean", choices=("mean", "concat"),
                   help="--features both: average or concatenate the two L2-normalised "
                        "features (mean)")
    g.add_argument("--motion", choices=("flow", "mv", "diff"),
                   help="motion source (default: flow when --flow-dir is given)")
    g.add_argument("--flow-dir", metavar="DIR", help="stored flow folder (`vidssl flow -o DIR`)")


def _motion_source(a: argparse.Namespace) -> Optional[str]:
    """Return the motion source the flags ask for (``None`` for RGB features)."""
    if a.features == "rgb":
        return None
    motion = a.motion or ("flow" if a.flow_dir else None)
    if motion is None:
        raise CLIError(f"--features {a.features} needs a motion source: --flow-dir DIR (stored "
                       "flow from `vidssl flow`), or --motion mv / diff")
    if motion == "flow" and not a.flow_dir:
        raise CLIError("--motion flow needs --flow-dir DIR (the folder `vidssl flow -o DIR` wrote)")
    return motion


@_command("retrieval", "R@1/5/10/20/50 of a checkpoint on UCF101 / HMDB51 (test queries train)",
          _add_retrieval)
def _run_retrieval(a: argparse.Namespace) -> int:
    from vidssl.data import VideoDataModule
    from vidssl.evaluation.embed import load_encoder
    from vidssl.evaluation.retrieval import evaluate_retrieval, format_recall_table

    motion = _motion_source(a)
    encoder, info = _encoder_from_args(a, a.ckpt)
    settings = _settings_from_args(a, info)
    # Motion settings of the data side (issue 13's contract); passed only when asked for.
    motion_kwargs = {"motion": motion, "flow_dir": a.flow_dir} if motion else {}
    dm = VideoDataModule(
        train=a.root, test=a.test, format=a.format, split=a.split, annotations=a.annotations,
        clip_len=settings.clip_len, stride=settings.stride, crop_size=settings.crop_size,
        short_side=settings.crop_size, batch_size=a.batch_size, num_workers=a.num_workers,
        **motion_kwargs,
    )
    device = _device(a.device)
    models = {Path(str(info["source"])).name: encoder}
    if a.baseline:
        models["random init"], _ = load_encoder(info["backbone"], backbone_kwargs=info.get(
            "backbone_kwargs"), random_init=True, motion=info.get("motion"))
    projection = a.features_from == "projection"
    if projection:
        models = _with_projection_heads(models, a.ckpt)
    results = {}
    for name, model in models.items():
        print(f"evaluating {name} ...", file=sys.stderr)
        results[name] = evaluate_retrieval(model.to(device), dm, num_clips=settings.num_clips,
                                           center=a.center, progress=True,
                                           features=a.features, combine=a.combine,
                                           projection=projection, protocol=a.protocol)
    print(format_recall_table(results))
    if a.json:
        Path(a.json).write_text(json.dumps({n: r.as_dict() for n, r in results.items()},
                                           indent=1))
    return 0


def _with_projection_heads(models: Dict[str, Any], ckpt: str) -> Dict[str, Any]:
    """Give each encoder the checkpoint's projection head (the baseline: a fresh one)."""
    from vidssl.evaluation.embed import load_checkpoint
    from vidssl.methods.heads import HeadedEncoder, projection_head_from_state_dict

    state = load_checkpoint(ckpt).get("state_dict") if os.path.isfile(ckpt) else None
    if not isinstance(state, dict):
        raise CLIError(f"--features-from projection needs a vidssl Lightning checkpoint (.ckpt) "
                       f"with its projection head; {ckpt} has none, use --features-from backbone")
    try:
        return {name: HeadedEncoder(model, projection_head_from_state_dict(
                    state, random_init=name == "random init"))
                for name, model in models.items()}
    except ValueError as e:
        raise CLIError(f"{ckpt}: {e}") from e


# ---------------------------------------------------------------------------- export-backbone
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="vidssl Lightning checkpoint (.ckpt)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.pth", help="output state dict")


@_command("export-backbone", "save a checkpoint's backbone as a torchvision-layout state dict",
          _add_export)
def _run_export(a: argparse.Namespace) -> int:
    import torch

    from vidssl.backbones.weights import extract_state_dict
    from vidssl.evaluation.embed import load_checkpoint

    if not os.path.isfile(a.ckpt):
        raise CLIError(f"checkpoint {a.ckpt} not found")
    ckpt = load_checkpoint(a.ckpt)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("backbone.") for k in state):
        raise CLIError(f"{a.ckpt} is not a vidssl Lightning checkpoint (no 'backbone.' weights "
                       "in its state_dict)")
    backbone = extract_state_dict(ckpt)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbone, out)
    hp = ckpt.get("hyper_parameters") or {}
    name = hp.get("backbone") if isinstance(hp.get("backbone"), str) else "NAME"
    kwargs = "".join(f", {k}={v!r}" for k, v in (hp.get("backbone_kwargs") or {}).items())
    print(f"wrote {len(backbone)} tensors to {out}")
    print(f"load it with: vidssl.backbones.build({name!r}, weights={str(out)!r}{kwargs})")
    return 0


# ---------------------------------------------------------------------------- check-videos
def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="dataset root, folder of videos or CSV")
    p.add_argument("--format", default="auto",
                   choices=("auto", "class_folders", "folder", "csv", "ucf101", "hmdb51"))
    p.add_argument("--decode", action="store_true",
                   help="also decode every frame and report decoder errors (damaged streams)")
    p.add_argument("--num-workers", type=int, default=4, help="probing threads (4)")
    p.add_argument("--json", metavar="FILE", help="write the findings as JSON")


def _check_one(path: str, decode: bool) -> Dict[str, Any]:
    from vidssl.data.decoding import scan_video
    from vidssl.data.index import probe_video

    info = probe_video(path)
    row = {"path": path, "frames": info.num_frames, "inexact": bool(info.exact),
           "error": info.error or ("no frames" if info.num_frames <= 0 else ""), "damaged": ""}
    if decode and not row["error"]:
        try:
            frames, errors, messages = scan_video(path)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a finding
            row["error"] = f"decoding failed: {type(e).__name__}: {e}"
            return row
        if errors:
            row["damaged"] = f"{errors} decoder errors, first: {messages[0]}"
        elif frames < info.num_frames:
            row["damaged"] = f"only {frames} of {info.num_frames} frames decode"
    return row


@_command("check-videos", "list unreadable, damaged (--decode) and inexactly seekable videos",
          _add_check)
def _run_check(a: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from vidssl.data.index import read_folder, read_index

    # Every video of an official layout, not one split's list: all of them must be readable.
    fmt = a.format
    index = read_folder(a.root) if fmt in ("auto", "folder") and os.path.isdir(a.root) \
        else read_index(a.root, format=fmt)
    paths = [str(p) for p in index.paths]
    with ThreadPoolExecutor(max(1, a.num_workers)) as pool:
        rows = list(tqdm(pool.map(lambda p: _check_one(p, a.decode), paths), total=len(paths),
                         desc="checking videos", unit="video"))
    bad = [r for r in rows if r["error"]]
    damaged = [r for r in rows if r["damaged"]]
    inexact = [r for r in rows if r["inexact"] and not r["error"]]
    print(f"{len(rows)} videos: {len(bad)} unreadable, "
          + (f"{len(damaged)} damaged, " if a.decode else "")
          + f"{len(inexact)} with inexact random access (B-frames without timestamps: decoded "
          "sequentially, slower; `vidssl transcode` makes fast copies)")
    if not a.decode:
        print("(add --decode to decode every frame and find damaged streams)")
    for r in bad:
        print(f"unreadable  {r['path']}  ({r['error']})")
    for r in damaged:
        print(f"damaged     {r['path']}  ({r['damaged']})")
    for r in inexact:
        print(f"inexact     {r['path']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 1 if bad or damaged else 0


# ---------------------------------------------------------------------------- transcode
def _add_transcode(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="folder of videos (e.g. a UCF101 / HMDB51 root)")
    p.add_argument("dst", metavar="DST", help="output folder (same layout, .mp4 files)")
    p.add_argument("--short-side", type=int, help="resize the short side (e.g. 128); default keep")
    p.add_argument("--crf", type=int, default=20, help="x264 quality, lower is better (20)")
    p.add_argument("--keyframe-interval", type=int, default=16, help="frames between keyframes")
    p.add_argument("--preset", default="veryfast", help="x264 speed preset (veryfast)")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--overwrite", action="store_true", help="re-encode existing outputs")


@_command("transcode", "re-encode videos to H.264 MP4 for fast exact random access",
          _add_transcode)
def _run_transcode(a: argparse.Namespace) -> int:
    from vidssl.data.transcode import transcode_dataset

    results = transcode_dataset(a.src, a.dst, short_side=a.short_side, crf=a.crf,
                                keyframe_interval=a.keyframe_interval, preset=a.preset,
                                num_workers=a.num_workers, overwrite=a.overwrite, progress=True)
    done = [r for r in results if not r.error]
    skipped = [r for r in results if r.error == "skipped"]
    failed = [r for r in results if r.error and r.error != "skipped"]
    print(f"transcoded {len(done)} videos into {a.dst} ({len(skipped)} existed, "
          f"{len(failed)} failed)")
    for r in failed:
        print(f"  failed: {r.src}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------- flow
def _add_flow(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="folder of videos, CSV or list file (trainlist01)")
    p.add_argument("-o", "--output", required=True, metavar="DST", help="flow folder")
    p.add_argument("--root", help="folder video paths are relative to (default: SRC's folder)")
    p.add_argument("--method", default="tvl1", choices=("tvl1", "dis", "farneback"))
    p.add_argument("--short-side", type=int, default=128, help="decode size, as the RGB (128)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--overwrite", action="store_true", help="recompute existing outputs")
    p.add_argument("--strict", action="store_true", help="exit 1 when a video was unreadable")


@_command("flow", "compute optical flow of videos offline (resumable; docs/motion.md)", _add_flow)
def _run_flow(a: argparse.Namespace) -> int:
    from vidssl.data.flow import flow_dataset, summarize

    results = flow_dataset(a.src, a.output, method=a.method, short_side=a.short_side,
                           root=a.root, workers=a.workers, overwrite=a.overwrite)
    line, failed = summarize(results, a.output)
    print(line)
    for failure in failed:
        print(failure, file=sys.stderr)
    return 1 if failed and a.strict else 0


# ---------------------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    from vidssl.demo import DEMO_METHODS, DemoSettings

    d = DemoSettings()
    p.add_argument("-o", "--output", default=d.out_dir, help=f"results folder ({d.out_dir})")
    p.add_argument("--cache-dir", default=d.cache_dir,
                   help="where the synthetic videos and their optical flow are written (reused)")
    p.add_argument("--method", default=d.method, choices=DEMO_METHODS,
                   help=f"method to pretrain ({d.method}: RGB and flow streams contrasted "
                        "within the flow stream and across the two)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="do not also train RGB-only SimCLR for comparison")
    p.add_argument("--motion-prob", type=float, default=d.motion_prob,
                   help=f"ClusterTriplet: share of positives replaced by flow ({d.motion_prob}; "
                        "SLIC: 0.25)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--videos-per-class", type=int, default=d.videos_per_class)
    p.add_argument("--width-mult", type=float, default=d.width_mult)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the videos and the training")


@_command("demo", "pretrain on synthetic videos, evaluate, plot, index (CPU, a few minutes)",
          _add_demo)
def _run_demo(a: argparse.Namespace) -> int:
    from vidssl.demo import DemoSettings, run_demo

    run_demo(DemoSettings(out_dir=a.output, cache_dir=a.cache_dir, method=a.method,
                          baseline=a.baseline, motion_prob=a.motion_prob, epochs=a.epochs,
                          videos_per_class=a.videos_per_class,
                          width_mult=a.width_mult, num_workers=a.num_workers, seed=a.seed))
    return 0


# ---------------------------------------------------------------------------- dispatch
def _overview() -> str:
    lines = [
        "usage: vidssl COMMAND [options]      (vidssl COMMAND --help for a command's options)",
        "",
        "training and evaluation (LightningCLI; --config FILE.yaml, --print_config):",
        "  fit          train a method",
        "  validate     run the validation loop of a checkpoint",
        "  test         run the test loop of a checkpoint",
        "  predict      run prediction",
        "",
        "tools:",
    ]
    lines += [f"  {c.name:<16} {c.help}" for c in _COMMANDS.values()]
    lines += ["", "docs: docs/quickstart.md, docs/cli.md"]
    return "\n".join(lines)


def _run_plain(name: str, argv: List[str]) -> int:
    cmd = _COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"vidssl {name}", description=cmd.help)
    cmd.add(parser)
    args = parser.parse_args(argv)
    try:
        return int(cmd.run(args) or 0)
    except _user_errors() as e:
        if os.environ.get("VIDSSL_TRACEBACK"):
            raise
        print(f"vidssl {name}: error: {e}", file=sys.stderr)
        return 2


def main(args: Optional[Sequence[str]] = None) -> int:
    """Run the ``vidssl`` command on ``args`` (default ``sys.argv[1:]``); return the exit code.

    Plain subcommands are dispatched here; ``fit``, ``validate``, ``test`` and ``predict`` (and
    anything else) go to LightningCLI. Errors the user can fix print one line and return 2.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    if argv[0] == "--version":
        from vidssl import __version__

        print(f"vidssl {__version__}")
        return 0
    if argv[0] in _COMMANDS:
        return _run_plain(argv[0], argv[1:])
    if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        print(f"vidssl: error: unknown command {argv[0]!r}\n\n{_overview()}", file=sys.stderr)
        return 2
    from vidssl.methods.base import ConfigError

    try:
        # args=None lets LightningCLI read sys.argv itself (it warns when given both).
        VidsslCLI(None if args is None else argv)
    except (CLIError, ConfigError) as e:
        if os.environ.get("VIDSSL_TRACEBACK"):
            raise
        print(f"vidssl {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # jsonargparse reports config errors by exiting
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return 0
