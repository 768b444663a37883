"""One incremental WaveNet step: the next sample from per-layer past activations, O(layers) work.

`WaveNetDecoder.forward` recomputes every layer over the receptive field; generation only needs
the newest column. Layer ``i`` at time ``tau`` reads its input at ``tau - j * d_i``
(``j < kernel``), so the caller keeps, per layer, a ring buffer of its last ``(kernel-1) * d_i``
inputs and passes the ``kernel - 1`` older taps as ``past``; this module returns the current
inputs (``current``) to push into those rings. Ring buffers and sampling noise live outside
(numpy in `vqwavenet.codec`), so this module exports to ONNX as one small graph and runs seeded.

The weights are a snapshot of the decoder's, rearranged for row-vector products (one GEMM per
layer and tap, one for every layer's skip at once): rebuild after training.
The dilated convolutions' biases are folded into the conditioning (`condition`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from model.decoder import WaveNetDecoder


@dataclass
class StepOutput:
    """Results of one step for ``B`` streams.

    Attributes:
        sample: mu-law class drawn by inverse CDF from ``noise`` ``[B]`` (int64).
        logits: ``[B, Q]``.
        current: each layer's shifted input at this time ``[B, L * R]`` (layer-major; push into
            the rings). Shifted: layer ``i``'s input less the constant sum of the residual
            biases before it, which is folded into the conditioning instead.
    """

    sample: torch.Tensor
    logits: torch.Tensor
    current: torch.Tensor


class DecoderStep(nn.Module):
    """Incremental form of a `WaveNetDecoder` (same function, teacher-forced or sampled).

    Each layer costs one product per tap (one for all its taps in the form that int8 quantises,
    see `layers`), a gate and one residual product; the skips are one product at the end.
    Constant terms (dilated biases, and the residual biases carried along the residual path,
    whose effect on every later layer's taps is a constant) live in `condition`, so the rings
    hold inputs without them (see `StepOutput.current`).
    """

    def __init__(self, decoder: WaveNetDecoder, temperature: float = 1.0):
        """``temperature``: `layers` samples from ``softmax(logits / temperature)`` (below 1
        sharper, towards the likeliest classes); ``logits`` stay the model's own."""
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"a sampling temperature must be a positive number, not {temperature}")
        self.temperature = float(temperature)
        cfg = decoder.cfg
        self.dilations = list(decoder.dilations)
        self.kernel = k = cfg.kernel_size
        self.gate = g = cfg.gate_channels
        self.n_layers = n = len(self.dilations)
        self.residual_channels = r = cfg.residual_channels
        with torch.no_grad():
            self.embed = nn.Embedding.from_pretrained(decoder.embed.weight.detach().clone())
            # Dilated weight [2G, R, k]: tap j reads tau - (k-1-j) d (oldest first).
            taps = torch.stack([c.weight.permute(2, 1, 0) for c in decoder.dilated])  # [L,k,R,2G]
            self.register_buffer("past_w", taps[:, :-1].reshape(n, (k - 1) * r, 2 * g).clone())
            self.register_buffer("current_w", taps[:, -1].clone())  # [L, R, 2G]
            # Both as one product's weight, for the form that onnxruntime quantises (`layers`).
            self.register_buffer("dilated_w", taps.reshape(n, k * r, 2 * g).clone())
            res_b = torch.stack([x.bias for x in decoder.residual])  # [L-1, R]
            shift = torch.cat([torch.zeros(1, r), res_b.cumsum(0)])  # [L, R]: bias sum before i
            bias = torch.stack([c.bias for c in decoder.dilated])  # [L, 2G]
            bias = bias + torch.einsum("lr,lkrg->lg", shift, taps)
            self.register_buffer("gate_bias", bias.reshape(-1).clone())  # [L * 2G]
            self.register_buffer(
                "residual_w", torch.stack([x.weight[:, :, 0].t() for x in decoder.residual]).clone()
            )  # [L-1, G, R]
            self.register_buffer(
                "skip_w", torch.cat([s.weight[:, :, 0].t() for s in decoder.skip]).clone()
            )  # [L * G, S]
            self.register_buffer("skip_b", sum(s.bias for s in decoder.skip).clone())  # [S]
            head1, head2 = decoder.head[1], decoder.head[3]
            self.register_buffer("head1_w", head1.weight[:, :, 0].t().clone())  # [S, S]
            self.register_buffer("head1_b", head1.bias.clone())
            self.register_buffer("head2_w", head2.weight[:, :, 0].t().clone())  # [S, Q]
            self.register_buffer("head2_b", head2.bias.clone())
        self._decoder = [decoder]  # not a submodule: the state dict holds only the snapshot

    def condition(
        self, slots: torch.Tensor, speaker: torch.Tensor, dropped: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The decoder's conditioning plus the folded constants ``[B, L * 2G, C]`` (see
        `WaveNetDecoder.condition` for the arguments)."""
        c = self._decoder[0].condition(slots, speaker, dropped)
        return c + self.gate_bias[None, :, None]

    def ring_sizes(self) -> list[int]:
        """Inputs each layer's ring buffer must hold: ``(kernel - 1) * dilation``."""
        return [(self.kernel - 1) * d for d in self.dilations]

    def warm(self, prev: torch.Tensor, cond: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The ring contents after ``T`` steps on known inputs, computed in parallel over time.

        A generator starts a stream with ``T`` warm-up steps whose inputs are known (silence);
        stepping through them costs ``T`` sequential steps, while their result, the last
        ``(k-1) d_i`` inputs of every layer, is a valid convolution over the whole window. It
        does not depend on the rings' initial contents once ``T >= sum((k-1) d_i)``.

        Args:
            prev: classes fed at steps ``0 .. T-1`` ``[B, T]`` (int64).
            cond: conditioning rows ``[B, C, L * 2G]`` (`condition`'s output, time-major).
            index: row of ``cond`` used at each step ``[B, T]`` (int64).

        Returns:
            ``[B, sum(ring_sizes), R]``: layer by layer, its shifted inputs at steps
            ``T - (k-1) d_i .. T-1`` (oldest first).
        """
        g, n, k, r = self.gate, self.n_layers, self.kernel, self.residual_channels
        sizes = self.ring_sizes()
        if prev.shape[1] < sum(sizes):
            raise ValueError(f"the warm-up needs at least {sum(sizes)} steps, got {prev.shape[1]}")
        taps = self.past_w.reshape(n, k - 1, r, 2 * g)
        x = self.embed(prev)  # [B, T, R]; row t is the input at step t
        states, first = [], 0  # `first`: the step of x's row 0
        for i, d in enumerate(self.dilations):
            states.append(x[:, -sizes[i] :])
            if i == n - 1:
                break
            first += (k - 1) * d
            h = x[:, (k - 1) * d :] @ self.current_w[i]
            for j in range(k - 1):  # tap j reads step t - (k-1-j) d
                h = h + x[:, j * d : x.shape[1] - (k - 1 - j) * d] @ taps[i, j]
            idx = index[:, first:, None].expand(-1, -1, 2 * g)
            h = h + torch.gather(cond[:, :, i * 2 * g : (i + 1) * 2 * g], 1, idx)
            z = torch.tanh(h[..., :g]) * torch.sigmoid(h[..., g:])
            x = x[:, (k - 1) * d :] + z @ self.residual_w[i]
        return torch.cat(states, 1)

    def forward(
        self, prev: torch.Tensor, past: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor
    ) -> StepOutput:
        """One step at decoder time ``tau`` for ``B`` streams (the stacked form of `layers`).

        Args:
            prev: mu-law class of sample ``tau - 1`` ``[B]`` (int64).
            past: shifted layer inputs at ``tau - j * d_i`` for ``j = k-1, ..., 1`` (oldest
                first), ``[L, B, (k-1) * R]``.
            cond: `condition` at ``cond_index(tau)`` ``[B, L * 2G]``.
            noise: uniform in [0, 1) ``[B]``; the class is the first whose CDF exceeds it.
        """
        r = self.residual_channels
        taps = [p[:, t * r : (t + 1) * r] for p in past for t in range(self.kernel - 1)]
        sample, logits, current = self.layers(prev, taps, cond.split(2 * self.gate, 1), noise)
        return StepOutput(sample, logits, torch.cat(current, 1))

    def layers(
        self,
        prev: torch.Tensor,
        past: Sequence[torch.Tensor],
        cond: Sequence[torch.Tensor],
        noise: torch.Tensor,
        *,
        fused: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """`forward` with one tensor per layer and tap, the exported step graph's interface.

        The generator binds each tap to its ring slot and each output to the slot it
        overwrites, so no step copies the rings into one array or out of one.

        Args:
            past: ``L * (k-1)`` tensors ``[B, R]``, layer-major, oldest tap first.
            cond: ``L`` tensors ``[B, 2G]``.
            fused: accumulate into the products (``addmm``, one ONNX ``Gemm`` each, faster
                in fp32). Off for the graph that onnxruntime quantises, which only quantises
                ``MatMul``: there each layer's taps and current input are concatenated into
                one product, which saves a quantised product and a sum per layer.

        Returns:
            ``(sample [B], logits [B, Q], current)``, ``sample`` drawn at `temperature`,
            ``current`` being ``L`` tensors ``[B, R]`` (see `StepOutput`).
        """
        g, n, r, taps = self.gate, self.n_layers, self.residual_channels, self.kernel - 1

        def acc(c: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.addmm(c, a, w) if fused else c + a @ w

        x = self.embed(prev)  # [B, R]
        inputs, gates = [], []
        for i in range(n):
            inputs.append(x)
            mine = past[i * taps : (i + 1) * taps]
            if fused:
                h = cond[i]
                for t in range(taps):
                    h = acc(h, mine[t], self.past_w[i, t * r : (t + 1) * r])
                h = acc(h, x, self.current_w[i])  # [B, 2G]
            else:
                h = cond[i] + torch.cat([*mine, x], 1) @ self.dilated_w[i]
            z = torch.tanh(h[:, :g]) * torch.sigmoid(h[:, g:])  # [B, G]
            gates.append(z)
            if i < n - 1:
                x = acc(x, z, self.residual_w[i])
        skips = torch.cat(gates, 1) @ self.skip_w + self.skip_b  # [B, S]
        h = torch.relu(torch.relu(skips) @ self.head1_w + self.head1_b)
        logits = h @ self.head2_w + self.head2_b  # [B, Q]
        sharp = logits if self.temperature == 1.0 else logits / self.temperature
        cdf = torch.cumsum(torch.softmax(sharp, dim=1), dim=1)
        q = logits.shape[1]
        sample = (cdf < noise[:, None]).to(torch.int64).sum(1).clamp(max=q - 1)
        return sample, logits, inputs
