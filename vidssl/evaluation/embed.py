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

__all__ = [
    "ClipSettings",
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
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Return ``(backbone, info)``: the video encoder named by ``source``, in eval mode, on CPU.

    ``source`` is one of:

    - a vidssl Lightning checkpoint (``.ckpt``): the backbone is rebuilt from the method's saved
      ``backbone`` / ``backbone_kwargs`` hyper-parameters and its ``backbone.`` weights;
    - a state dict in torchvision layout (``vidssl export-backbone`` output, torchvision or
      Hara-style weights): needs ``backbone`` (the zoo name) and any ``backbone_kwargs``;
    - a backbone name (``r3d_18``): a randomly initialised model (seed 0, so it can be rebuilt),
      only with ``random_init=True`` (a baseline and for tests).

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
            info = {"source": src, "backbone": src, "backbone_kwargs": kwargs, "random_init": True}
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
    data = ckpt.get("datamodule_hyper_parameters") if isinstance(ckpt, dict) else None
    if isinstance(data, dict):
        info["data"] = {k: data[k] for k in ("clip_len", "stride", "crop_size") if k in data}
    return model.eval(), info


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


class _ClipDataset(torch.utils.data.Dataset):
    """Yields ``(position, clips K x T x H x W x C uint8 or None)`` for a list of videos."""

    def __init__(self, paths: Sequence[str], positions: Sequence[int], settings: ClipSettings,
                 reader: Callable[[str, ClipSettings], torch.Tensor]) -> None:
        self.paths, self.positions = list(paths), list(positions)
        self.settings, self.reader = settings, reader

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Tuple[int, Optional[torch.Tensor], str]:
        pos = self.positions[i]
        try:
            return pos, self.reader(self.paths[pos], self.settings), ""
        except Exception as e:  # noqa: BLE001 - any decoder failure marks the video unreadable
            return pos, None, f"{type(e).__name__}: {e}"


def _encode(transform: nn.Module, encoder: nn.Module, videos: Sequence[torch.Tensor],
            device: Union[str, torch.device]) -> torch.Tensor:
    """Average features ``B x D`` of ``B`` videos, each uint8 clips ``K x T x H x W x C``.

    Each video is resized and centre-cropped on its own before the clips are stacked, so videos
    of any aspect ratio share a forward pass and none changes another's crop.
    """
    x = torch.cat([transform(v.to(device)) for v in videos])  # (sum K) x C x T x S x S
    feats = encoder(x).float().split([len(v) for v in videos])
    return torch.stack([f.mean(0) for f in feats])


def _collate(items: List[Tuple[int, Optional[torch.Tensor], str]]) -> List:
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

    Raises:
        EmbeddingsMismatchError: ``out_dir`` holds embeddings of another model, other settings
            or another video list (pass ``overwrite=True`` or a new folder).
        OSError: ``out_dir`` cannot be created or written (e.g. ``PermissionError``); raised
            before any video is decoded.
        ValueError: a finished shard in ``out_dir`` is damaged (the message names it).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    videos = [str(v) for v in videos]
    if not videos:
        raise ValueError("no videos to embed")
    _prepare_output(out, overwrite)
    meta = {
        "format": _FORMAT_VERSION,
        "encoder": dict(source_info or {}),
        "settings": _settings_dict(settings),
        "num_videos": len(videos),
        "videos_sha1": _list_hash(videos),
    }
    meta_file = out / _META_FILE
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        for key, what in (("encoder", "model"), ("settings", "clip settings"),
                          ("videos_sha1", "video list")):
            if old.get(key) != meta[key]:
                raise EmbeddingsMismatchError(
                    f"{out} holds embeddings made with another {what} ({old.get(key)} vs "
                    f"{meta[key]}); use another output folder or --overwrite"
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
        _ClipDataset(videos, todo, settings, reader or read_clips),
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
            good = [(pos, clips) for pos, clips, _ in items if clips is not None]
            for pos, _, err in items:
                if err:
                    buf_failed[pos] = err
            if good:
                feats = _encode(transform, encoder, [c for _, c in good], device)
                dim = feats.shape[1]
                buf_pos.extend(p for p, _ in good)
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
