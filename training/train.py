"""Train the VQ-VAE WaveNet codec on a prepared dataset, on one device or many.

    python -m training.train --config small --data data/vctk --out runs/small
    python -m training.train --config small --data data/vctk --out runs/small --resume
    python -m training.train --config small --data D --out runs/new --resume-from latest.pt
    python -m training.train --config small --data D --out runs/new --init-from warm.pt
    python -m training.train --config small --data D --out runs/b --resume-from latest.pt \
        --set model.decoder.input_noise=3 train.compile=false    # a branch of the run
    torchrun --nproc_per_node 8 -m training.train --config default --data D --out runs/big

One optimiser step = ``accumulation`` micro-batches of ``windows`` windows of N consecutive
predictions per rank. The loss contract (docs/DESIGN.md, "The heart"): the valid predictions of all
micro-batches on all ranks are counted and all-reduced before the forward passes, and every
micro-batch's loss is its sum over predictions divided by that global count. DDP averages
gradients over ranks, so each rank's loss is scaled by the world size; the EMA codebook
statistics are averaged the same way, once per step. The result is the mean per-prediction
gradient of the whole global batch, however it is split.

Everything an uninterrupted run would have is in each checkpoint (weights, optimiser, schedule,
codebook buffers, every rank's RNG states, sampler position, best validation CE, resolved config),
so ``--resume`` continues bit for bit: on CPU always, on CUDA with ``train.deterministic`` (CUDA's
atomic adds otherwise change the last bits from run to run; tests/test_cuda.py). A NaN/Inf loss
or gradient skips the step; ``max_bad_steps`` in a row write a checkpoint and exit with status 3.
Ctrl-C or SIGTERM finishes the step in flight, writes a checkpoint and exits with 128 + the
signal's number (`training.stop_signal`); a second one stops at once.
``--set`` changes settings over the config file's, or over a checkpoint's (``--resume-from``,
``--init-from``: there only the training-time model settings,
`training.config.TRAINING_ONLY_MODEL_KEYS`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.autoencoder import Autoencoder
from model.config import ModelConfig, from_dict, to_dict
from training import checkpoint as ckpt_io
from training import distributed as dist
from training.config import (
    TrainConfig,
    load_model_config,
    load_train_config,
    parse_setting,
    with_settings,
)
from training.data import (
    Loader,
    MicroBatch,
    WindowSampler,
    fixed_windows,
    split_lengths,
    voice_ids,
)
from training.dataset import Dataset
from training.host_memory import keep_freed_memory
from training.loss import batch_loss
from training.stop_signal import StopSignals

EXIT_ERROR = 2
EXIT_BAD_STEPS = 3


class TrainingError(RuntimeError):
    """A problem with the inputs (config, data, output directory) reported without a trace."""


def log(msg: str) -> None:
    if dist.is_main():
        tqdm.write(msg, file=sys.stderr)


# --- the loss contract -----------------------------------------------------------------------


@dataclass
class StepSums:
    """This rank's parts of the step loss (each already divided by the global count)."""

    loss: torch.Tensor
    ce: torch.Tensor
    commitment: torch.Tensor
    count: int  # global valid predictions of the step


def accumulate(
    model: torch.nn.Module,
    batches: list[MicroBatch],
    autocast=contextlib.nullcontext,
    loss=batch_loss,
) -> StepSums:
    """Forward and backward over one step's micro-batches; gradients are left in ``.grad``.

    Args:
        model: the autoencoder, possibly wrapped in DDP (averaging gradients over ranks).
        batches: this rank's micro-batches of the step.
        autocast: a context manager factory for mixed precision.
        loss: ``(out, count) -> LossTerms``; training has one, `batch_loss` (experiments
            compare it with other forms, e.g. ``benchmarks.window_losses``).
    """
    count = torch.tensor(float(sum(b.n_valid() for b in batches)), dtype=torch.float64)
    count = int(dist.all_reduce_sum(count.to(_device_of(model))).item())
    scale = dist.world_size()  # DDP averages: sum over ranks / count = world * mean
    is_ddp = isinstance(model, DistributedDataParallel)
    zero = torch.zeros((), dtype=torch.float64)
    sums = StepSums(zero.clone(), zero.clone(), zero.clone(), count)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if (last or not is_ddp) else model.no_sync()
        with sync:
            with autocast():
                out = model(b.wave, b.windows, b.n)
            if out.logits.dtype in (torch.bfloat16, torch.float16):
                out.logits = out.logits.float()  # the softmax and the sums in fp32
            terms = loss(out, count)
            (terms.loss * scale).backward()
        sums.loss += terms.loss.detach().double().cpu()
        sums.ce += terms.ce.double().cpu()
        sums.commitment += terms.commitment.double().cpu()
    return sums


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- optimiser groups ------------------------------------------------------------------------


