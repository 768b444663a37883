"""Config files: the TOML loader, and the training settings, a dataclass whose defaults are a
reference run, overridden by the ``[train]`` table of a config file (unknown keys and wrong
types rejected). The ``[model]`` table overrides `model.config.ModelConfig` the same way."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from model.config import ModelConfig, from_dict, to_dict

# The config files: `configs/` in a checkout, shipped inside this package when installed.
_PACKAGED = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainConfig:
    # AdamW.
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    # The decoder's lr as a multiple of lr (0 freezes it): further training under the
    # teacher-forced CE lowers the STOI of what the decoder generates, while the encoder's and
    # codebook's training does not (docs/TRAINING.md), so a continuation can train them alone.
    decoder_lr_scale: float = 1.0
    # Schedule: linear warm-up from 0, then `decay` ("cosine" or "linear") from lr down to the
    # floor lr * min_lr_ratio at total_steps, constant after.
    warmup_steps: int = 1000
    total_steps: int = 200_000
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (0 disables clipping)
    # Batch: per rank, `accumulation` micro-batches of `windows` windows of `predictions`
    # consecutive predictions each.
    windows: int = 8
    predictions: int = 4000
    accumulation: int = 1
    # Validation: teacher-forced CE (nats/sample) over `valid_windows` fixed windows.
    valid_every: int = 1000
    valid_windows: int = 64
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    audio_clips: int = 4  # original clips logged to TensorBoard once
    seed: int = 0
    compile: bool = False
    amp: bool = True  # bf16 autocast (CUDA and CPU); the quantiser and the loss stay in fp32
    # Bit-reproducible CUDA steps (torch.use_deterministic_algorithms): a resumed run then
    # equals the straight one bit for bit, as on CPU. Off by default: it costs speed.
    deterministic: bool = False
    max_bad_steps: int = 10  # NaN/Inf steps in a row before checkpoint-and-stop
    kmeans_windows: int = 64  # windows whose encoder outputs seed the codebook (0: no k-means)
    stats_utterances: int = 200  # utterances sampled when feature statistics must be computed
    # Train and validate on these dataset voices only (None: all). The speaker table stays the
    # dataset's, so a run on fewer voices can branch from, and be compared with, one on all.
    voices: list[str] | None = None

    def validate(self) -> TrainConfig:
        if self.decay not in ("cosine", "linear"):
            raise ValueError("train.decay must be 'cosine' or 'linear'")
        if not (math.isfinite(self.decoder_lr_scale) and self.decoder_lr_scale >= 0):
            raise ValueError("train.decoder_lr_scale must be a finite number >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.min_lr_ratio must lie in [0, 1]")
        for name in ("windows", "predictions", "accumulation", "total_steps", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        for name in ("valid_every", "checkpoint_every", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if not 0 <= self.seed < 2**63:  # the jitter hash reads it as an int64 tensor
            raise ValueError("train.seed must lie in [0, 2**63)")
        if self.warmup_steps < 0 or self.valid_windows < 0 or self.kmeans_windows < 0:
            raise ValueError("train.warmup_steps, valid_windows, kmeans_windows must be >= 0")
        if self.voices is not None and (
            not isinstance(self.voices, list)
            or not self.voices
            or not all(isinstance(v, str) for v in self.voices)
        ):
            raise ValueError("train.voices must be a non-empty list of voice names (or unset)")
        return self

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def load_train_config(name_or_path: str | Path) -> TrainConfig:
    """The ``[train]`` table of a config file, over the defaults."""
    return from_dict(TrainConfig, load_toml(name_or_path).get("train", {}), "train").validate()


def resolve_path(name_or_path: str | Path) -> Path:
    """A config name (``tiny``, ``small``, ``default``) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise FileNotFoundError(f"no config {name_or_path!r} (known: {known})")
    return path


def load_toml(name_or_path: str | Path) -> dict:
    with open(resolve_path(name_or_path), "rb") as f:
        return tomllib.load(f)


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """The ``[model]`` table of a config file, over the defaults."""
    data = load_toml(name_or_path)
    return from_dict(ModelConfig, data.get("model", {}), "model").validate()


# Model settings that act only in training: a run continued from a checkpoint may change them,
# since the weights do not depend on them (every other model setting is fixed by the weights).
TRAINING_ONLY_MODEL_KEYS = frozenset(
    {
        "quantizer.beta",
        "quantizer.ema_decay",
        "quantizer.dead_code_threshold",
        "decoder.jitter_probability",
        "decoder.input_noise",
        "decoder.past_gain_db",
        "decoder.past_gain_every",
        "decoder.past_tilt",
        "decoder.past_tilt_every",
        "decoder.past_draws",
        "decoder.cond_dropout",
        "decoder.cond_dropout_every",
    }
)


def parse_setting(item: str) -> tuple[str, object]:
    """``TABLE.KEY=VALUE`` as (dotted key, value): VALUE is JSON, or else a bare string."""
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"expected TABLE.KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def with_settings(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    settings: dict[str, object],
    *,
    weights_fixed: bool,
) -> tuple[ModelConfig, TrainConfig]:
    """The two configs with ``settings`` (``train.KEY`` or ``model.TABLE.KEY``) applied, checked
    as a config file is (unknown keys, wrong types and bad values rejected). Where the weights
    come from a checkpoint (``weights_fixed``), only `TRAINING_ONLY_MODEL_KEYS` of the model
    may change."""
    model, train = to_dict(model_cfg), to_dict(train_cfg)
    for dotted, value in settings.items():
        top, _, rest = dotted.partition(".")
        if top not in ("model", "train") or not rest:
            raise ValueError(f"{dotted}: settings are train.KEY or model.TABLE.KEY")
        if top == "model" and weights_fixed and rest not in TRAINING_ONLY_MODEL_KEYS:
            allowed = ", ".join(f"model.{k}" for k in sorted(TRAINING_ONLY_MODEL_KEYS))
            raise ValueError(f"{dotted}: the checkpoint's weights fix it (may change: {allowed})")
        *tables, key = rest.split(".")
        node = model if top == "model" else train
        for table in tables:
            if not isinstance(node.get(table), dict):
                raise ValueError(f"{dotted}: no table {table!r}")
            node = node[table]
        if key not in node:
            raise ValueError(f"{dotted}: no such setting")
        node[key] = value
    return (
        from_dict(ModelConfig, model, "model").validate(),
        from_dict(TrainConfig, train, "train").validate(),
    )
