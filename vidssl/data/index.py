"""Video indexes: which videos a dataset holds, their labels and probed metadata.

Readers for class folders, unlabeled folders, CSV manifests and the official UCF101 / HMDB51
split files; metadata is held in numpy arrays (cheap to share with forked workers) and cached.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoIndex",
    "VideoInfo",
    "probe_video",
    "needs_exact_decoding",
    "read_class_folders",
    "read_folder",
    "read_csv",
    "read_ucf101",
    "read_hmdb51",
    "read_index",
    "split_list_line",
]

log = logging.getLogger(__name__)

#: File suffixes treated as videos when scanning folders.
VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".avi",
    ".mp4",
    ".mkv",
    ".webm",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
)

# Random access with decord is exact only where we verified it for streams with reordered frames
# (B-frames): H.264 in MP4 / Matroska. Measured (docs/data.md): MPEG-4 Part 2 and MPEG-2 with
# B-frames are wrong in AVI, MP4 and MKV alike; H.264 with B-frames is wrong in AVI (no
# presentation timestamps) and right in MP4 / MKV; streams without B-frames were always right.
_VERIFIED_REORDERED = {"h264": ("mov", "mp4", "matroska", "webm")}

#: Index formats :func:`read_index` understands.
IndexFormat = Literal["auto", "class_folders", "folder", "csv", "ucf101", "hmdb51"]
_FORMATS = ("auto", "class_folders", "folder", "csv", "ucf101", "hmdb51")

_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class VideoInfo:
    """Probed metadata of one video file.

    Attributes:
        num_frames: frames the decoder returns (0 when unreadable).
        fps: average frame rate.
        width: native width in pixels.
        height: native height in pixels.
        exact: True when the file must be decoded sequentially to get exact frames
            (reordered B-frames that decord seeks wrongly, see :func:`needs_exact_decoding`).
        codec: codec name, e.g. ``"mpeg4"``.
        container: container format name, e.g. ``"avi"``.
        error: why probing failed ("" when it did not).
    """

    num_frames: int
    fps: float
    width: int
    height: int
    exact: bool
    codec: str = ""
    container: str = ""
    error: str = ""


def needs_exact_decoding(container: str, codec: str, has_b_frames: bool) -> bool:
    """Say whether decord's random access may return wrong frames, so decode sequentially.

    Args:
        container: FFmpeg's container name (``av.open(p).format.name``, e.g. ``"avi"`` or
            ``"mov,mp4,m4a,3gp,3g2,mj2"``).
        codec: FFmpeg's codec name (e.g. ``"mpeg4"``, ``"h264"``).
        has_b_frames: the codec context's ``has_b_frames`` (frames are reordered).

    Returns:
        True for reordered streams except the verified-safe ones (H.264 in MP4 / Matroska).
    """
    if not has_b_frames:
        return False
    safe_containers = _VERIFIED_REORDERED.get(codec, ())
    return not any(n in safe_containers for n in container.split(","))


def probe_video(path: str) -> VideoInfo:
    """Probe one video with PyAV (container, codec, B-frames) and count its frames.

    Frames are counted by demuxing (no decoding): video packets with a payload. decord, when
    installed, counts the same way from its own index and is used for the count so that the
    count matches what the decord backend can address.

    FFmpeg's messages are kept off the terminal (:func:`~vidssl.data.decoding.quiet_ffmpeg_log`);
    when the file cannot be read, ``error`` quotes FFmpeg's first error for it, e.g.
    ``(... moov atom not found)`` for an MP4 cut off before its index.
    """
    import av
    import av.logging

    from vidssl.data.decoding import quiet_ffmpeg_log

    path = str(path)
    own_log = av.logging.Capture(local=True)  # this thread's messages only
    try:
        with quiet_ffmpeg_log(), own_log, av.open(path) as container:
            stream = container.streams.video[0]
            ctx = stream.codec_context
            container_name = container.format.name
            exact = needs_exact_decoding(container_name, ctx.name, bool(ctx.has_b_frames))
            fps = float(stream.average_rate or stream.guessed_rate or 0.0) or 25.0
            width, height = int(ctx.width), int(ctx.height)
            codec = ctx.name
            # Header frame counts lie for some files (tree.avi says 444, decodes 68).
            num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        return VideoInfo(num_frames, fps, width, height, exact, codec, container_name)
    except Exception as exc:  # noqa: BLE001 - any decoder failure marks the file unreadable
        # PyAV appends the process's last FFmpeg error, which may be another thread's file;
        # quote this thread's own first error instead.
        text = str(exc).split("; last error log:")[0]
        own = [f"[{n}] {msg.strip()}" for lvl, n, msg in own_log.logs if lvl <= av.logging.ERROR]
        error = f"{type(exc).__name__}: {text}" + (f" ({own[0]})" if own else "")
        return VideoInfo(0, 0.0, 0, 0, False, error=error)


@dataclass
class VideoIndex:
    """A list of videos with labels and probed metadata, all in numpy arrays.

    Worker processes fork with the index; numpy arrays of fixed-width strings carry no per-item
    Python objects, so reading them does not copy pages (no copy-on-read growth of worker memory
    as with lists of dicts).

    Attributes:
        paths: ``N`` absolute file paths (numpy unicode array).
        labels: ``N`` int64 class ids, ``-1`` where unknown.
        class_names: class names by id (empty for unlabeled sets).
        num_frames: ``N`` int64 frame counts (0 until probed or when unreadable).
        fps: ``N`` float32 frame rates.
        width: ``N`` int32 native widths.
        height: ``N`` int32 native heights.
        exact: ``N`` bool, True where frames must be decoded sequentially.
    """

    paths: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    num_frames: np.ndarray | None = None
    fps: np.ndarray | None = None
    width: np.ndarray | None = None
    height: np.ndarray | None = None
    exact: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.paths = np.asarray(self.paths, dtype=np.str_)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.paths.shape != self.labels.shape:
            raise ValueError(
                f"paths and labels differ in length ({len(self.paths)} vs {len(self.labels)})."
            )
        n = len(self.paths)
        if self.num_frames is None:
            self.num_frames = np.zeros(n, np.int64)
            self.fps = np.zeros(n, np.float32)
            self.width = np.zeros(n, np.int32)
            self.height = np.zeros(n, np.int32)
            self.exact = np.zeros(n, bool)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def probed(self) -> bool:
        """True once :meth:`probe` has filled the metadata."""
        return bool(len(self) == 0 or self.num_frames.any())

    def subset(self, keep: np.ndarray) -> VideoIndex:
        """Return the videos selected by a boolean mask or an index array."""
        return replace(
            self,
            paths=self.paths[keep],
            labels=self.labels[keep],
            num_frames=self.num_frames[keep],
            fps=self.fps[keep],
            width=self.width[keep],
            height=self.height[keep],
            exact=self.exact[keep],
        )

    def probe(
        self,
        cache_dir: str | os.PathLike | None = None,
        num_workers: int = 4,
        progress: bool | None = None,
        drop_unreadable: bool = False,
    ) -> VideoIndex:
        """Fill frame counts, fps, sizes and the exact-decoding flag, using a manifest cache.

        Each file is probed once; results are cached in a JSON manifest keyed by (path, size,
        mtime), so a second start on a large set reads only the manifest. Probing runs in a
        thread pool (PyAV releases the GIL while demuxing) with a tqdm bar for large sets.

        Args:
            cache_dir: folder of the manifest (default ``$VIDSSL_CACHE`` or
                ``~/.cache/vidssl/manifests``); one manifest per set of paths.
            num_workers: probing threads.
            progress: show a progress bar (default: for more than 200 files to probe).
            drop_unreadable: remove unreadable videos (logged) instead of keeping them with
                ``num_frames == 0`` (the dataset's ``on_error`` policy handles those).

        Returns:
            ``self``, probed (or a subset when ``drop_unreadable``).
        """
        manifest_path = _manifest_path(self.paths, cache_dir)
        cached = _load_manifest(manifest_path)
        stats = [_file_key(p) for p in self.paths]
        todo = [
            i
            for i, (p, k) in enumerate(zip(self.paths, stats))
            if cached.get(p, {}).get("key") != k
        ]
        if todo:
            show = progress if progress is not None else len(todo) > 200
            with ThreadPoolExecutor(max(1, num_workers)) as pool:
                results: Iterable[VideoInfo] = pool.map(probe_video, (self.paths[i] for i in todo))
                if show:
                    from tqdm.auto import tqdm

                    results = tqdm(results, total=len(todo), desc="probing videos", unit="video")
                for i, info in zip(todo, results):
                    cached[str(self.paths[i])] = {"key": stats[i], **info.__dict__}
            _save_manifest(manifest_path, cached)
        bad = []
        for i, p in enumerate(self.paths):
            rec = cached[str(p)]
            self.num_frames[i] = rec["num_frames"]
            self.fps[i] = rec["fps"]
            self.width[i] = rec["width"]
            self.height[i] = rec["height"]
            self.exact[i] = rec["exact"]
            if rec["num_frames"] <= 0:
                bad.append(f"{p} ({rec['error'] or 'no frames'})")
        if bad:
            log.warning(
                "%d of %d videos are unreadable%s: %s",
                len(bad),
                len(self),
                " and were dropped" if drop_unreadable else "",
                "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""),
            )
            if drop_unreadable:
                return self.subset(self.num_frames > 0)
        return self


def _file_key(path: str) -> list:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def _manifest_path(paths: np.ndarray, cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = (
            os.environ.get("VIDSSL_CACHE") or Path.home() / ".cache" / "vidssl" / "manifests"
        )
    digest = hashlib.sha1("\n".join(paths.tolist()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"manifest-{digest}.json"


def _load_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["videos"] if data.get("version") == _MANIFEST_VERSION else {}
    except (OSError, ValueError, KeyError):
        return {}


def _save_manifest(path: Path, videos: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": _MANIFEST_VERSION, "videos": videos}))
        os.replace(tmp, path)  # atomic: concurrent ranks never read half a file
    except OSError as exc:
        log.warning("Could not write the video manifest %s (%s); probing will repeat.", path, exc)


def _resolve(path: Path) -> str:
    """Return ``path``, or a same-stem video with another suffix when only that exists.

    Split lists name ``v.avi``; after ``transcode_dataset`` the folder holds ``v.mp4``.
    """
    if path.exists():
        return str(path)
    for ext in VIDEO_EXTENSIONS:
        alt = path.with_suffix(ext)
        if alt.exists():
            return str(alt)
    return str(path)  # missing: probing marks it unreadable and names it


def _is_video(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS


def read_class_folders(root: str | os.PathLike) -> VideoIndex:
    """Index ``root/<class>/<video>``: one class per sub-folder, classes sorted by name."""
    root = Path(root).expanduser().resolve()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if _is_video(p):
                paths.append(str(p))
                labels.append(label)
    if not paths:
        raise FileNotFoundError(
            f"No videos ({', '.join(VIDEO_EXTENSIONS)}) in class folders under {root}."
        )
    return VideoIndex(np.array(paths), np.array(labels), classes)


def read_folder(root: str | os.PathLike) -> VideoIndex:
    """Index every video under ``root`` (recursively), unlabeled (labels ``-1``)."""
    root = Path(root).expanduser().resolve()
    paths = [str(p) for p in sorted(root.rglob("*")) if _is_video(p)]
    if not paths:
        raise FileNotFoundError(f"No videos ({', '.join(VIDEO_EXTENSIONS)}) under {root}.")
    return VideoIndex(np.array(paths), np.full(len(paths), -1))


def read_csv(path: str | os.PathLike, root: str | os.PathLike | None = None) -> VideoIndex:
    """Index a CSV manifest with columns ``path`` and optional ``label``.

    A header row naming ``path`` (and ``label``) is optional; without it the first column is the
    path and the second, if any, the label. Labels may be integers or class names (names are
    numbered in sorted order); empty labels are ``-1``. Relative paths are resolved against
    ``root`` (default: the CSV's folder). Without a header and without commas the file is a
    plain video list (``path [label]`` lines, as in ``.txt`` lists) read by
    :func:`split_list_line`: paths may hold spaces, and the last token is the label only when it
    is an integer.
    """
    path = Path(path).expanduser().resolve()
    base = Path(root).expanduser().resolve() if root is not None else path.parent
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if rows and rows[0][0].strip().lower() == "path":
        header = [h.strip().lower() for h in rows[0]]
        rows = rows[1:]
        pcol = header.index("path")
        lcol = header.index("label") if "label" in header else None
    elif rows and len(rows[0]) == 1:  # a plain list: "path [int label]" lines
        split = [split_list_line(r[0]) for r in rows]
        rows = [[p, "" if lab is None else str(lab)] for p, lab in split]
        pcol, lcol = 0, 1
    else:
        pcol, lcol = 0, (1 if rows else None)
    paths = [_resolve(base / r[pcol].strip()) for r in rows]
    raw = [r[lcol].strip() if lcol is not None and lcol < len(r) else "" for r in rows]
    class_names: list[str] = []
    if all(x.lstrip("-").isdigit() or x == "" for x in raw):
        labels = [int(x) if x else -1 for x in raw]
    else:
        class_names = sorted({x for x in raw if x})
        lookup = {n: i for i, n in enumerate(class_names)}
        labels = [lookup[x] if x else -1 for x in raw]
    if not paths:
        raise ValueError(f"The CSV manifest {path} lists no videos.")
    return VideoIndex(np.array(paths), np.array(labels), class_names)


def split_list_line(line: str) -> tuple[str, int | None]:
    """Split one line of a video list into ``(path, label)``; the path may contain spaces.

    The label is the last whitespace-separated token, and only when there are at least two
    tokens and it parses as an integer; otherwise the whole line (stripped) is the path and the
    label is ``None``. ``"my videos/a b.mp4 3"`` gives ``("my videos/a b.mp4", 3)``,
    ``"my videos/a b.mp4"`` gives ``("my videos/a b.mp4", None)``.
    """
    line = line.strip()
    parts = line.rsplit(None, 1)
    if len(parts) == 2 and re.fullmatch(r"[+-]?[0-9]+", parts[1]):
        return parts[0], int(parts[1])
    return line, None


def _find_dir(root: Path, names: Sequence[str]) -> Path | None:
    for base in (root, root.parent):
        for n in names:
            if (base / n).is_dir():
                return base / n
    return None


def read_ucf101(
    root: str | os.PathLike,
    split: int = 1,
    subset: Literal["train", "test"] = "train",
    annotations: str | os.PathLike | None = None,
) -> VideoIndex:
    """Index the official UCF101 layout with one of its three splits.

    ``root`` is the ``UCF-101`` folder (``<Class>/v_*.avi``) or its parent;
    ``annotations`` is ``ucfTrainTestlist`` (found next to or inside ``root`` by default) with
    ``classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist0{split}.txt`` ("<Class>/<file> <label>",
    1-based) and ``testlist0{split}.txt`` ("<Class>/<file>"). Labels are 0-based.
    """
    if split not in (1, 2, 3) or subset not in ("train", "test"):
        raise ValueError(f"UCF101 has splits 1-3 and subsets train/test; got {split}, {subset!r}.")
    root = Path(root).expanduser().resolve()
    if (root / "UCF-101").is_dir():
        root = root / "UCF-101"
    ann = Path(annotations) if annotations else _find_dir(root, ["ucfTrainTestlist"])
    if ann is None or not (ann / "classInd.txt").is_file():
        raise FileNotFoundError(
            f"UCF101 annotations (ucfTrainTestlist/classInd.txt) not found next to {root}; "
            "pass annotations=<folder with classInd.txt>."
        )
    classes = {}
    for line in (ann / "classInd.txt").read_text().split("\n"):
        if line.strip():
            i, name = line.split(None, 1)
            classes[name.strip()] = int(i) - 1
    names = [n for n, _ in sorted(classes.items(), key=lambda kv: kv[1])]
    lst = ann / f"{subset}list0{split}.txt"
    paths, labels = [], []
    for line in lst.read_text().split("\n"):
        if not line.strip():
            continue
        rel = split_list_line(line)[0]  # "<Class>/<file> <label>" or "<Class>/<file>"
        paths.append(_resolve(root / rel))
        labels.append(classes[rel.split("/")[0]])  # the folder names the class in both lists
    return VideoIndex(np.array(paths), np.array(labels), names)


def read_hmdb51(
    root: str | os.PathLike,
    split: int = 1,
    subset: Literal["train", "test"] = "train",
    annotations: str | os.PathLike | None = None,
) -> VideoIndex:
    """Index the official HMDB51 layout with one of its three splits.

    ``root`` holds ``<class>/<file>.avi`` (or is the parent of an ``hmdb51`` folder);
    ``annotations`` is ``testTrainMulti_7030_splits`` with ``<class>_test_split{split}.txt``,
    lines "<file> <0|1|2>" (1 train, 2 test, 0 unused). Classes are numbered in sorted order.
    """
    if split not in (1, 2, 3) or subset not in ("train", "test"):
        raise ValueError(f"HMDB51 has splits 1-3 and subsets train/test; got {split}, {subset!r}.")
    root = Path(root).expanduser().resolve()
    for sub in ("hmdb51", "hmdb51_org"):
        if (root / sub).is_dir():
            root = root / sub
    ann = (
        Path(annotations)
        if annotations
        else _find_dir(root, ["testTrainMulti_7030_splits", "test_train_splits"])
    )
    if ann is None:
        raise FileNotFoundError(
            f"HMDB51 split files (testTrainMulti_7030_splits) not found next to {root}; "
            "pass annotations=<folder with <class>_test_split1.txt>."
        )
    suffix = f"_test_split{split}.txt"
    files = sorted(p for p in ann.iterdir() if p.name.endswith(suffix))
    names = [p.name[: -len(suffix)] for p in files]
    want = 1 if subset == "train" else 2
    paths, labels = [], []
    for label, (name, f) in enumerate(zip(names, files)):
        for line in f.read_text().split("\n"):
            file, flag = split_list_line(line)
            if flag == want:
                paths.append(_resolve(root / name / file))
                labels.append(label)
    return VideoIndex(np.array(paths), np.array(labels), names)


def detect_format(source: str | os.PathLike) -> str:
    """Guess the index format of ``source`` (a CSV file or a folder)."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() in (".csv", ".txt"):
            return "csv"
        raise ValueError(f"{p} is a file but not a CSV manifest; pass a folder or a .csv file.")
    if not p.is_dir():
        raise FileNotFoundError(f"Video source {p} does not exist.")
    if _find_dir(p, ["ucfTrainTestlist"]) is not None:
        return "ucf101"
    if _find_dir(p, ["testTrainMulti_7030_splits", "test_train_splits"]) is not None:
        return "hmdb51"
    if any(_is_video(f) for f in p.iterdir()):
        return "folder"
    return "class_folders"


def read_index(
    source: str | os.PathLike,
    format: str = "auto",
    split: int = 1,
    subset: Literal["train", "test"] = "train",
    annotations: str | os.PathLike | None = None,
) -> VideoIndex:
    """Read an index of any supported format (unprobed; call :meth:`VideoIndex.probe`).

    Args:
        source: a folder (class folders, unlabeled folder, UCF101 or HMDB51 root) or a CSV file.
        format: one of ``auto``, ``class_folders``, ``folder``, ``csv``, ``ucf101``, ``hmdb51``.
        split: official split (1-3) for UCF101 / HMDB51.
        subset: ``train`` or ``test`` list of the official split.
        annotations: the folder of official split files when not next to ``source``.
    """
    if format not in _FORMATS:
        raise ValueError(f"Unknown index format {format!r}; choose one of {', '.join(_FORMATS)}.")
    fmt = detect_format(source) if format == "auto" else format
    if fmt == "ucf101":
        return read_ucf101(source, split, subset, annotations)
    if fmt == "hmdb51":
        return read_hmdb51(source, split, subset, annotations)
    if fmt == "csv":
        return read_csv(source)
    if fmt == "folder":
        return read_folder(source)
    return read_class_folders(source)
