"""Vector quantiser with a straight-through estimator and a usage-weighted EMA codebook.

The per-frame commitment distance ``d[j]`` is returned to the loss, which counts each frame as
often as predictions use it. With the EMA codebook, a gradient hook on ``d`` (`watch`) reads
the exact usage weights ``dL/dd[j] / beta`` during backward (they sum to 1 per optimiser step)
and adds them to the EMA statistics; `ema_update` applies them once per step. So the
statistics are invariant to how predictions are batched, and masked frames (weight 0) never
count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.config import QuantizerConfig


@dataclass
class QuantizerOutput:
    """Quantiser results for ``[B, F]`` frames.

    Attributes:
        quantized: straight-through codebook vectors ``[B, F, D]`` (gradient flows to z_e).
        codes: nearest codebook index ``[B, F]``.
        commitment: ``d[j]`` = reduce over D of ``(z_e - sg(e))^2``, ``[B, F]``.
        codebook: ``reduce over D of (sg(z_e) - e)^2`` when the codebook learns by gradient.
        beta: the commitment weight (``QuantizerConfig.beta``): the loss weights
            ``commitment`` by it and the EMA hook divides it out again, so both read it here.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment: torch.Tensor
    codebook: torch.Tensor | None
    beta: float


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.dim
        self.ema = cfg.codebook_update == "ema"
        init = torch.randn(k, d) / d**0.5
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_count", torch.zeros(k))
            self.register_buffer("ema_sum", torch.zeros(k, d))
            # Statistics of the current optimiser step, filled by the backward hook.
            self.register_buffer("step_count", torch.zeros(k), persistent=False)
            self.register_buffer("step_sum", torch.zeros(k, d), persistent=False)
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("perplexity", torch.zeros(()))
        self.register_buffer("codes_used", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Encoder outputs and usage weights of every backward since the last update (each
        # micro-batch's, with gradient accumulation); vectors with weight > 0 are the restart
        # candidates, selected in `ema_update` outside any compiled graph and in batch order,
        # so restarts do not depend on how a step's windows are split into micro-batches.
        self._pool: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1) if self.cfg.commitment_reduction == "mean" else x.sum(-1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Codes ``[...]`` of the nearest codebook entries to ``z [..., D]``, in >= fp32."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        flat = z.reshape(-1, z.shape[-1]).to(dtype)
        e = self.codebook.detach().to(dtype)
        dist = (flat * flat).sum(1, keepdim=True) - 2 * flat @ e.t() + (e * e).sum(1)[None]
        return dist.argmin(1).reshape(z.shape[:-1])

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """``z [B, F, D]`` -> `QuantizerOutput`."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(torch.promote_types(z.dtype, torch.float32))
            codes = self.nearest(z)
            e = self.codebook[codes].to(z.dtype)
            quantized = z + (e - z).detach()
            commitment = self._reduce((z - e.detach()) ** 2)
            codebook = None if self.ema else self._reduce((z.detach() - e) ** 2)
        return QuantizerOutput(quantized, codes, commitment, codebook, self.cfg.beta)

    # Eager: under torch.compile (torch 2.11) the hook becomes part of the compiled backward,
    # which may not set this module's attributes, and filling a tensor made in the forward
    # instead builds a graph that Inductor rejects (a buffer used before its placeholder).
    # The caller watches last, so the graph break ends the compiled forward.
    @torch.compiler.disable
    def watch(self, out: QuantizerOutput, z: torch.Tensor) -> None:
        """Collect this step's EMA usage statistics from the backward of ``out.commitment``
        (``z``: the encoder outputs ``out`` came from). Training calls it after every forward;
        it does nothing without an EMA codebook, outside training or without gradients."""
        d = out.commitment
        if not (self.ema and self.training and d.requires_grad):
            return
        beta = out.beta
        flat_z = z.detach().reshape(-1, z.shape[-1]).to(d.dtype)
        flat_codes = out.codes.reshape(-1)

        def hook(grad: torch.Tensor) -> None:
            w = (grad / beta).reshape(-1).to(self.step_count.dtype)
            self.step_count.index_add_(0, flat_codes, w)
            self.step_sum.index_add_(0, flat_codes, w[:, None] * flat_z)
            self._pool.append((flat_z, w))

        d.register_hook(hook)

    @torch.no_grad()
    def ema_update(
        self,
        reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
        generator: torch.Generator | None = None,
        broadcast: Callable[[torch.Tensor], torch.Tensor] = _identity,
    ) -> None:
        """Fold this step's usage statistics into the EMA codebook (once per optimiser step).

        Args:
            reduce: combines a tensor over data-parallel ranks the way the gradients are
                combined (identity in one process).
            generator: draws restart vectors for dead codes (seeded alike on every rank).
            broadcast: rank 0's tensor on every rank (identity in one process); restart
                vectors come from rank 0 so every rank keeps the same codebook.
        """
        if not self.ema:
            return
        count = reduce(self.step_count.clone())
        total = reduce(self.step_sum.clone())
        self.step_count.zero_()
        self.step_sum.zero_()
        decay, eps = self.cfg.ema_decay, self.cfg.ema_epsilon
        self.ema_count.mul_(decay).add_(count, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(total, alpha=1 - decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + eps) / (n + eps * len(self.ema_count)) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None].clamp_min(1e-12))
        self._track_usage(count)
        self._restart_dead(generator, broadcast)

    def discard_step(self) -> None:
        """Drop this step's usage statistics (the trainer skips a non-finite step)."""
        if self.ema:
            self.step_count.zero_()
            self.step_sum.zero_()
        self._pool = []

    @property
    def ema_perplexity(self) -> float:
        """Perplexity of the EMA usage counts: usage over the last ``1 / (1 - decay)`` steps or
        so, where `perplexity` and `codes_used` see one step's frames only (a step of a few
        short windows has fewer frames than the codebook has codes)."""
        if not self.ema:
            return float(self.perplexity)
        p = self.ema_count / self.ema_count.sum().clamp_min(1e-12)
        return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))

    def _track_usage(self, count: torch.Tensor) -> None:
        p = count / count.sum().clamp_min(1e-12)
        self.perplexity.copy_(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
        self.codes_used.copy_((count > 0).sum())

    def _restart_dead(self, generator, broadcast) -> None:
        """Move codes whose EMA usage fell below the threshold onto recent encoder outputs.

        ``dead`` depends only on the reduced statistics, so every rank takes the same branch;
        every rank draws the same amount from its generator and receives rank 0's vectors (or
        rank 0's decision to skip when it saw no candidates)."""
        dead = self.ema_count < self.cfg.dead_code_threshold
        pool, self._pool = self._pool, []
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        cand = torch.cat([z[w > 0] for z, w in pool]) if pool else None
        u = torch.rand(n_dead, generator=generator, dtype=torch.float64)
        dim = self.codebook.shape[1]
        new = torch.zeros(n_dead, dim, dtype=self.codebook.dtype, device=self.codebook.device)
        have = torch.zeros((), dtype=self.codebook.dtype, device=self.codebook.device)
        if cand is not None and len(cand) > 0:
            idx = (u * len(cand)).long().clamp_max(len(cand) - 1)
            new.copy_(cand[idx.to(cand.device)].to(new.dtype))
            have.fill_(1)
        if float(broadcast(have)) == 0:
            return
        new = broadcast(new)
        self.codebook[dead] = new
        self.ema_sum[dead] = new * self.cfg.dead_code_threshold
        self.ema_count[dead] = self.cfg.dead_code_threshold

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 10, generator=None) -> None:
        """Initialise the codebook by k-means on encoder outputs ``z [M, D]`` (M >= K)."""
        z = z.reshape(-1, z.shape[-1]).to(self.codebook.dtype)
        k = self.cfg.codebook_size
        if len(z) < k:
            raise ValueError(f"k-means needs at least {k} vectors, got {len(z)}")
        centres = z[torch.randperm(len(z), generator=generator)[:k].to(z.device)].clone()
        for _ in range(iters):
            dist = torch.cdist(z, centres)
            assign = dist.argmin(1)
            counts = torch.bincount(assign, minlength=k).to(z.dtype)
            sums = torch.zeros_like(centres).index_add_(0, assign, z)
            filled = counts > 0
            centres[filled] = sums[filled] / counts[filled, None]
        self.codebook.data.copy_(centres)
        if self.ema:
            counts = torch.bincount(torch.cdist(z, centres).argmin(1), minlength=k).to(z.dtype)
            self.ema_count.copy_(counts / counts.sum())
            self.ema_sum.copy_(centres * self.ema_count[:, None])
        self.initialized.fill_(True)
