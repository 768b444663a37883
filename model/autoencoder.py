"""The VQ-VAE WaveNet autoencoder: MFCC encoder -> quantiser -> jittered WaveNet decoder.

A forward pass computes N consecutive teacher-forced predictions per window. Everything is
indexed in absolute padded-utterance coordinates (see `model.geometry`), so a prediction's
logits and its share of the commitment loss do not depend on the window it was computed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model import mulaw
from model.cond_dropout import dropped_conditioning
from model.config import ModelConfig
from model.decoder import WaveNetDecoder
from model.encoder import Encoder
from model.features import MFCC
from model.geometry import CodecGeometry, Conv, hull
from model.input_noise import noisy_classes
from model.jitter import slot_frames
from model.past_draws import chosen, drawn_classes
from model.past_gain import gained_samples
from model.past_tilt import tilted_samples
from model.quantizer import QuantizerOutput, VectorQuantizer


@dataclass
class Windows:
    """Where each row of a waveform batch sits in its utterance (all ``[B]`` long tensors).

    Attributes:
        start: padded-utterance index of ``wave[b, 0]`` (normally ``frame0 * hop``).
        frame0: index of the first frame encoded from ``wave[b, 0:]``.
        n_frames: frames in the whole (padded) utterance, F.
        t0: first prediction of the window.
        n_valid: valid predictions from ``t0`` (the rest of the N columns are padding).
        utt: utterance ids (jitter is a hash of them).
        speaker: speaker ids.
        seed, epoch: the jitter draw, stored as 0-d int64 tensors: a Python int would be a
            constant of a compiled graph, which torch.compile recompiles when the epoch changes.
    """

    start: torch.Tensor
    frame0: torch.Tensor
    n_frames: torch.Tensor
    t0: torch.Tensor
    n_valid: torch.Tensor
    utt: torch.Tensor
    speaker: torch.Tensor
    seed: int | torch.Tensor = 0
    epoch: int | torch.Tensor = 0

    def __post_init__(self):
        self.seed = torch.as_tensor(self.seed, dtype=torch.int64)
        self.epoch = torch.as_tensor(self.epoch, dtype=torch.int64)

    def to(self, device) -> Windows:
        fields = {k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        return Windows(**fields)


@dataclass
class AutoencoderOutput:
    """Teacher-forced outputs of one pass over ``[B]`` windows of N predictions.

    Attributes:
        logits: ``[B, Q, N]``; column ``i`` predicts sample ``t0 + i``.
        targets: mu-law classes ``[B, N]``.
        mask: ``[B, N]`` true for valid predictions.
        quantizer: per-frame results ``[B, F_w]`` (commitment ``d[j]`` among them).
        slot_frames: local frame carried by each slot ``[B, n_slots]`` (the jitter gather).
        slot_lo, slot_hi: local slot range ``[lo(t), hi(t)]`` of each prediction ``[B, N]``.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    quantizer: QuantizerOutput
    slot_frames: torch.Tensor
    slot_lo: torch.Tensor
    slot_hi: torch.Tensor


class Autoencoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.features = MFCC(cfg.features)
        self.encoder = Encoder(self.features.dim, cfg.quantizer.dim, cfg.encoder)
        self.quantizer = VectorQuantizer(cfg.quantizer)
        self.decoder = WaveNetDecoder(cfg.quantizer.dim, cfg.decoder)
        enc_layers = self.features.layers() + self.encoder.layers()
        hop = cfg.features.hop_length * cfg.encoder.stride
        first, last = hull(enc_layers, 0, 0)
        rf = last - first + 1
        k = cfg.decoder.cond_kernel
        # Centre conditioning index c (slots c..c+k-1) on the samples of its middle frame.
        shift = ((k - 1) * hop + rf - hop) // 2
        self.geometry = CodecGeometry(
            encoder=enc_layers,
            conditioning=self.decoder.conditioning_layers(hop, shift),
            wavenet=self.decoder.wavenet_layers(),
            ar_input=Conv(1, offset=-1),
            drawn_past=cfg.decoder.past_draws > 0,
        )

    # --- utterance level ----------------------------------------------------------------------

    def pad(self, wave: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Utterance-level padding ``[..., n] -> [..., n + pads]``; returns (padded, left, F)."""
        left, right, n_frames = self.geometry.padding(wave.shape[-1])
        return nn.functional.pad(wave, (left, right)), left, n_frames

    @torch.no_grad()
    def encode(self, padded: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, F]`` of padded utterances ``[B, L]`` (frames of the utterance grid)."""
        z = self.encoder(self.features(padded)).transpose(1, 2)
        return self.quantizer.nearest(z)

    # --- training / teacher forcing -----------------------------------------------------------

    def forward(self, wave: torch.Tensor, win: Windows, n: int) -> AutoencoderOutput:
        """Teacher-forced pass over ``B`` windows of ``n`` consecutive predictions.

        Args:
            wave: ``[B, L]`` waveform rows in [-1, 1]; row ``b`` holds padded-utterance samples
                ``[start_b, start_b + L)`` (zero-filled past its own window).
            win: where each row sits (`Windows`).
            n: predictions per window (columns of the output).
        """
        geo = self.geometry
        self._check_length(wave, win)
        z = self.encoder(self.features(wave)).transpose(1, 2)  # [B, F_w, D]
        q = self.quantizer(z)
        n_local = z.shape[1]

        t = win.t0[:, None] + torch.arange(n, device=wave.device)  # [B, N]
        lo, hi = geo.slot_range(t)
        draws = self.cfg.decoder.past_draws if self.training else 0.0
        # With drawn pasts, a first pass also predicts the ar_context samples before t0.
        lead = geo.ar_context if draws > 0 else 0
        k0 = geo.slot_range(win.t0 - lead)[0][:, None]
        n_slots = geo.slots_spanned(n + lead)  # static: every row's slots from k0 on
        slots = k0 + torch.arange(n_slots, device=wave.device)  # absolute slots [B, n_slots]
        frames = self.route(slots, win)
        local = (frames - win.frame0[:, None]).clamp(0, n_local - 1)
        vecs = q.quantized.gather(1, local[..., None].expand(-1, -1, q.quantized.shape[-1]))
        cond = self.decoder.condition(vecs.transpose(1, 2), win.speaker, self._dropped(slots, win))

        past, cond_index = self._decoder_indices(win.t0, n, k0, cond.shape[-1])
        ar = past - win.start[:, None]
        samples = wave.gather(1, ar.clamp(0, wave.shape[1] - 1))
        q_ch = self.cfg.decoder.quantization_channels
        if draws > 0:
            samples = self._with_draws(wave, win, cond, k0, past, samples, draws)
        tilt = self.cfg.decoder.past_tilt if self.training else 0.0
        if tilt > 0:  # the sample before each: in the row (span's margin frame), or silence
            previous = wave.gather(1, (ar - 1).clamp(0, wave.shape[1] - 1))
            previous = torch.where(past > 0, previous, torch.zeros_like(previous))
            every = self.cfg.decoder.past_tilt_every
            samples = tilted_samples(
                samples,
                previous,
                tilt,
                every,
                seed=win.seed,
                epoch=win.epoch,
                utt=win.utt,
                index=past,
            )
        gain = self.cfg.decoder.past_gain_db if self.training else 0.0
        if gain > 0:
            every = self.cfg.decoder.past_gain_every
            samples = gained_samples(
                samples, gain, every, seed=win.seed, epoch=win.epoch, utt=win.utt, index=past
            )
        classes = mulaw.encode(samples, q_ch)
        sigma = self.cfg.decoder.input_noise if self.training else 0.0
        if sigma > 0:
            classes = noisy_classes(
                classes, q_ch, sigma, seed=win.seed, epoch=win.epoch, utt=win.utt, index=past
            )
        logits = self.decoder(classes, cond, cond_index)
        mask = torch.arange(n, device=wave.device)[None] < win.n_valid[:, None]
        out = AutoencoderOutput(
            logits=logits,
            targets=mulaw.encode(
                wave.gather(1, (t - win.start[:, None]).clamp(0, wave.shape[1] - 1)),
                q_ch,
            ),
            mask=mask,
            quantizer=q,
            slot_frames=local,
            slot_lo=(lo - k0).clamp(0, n_slots - 1),
            slot_hi=(hi - k0).clamp(0, n_slots - 1),
        )
        self.quantizer.watch(q, z)  # last: it is a graph break under torch.compile
        return out

    def _dropped(self, slots: torch.Tensor, win: Windows) -> torch.Tensor | None:
        """In training with ``decoder.cond_dropout``, whether each conditioning index (column
        ``j`` is absolute index ``slots[:, j]``, as its first slot) has the null
        (`model.cond_dropout`); else None."""
        p = self.cfg.decoder.cond_dropout if self.training else 0.0
        if p == 0:
            return None
        index = slots[:, : slots.shape[1] - self.cfg.decoder.cond_kernel + 1]
        every = self.cfg.decoder.cond_dropout_every
        return dropped_conditioning(
            p, every, seed=win.seed, epoch=win.epoch, utt=win.utt, index=index
        )

    def _decoder_indices(self, t0: torch.Tensor, n: int, k0: torch.Tensor, n_cond: int):
        """For predictions ``[t0, t0 + n)``: the absolute indices of the past samples the
        decoder reads ``[B, n + wavenet_context]`` and the conditioning index of each decoder
        time from the first layer's first output on (relative to slot ``k0``)."""
        ctx = self.geometry.wavenet_context
        first = self.decoder.wavenet_layers()[0].span
        times = t0[:, None] + torch.arange(-ctx + first, n, device=t0.device)
        cond_index = (self.geometry.cond_index(times) - k0).clamp(0, n_cond - 1)
        past = t0[:, None] - 1 + torch.arange(-ctx, n, device=t0.device)
        return past, cond_index

    @torch.no_grad()
    def _with_draws(self, wave, win, cond, k0, past, samples, fraction: float) -> torch.Tensor:
        """``samples`` (the true past at absolute ``past``) with a ``fraction`` of them
        replaced by the decoder's draws given the true past before each (`model.past_draws`);
        samples before the first valid prediction stay the padding's silence."""
        geo, q_ch = self.geometry, self.cfg.decoder.quantization_channels
        first_past = past[:, 0]
        inputs, cond_index = self._decoder_indices(first_past, past.shape[1], k0, cond.shape[-1])
        true = wave.gather(1, (inputs - win.start[:, None]).clamp(0, wave.shape[1] - 1))
        logits = self.decoder(mulaw.encode(true, q_ch), cond, cond_index)  # predicts `past`
        key = {"seed": win.seed, "epoch": win.epoch, "utt": win.utt, "index": past}
        drawn = mulaw.decode(drawn_classes(logits, **key), q_ch).to(samples.dtype)
        replace = chosen(fraction, **key) & (past >= geo.pad_left)
        return torch.where(replace, drawn, samples)

    def route(self, slots: torch.Tensor, win: Windows) -> torch.Tensor:
        """Frame ``pi(k)`` carried by each absolute slot ``[B, n_slots]``: jittered in
        training, a pure function of (seed, epoch, utterance, slot)."""
        p = self.cfg.decoder.jitter_probability if self.training else 0.0
        return slot_frames(slots, win.n_frames, p=p, seed=win.seed, epoch=win.epoch, utt=win.utt)

    def _check_length(self, wave: torch.Tensor, win: Windows) -> None:
        """ValueError on CPU when a row is shorter than its predictions need. On CUDA, and
        under torch.compile, an asynchronous assert instead (a host check would stall CUDA's
        launch queue and break the compiled graph): a RuntimeError, on CUDA at a later
        synchronisation ("device-side assert triggered"), which ends the process's CUDA use."""
        geo = self.geometry
        last = win.t0 + win.n_valid - 1
        _, hi = geo.slot_range(last)
        f1 = torch.minimum(hi + 1, win.n_frames - 1)
        need = (torch.maximum(f1 * geo.hop + geo.encoder_rf, last + 1) - win.start).max()
        have = wave.shape[-1]
        if wave.device.type == "cpu" and not torch.compiler.is_compiling():
            if have < need or have < geo.encoder_rf:
                raise ValueError(
                    f"window of {have} samples is shorter than the {int(need)} samples its "
                    f"predictions need; the receptive field needs at least "
                    f"{geo.min_window_samples(1)} samples for one prediction"
                )
        else:
            torch._assert_async(
                (need <= have) & (have >= geo.encoder_rf),
                "a window is shorter than its predictions need",
            )