def _decoder_split(model: torch.nn.Module) -> tuple[list[int], list[int]]:
    """Positions in ``model.parameters()`` of the parameters outside the decoder and in it."""
    decoder = {id(p) for p in model.decoder.parameters()}
    params = list(model.parameters())
    rest = [i for i, p in enumerate(params) if id(p) not in decoder]
    return rest, [i for i, p in enumerate(params) if id(p) in decoder]


def group_lr_scales(cfg: TrainConfig) -> tuple[float, float]:
    """Each optimiser group's lr as a multiple of ``train.lr``: (the rest, the decoder)."""
    return 1.0, cfg.decoder_lr_scale


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two AdamW groups, features + encoder + quantiser and the decoder, so that the decoder
    can train at an lr of its own (``train.decoder_lr_scale``); each keeps the parameters'
    order, and at scale 1 a step equals the one-group step bit for bit."""
    params = list(model.parameters())
    return [
        {"params": [params[i] for i in positions], "lr": cfg.lr * scale}
        for positions, scale in zip(_decoder_split(model), group_lr_scales(cfg), strict=True)
    ]


def regroup_optimizer_state(saved: dict, model: torch.nn.Module) -> dict:
    """A saved AdamW state laid out as `parameter_groups` lays it out.

    Checkpoints written before the decoder had a group of its own hold one group over
    ``model.parameters()``; their per-parameter moments are handed to the two groups by the
    parameters' positions, so those runs resume, and branch with a decoder lr of their own."""
    groups = saved["param_groups"]
    if len(groups) != 1:
        return saved
    (group,) = groups
    n = len(list(model.parameters()))
    if len(group["params"]) != n:
        raise TrainingError(
            f"the checkpoint's optimiser holds {len(group['params'])} parameters, the model {n}"
        )
    ids = group["params"]
    regrouped = [{**group, "params": [ids[i] for i in pos]} for pos in _decoder_split(model)]
    return {"state": saved["state"], "param_groups": regrouped}


# --- the trainer -----------------------------------------------------------------------------


