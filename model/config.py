"""Model settings as dataclasses; TOML files override the defaults (a Chorowski-size model),
read by `training.config`.

Unknown keys and wrong types are rejected, so a typo in a config never silently trains the
wrong model. `to_dict` gives the resolved config that travels with checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field


@dataclass
class FeatureConfig:
    """MFCC front end: valid framing, fixed normalisation statistics (buffers of the module)."""

    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    n_mfcc: int = 13
    delta_width: int = 2  # frames each side of a delta (torchaudio's win_length 5)
    f_min: float = 0.0
    f_max: float | None = None


@dataclass
class EncoderConfig:
    """Chorowski's encoder: two k3 convs, one k4 stride-2 conv, two k3, four 1x1, 1x1 to dim."""

    channels: int = 768
    stride: int = 2  # of the strided conv; total stride = hop_length * stride
    n_residual_1x1: int = 4


@dataclass
class QuantizerConfig:
    codebook_size: int = 256
    dim: int = 64
    beta: float = 0.25
    # "mean" (the beta = 0.25 convention) or "sum" over the D dimensions of d[j].
    commitment_reduction: str = "mean"
    # "ema": codebook from usage-weighted EMA statistics; "gradient": learned by the codebook loss.
    codebook_update: str = "ema"
    ema_decay: float = 0.99
    # Units: the usage weights dL/dd / beta sum to 1 per optimiser step, so these are fractions
    # of one step's predictions.
    ema_epsilon: float = 1e-5
    dead_code_threshold: float = 1e-4


@dataclass
class DecoderConfig:
    jitter_probability: float = 0.12
    # Std, in mu-law classes, of the noise on the autoregressive input in training
    # (`model.input_noise`); 0: the clean past.
    input_noise: float = 0.0
    # Largest gain, in dB either way, on the autoregressive input in training, varying linearly
    # between knots `past_gain_every` samples apart (`model.past_gain`); 0: the true loudness.
    past_gain_db: float = 0.0
    past_gain_every: int = 1600
    # Largest coefficient of a first-order tilt filter on the autoregressive input in training,
    # varying linearly between knots `past_tilt_every` samples apart (`model.past_tilt`); 0: the
    # true spectrum.
    past_tilt: float = 0.0
    past_tilt_every: int = 1600
    # Fraction of the past samples the decoder reads in training replaced by its own draws,
    # each predicted from the true past before it (`model.past_draws`); 0: the true past.
    past_draws: float = 0.0
    # Probability that a run of `cond_dropout_every` conditioning indices (slots, 50 per second)
    # is conditioned on the speaker alone in training, so that guidance has a null to push away
    # from (`model.cond_dropout`); 0: the codes everywhere.
    cond_dropout: float = 0.0
    cond_dropout_every: int = 25
    cond_kernel: int = 3
    cond_channels: int = 128
    n_speakers: int = 4
    speaker_dim: int = 64
    residual_channels: int = 256
    gate_channels: int = 256
    skip_channels: int = 256
    dilation_cycles: int = 2
    dilation_depth: int = 10  # dilations 1, 2, ..., 2**(depth-1), repeated `cycles` times
    kernel_size: int = 2
    quantization_channels: int = 256  # mu-law classes

    @property
    def dilations(self) -> list[int]:
        return [2**i for i in range(self.dilation_depth)] * self.dilation_cycles


@dataclass
class ModelConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def validate(self) -> ModelConfig:
        q = self.quantizer
        if q.commitment_reduction not in ("mean", "sum"):
            raise ValueError("quantizer.commitment_reduction must be 'mean' or 'sum'")
        if q.codebook_update not in ("ema", "gradient"):
            raise ValueError("quantizer.codebook_update must be 'ema' or 'gradient'")
        if q.codebook_update == "ema" and q.beta <= 0:
            raise ValueError("an EMA codebook weights its statistics by usage: beta must be > 0")
        if not 0 <= self.decoder.jitter_probability <= 1:
            raise ValueError("decoder.jitter_probability must lie in [0, 1]")
        if not (math.isfinite(self.decoder.input_noise) and self.decoder.input_noise >= 0):
            raise ValueError("decoder.input_noise must be a finite number >= 0")
        if not (math.isfinite(self.decoder.past_gain_db) and self.decoder.past_gain_db >= 0):
            raise ValueError("decoder.past_gain_db must be a finite number >= 0")
        if self.decoder.past_gain_every < 1:
            raise ValueError("decoder.past_gain_every must be >= 1")
        if not 0 <= self.decoder.past_tilt < 1:  # NaN fails too
            raise ValueError("decoder.past_tilt must lie in [0, 1)")
        if self.decoder.past_tilt_every < 1:
            raise ValueError("decoder.past_tilt_every must be >= 1")
        if not 0 <= self.decoder.cond_dropout < 1:  # NaN fails too
            raise ValueError("decoder.cond_dropout must lie in [0, 1)")
        if self.decoder.cond_dropout_every < 1:
            raise ValueError("decoder.cond_dropout_every must be >= 1")
        if not 0 <= self.decoder.past_draws <= 1:  # NaN fails too
            raise ValueError("decoder.past_draws must lie in [0, 1]")
        if self.decoder.past_draws > 0 and self.decoder.past_tilt > 0:
            raise ValueError(
                "decoder.past_draws and decoder.past_tilt cannot be combined: the tilt reads the"
                " sample before each past sample from the true waveform"
            )
        f = self.features
        if f.win_length != f.n_fft:
            raise ValueError("features.win_length must equal features.n_fft (no zero padding)")
        return self


def _check_type(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return value
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise TypeError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from nested dicts, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown config key(s) {sorted(unknown)} in [{where or cls.__name__}]")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        sub = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise TypeError(f"{sub}: expected a table")
            kwargs[name] = from_dict(hint, value, sub)
        else:
            kwargs[name] = _check_type(value, hint, sub)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
