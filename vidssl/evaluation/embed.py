"""Embedding export: one multi-clip averaged feature per video, written in resumable shards.

``embed_videos`` turns a list of videos into an embeddings folder that
:class:`vidssl.evaluation.search.SearchIndex` indexes; ``load_encoder`` gets the backbone out of a
vidssl checkpoint, a torchvision-layout state dict or a backbone name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from vidssl.data.augment import EvalTransform
from vidssl.data.index import VIDEO_EXTENSIONS, split_list_line
from vidssl.evaluation.features import check_features, video_features

__all__ = [
    "ClipSettings",
    "MotionClipReader",
    "Embeddings",
    "EmbeddingsMismatchError",
    "embed_paths",
    "embed_videos",
    "find_videos",
    "load_embeddings",
    "load_checkpoint",
    "load_encoder",
    "read_clips",
]


_META_FILE = "meta.json"
_VIDEOS_FILE = "videos.txt"
_FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class EmbeddingsMismatchError(ValueError):
    """An embeddings folder holds features made with other settings, model or video list."""


@dataclass(frozen=True)
class ClipSettings:
    """How a video is turned into clips for its embedding (the retrieval protocol's test clips).

    ``num_clips`` clips spread evenly over the video (:func:`vidssl.data.sampling.uniform_clips`)
    are decoded with the short side resized to ``crop_size``, centre-cropped and normalised by the
    data module's :class:`~vidssl.data.EvalTransform`; the clip features are averaged. Ten clips
    follow the retrieval protocol of VCOP (Xu et al. 2019, ``retrieve_clips.py``) and SLIC; clip
    length, stride and crop default to :class:`~vidssl.data.VideoDataModule`'s, and
    :func:`load_encoder` takes them from a checkpoint's data module when it saved them, so clips
    look like those the model was trained on.

    Args:
        num_clips: clips per video; their features are averaged.
        clip_len: frames per clip (``T``).
        stride: step between sampled frames.
        crop_size: centre crop ``H = W`` fed to the backbone.
    """

    num_clips: int = 10
    clip_len: int = 16
    stride: int = 2
    crop_size: int = 112

    def __post_init__(self) -> None:
        for name in ("num_clips", "clip_len", "stride", "crop_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def for_encoder(cls, info: Dict[str, Any], **overrides: Any) -> ClipSettings:
        """Return settings from a checkpoint's data module (``info["data"]``), then ``overrides``.

        ``None`` overrides are ignored, so CLI flags left unset keep the checkpoint's values.
        """
        data = info.get("data") or {}
        values = {k: data[k] for k in ("clip_len", "stride", "crop_size") if k in data}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Embeddings:
    """Features of a collection: ``features`` ``N x D`` float32, row ``i`` for ``paths[i]``.

    ``failed`` lists the videos that could not be read (left out of ``features``); ``meta`` says
    how the features were made (model source and clip settings).
    """

    features: np.ndarray
    paths: List[str]
    failed: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- finding videos
def find_videos(source: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    """Return the videos named by ``source``, as absolute paths, in a stable order.

    ``source`` is a folder (searched recursively for :data:`VIDEO_EXTENSIONS`, sorted), a text
    file with one video path per line (relative paths are taken from the file's folder; blank
    lines and ``#`` comments skipped; a path may hold spaces, and a last token that is an
    integer, a label as in split lists, is dropped: see
    :func:`vidssl.data.index.split_list_line`), a single video file, or a list of any of these.
    """
    if isinstance(source, (list, tuple)):
        out: List[str] = []
        for s in source:
            out.extend(find_videos(s))
        return out
    p = Path(source).expanduser()
    if p.is_dir():
        found = sorted(
            str(f.resolve())
            for f in p.rglob("*")
            if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file()
        )
        if not found:
            raise FileNotFoundError(
                f"no videos ({', '.join(VIDEO_EXTENSIONS)}) found under folder {p}"
            )
        return found
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected a video, a folder or a list file)")
    if p.suffix.lower() in VIDEO_EXTENSIONS:
        return [str(p.resolve())]
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    paths = [split_list_line(ln)[0] for ln in lines if ln and not ln.startswith("#")]
    if not paths:
        raise ValueError(f"list file {p} names no videos")
    return [str((p.parent / q).resolve()) if not os.path.isabs(q) else q for q in paths]


# ---------------------------------------------------------------------- the encoder
def load_checkpoint(path: PathLike) -> Any:
    """``torch.load`` a checkpoint on the CPU with ``weights_only=True`` (no pickled code)."""
    import pickle

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects that torch.load(weights_only=True) refuses ({e}); if you "
            "trust the file, re-save its state dict with torch.save(ckpt['state_dict'], ...)"
        ) from e


def _is_backbone_name(name: str) -> bool:
    from vidssl.backbones import list_backbones

    return name in list_backbones()


def load_encoder(
    source: PathLike,
    backbone: Optional[str] = None,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    random_init: bool = False,
    motion: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Return ``(backbone, info)``: the video encoder named by ``source``, in eval mode, on CPU.

    ``source`` is one of:

    - a vidssl Lightning checkpoint (``.ckpt``): the backbone is rebuilt from the method's saved
      ``backbone`` / ``backbone_kwargs`` hyper-parameters and its ``backbone.`` weights;
    - a state dict in torchvision layout (``vidssl export-backbone`` output, torchvision or
      Hara-style weights): needs ``backbone`` (the zoo name) and any ``backbone_kwargs``;
    - a backbone name (``r3d_18``): a randomly initialised model (seed 0, so it can be rebuilt),
      only with ``random_init=True`` (a baseline and for tests).

    A checkpoint of a method trained with motion views through its shared encoder
    (``ClusterTriplet(motion_prob > 0)``) gives a :class:`vidssl.backbones.SharedEncoder`:
    ``forward`` embeds RGB clips as the backbone does, ``encode_motion`` embeds motion fields in
    the format the method trained with (its ``motion_stem.*`` weights for ``"xy"``); ``info``
    then holds ``motion`` (``motion_input``, ``motion_channels``). ``motion`` (such a dict) makes
    a randomly initialised model of that kind too (the baseline of a motion evaluation).

    ``info`` holds what :func:`load_encoder` needs to rebuild the same encoder later (the index
    manifest keeps it so ``vidssl search`` embeds a query video the same way).
    """
    from vidssl.backbones import build, list_backbones

    kwargs = dict(backbone_kwargs or {})
    src = str(source)
    if not os.path.exists(src):
        if _is_backbone_name(src):
            if not random_init:
                raise ValueError(
                    f"{src!r} is a backbone name, not a checkpoint: pass --random-init to embed "
                    "with a randomly initialised model (a baseline), or give a checkpoint file"
                )
            # Seeded, so that the same random model is rebuilt later (e.g. to embed a query).
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = build(src, **kwargs)
                model = _with_motion(model, motion, None, src, kwargs)
            info = {"source": src, "backbone": src, "backbone_kwargs": kwargs, "random_init": True}
            if motion:
                info["motion"] = dict(motion)
            return model.eval(), info
        raise FileNotFoundError(
            f"checkpoint {src} not found; give a vidssl .ckpt, a state-dict .pth with --backbone, "
            f"or a backbone name with --random-init (known: {', '.join(list_backbones())})"
        )
    if random_init:
        raise ValueError("--random-init takes a backbone name, not a checkpoint file")
    src = str(Path(src).resolve())
    ckpt = load_checkpoint(src)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if isinstance(ckpt, dict) and "state_dict" in ckpt and isinstance(hparams.get("backbone"), str):
        name = hparams["backbone"] if backbone is None else backbone
        kwargs = {**(hparams.get("backbone_kwargs") or {}), **kwargs}
    elif backbone is not None:
        name = backbone
    else:
        raise ValueError(
            f"{src} does not say which backbone it holds (no vidssl method hyper-parameters); "
            f"pass --backbone NAME (one of {', '.join(list_backbones())}) and any "
            "--width-mult it was trained with"
        )
    model = build(name, weights=src, **kwargs)
    info = {"source": src, "backbone": name, "backbone_kwargs": kwargs, "random_init": False}
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if isinstance(state, dict) and any(k.startswith("motion_backbone.") for k in state):
        # A two-stream method (GOCA): its motion backbone beside the RGB one.
        info["motion"] = {"two_stream": True,
                          "motion_channels": int(hparams.get("motion_channels", 2))}
        model = _with_motion(model, info["motion"], state, name, kwargs)
    elif float(hparams.get("motion_prob") or 0) > 0 and "motion_input" in hparams:
        info["motion"] = {"motion_input": hparams["motion_input"],
                          "motion_channels": int(hparams.get("motion_channels", 2))}
        model = _with_motion(model, info["motion"], state)
    data = ckpt.get("datamodule_hyper_parameters") if isinstance(ckpt, dict) else None
    if isinstance(data, dict):
        info["data"] = {k: data[k] for k in ("clip_len", "stride", "crop_size") if k in data}
    return model.eval(), info


def _with_motion(backbone: nn.Module, motion: Optional[Dict[str, Any]],
                 state: Optional[Dict[str, Any]], name: Optional[str] = None,
                 kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Give ``backbone`` the motion encoder of ``motion`` settings (weights from ``state``).

    ``two_stream`` settings (GOCA) pair it with a motion backbone of the same zoo ``name`` in a
    ``TwoStream`` (``motion_backbone.*`` weights); the others wrap it in a ``SharedEncoder``
    (one encoder, the method's motion stem: ``motion_stem.*`` weights).
    """
    if not motion:
        return backbone
    from vidssl.backbones import MotionStem, SharedEncoder, TwoStream, build

    if motion.get("two_stream"):
        net = build(name, in_channels=int(motion["motion_channels"]), **(kwargs or {}))
        if state is not None:
            prefix = "motion_backbone."
            net.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                 if k.startswith(prefix)})
        return TwoStream(backbone, net)

    stem = MotionStem(backbone, motion["motion_input"], int(motion["motion_channels"]))
    if state is not None and stem.conv is not None:
        prefix = "motion_stem."
        stem.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                              if k.startswith(prefix)})
    return SharedEncoder(backbone, stem)


# ---------------------------------------------------------------------- decoding
def read_clips(path: str, settings: ClipSettings) -> torch.Tensor:
    """Decode the test clips of one video: uint8 ``K x T x H x W x C`` (short side ``crop_size``).

    The video is probed (frame count, whether random access is exact) and decoded with the data
    module's decoders (:mod:`vidssl.data.decoding`), resized on decode. Clips longer than the
    video loop (:func:`vidssl.data.sampling.loop_indices`).
    """
    from vidssl.data.decoding import build_decoder, resized_size
    from vidssl.data.index import probe_video
    from vidssl.data.sampling import uniform_clips

    info = probe_video(path)
    if info.num_frames <= 0:
        raise OSError(f"cannot read {path}: {info.error or 'no frames'}")
    indices = uniform_clips(info.num_frames, settings.clip_len, settings.stride, settings.num_clips)
    size = resized_size(info.width, info.height, settings.crop_size)
    frames = build_decoder("decord").read(path, indices.reshape(-1), size, exact=info.exact)
    return torch.from_numpy(frames).view(settings.num_clips, settings.clip_len, *frames.shape[1:])


class MotionClipReader:
    """Reads the motion fields of a video's test clips: float ``K x 2 x T x S x S`` in [-1, 1].

    The same clips as :func:`read_clips` (frame indices, decode size with the short side
    ``crop_size``, then the centre ``S x S`` crop), in the motion contract's format
    (docs/motion.md): x, y in pixels per frame of the decoded size, divided by the bound 20
    and clipped. ``source="flow"`` reads stored flow (:func:`vidssl.data.flow.read_flow`; the
    video's path is taken relative to the flow folder's source root, from its manifest, unless
    ``root`` is given); ``source="mv"`` decodes the compressed stream's motion vectors
    (:func:`vidssl.data.motion_vectors.read_motion_vectors`).

    Args:
        source: ``"flow"`` or ``"mv"``.
        flow_dir: the flow folder (``vidssl flow -o DIR``), for ``"flow"``.
        root: the folder the flow's video paths are relative to (default: the manifest's).
    """

    def __init__(self, source: str = "flow", flow_dir: Optional[PathLike] = None,
                 root: Optional[PathLike] = None) -> None:
        if source not in ("flow", "mv"):
            raise ValueError(f"unknown motion source {source!r} for embedding; valid: flow, mv")
        if source == "flow" and flow_dir is None:
            raise ValueError("motion source 'flow' needs flow_dir (the folder `vidssl flow` wrote)")
        self.source, self.flow_dir = source, None if flow_dir is None else str(flow_dir)
        self.root = None if root is None else str(root)
        if source == "flow" and self.root is None:
            from vidssl.data.flow import load_flow_manifest

            self.root = load_flow_manifest(self.flow_dir).get("root")
            if not self.root:
                raise ValueError(f"{flow_dir} has no flow manifest naming its source folder; "
                                 "pass root= (the folder `vidssl flow` read)")

    def __call__(self, path: str, settings: ClipSettings) -> torch.Tensor:
        """Return the motion fields of ``path``'s test clips, float ``K x 2 x T x S x S``."""
        from vidssl.data.decoding import resized_size
        from vidssl.data.flow import FLOW_BOUND, read_flow
        from vidssl.data.index import probe_video
        from vidssl.data.motion_vectors import read_motion_vectors
        from vidssl.data.sampling import uniform_clips

        info = probe_video(path)
        if info.num_frames <= 0:
            raise OSError(f"cannot read {path}: {info.error or 'no frames'}")
        idx = uniform_clips(info.num_frames, settings.clip_len, settings.stride,
                            settings.num_clips).reshape(-1)
        size = resized_size(info.width, info.height, settings.crop_size)
        if self.source == "flow":
            rel = os.path.relpath(path, self.root)
            field = read_flow(self.flow_dir, rel, idx, size=size)
        else:
            field = read_motion_vectors(path, idx, size=size)
        x = torch.from_numpy(np.asarray(field, dtype=np.float32))  # (K T) x H x W x 2
        h, w, c = x.shape[1], x.shape[2], settings.crop_size
        top, left = max(0, (h - c) // 2), max(0, (w - c) // 2)
        x = x[:, top : top + c, left : left + c]
        x = (x / FLOW_BOUND).clamp(-1.0, 1.0)
        k, t = settings.num_clips, settings.clip_len
        return x.view(k, t, *x.shape[1:]).permute(0, 4, 1, 2, 3).contiguous()


_Reader = Callable[[str, ClipSettings], torch.Tensor]


class _ClipDataset(torch.utils.data.Dataset):
    """Yields ``(position, clips or None, motion fields or None, error)`` for a list of videos.

    ``clips`` are uint8 ``K x T x H x W x C``; the motion fields (only with a
    ``motion_reader``) float ``K x M x T x S x S``.
    """

    def __init__(self, paths: Sequence[str], positions: Sequence[int], settings: ClipSettings,
                 reader: _Reader, motion_reader: Optional[_Reader] = None,
                 rgb: bool = True) -> None:
        self.paths, self.positions = list(paths), list(positions)
        self.settings, self.reader = settings, reader
        self.motion_reader, self.rgb = motion_reader, rgb

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Tuple[int, Optional[torch.Tensor], Optional[torch.Tensor],
                                           str]:
        pos = self.positions[i]
        path = self.paths[pos]
        try:
            clips = self.reader(path, self.settings) if self.rgb else None
            motion = self.motion_reader(path, self.settings) if self.motion_reader else None
            return pos, clips, motion, ""
        except Exception as e:  # noqa: BLE001 - any decoder failure marks the video unreadable
            return pos, None, None, f"{type(e).__name__}: {e}"


def _encode(transform: nn.Module, encoder: nn.Module, videos: Sequence[Optional[torch.Tensor]],
            device: Union[str, torch.device], motions: Optional[Sequence[torch.Tensor]] = None,
            features: str = "rgb", combine: str = "mean") -> torch.Tensor:
    """Average features ``B x D`` of ``B`` videos, each uint8 clips ``K x T x H x W x C``.

    Each video is resized and centre-cropped on its own before the clips are stacked, so videos
    of any aspect ratio share a forward pass and none changes another's crop. With
    ``features`` ``"motion"`` / ``"both"`` the motion fields ``K x M x T x S x S`` of each
    video go through ``encoder.encode_motion`` (``"both"``: joined as
    :func:`vidssl.evaluation.retrieval.combine_features` says).
    """
    rgb = [transform(v.to(device)) for v in videos] if features != "motion" else []
    motion = [m.to(device) for m in motions or []] if features != "rgb" else []
    groups = [range(len(videos))]
    if len({len(c) for c in rgb + motion}) > 1:  # clip counts differ: one video at a time
        groups = [[i] for i in range(len(videos))]
    out = []
    for group in groups:
        # The batch contract: views[k] (and motion[k]) holds clip k of every video.
        clips = {key: list(torch.stack([c[i] for i in group], 1)) if c else None
                 for key, c in (("views", rgb), ("motion", motion))}
        batch = {"views": clips["views"] or [None] * len(clips["motion"]),  # motion: K only
                 "motion": dict(enumerate(clips["motion"] or []))}
        out.append(video_features(encoder, batch, features, combine).float())
    return torch.cat(out)


def _collate(items: List[Tuple[int, Optional[torch.Tensor], Optional[torch.Tensor], str]]
             ) -> List:
    return items


# ---------------------------------------------------------------------- the shard store
def _settings_dict(settings: ClipSettings) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def _list_hash(paths: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(paths).encode()).hexdigest()


# A finished shard is exactly ``shard-NNNNNN.npz``. Shards are written under a name that cannot
# match it (``.shard-NNNNNN.npz.tmp``) and renamed when complete, so a reader never sees half a
# shard; ``shard-NNNNNN.tmp.npz`` is what older versions left when interrupted mid-write.
_SHARD_NAME = re.compile(r"shard-(\d{6})\.npz")
_LEFTOVER_GLOBS = (".shard-*.npz.tmp", "shard-*.tmp.npz")


def _shards(directory: Path) -> List[Tuple[int, Path]]:
    """Return ``(number, path)`` of the finished shards in ``directory``, in number order."""
    found = []
    for f in directory.glob("shard-*.npz"):
        m = _SHARD_NAME.fullmatch(f.name)
        if m:
            found.append((int(m.group(1)), f))
    return sorted(found)


def _read_shards(directory: Path) -> Tuple[Dict[int, np.ndarray], Dict[int, str]]:
    """Return ``({position: feature}, {position: error})`` from the shards in ``directory``."""
    done: Dict[int, np.ndarray] = {}
    failed: Dict[int, str] = {}
    for _, shard in _shards(directory):
        try:
            with np.load(shard, allow_pickle=False) as z:
                positions, features = z["positions"], z["features"]
                failed_positions, failed_errors = z["failed_positions"], z["failed_errors"]
        except (zipfile.BadZipFile, EOFError, KeyError, ValueError) as e:
            raise ValueError(
                f"{shard} is damaged ({type(e).__name__}: {e}); delete it and run the same "
                "`vidssl embed` again to embed its videos anew"
            ) from e
        for pos, feat in zip(positions, features):
            done[int(pos)] = feat
        for pos, err in zip(failed_positions, failed_errors):
            failed[int(pos)] = str(err)
    return done, failed


def _write_shard(directory: Path, number: int, positions: List[int], features: List[np.ndarray],
                 failed: Dict[int, str], dim: int) -> None:
    final = directory / f"shard-{number:06d}.npz"
    tmp = directory / f".{final.name}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(
            f,
            positions=np.asarray(positions, dtype=np.int64),
            features=np.stack(features).astype(np.float32) if features
            else np.zeros((0, dim), np.float32),
            failed_positions=np.asarray(list(failed), dtype=np.int64),
            failed_errors=np.asarray(list(failed.values()), dtype=str),
        )
        f.flush()
        os.fsync(f.fileno())
    # Atomic rename: a shard is either complete or absent, so an interrupted run resumes cleanly.
    os.replace(tmp, final)


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Create ``out``, check it is writable, remove interrupted writes (and all, ``overwrite``)."""
    out.mkdir(parents=True, exist_ok=True)
    # Fail now, not after the first shard's worth of decoding, when nothing can be written.
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(out)) from e
    leftovers = [f for pattern in _LEFTOVER_GLOBS for f in out.glob(pattern)]
    if overwrite:
        leftovers += [f for _, f in _shards(out)] + [out / _META_FILE, out / _VIDEOS_FILE]
    for f in leftovers:
        f.unlink(missing_ok=True)


def embed_videos(
    encoder: nn.Module,
    videos: Sequence[str],
    out_dir: PathLike,
    settings: ClipSettings = ClipSettings(),
    source_info: Optional[Dict[str, Any]] = None,
    batch_size: int = 4,
    num_workers: int = 0,
    shard_size: int = 256,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    overwrite: bool = False,
    reader: Optional[Callable[[str, ClipSettings], torch.Tensor]] = None,
    features: str = "rgb",
    combine: str = "mean",
    motion_reader: Optional[Callable[[str, ClipSettings], torch.Tensor]] = None,
) -> Embeddings:
    """Embed every video of ``videos`` into ``out_dir``; resume if it holds part of the work.

    Each video gives ``settings.num_clips`` clips; the encoder's features ``K x D`` of its clips
    are averaged into one ``D`` feature (the retrieval protocol); each video is resized and
    centre-cropped on its own, so videos of any aspect ratio can share a batch. Results are
    written every ``shard_size`` videos as ``shard-NNNNNN.npz``, first under a name that no reader
    takes for a shard (``.shard-NNNNNN.npz.tmp``), then renamed. A second call with the same
    arguments removes what an interrupted write left behind and skips the videos already in a
    shard, so an interrupted (even killed) run continues where it stopped and embeds every video
    exactly once. Videos that cannot be decoded are recorded as failed (with the error) and left
    out.

    Args:
        encoder: ``B x C x T x H x W -> B x D`` (a backbone, or a method's ``forward``).
        videos: video paths (see :func:`find_videos`).
        out_dir: the embeddings folder (created).
        settings: how clips are sampled and preprocessed.
        source_info: how the encoder was made (:func:`load_encoder`'s ``info``), kept in
            ``meta.json`` to check a resume and for ``vidssl search``.
        batch_size: videos per forward pass (``batch_size * num_clips`` clips).
        num_workers: DataLoader worker processes decoding videos.
        shard_size: videos per shard file.
        device: where the encoder runs.
        progress: show a tqdm progress bar.
        overwrite: discard whatever ``out_dir`` holds instead of resuming.
        reader: ``(path, settings) -> uint8 K x T x H x W x C`` (default :func:`read_clips`).
        features: ``"rgb"``, ``"motion"`` (each clip's motion field through
            ``encoder.encode_motion``) or ``"both"`` (the two features L2-normalised, then
            joined by ``combine``), as :func:`vidssl.evaluation.extract_features`; recorded in
            ``meta.json``.
        combine: ``"mean"`` or ``"concat"``.
        motion_reader: ``(path, settings) -> float K x M x T x S x S``, the motion fields of
            the same clips, centre-cropped (e.g. :class:`MotionClipReader`); needed unless
            ``features="rgb"``.

    Raises:
        EmbeddingsMismatchError: ``out_dir`` holds embeddings of another model, other settings
            or another video list (pass ``overwrite=True`` or a new folder).
        OSError: ``out_dir`` cannot be created or written (e.g. ``PermissionError``); raised
            before any video is decoded.
        ValueError: a finished shard in ``out_dir`` is damaged (the message names it).
    """
    from tqdm.auto import tqdm

    from vidssl.evaluation.retrieval import describe_features

    out = Path(out_dir)
    videos = [str(v) for v in videos]
    if not videos:
        raise ValueError("no videos to embed")
    check_features(features, combine, encoder)
    if features != "rgb" and motion_reader is None:
        raise ValueError(f"features={features!r} needs a motion_reader (e.g. "
                         "MotionClipReader('flow', flow_dir)); `vidssl embed` takes --flow-dir")
    _prepare_output(out, overwrite)
    meta = {
        "format": _FORMAT_VERSION,
        "encoder": dict(source_info or {}),
        "settings": _settings_dict(settings),
        "num_videos": len(videos),
        "videos_sha1": _list_hash(videos),
    }
    if features != "rgb":  # absent for RGB, so folders of older versions still resume
        meta["features"] = describe_features(features, combine)
    meta_file = out / _META_FILE
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        for key, what in (("encoder", "model"), ("settings", "clip settings"),
                          ("features", "features"), ("videos_sha1", "video list")):
            if old.get(key) != meta.get(key):
                raise EmbeddingsMismatchError(
                    f"{out} holds embeddings made with another {what} ({old.get(key)} vs "
                    f"{meta.get(key)}); use another output folder or --overwrite"
                )
    else:
        (out / _VIDEOS_FILE).write_text("\n".join(videos) + "\n")
        meta_file.write_text(json.dumps(meta, indent=1))

    done, failed = _read_shards(out)
    todo = [i for i in range(len(videos)) if i not in done and i not in failed]
    shards = _shards(out)
    shard_no = shards[-1][0] + 1 if shards else 0
    encoder = encoder.to(device).eval()
    transform = EvalTransform(settings.crop_size).to(device)
    loader = torch.utils.data.DataLoader(
        _ClipDataset(videos, todo, settings, reader or read_clips,
                     motion_reader if features != "rgb" else None, rgb=features != "motion"),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    buf_pos: List[int] = []
    buf_feat: List[np.ndarray] = []
    buf_failed: Dict[int, str] = {}
    dim = 0
    bar = tqdm(total=len(videos), initial=len(videos) - len(todo), unit="video",
               desc="embedding", disable=not progress)
    with torch.inference_mode():
        for items in loader:
            good = [(pos, clips, motion) for pos, clips, motion, err in items if not err]
            for pos, _, _, err in items:
                if err:
                    buf_failed[pos] = err
            if good:
                feats = _encode(transform, encoder, [c for _, c, _ in good], device,
                                [m for _, _, m in good], features, combine)
                dim = feats.shape[1]
                buf_pos.extend(p for p, _, _ in good)
                buf_feat.extend(feats.cpu().numpy())
            bar.update(len(items))
            if len(buf_pos) + len(buf_failed) >= shard_size:
                _write_shard(out, shard_no, buf_pos, buf_feat, buf_failed, dim)
                shard_no += 1
                buf_pos, buf_feat, buf_failed = [], [], {}
    if buf_pos or buf_failed:
        _write_shard(out, shard_no, buf_pos, buf_feat, buf_failed, dim)
    bar.close()
    return load_embeddings(out)


def load_embeddings(directory: PathLike) -> Embeddings:
    """Read an embeddings folder written by :func:`embed_videos` (rows in video-list order).

    Only finished shards are read (never a write in progress or one an interrupted run left).
    Raises ``FileNotFoundError`` when ``directory`` is not an embeddings folder and
    ``ValueError`` when it holds no finished video yet or a damaged shard.
    """
    d = Path(directory)
    if not (d / _META_FILE).is_file() or not (d / _VIDEOS_FILE).is_file():
        raise FileNotFoundError(
            f"{d} is not an embeddings folder (no {_META_FILE}); make one with "
            "`vidssl embed CKPT VIDEOS -o DIR`"
        )
    meta = json.loads((d / _META_FILE).read_text())
    videos = (d / _VIDEOS_FILE).read_text().splitlines()
    done, failed = _read_shards(d)
    if not done:
        raise ValueError(f"{d} holds no embedded video yet (run `vidssl embed` into it)")
    order = sorted(done)
    missing = len(videos) - len(done) - len(failed)
    meta["incomplete"] = missing
    return Embeddings(
        features=np.stack([done[i] for i in order]).astype(np.float32),
        paths=[videos[i] for i in order],
        failed=[f"{videos[i]}: {failed[i]}" for i in sorted(failed)],
        meta=meta,
    )


def embed_paths(
    encoder: nn.Module,
    paths: Iterable[str],
    settings: ClipSettings = ClipSettings(),
    device: Union[str, torch.device] = "cpu",
    reader: Optional[Callable[[str, ClipSettings], torch.Tensor]] = None,
) -> np.ndarray:
    """Embed a few videos in memory (e.g. search queries): ``N x D`` float32, not normalised.

    Raises ``OSError`` naming the video when one cannot be read (missing, not a video, or a
    decoder failure).
    """
    reader = reader or read_clips
    encoder = encoder.to(device).eval()
    transform = EvalTransform(settings.crop_size).to(device)
    with torch.inference_mode():
        feats = [_encode(transform, encoder, [_read_query(reader, str(p), settings)], device)
                 for p in paths]
    return torch.cat(feats).cpu().numpy()


def _read_query(reader: Callable[[str, ClipSettings], torch.Tensor], path: str,
                settings: ClipSettings) -> torch.Tensor:
    try:
        return reader(path, settings)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means the video is unreadable
        raise OSError(f"cannot read {path}: {type(e).__name__}: {e}") from e