class Trainer:
    """Model, optimiser, data and bookkeeping of one run (one per rank)."""

    loss = staticmethod(batch_loss)  # the training loss; experiments subclass to compare others

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        data: str | Path,
        out: str | Path,
        device: str | None = None,
        resume: bool = False,
        resume_from: str | Path | None = None,
        init_from: str | Path | None = None,
        settings: dict[str, object] | None = None,
    ):
        self.out = Path(out)
        self.device = _pick_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # a step's activations reuse the last step's pages
        dist.init(self.device.type)
        self.rank, self.world = dist.rank(), dist.world_size()
        if dist.is_initialized():
            log(f"process group: {dist.backend()}, {self.world} rank(s); device {self.device}")
        try:
            self.dataset = Dataset(data)
        except (FileNotFoundError, ValueError) as exc:
            raise TrainingError(str(exc)) from exc
        self.out.mkdir(parents=True, exist_ok=True)

        if resume_from is not None or init_from is not None:
            if resume or (resume_from is not None and init_from is not None):
                raise TrainingError("--resume, --resume-from and --init-from exclude each other")
            if ckpt_io.list_checkpoints(self.out):
                raise TrainingError(f"{self.out} already holds checkpoints: use --resume there")
        state = _load_file("--resume-from", resume_from) if resume_from else None
        if state is None and init_from is None:
            state = self._find_resume_state(resume)
        elif state is not None:
            log(f"resuming from {resume_from} (step {state['step']})")
        init = _load_file("--init-from", init_from) if init_from else None
        if init is not None:
            model_cfg = from_dict(ModelConfig, init["model_config"], "model").validate()
            if list(init.get("speakers", [])) != self.dataset.speakers:
                raise TrainingError(
                    f"--init-from {init_from} has the voices {init.get('speakers')}, the dataset "
                    f"{self.dataset.speakers}: rebuild it for this dataset (training.warm_start)"
                )
            log(f"weights from {init_from}; the [model] table of --config is not used")
        if state is not None:
            model_cfg = from_dict(ModelConfig, state["model_config"], "model").validate()
            saved_train = from_dict(TrainConfig, state["train_config"], "train").validate()
            if to_dict(saved_train) != to_dict(train_cfg):
                log("note: resuming with the checkpoint's [train] settings, not the file's")
            train_cfg = saved_train
        if settings:
            if resume:
                raise TrainingError(
                    "--set with --resume: a resumed run continues as it was saved; continue it "
                    "with other settings into a new directory with --resume-from"
                )
            try:
                model_cfg, train_cfg = with_settings(
                    model_cfg,
                    train_cfg,
                    settings,
                    weights_fixed=state is not None or init is not None,
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise TrainingError(f"--set: {exc}") from exc
            log("settings: " + ", ".join(f"{k} = {v!r}" for k, v in settings.items()))
        self.model_cfg, self.cfg = model_cfg, train_cfg
        cfg = train_cfg
        if cfg.deterministic:
            set_deterministic(True)
        n_spk = len(self.dataset.speakers)
        if n_spk > model_cfg.decoder.n_speakers:
            raise TrainingError(
                f"the dataset has {n_spk} speakers but the model's decoder.n_speakers is "
                f"{model_cfg.decoder.n_speakers}: raise it in the config"
            )
        if self.dataset.sample_rate != model_cfg.features.sample_rate:
            raise TrainingError(
                f"dataset sample rate {self.dataset.sample_rate} != model "
                f"{model_cfg.features.sample_rate}"
            )
        try:
            self.speaker_ids = voice_ids(self.dataset, cfg.voices)
        except ValueError as exc:
            raise TrainingError(str(exc)) from exc
        train_lengths = split_lengths(self.dataset, "train", self.speaker_ids)
        if not train_lengths:
            of = f" of {', '.join(cfg.voices)}" if cfg.voices else ""
            raise TrainingError(f"{data} has no utterances{of} in the train split")
        if cfg.voices:
            log(f"train.voices: training and validating on {', '.join(cfg.voices)} only")

        torch.manual_seed(cfg.seed)
        self.model = Autoencoder(model_cfg).to(self.device)
        geo = self.model.geometry
        self.sampler = WindowSampler(
            train_lengths,
            geo,
            cfg.windows * cfg.accumulation,
            cfg.predictions,
            seed=cfg.seed,
            rank=self.rank,
            world=self.world,
        )
        self.loader = Loader(self.dataset, geo, cfg.seed)
        valid_lengths = split_lengths(self.dataset, "valid", self.speaker_ids)
        if not valid_lengths:
            log("warning: no valid split: validation is skipped and best.pt is not written")
        self.valid = fixed_windows(valid_lengths, geo, cfg.valid_windows, cfg.predictions, cfg.seed)
        self.ema_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.best, self.bad_in_a_row = 0, math.inf, 0

        if state is not None:
            self.model.load_state_dict(state["model"])
        elif init is not None:
            self.model.load_state_dict(init["model"])
        else:
            self._init_statistics(train_lengths)
            self._init_codebook()
        if cfg.decoder_lr_scale == 0:
            # A frozen decoder computes no weight gradients, and none count in the clip; the
            # gradient still flows through it to the encoder.
            self.model.decoder.requires_grad_(False)

        self.forward_model: torch.nn.Module = self.model
        if cfg.compile:  # the same function (tests/test_train.py); checkpoints save self.model
            self.forward_model = torch.compile(self.model)
            log("train.compile: the first step compiles the model (60-90 s at the default config)")
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers are kept equal by the EMA reduce and rank 0's restarts; DDP's per-forward
            # buffer broadcast would overwrite the step statistics of earlier micro-batches.
            self.forward_model = DistributedDataParallel(
                self.forward_model, device_ids=ids, broadcast_buffers=False
            )
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, cfg),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_factor)
        self.amp = cfg.amp
        if state is not None:
            self._restore(state)
        else:
            self._seed_everything()

    # --- set-up --------------------------------------------------------------------------

    def _find_resume_state(self, resume: bool) -> dict | None:
        if dist.is_main():
            ckpt_io.remove_stale_temporaries(self.out)
        existing = ckpt_io.list_checkpoints(self.out)
        if not resume:
            if existing:
                raise TrainingError(
                    f"{self.out} already holds checkpoints: pass --resume to continue, or "
                    "choose another --out"
                )
            return None
        found = None
        if dist.is_main():
            found = ckpt_io.load_latest(self.out)
        path = dist.broadcast_object(str(found[1]) if found else None)
        if path is None:
            log(f"no intact checkpoint in {self.out}: starting from scratch")
            return None
        state = found[0] if found else ckpt_io.load(path)
        log(f"resuming from {path} (step {state['step']})")
        return state

    def _init_statistics(self, train_lengths: dict[int, int]) -> None:
        feats = self.model.features
        stats = self.dataset.stats
        if stats is not None and stats.get("features") == to_dict(self.model_cfg.features):
            feats.set_statistics(torch.tensor(stats["mean"]), torch.tensor(stats["std"]))
            log("feature statistics: from the dataset's stats.json")
            return
        why = "no stats.json" if stats is None else "stats.json has other feature settings"
        rng = np.random.default_rng([self.cfg.seed, 0x57A7])
        ids = sorted(train_lengths)
        pick = rng.permutation(len(ids))[: self.cfg.stats_utterances]
        feats.set_statistics(torch.zeros(feats.dim), torch.ones(feats.dim))
        total = torch.zeros(feats.dim, dtype=torch.float64)
        total_sq = torch.zeros(feats.dim, dtype=torch.float64)
        frames = 0
        with torch.no_grad():
            for j in pick:
                wave = torch.from_numpy(self.dataset.wave(ids[j]))
                try:
                    f = feats(wave[None].to(self.device))[0].double().cpu()  # [C, M]
                except ValueError:  # shorter than one feature frame
                    continue
                total += f.sum(1)
                total_sq += (f * f).sum(1)
                frames += f.shape[1]
        if frames < 2:
            raise TrainingError("train utterances too short to compute feature statistics")
        mean = total / frames
        std = (total_sq / frames - mean * mean).clamp_min(0).sqrt()
        feats.set_statistics(mean.float(), std.float())
        dist.broadcast(feats.mean)
        dist.broadcast(feats.std)
        log(f"feature statistics: computed from {len(pick)} train utterances ({why})")

    def _init_codebook(self) -> None:
        q = self.model.quantizer
        n = self.cfg.kmeans_windows
        if n == 0:
            return
        lengths = split_lengths(self.dataset, "train", self.speaker_ids)
        sampler = WindowSampler(
            lengths, self.model.geometry, n, self.cfg.predictions, seed=self.cfg.seed + 0x4B
        )
        vectors, tries = [], 0
        with torch.no_grad():
            while sum(len(v) for v in vectors) < q.cfg.codebook_size and tries < 20:
                epoch, windows = sampler.next()
                for w in windows:  # one window at a time: no zero-filled rows
                    b = self.loader.batch([w], epoch, w.n).to(self.device)
                    z = self.model.encoder(self.model.features(b.wave)).transpose(1, 2)
                    vectors.append(z[0].float())
                tries += 1
        z = torch.cat(vectors)
        if len(z) < q.cfg.codebook_size:
            raise TrainingError(
                f"k-means needs {q.cfg.codebook_size} encoder outputs; the train split gave "
                f"{len(z)}"
            )
        q.kmeans_init(z, generator=torch.Generator().manual_seed(self.cfg.seed + 2))
        for buf in (q.codebook, q.ema_count, q.ema_sum) if q.ema else (q.codebook,):
            dist.broadcast(buf.data)
        log(f"codebook: k-means on {len(z)} encoder outputs of {len(vectors)} windows")

    def _seed_everything(self) -> None:
        seed = self.cfg.seed * 1000 + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # --- checkpoints ---------------------------------------------------------------------

    def _rng_state(self) -> dict:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "ema": self.ema_generator.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        self.ema_generator.set_state(state["ema"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def state_dict(self) -> dict:
        """The checkpoint (collective: every rank must call it, for their RNG states)."""
        return {
            "model_config": to_dict(self.model_cfg),
            "train_config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": dist.all_gather_object(self._rng_state()),
            "sampler": self.sampler.state_dict(),
            "step": self.step,
            "best_valid_ce": self.best,
            "bad_in_a_row": self.bad_in_a_row,
            "world_size": self.world,
            "speakers": list(self.dataset.speakers),
        }

    def _restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(regroup_optimizer_state(state["optimizer"], self.model))
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optimiser_settings()
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.best = float(state["best_valid_ce"])
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        rngs = state["rng"]
        if len(rngs) != self.world:
            log(f"warning: checkpoint from {len(rngs)} ranks, now {self.world}: data order differs")
        self._set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])

    def _apply_optimiser_settings(self) -> None:
        """Put the config's lr, betas and weight decay over the restored optimiser's.

        The optimiser's and scheduler's state carry the saved run's hyper-parameters (each
        group's ``initial_lr``, the scheduler's ``base_lrs``), so without this a branch made with
        ``--resume-from CKPT --set train.lr=...`` would say it trains at the new lr and keep the
        old one. The lr of the current step is recomputed the way the scheduler computes it, so
        a plain resume keeps every value bit for bit."""
        cfg = self.cfg
        factor = cfg.lr_factor(self.scheduler.last_epoch)
        base_lrs = [cfg.lr * scale for scale in group_lr_scales(cfg)]
        for group, base in zip(self.optimizer.param_groups, base_lrs, strict=True):
            group.update(
                initial_lr=base,
                lr=base * factor,
                betas=(cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay,
            )
        self.scheduler.base_lrs = base_lrs
        self.scheduler._last_lr = [base * factor for base in base_lrs]

    def save(self) -> Path | None:
        state = self.state_dict()
        path = None
        if dist.is_main():
            path = ckpt_io.save_rotating(state, self.out, self.step, self.cfg.keep_last)
        dist.barrier()
        return path

    # --- steps ---------------------------------------------------------------------------

    def _autocast(self):
        """bf16 autocast on CUDA and CPU (bf16 matrix products are several times faster on
        CPUs with AVX-512 BF16 or AMX); the quantiser and the loss stay in fp32."""
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns namespaced metrics (``skipped`` = 1 for a NaN/Inf step)."""
        started = time.perf_counter()
        self.model.train()
        epoch, windows = self.sampler.next()
        batches = [
            b.to(self.device)
            for b in self.loader.step(windows, epoch, self.cfg.predictions, self.cfg.accumulation)
        ]
        self.optimizer.zero_grad(set_to_none=True)
        sums = accumulate(self.forward_model, batches, self._autocast, self.loss)
        parts = torch.stack([sums.loss, sums.ce, sums.commitment]).to(self.device)
        loss, ce, commitment = dist.all_reduce_sum(parts).tolist()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        q = self.model.quantizer
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            q.ema_update(
                reduce=dist.all_reduce_mean, generator=self.ema_generator, broadcast=dist.broadcast
            )
            self.bad_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            q.discard_step()  # this step's usage statistics are dropped with it
            self.bad_in_a_row += 1
            log(
                f"step {self.step + 1}: non-finite loss {loss} or gradient norm {grad_norm}: "
                f"skipped ({self.bad_in_a_row} in a row)"
            )
        self.scheduler.step()
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        return {
            "loss/total": loss,
            "loss/ce": ce,
            "loss/commitment": commitment,
            "vq/perplexity": float(q.perplexity),
            "vq/codes_used": float(q.codes_used),
            "vq/perplexity_ema": q.ema_perplexity,
            "perf/samples_per_s": sums.count / elapsed,
            "perf/grad_norm": grad_norm,
            "lr": lr,
            "skipped": 0.0 if finite else 1.0,
        }

    @torch.no_grad()
    def validate(self) -> float | None:
        """Teacher-forced CE in nats/sample over the fixed validation windows (no jitter)."""
        if not self.valid:
            return None
        self.model.eval()
        mine = self.valid[self.rank :: self.world]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, len(mine), self.cfg.windows):
            b = self.loader.batch(mine[i : i + self.cfg.windows], 0, self.cfg.predictions)
            b = b.to(self.device)
            with self._autocast():
                out = self.model(b.wave, b.windows, b.n)
            ce = torch.nn.functional.cross_entropy(
                out.logits.float(), out.targets, reduction="none"
            )
            sums[0] += (ce * out.mask).sum().double()
            sums[1] += out.mask.sum()
        self.model.train()
        total, count = dist.all_reduce_sum(sums).tolist()
        return total / count

    def log_audio(self, writer) -> None:
        """The original clips of the first validation windows' utterances (a few seconds)."""
        sr = self.dataset.sample_rate
        seen = []
        for w in self.valid:
            if w.utt in seen or len(seen) >= self.cfg.audio_clips:
                continue
            seen.append(w.utt)
            wave = torch.from_numpy(self.dataset.wave(w.utt)[: 4 * sr].copy())
            writer.add_audio(f"input/{self.dataset.records[w.utt].id}", wave[None], 0, sr)


def set_deterministic(enabled: bool) -> None:
    """Bit-reproducible kernels for the rest of the process (``train.deterministic``), or back
    to PyTorch's defaults. On CUDA the quantiser's ``index_add_`` and the slot routing's gather
    backward add with atomics, and cuDNN may pick another algorithm per run, so the last bits
    of a step change from run to run and a resumed run drifts from the straight one (the
    decoder's conditioning gather has its own deterministic backward); CPU kernels are
    reproducible already."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled


def _load_file(option: str, path: str | Path) -> dict:
    try:
        return ckpt_io.load(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"{option} {path}: {exc}") from exc


def _pick_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r}: this machine has no usable CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TrainingError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise TrainingError(f"device {name!r}: the trainer runs on cpu or cuda")
    if device.type == "cuda" and dist.launched_by_torchrun():
        device = torch.device("cuda", dist.local_rank())
    return device


# --- the CLI ---------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="config name (tiny, small, default) or TOML")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="run directory (checkpoints, TensorBoard)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument(
        "--resume-from",
        metavar="CKPT",
        help="continue the run saved in this checkpoint file (for example one kept in the "
        "repository) in a new --out directory",
    )
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start a new run from these weights (training.warm_start rebuilds them from an "
        "exported model); optimiser, schedule and data order start afresh",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="change a setting over the config (or the checkpoint's, with --resume-from or "
        "--init-from), e.g. train.compile=false or model.decoder.input_noise=2; VALUE is JSON. "
        "From a checkpoint only training-time model settings may change",
    )
    p.add_argument("--steps", type=int, help="stop after this optimiser step (default: total)")
    p.add_argument(
        "--minutes",
        type=float,
        help="stop (with a checkpoint) after the step that reaches this many minutes of wall time",
    )
    p.add_argument(
        "--cpu-minutes",
        type=float,
        help="the same in this process's CPU time (all threads), which other processes on a "
        "shared machine do not inflate: equal budgets for compared runs",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch (default: its own choice, one per core); on a machine "
        "shared with other work, fewer threads than cores avoid stalls at every synchronisation",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    budget = Budget(args.minutes, args.cpu_minutes)  # set-up (k-means) counts too
    if args.threads is not None:
        if args.threads < 1:
            raise TrainingError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        settings = dict(parse_setting(item) for item in args.set)
    except ValueError as exc:
        raise TrainingError(f"--set: {exc}") from exc
    try:
        model_cfg, train_cfg = load_model_config(args.config), load_train_config(args.config)
    except (FileNotFoundError, KeyError, TypeError, ValueError) as exc:
        raise TrainingError(f"config {args.config}: {exc}") from exc
    trainer = Trainer(
        model_cfg,
        train_cfg,
        args.data,
        args.out,
        device=args.device,
        resume=args.resume,
        resume_from=args.resume_from,
        init_from=args.init_from,
        settings=settings,
    )
    cfg = trainer.cfg
    stop = args.steps if args.steps is not None else cfg.total_steps
    writer = None
    metrics_file = None
    if dist.is_main():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(trainer.out / "tb"))
        if trainer.step == 0:
            trainer.log_audio(writer)
            (trainer.out / "config.json").write_text(
                json.dumps({"model": trainer.model_cfg, "train": cfg}, default=vars, indent=2)
            )
        metrics_file = open(trainer.out / "metrics.jsonl", "a")
    bar = tqdm(
        total=stop,
        initial=trainer.step,
        disable=args.no_progress or not dist.is_main(),
        dynamic_ncols=True,
    )
    saved_at, saved_path = trainer.step, None
    stop_signals = StopSignals()
    try:
        with stop_signals:
            while (
                trainer.step < stop
                and not budget.spent()
                and not stop_signals.requested(trainer.device)
            ):
                m = trainer.train_step()
                if trainer.step % cfg.valid_every == 0:
                    valid = trainer.validate()
                    if valid is not None:
                        m["valid/ce"] = valid
                        if valid < trainer.best:
                            trainer.best = valid
                            state = trainer.state_dict()
                            if dist.is_main():
                                ckpt_io.save_best(state, trainer.out)
                if dist.is_main():
                    metrics_file.write(json.dumps({"step": trainer.step, **m}) + "\n")
                    metrics_file.flush()
                    if trainer.step % cfg.log_every == 0 or "valid/ce" in m:
                        for k, v in m.items():
                            writer.add_scalar(k, v, trainer.step)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{m['loss/total']:.3f}",
                        ce=f"{m['loss/ce']:.3f}",
                        commit=f"{m['loss/commitment']:.4f}",
                        ppl=f"{m['vq/perplexity']:.1f}",
                        used=int(m["vq/codes_used"]),
                        sps=f"{m['perf/samples_per_s']:.0f}",
                    )
                if trainer.bad_in_a_row >= cfg.max_bad_steps:
                    path = trainer.save()
                    print(
                        f"error: {trainer.bad_in_a_row} non-finite steps in a row "
                        f"(max_bad_steps = {cfg.max_bad_steps}); wrote {path} and stopped. "
                        "Lower the learning rate or check the data.",
                        file=sys.stderr,
                    )
                    return EXIT_BAD_STEPS
                if trainer.step % cfg.checkpoint_every == 0:
                    saved_path = trainer.save()
                    saved_at = trainer.step
        if saved_at != trainer.step:
            saved_path = trainer.save()
    finally:
        trainer.forward_model = trainer.model  # no DDP left when the group goes (dist.shutdown)
        bar.close()
        if writer is not None:
            writer.close()
            metrics_file.close()
    if stop_signals.received is not None:
        name = signal.Signals(stop_signals.received).name
        where = f"{saved_path} holds it" if saved_path else "nothing new to save"
        log(f"stopped by {name} after step {trainer.step}; {where}; continue with --resume")
        return stop_signals.exit_status
    if budget.spent():
        log(f"time budget spent: {budget}")
    best = f"{trainer.best:.4f} nats/sample" if math.isfinite(trainer.best) else "none yet"
    log(f"done at step {trainer.step}; best valid CE {best}")
    return 0


class Budget:
    """Optional limits on this process's wall time and CPU time (minutes, None = none),
    counted from construction; checked between steps, so the last step may overrun."""

    def __init__(self, minutes: float | None, cpu_minutes: float | None):
        for name, value in (("--minutes", minutes), ("--cpu-minutes", cpu_minutes)):
            if value is not None and not value > 0:
                raise TrainingError(f"{name} must be positive")
        self.minutes, self.cpu_minutes = minutes, cpu_minutes
        self.wall0, self.cpu0 = time.monotonic(), time.process_time()

    def used(self) -> tuple[float, float]:
        """(wall, CPU) minutes so far."""
        return (time.monotonic() - self.wall0) / 60, (time.process_time() - self.cpu0) / 60

    def spent(self) -> bool:
        wall, cpu = self.used()
        return (self.minutes is not None and wall >= self.minutes) or (
            self.cpu_minutes is not None and cpu >= self.cpu_minutes
        )

    def __str__(self) -> str:
        wall, cpu = self.used()
        return f"{wall:.1f} wall minutes, {cpu:.1f} CPU minutes"


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        return run(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
