"""Video data: indexes, frame-accurate decoding, clip sampling, GPU augmentation, DataModule.

See ``docs/data.md`` for the pipeline and ``docs/concepts.md`` for the batch contract.
"""

from vidssl.data.augment import EvalTransform, VideoAugmentation, build_augmentation
from vidssl.data.datamodule import VideoDataModule
from vidssl.data.dataset import (
    VideoDataset,
    centre_square,
    collate_eval_videos,
    collate_videos,
)
from vidssl.data.decoding import DecordDecoder, PyAVDecoder, build_decoder
from vidssl.data.index import VideoIndex, probe_video, read_index
from vidssl.data.sampling import TemporalTransform
from vidssl.data.synthetic import write_synthetic_dataset
from vidssl.data.transcode import transcode_dataset, transcode_video

__all__ = [
    "DecordDecoder",
    "EvalTransform",
    "PyAVDecoder",
    "TemporalTransform",
    "VideoAugmentation",
    "VideoDataModule",
    "VideoDataset",
    "VideoIndex",
    "build_augmentation",
    "build_decoder",
    "centre_square",
    "collate_eval_videos",
    "collate_videos",
    "probe_video",
    "read_index",
    "transcode_dataset",
    "transcode_video",
    "write_synthetic_dataset",
]

from vidssl.data.cluster_sampler import ClusterBatchSampler  # noqa: E402

__all__ += ["ClusterBatchSampler"]
