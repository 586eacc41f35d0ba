"""GOCA: online clustering of RGB and motion clips, each modality's codes guided by the other's.

Prototypes, a distributed Sinkhorn-Knopp with an optional prior, and the method module.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidssl import distributed as vdist
from vidssl.methods.queue import KeyQueue
from vidssl.methods.settings import Head, Optimization
from vidssl.methods.two_stream import TwoStreamMethod
from vidssl.pseudo_labels import PseudoLabelState

__all__ = [
    "GOCA",
    "guided_codes",
    "hyperspherical_prototypes",
    "prototype_separation_loss",
    "sinkhorn",
]

_CODE = "github.com/Seleucia/goca"
PRIOR_SIGNS = ("kl", "official")
PROTOTYPE_KINDS = ("frozen", "learned")
SHORT_SOURCES = ("views", "long")


# ----------------------------------------------------------------------------- Sinkhorn
@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    prior: Optional[torch.Tensor] = None,
    prior_epsilon: float = 0.01,
    prior_sign: str = "kl",
) -> torch.Tensor:
    """Return soft codes ``N x K`` of scores ``N x K`` (samples x prototypes), no gradient.

    Sinkhorn-Knopp as in SwAV and GOCA (``helper/train_utils.py`` ``distributed_sinkhorn``):
    ``Q = exp(S / epsilon)``, then ``iterations`` rounds of "each prototype's total is
    ``N_all / K``" and "each sample's code sums to 1", where ``N_all`` is the number of rows over
    every DDP rank. Rows of the result sum to 1 exactly (the last step); each prototype's total
    over all ranks approaches ``N_all / K`` as ``iterations`` grows. Under DDP the sums over
    samples are all-reduced, so every rank gets its own rows of the codes a single process would
    compute on the concatenated rows (ranks may hold different numbers of rows).

    With a ``prior`` (``N x K``, rows summing to 1: the other modality's codes of the same
    samples) the logits become ``(S + s * prior_epsilon * log(prior)) / (epsilon +
    prior_epsilon)`` (GOCA's ``distributed_sinkhorn_withprior``):

    - ``prior_sign="kl"`` (``s = +1``, the default): the maximiser of ``<Q, S> + epsilon H(Q) -
      prior_epsilon KL(Q || P)`` over the transport polytope. Setting the derivative of the
      Lagrangian to zero gives ``(epsilon + prior_epsilon) log Q = S + prior_epsilon log P +
      (row and column multipliers)``, so ``Q = diag(u) exp((S + prior_epsilon log P) /
      (epsilon + prior_epsilon)) diag(v)``: the prior pulls each code toward the other view's.
    - ``prior_sign="official"`` (``s = -1``): the official code's
      ``-log(prior_P / B) * epsilon2`` (the ``log B`` is a constant shift, removed by the
      normalisation). That is the maximiser of ``<Q, S> + (epsilon + 2 prior_epsilon) H(Q) +
      prior_epsilon KL(Q || P)``: it rewards distance from the prior and pushes each code away
      from the other view's, the opposite of what the paper's text (and the README: "use the
      initial cluster assignment of each modality as prior to guide the final cluster
      assignment of the other modality ... enforce similar cluster structures") asks.

    The prior is clamped to the smallest normal float before the log, so a zero entry neither
    gives ``inf`` (official sign) nor an all-zero prototype row (KL sign). Logits are shifted by
    their global maximum before ``exp`` (exact: the first step divides by the total).

    Args:
        scores: ``N x K`` scores of this rank's samples (any float dtype; computed in float32).
        epsilon: entropic regularisation (GOCA, SwAV: 0.05).
        iterations: Sinkhorn-Knopp rounds (GOCA, SwAV: 3).
        prior: ``N x K`` codes to guide toward (or away from), or ``None``.
        prior_epsilon: weight of the prior (GOCA ``epsilon2``: 0.01).
        prior_sign: ``"kl"`` or ``"official"`` (see above).
    """
    if prior_sign not in PRIOR_SIGNS:
        raise ValueError(f"unknown prior_sign {prior_sign!r}; valid: {', '.join(PRIOR_SIGNS)}")
    logits = scores.float()
    if prior is None:
        logits = logits / epsilon
    else:
        if prior.shape != scores.shape:
            raise ValueError(f"prior {tuple(prior.shape)} must match scores {tuple(scores.shape)}")
        log_p = prior.float().clamp_min(torch.finfo(torch.float32).tiny).log()
        sign = 1.0 if prior_sign == "kl" else -1.0
        logits = (logits + sign * prior_epsilon * log_p) / (epsilon + prior_epsilon)
    top = logits.max() if logits.numel() else logits.new_tensor(-float("inf"))
    top = vdist.all_reduce(top.reshape(1).clone(), "max")
    q = torch.exp(logits - top).t()  # K x N, as the official code
    k = q.shape[0]
    n_all = float(vdist.all_reduce(torch.tensor([q.shape[1]], dtype=torch.float64,
                                                device=q.device)).item())
    q /= vdist.all_reduce(q.sum().reshape(1))
    for _ in range(iterations):
        q /= vdist.all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: total 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: total 1/N_all
        q /= n_all
    q *= n_all  # each sample's code sums to 1
    return q.t()


@torch.no_grad()
def guided_codes(
    rgb_scores: torch.Tensor,
    motion_scores: torch.Tensor,
    cycles: int = 1,
    epsilon: float = 0.05,
    iterations: int = 3,
    prior_epsilon: float = 0.01,
    prior_sign: str = "kl",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the codes ``(rgb, motion)`` (``N x K`` each) of one clip in both modalities.

    ``cycles=0``: each modality's plain :func:`sinkhorn` codes. Each cycle recomputes both with
    the other modality's codes of the previous round as the prior (GOCA ``compute_ot_loss``,
    ``sinkhorn_cycle`` 1 and 2: ``q_rgb = SK(S_rgb, prior=q_flow_prev)``, ``q_flow =
    SK(S_flow, prior=q_rgb_prev)``), for any number of cycles.
    """
    kw = dict(epsilon=epsilon, iterations=iterations)
    q_rgb, q_motion = sinkhorn(rgb_scores, **kw), sinkhorn(motion_scores, **kw)
    pkw = dict(kw, prior_epsilon=prior_epsilon, prior_sign=prior_sign)
    for _ in range(cycles):
        q_rgb, q_motion = (sinkhorn(rgb_scores, prior=q_motion, **pkw),
                           sinkhorn(motion_scores, prior=q_rgb, **pkw))
    return q_rgb, q_motion


# ----------------------------------------------------------------------------- prototypes
def prototype_separation_loss(prototypes: torch.Tensor) -> torch.Tensor:
    """Mean over prototypes of ``1 + `` the largest cosine to any other prototype.

    GOCA ``prototype_loss`` (``ssv_main.py``, ``prots/prototypes.py``, from Mettes et al. 2019,
    "Hyperspherical Prototype Networks"): rows of ``prototypes`` (``K x d``) are taken as unit
    vectors (the caller normalises them). Minimising it spreads them on the hypersphere.
    """
    product = prototypes @ prototypes.t() + 1
    product = product - 2.0 * torch.diag(torch.diag(product))  # the diagonal drops out of max
    return product.max(dim=1)[0].mean()


def _prototype_cache(num: int, dim: int, steps: int, lr: float, seed: int) -> Path:
    root = os.environ.get("VIDSSL_CACHE") or str(Path.home() / ".cache" / "vidssl")
    tag = hashlib.sha1(f"{num}-{dim}-{steps}-{lr}-{seed}-v1".encode()).hexdigest()[:12]
    return Path(root) / "prototypes" / f"hyperspherical-{num}x{dim}-{steps}-{tag}.pt"


def hyperspherical_prototypes(
    num: int,
    dim: int,
    steps: int = 50000,
    lr: float = 0.1,
    seed: int = 300,
    cache: bool = True,
) -> torch.Tensor:
    """Return ``num x dim`` unit vectors spread on the hypersphere (GOCA's frozen prototypes).

    The official ``prots/prototypes.py``: Gaussian vectors (seed 300), normalised, then ``steps``
    gradient steps of :func:`prototype_separation_loss` with renormalisation after each. Its
    first step is Adam (lr 0.1); it then builds a new ``SGD(lr=0.1, momentum=0.9)`` every step,
    so the momentum never builds up: plain gradient steps of ``lr``. Same here, on a private
    generator (the global RNG is untouched), on the GPU when there is one. 50 000 steps (the
    official file ``prototypes-128d-1000c_50000.npy``) take about 20 minutes on one CPU core
    for ``1000 x 128`` and seconds on a GPU, so the result is cached in
    ``$VIDSSL_CACHE/prototypes/`` (default ``~/.cache/vidssl``) keyed by every argument.
    """
    path = _prototype_cache(num, dim, steps, lr, seed)
    if cache and path.is_file():
        return torch.load(path, map_location="cpu")
    gen = torch.Generator().manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = F.normalize(torch.randn(num, dim, generator=gen), dim=1).to(device)
    p.requires_grad_(True)
    adam = torch.optim.Adam([p], lr=lr)
    for step in range(steps):
        with torch.enable_grad():
            loss = prototype_separation_loss(p)
            if step == 0:
                adam.zero_grad()
                loss.backward()
                adam.step()
                grad_step = None
            else:
                (grad_step,) = torch.autograd.grad(loss, p)
        with torch.no_grad():
            q = p if grad_step is None else p - lr * grad_step
            p = F.normalize(q, dim=1)
        p.requires_grad_(True)
    out = p.detach().cpu().contiguous()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


# ----------------------------------------------------------------------------- the method
def _cut(clips: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """Frames ``start[b] : start[b] + length`` of each clip ``B x C x T x H x W``."""
    frames = start.to(clips.device)[:, None] + torch.arange(length, device=clips.device)
    rows = torch.arange(clips.shape[0], device=clips.device)[:, None]
    return clips.transpose(1, 2)[rows, frames].transpose(1, 2)


class GOCA(TwoStreamMethod):
    """GOCA: guided online cluster assignment across RGB and motion (Coskun et al., ECCV 2022).

    "GOCA: Guided Online Cluster Assignment for Self-Supervised Video Representation Learning";
    official code github.com/Seleucia/goca (file and function named for each default below).

    - **Two encoders**: an RGB backbone (``self.backbone``) and a motion backbone of the same
      layout with ``motion_channels`` input channels (``self.motion_backbone``), each with its
      own MLP head ``D -> 2048 -> 2048 -> 128`` (BN, ReLU; ``my_models/model_aug.py``
      ``init_head``, ``share_proj_head`` False by default), outputs L2-normalised (``z``,
      ``pre_protype_normalize``). One set of prototypes ``C`` (``K x 128``, no bias, rows
      renormalised before every step, ``ssv_main.py`` ``train_one_epoch``) shared by both
      modalities; scores ``S = z C^T``.
    - **Clips** (temporal multi-crop): views 0 and 1 are the 2 long clips that produce codes
      (``temporal_for_assign`` 0,1); ``num_short_clips`` short clips of ``short_frames`` frames
      (``nmb_temporal_samples`` 2,4; ``num_frames_lst`` 32,16: half the long clips' frames at
      the same stride). Every clip's motion is ``batch["motion"][pos]`` of the same frames and
      crop (docs/motion.md). ``short_clips_from="views"`` (default): the data module gives one
      more ``positive`` view (an independent clip of the video, its own spatial draw) per short
      clip and the method keeps a random window of ``short_frames`` consecutive frames of it: a
      short clip at an independent position with its own augmentation, as the official sampler
      (``my_ds/AVideoDatasetCont.py`` ``get_clips_idx``) draws them, without its minimum
      distance between clip starts. ``"long"``: the short clips are random windows of the two
      long views, alternating (no extra decoding; they share the long clip's crop and colour).
    - **Codes**: :func:`sinkhorn` on each long clip's scores (``epsilon`` 0.05, 3 iterations,
      ``helper/opt_aug.py``), sums all-reduced over DDP ranks as SwAV does. From
      ``prior_start_epoch`` on (``video_modal_merge_start``), each modality's codes are
      recomputed ``prior_cycles`` times with the other modality's codes as the prior
      (:func:`guided_codes`; ``epsilon2`` 0.01, ``sinkhorn_cycle``). ``prior_sign`` settles the
      sign of the prior term (see :func:`sinkhorn`): ``"kl"`` (default) pulls codes toward the
      other modality's, as an entropic transport with a KL term to the prior does and as the
      paper's stated aim needs; ``"official"`` is the code's sign, which pushes them apart.
    - **Queue** (``queue_length > 0``, official default 0): the long clips' embeddings of earlier
      batches, rescored with the current prototypes and added to the Sinkhorn's samples once the
      queue is full, from ``queue_start_epoch`` (``epoch_queue_starts`` 10). One queue of
      ``queue_length`` rows filled from every rank (:class:`~vidssl.methods.queue.KeyQueue`),
      taken into the Sinkhorn on rank 0 only: the samples are each rank's batch plus the queue
      once, as the official per-rank queues of ``queue_length / world_size`` rows are; the
      checkpoint holds all of it.
    - **Loss**: swapped prediction within each modality (``compute_ce``): the codes of each long
      clip predict ``softmax(S_v / temperature)`` of every other clip ``v`` (the other long one
      and the short ones), averaged over the ``V - 1`` predicted clips, the 2 long clips and the
      2 modalities. The official code divides this by the number of long clips once more
      (``compute_ot_loss`` and ``fw_pass``): half the value and gradients; not done here (with
      LARS the step is nearly scale-free; with plain SGD halve ``lr`` to match).
    - **Prototypes**: ``"frozen"`` (official default ``use_precomp_prot``): spread on the
      hypersphere before training by :func:`hyperspherical_prototypes` and never trained
      (``requires_grad=False``). ``"learned"``: randomly initialised, trained with the
      separation loss :func:`prototype_separation_loss` added (``use_protreg``), their gradient
      dropped during the first ``freeze_prototypes_epochs`` epochs
      (``freeze_prototypes_epoch`` 1).
    - **Optimiser** (``default_optim``; ``helper/train_utils.py`` ``setup_optimization_finetune``,
      ``get_scheduled_LR``): SGD momentum 0.9 under LARC (trust 0.001, ``clip=False``): here
      vidssl's ``LARS`` with biases and BN included (LARC adapts every parameter); weight decay
      1e-4; peak lr ``0.15 * sqrt(global batch)`` (the default 1.2 is that for a global batch
      of 64); 10 warm-up epochs (official: linear from 0.3; here from ``lr / warmup steps``),
      then cosine to ``final_lr`` 0.0048 (``min_lr_ratio`` 0.004 = 0.0048 / 1.2).
    - **Evaluation features**: the mean of the RGB and motion backbone features (the official
      ``video_modal_merge_val`` Avg): ``vidssl retrieval --features both --combine mean``
      (each modality L2-normalised before the mean,
      :func:`vidssl.evaluation.retrieval.combine_features`; the official mean is of the raw
      features). ``forward`` / ``embed`` / ``encode_rgb``
      give the RGB stream, :meth:`encode_motion` the motion stream.
    - **Assignments**: :meth:`assignments` gives each training video's latest cluster (argmax of
      the mean of its long clips' codes over both modalities), updated from every batch's
      ``index`` on every rank alike and saved in the checkpoint (``goca_assignments``).

    Logged: ``train/code_entropy`` (entropy in nats of the batch's mean code over both
    modalities; ``log K`` = every prototype used equally, 0 = collapse onto one),
    ``train/prior`` (1 while the prior is on) and, for learned prototypes,
    ``train/separation``.

    Args:
        backbone: zoo name of both streams (the motion one with ``motion_channels`` inputs).
        backbone_kwargs: extra arguments for ``vidssl.backbones.build`` (e.g. ``width_mult``).
        weights: weights for both streams (the motion stem by TSN's cross-modality
            initialisation, as :func:`vidssl.backbones.build_two_stream`).
        motion_channels: channels of ``batch["motion"]`` (2: flow / motion vectors; 3: diff).
        num_prototypes: number of prototypes ``K`` (``nmb_prototypes`` 1000).
        temperature: softmax temperature of the predictions (``temperature`` 0.1).
        epsilon: Sinkhorn entropic regularisation (``epsilon`` 0.05).
        sinkhorn_iterations: Sinkhorn-Knopp rounds (``sinkhorn_iterations`` 3).
        prior_epsilon: weight of the cross-modal prior (``epsilon2`` 0.01).
        prior_cycles: guided recomputations per step (``sinkhorn_cycle``: the code's default 1;
            the code also implements 2); 0 turns the prior off.
        prior_start_epoch: first epoch with the prior (``video_modal_merge_start`` 100).
        prior_sign: ``"kl"`` (pull toward the other modality) or ``"official"`` (the code's
            sign, which pushes away); see :func:`sinkhorn`.
        num_short_clips: short clips per sample (``nmb_temporal_samples`` 2,4: 4).
        short_frames: frames per short clip; ``None``: half of the long clips' (32 -> 16).
        short_clips_from: ``"views"`` (a window of an extra view per short clip) or ``"long"``
            (windows of the two long views).
        share_head: one head for both modalities (``share_proj_head``, default False).
        prototypes: ``"frozen"`` (spread beforehand, never trained; ``use_precomp_prot``) or
            ``"learned"`` (trained with the separation loss).
        prototype_steps: gradient steps of :func:`hyperspherical_prototypes` (50000).
        prototype_seed: seed of :func:`hyperspherical_prototypes` (``prots/prototypes.py`` 300).
        separation_weight: weight of the separation loss for learned prototypes (1).
        freeze_prototypes_epochs: epochs without prototype updates when learned
            (``freeze_prototypes_epoch`` 1).
        queue_length: embeddings kept from earlier batches, over all ranks; 0 = no queue
            (``queue_length`` 0).
        queue_start_epoch: first epoch that fills the queue (``epoch_queue_starts`` 10).
        **kwargs: ``VideoSSLMethod``'s ``head`` (both heads) and ``optim``.
    """

    motion_option = "GOCA reads the motion of every clip"

    # Both heads: hidden_dim 2048 (hidden_mlp), output_dim = d 128 (emedding_dim), 3 linear
    # layers with BatchNorm1d in the hidden ones.
    default_head = Head(hidden_dim=2048, output_dim=128, num_layers=3, batch_norm=True)
    # Sources: the class docstring's "Optimiser" (LARC's trust_coefficient 0.001 is lars_eta).
    default_optim = Optimization(
        optimizer="lars", lr=1.2, weight_decay=1e-4, momentum=0.9, exclude_bias_and_norm=False,
        lars_eta=0.001, warmup_epochs=10.0, lr_schedule="cosine", min_lr_ratio=0.004,
    )

    def __init__(
        self,
        backbone: Union[str, nn.Module] = "r3d_18",
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[str] = None,
        motion_channels: int = 2,
        num_prototypes: int = 1000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        prior_epsilon: float = 0.01,
        prior_cycles: int = 1,
        prior_start_epoch: int = 100,
        prior_sign: Literal["kl", "official"] = "kl",
        num_short_clips: int = 4,
        short_frames: Optional[int] = None,
        short_clips_from: Literal["views", "long"] = "views",
        share_head: bool = False,
        prototypes: Literal["frozen", "learned"] = "frozen",
        prototype_steps: int = 50000,
        prototype_seed: int = 300,
        separation_weight: float = 1.0,
        freeze_prototypes_epochs: int = 1,
        queue_length: int = 0,
        queue_start_epoch: int = 10,
        **kwargs: Any,
    ):
        for name, value, valid in (("prior_sign", prior_sign, PRIOR_SIGNS),
                                   ("prototypes", prototypes, PROTOTYPE_KINDS),
                                   ("short_clips_from", short_clips_from, SHORT_SOURCES)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)} "
                                 f"(model.init_args.{name})")
        for name, value, low in (("num_prototypes", num_prototypes, 2),
                                 ("motion_channels", motion_channels, 1),
                                 ("prior_cycles", prior_cycles, 0),
                                 ("num_short_clips", num_short_clips, 0),
                                 ("queue_length", queue_length, 0),
                                 ("sinkhorn_iterations", sinkhorn_iterations, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value} "
                                 f"(model.init_args.{name})")
        if not (epsilon > 0 and prior_epsilon >= 0 and temperature > 0):
            raise ValueError("epsilon and temperature must be > 0 and prior_epsilon >= 0, got "
                             f"{epsilon}, {temperature}, {prior_epsilon}")
        if short_frames is not None and short_frames < 1:
            raise ValueError(f"short_frames must be >= 1 or null, got {short_frames}")
        super().__init__(backbone=backbone, backbone_kwargs=backbone_kwargs, weights=weights,
                         motion_channels=motion_channels, share_head=share_head, **kwargs)
        dim = self.head.output_dim
        self.prototypes = nn.Linear(dim, num_prototypes, bias=False)
        self.prototype_kind = prototypes
        if prototypes == "frozen":
            with torch.no_grad():
                self.prototypes.weight.copy_(hyperspherical_prototypes(
                    num_prototypes, dim, steps=prototype_steps, seed=prototype_seed))
            self.prototypes.weight.requires_grad_(False)
        self.num_prototypes = num_prototypes
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.prior_epsilon = prior_epsilon
        self.prior_cycles = prior_cycles
        self.prior_start_epoch = prior_start_epoch
        self.prior_sign = prior_sign
        self.num_short_clips = num_short_clips
        self.short_frames = short_frames
        self.short_clips_from = short_clips_from
        self.separation_weight = separation_weight
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        self.queue_start_epoch = queue_start_epoch
        # One row per video: the embeddings of (rgb, motion) x (long clip 0, 1), concatenated.
        self.queue = KeyQueue(queue_length, 4 * dim) if queue_length > 0 else None
        extra = num_short_clips if short_clips_from == "views" else 0
        self.views = ("anchor", "positive") + ("positive",) * extra
        self.motion_views = tuple(range(len(self.views)))
        self._labels = torch.full((0,), -1, dtype=torch.long)
        self._labels_epoch = -1
        self._batch_idx = 0

    # ----------------------------------------------------------------- checks
    def check_batch(self, batch: Dict[str, Any]) -> None:
        """Run the base checks, and check that short clips fit in the views' frames."""
        super().check_batch(batch)
        t = int(batch["views"][0].shape[2])
        short = self._short_len(t)
        if self.num_short_clips and not 1 <= short < t:
            raise ValueError(
                f"GOCA short clips of {short} frames need longer views, these have {t}; lower "
                "model.init_args.short_frames or raise data.init_args.clip_len"
            )

    def _short_len(self, t: int) -> int:
        return self.short_frames if self.short_frames is not None else t // 2

    # ----------------------------------------------------------------- clips
    def clips(self, batch: Dict[str, Any]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Return ``(rgb clips, motion clips)``: the 2 long clips, then the short ones.

        Short clips are random windows (one start per sample) of the extra views
        (``short_clips_from="views"``) or of the long views, alternating; the RGB clip and its
        motion are cut at the same frames. The starts come from a generator seeded by
        ``(torch.initial_seed(), epoch, batch index, rank)``, so a resumed run cuts the same
        windows and the global RNG (augmentation) is left alone.
        """
        views, motion = batch["views"], batch["motion"]
        rgb, mot = list(views[:2]), [motion[0], motion[1]]
        t = int(views[0].shape[2])
        length = self._short_len(t)
        key = [torch.initial_seed(), self.current_epoch, self._batch_idx, self.global_rank]
        seed = np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1)
        gen = torch.Generator().manual_seed(int(seed))
        for j in range(self.num_short_clips):
            src = 2 + j if self.short_clips_from == "views" else j % 2
            v, m = views[src], motion[src]
            start = torch.randint(0, v.shape[2] - length + 1, (v.shape[0],), generator=gen)
            rgb.append(_cut(v, start, length))
            mot.append(_cut(m, start, length))
        return rgb, mot

    def _scores(self, clips: Sequence[torch.Tensor], modality: str
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Return per clip ``(z, S)``.

        Clips of one length share one backbone pass (one BN batch), as the official
        ``AVModel.forward`` groups them.
        """
        encode = self.encode_rgb if modality == "rgb" else self.encode_motion
        out: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(clips)
        lengths = sorted({int(c.shape[2]) for c in clips}, reverse=True)
        for length in lengths:
            pos = [i for i, c in enumerate(clips) if int(c.shape[2]) == length]
            z = self.project(encode(torch.cat([clips[i] for i in pos])), modality)
            s = self.prototypes(z)
            for k, (zi, si) in enumerate(zip(z.chunk(len(pos)), s.chunk(len(pos)))):
                out[pos[k]] = (zi, si)
        return [o[0] for o in out], [o[1] for o in out]

    # ----------------------------------------------------------------- loss
    def prior_active(self) -> bool:
        """Whether this epoch's codes are guided by the other modality (``prior_start_epoch``)."""
        return self.prior_cycles > 0 and self.current_epoch >= self.prior_start_epoch

    def _queue_scores(self, a: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Return the queue's (rgb, motion) scores of long clip ``a``, on rank 0 once it is full."""
        q = self.queue
        if q is None or vdist.get_rank() != 0 or not bool(q.filled().all()):
            return None
        emb = q.keys.view(q.size, 2, 2, -1)
        w = self.prototypes.weight.detach()
        return emb[:, 0, a] @ w.t(), emb[:, 1, a] @ w.t()

    @torch.no_grad()
    def codes(self, rgb_scores: Sequence[torch.Tensor], motion_scores: Sequence[torch.Tensor]
              ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Return ``[(rgb codes, motion codes)]`` (``B x K``) of the 2 long clips."""
        cycles = self.prior_cycles if self.prior_active() else 0
        out = []
        for a in range(2):
            s_r, s_m = rgb_scores[a].detach().float(), motion_scores[a].detach().float()
            b = s_r.shape[0]
            queued = self._queue_scores(a)
            if queued is not None:
                s_r, s_m = torch.cat([queued[0], s_r]), torch.cat([queued[1], s_m])
            q_r, q_m = guided_codes(
                s_r, s_m, cycles=cycles, epsilon=self.epsilon,
                iterations=self.sinkhorn_iterations, prior_epsilon=self.prior_epsilon,
                prior_sign=self.prior_sign,
            )
            out.append((q_r[-b:], q_m[-b:]))
        return out

    def _swapped(self, codes: Sequence[torch.Tensor], scores: Sequence[torch.Tensor]
                 ) -> torch.Tensor:
        """Mean over long clips ``a`` and other clips ``v`` of ``CE(q_a, softmax(S_v / t))``."""
        total = scores[0].new_zeros(())
        for a, q in enumerate(codes):
            for v, s in enumerate(scores):
                if v != a:
                    log_p = F.log_softmax(s.float() / self.temperature, dim=1)
                    total = total - (q * log_p).sum(dim=1).mean() / (len(scores) - 1)
        return total / len(codes)

    def compute_loss(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """GOCA's loss on a batch (see the class docstring); logs code entropy and the prior."""
        rgb, mot = self.clips(batch)
        z_r, s_r = self._scores(rgb, "rgb")
        z_m, s_m = self._scores(mot, "motion")
        codes = self.codes(s_r, s_m)
        loss_r = self._swapped([c[0] for c in codes], s_r)
        loss_m = self._swapped([c[1] for c in codes], s_m)
        loss = (loss_r + loss_m) / 2
        out: Dict[str, torch.Tensor] = {}
        if self.prototype_kind == "learned":
            sep = prototype_separation_loss(F.normalize(self.prototypes.weight, dim=1))
            loss = loss + self.separation_weight * sep
            out["separation"] = sep.detach()
        with torch.no_grad():
            if self.queue is not None and self.current_epoch >= self.queue_start_epoch:
                self.queue.enqueue(torch.cat([z_r[0], z_r[1], z_m[0], z_m[1]], dim=1).detach(),
                                   batch["index"])
            mean_code = torch.stack([q for pair in codes for q in pair]).sum(0)
            self._record(batch["index"], mean_code.argmax(dim=1))
            p = mean_code.mean(0) / mean_code.mean(0).sum()
            out["code_entropy"] = -(p * p.clamp_min(1e-12).log()).sum()
            out["prior"] = torch.tensor(float(self.prior_active()), device=loss.device)
        out["loss"] = loss
        return out

    # ----------------------------------------------------------------- training hooks
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Run the base step, remembering ``batch_idx`` for the short clips' windows."""
        self._batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Renormalise the prototypes' rows before the step (``train_one_epoch``)."""
        with torch.no_grad():
            w = self.prototypes.weight
            w.copy_(F.normalize(w, dim=1))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Drop learned prototypes' gradient in the first ``freeze_prototypes_epochs``."""
        if self.prototype_kind == "learned" and self.current_epoch < self.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None

    # ----------------------------------------------------------------- assignments
    @torch.no_grad()
    def _record(self, index: torch.Tensor, labels: torch.Tensor) -> None:
        index = vdist.all_gather_padded(index.long().reshape(-1)).cpu()
        labels = vdist.all_gather_padded(labels.long().reshape(-1)).cpu()
        need = int(index.max()) + 1 if index.numel() else 0
        if need > self._labels.numel():
            grown = torch.full((need,), -1, dtype=torch.long)
            grown[: self._labels.numel()] = self._labels
            self._labels = grown
        self._labels[index] = labels
        self._labels_epoch = int(self.current_epoch)

    @property
    def pseudo_label_state(self) -> Optional[PseudoLabelState]:
        """Each training video's latest cluster (argmax code): GOCA as a labeller.

        The ``vidssl.pseudo_labels.PseudoLabelSource`` side of the contract, the same state the
        ``PseudoLabels`` callback exposes, so diagnostics and plots read both kinds alike:
        ``labels[i]`` is the prototype the video at dataset index ``i`` was last assigned to
        (``-1``: not seen yet), ``keys`` the videos' identities when the data module gives them
        (``train_video_ids``, then one label per training video), ``epoch`` the epoch of the
        latest update. ``None`` before any step.
        """
        if self._labels_epoch < 0:
            return None
        labels = self._labels.numpy().copy()
        ids = getattr(self._datamodule(), "train_video_ids", None)
        keys = None
        if ids is not None:
            keys = np.asarray([str(k) for k in ids], dtype=np.str_)
            full = np.full(len(keys), -1, dtype=np.int64)
            n = min(len(keys), len(labels))
            full[:n] = labels[:n]
            labels = full
        return PseudoLabelState(
            labels, keys, self._labels_epoch,
            "online Sinkhorn codes (argmax of the long clips' mean code, RGB and motion)")

    def assignments(self) -> Optional[PseudoLabelState]:
        """Return :attr:`pseudo_label_state` (each training video's latest cluster)."""
        return self.pseudo_label_state

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Save the assignment record (``checkpoint["goca_assignments"]``)."""
        checkpoint["goca_assignments"] = {"labels": self._labels.clone(),
                                          "labels_epoch": self._labels_epoch}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Restore the assignment record saved by :meth:`on_save_checkpoint`."""
        state = checkpoint.get("goca_assignments")
        if state is not None:
            self._labels = torch.as_tensor(state["labels"]).long().cpu().clone()
            self._labels_epoch = int(state["labels_epoch"])
