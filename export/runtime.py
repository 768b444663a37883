"""Inference without PyTorch: onnxruntime + numpy (+ soxr to resample).

    codec = Codec("exported/small")
    codes = codec.encode(wave, sr)                     # [F] int64, 50 Hz
    audio = codec.decode(codes, speaker=0, seed=1)     # float32 [n] at codec.sample_rate
    audio = codec.resynthesize(wave, sr, speaker="p225")

Encoding runs in chunks of whole frames: frame ``j`` reads padded samples ``[j*S, j*S + Re)``
only (valid convolutions), so a chunk of frames cut with the geometry's sample ranges gives the
codes of whole-file encoding with bounded memory, and chunks are batched.

Decoding is incremental: one `decoder_step.onnx` call per sample for a batch of streams, with
per-layer ring buffers of past layer inputs in numpy. A long utterance is folded into segments
generated side by side as one batch and cross-faded over ``overlap`` samples; each segment
starts from silence (its rings are warmed on ``wavenet_context`` zero-input steps, exactly as
the first segment starts from the utterance's zero padding). Several requests share the batch.
Streams are split between up to ``workers`` threads, each calling onnxruntime with one intra-op
thread (see `Codec` for when a second worker pays). Sampling noise comes from
``numpy.random.default_rng([seed, segment])`` per stream, so a call is reproducible for a seed
(bit-identical for the same requests and settings; batching a file with others changes the
batch shape of the matrix products, which may change the last bits and so the draw).

Only ``model.geometry`` (pure numpy) is imported from the model package, to rebuild the codec's
geometry from the layer specs in ``model.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soxr

from model.geometry import CodecGeometry, Conv, Upsample

FORMAT = "vqwavenet-onnx"
VERSION = 1
_LAYERS = {"Conv": Conv, "Upsample": Upsample}
_BLOCK = 4096  # steps whose conditioning indices and noise are prepared at once


class ModelDirError(ValueError):
    """The model directory is missing files, has the wrong format or fails its hashes."""


def geometry_from_spec(spec: dict) -> CodecGeometry:
    """Rebuild the codec geometry from ``model.json``'s layer specs (one source of truth)."""

    def layer(d: dict):
        d = dict(d)
        return _LAYERS[d.pop("type")](**d)

    return CodecGeometry(
        encoder=[layer(x) for x in spec["encoder"]],
        conditioning=[layer(x) for x in spec["conditioning"]],
        wavenet=[layer(x) for x in spec["wavenet"]],
        ar_input=layer(spec["ar_input"]),
    )


def mulaw_encode(x: np.ndarray, q: int = 256) -> np.ndarray:
    """Waveform in [-1, 1] -> classes in [0, q) (float32 arithmetic, as `model.mulaw`)."""
    mu = q - 1
    x = np.asarray(x, dtype=np.float32)
    y = np.sign(x) * np.log1p(mu * np.minimum(np.abs(x), 1.0)) / np.float32(math.log1p(mu))
    return np.clip(np.floor((y + 1) / 2 * mu + 0.5), 0, mu).astype(np.int64)


def mulaw_decode(c: np.ndarray, q: int = 256) -> np.ndarray:
    """Classes -> waveform in [-1, 1] (float32)."""
    mu = q - 1
    y = 2 * np.asarray(c, dtype=np.float64) / mu - 1
    return (np.sign(y) * ((1 + mu) ** np.abs(y) - 1) / mu).astype(np.float32)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (model.json records one per graph)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class DecodeRequest:
    """One utterance to decode: codes ``[F]``, speaker (index or name), original sample count
    (default: the most the codes can hold) and the sampling seed."""

    codes: np.ndarray
    speaker: int | str = 0
    n_samples: int | None = None
    seed: int = 0


@dataclass
class _Stream:
    """A run of consecutive decoder times for one batch row: ``warm`` zero-input steps from
    ``tau0``, then ``length`` outputs from ``tau0 + warm``."""

    request: int
    tau0: int
    length: int
    cond_offset: int
    cond_count: int
    seed: tuple[int, ...]
    forced: np.ndarray | None = None  # [warm + length] prev classes (teacher forcing)
    targets: np.ndarray | None = None  # [length] classes whose NLL to return


class Codec:
    """A loaded model directory (see `export.onnx_export`).

    Thread layout: each worker thread runs its own batch of streams with one intra-op thread.
    A second worker only pays when each gets at least `streams_per_worker` streams: below that
    a step is dominated by per-operator overhead and costs about the same for twice the rows,
    so one worker with the whole batch was faster in every case measured on the shared 2-core
    machine (``benchmarks/generation.py``, ``onnx_folded_1w`` against ``_2w``).

    Args:
        model_dir: directory with ``model.json`` and the graphs.
        int8: use ``decoder_step.int8.onnx`` (exported with ``--int8``).
        workers: generation threads (default: 2, or 1 on a single core).
        threads: intra-op threads of the encoder and conditioner (default: all cores).
        check_hashes: verify every file against ``model.json``'s sha256.
    """

    streams_per_worker: int = 16

    def __init__(
        self,
        model_dir: str | Path,
        *,
        int8: bool = False,
        workers: int | None = None,
        threads: int | None = None,
        check_hashes: bool = True,
    ):
        self.dir = Path(model_dir)
        meta_path = self.dir / "model.json"
        if not meta_path.is_file():
            raise ModelDirError(f"{self.dir}: no model.json (export a checkpoint first)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ModelDirError(
                f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')} "
                f"is not {FORMAT} v{VERSION}"
            )
        self.meta = meta
        step_file = "decoder_step.int8.onnx" if int8 else "decoder_step.onnx"
        needed = ["encoder.onnx", "conditioner.onnx", step_file]
        for name in needed:
            path = self.dir / name
            if name not in meta["files"] or not path.is_file():
                raise ModelDirError(f"{self.dir}: missing {name}")
            if check_hashes and file_sha256(path) != meta["files"][name]:
                raise ModelDirError(f"{path}: sha256 differs from model.json (corrupt or edited)")
        cores = os.cpu_count() or 1
        self.workers = max(1, workers if workers is not None else min(2, cores))
        threads = threads or cores
        self._encoder = self._session(self.dir / "encoder.onnx", threads)
        self._conditioner = self._session(self.dir / "conditioner.onnx", threads)
        self._step = self._session(self.dir / step_file, 1)
        self.int8 = int8
        self.model_id: str = meta["model_id"]
        self.sample_rate: int = int(meta["sample_rate"])
        self.codebook_size: int = int(meta["codebook_size"])
        self.speakers: list[str] = list(meta["speakers"])
        self.q: int = int(meta["quantization_channels"])
        self.geometry = geometry_from_spec(meta["geometry"])
        self.hop = self.geometry.hop
        if self.hop != meta["hop"]:
            raise ModelDirError(f"{meta_path}: hop {meta['hop']} disagrees with the geometry")
        step = meta["decoder_step"]
        self.n_layers, self.kernel = int(step["n_layers"]), int(step["kernel_size"])
        self.dilations = [int(d) for d in step["dilations"]]
        self.residual_channels = int(step["residual_channels"])
        self.cond_kernel = int(step["cond_kernel"])
        self.context = self.geometry.wavenet_context
        self._rings = self._ring_tables()

    @staticmethod
    def _session(path: Path, threads: int) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    # --- audio and speakers -------------------------------------------------------------------

    def to_model_rate(self, wav: np.ndarray, sr: int | None = None) -> np.ndarray:
        """Mono float32 in [-1, 1] at the model's rate from ``[n]`` or ``[n, channels]``
        (integer PCM is scaled)."""
        x = np.asarray(wav)
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
        x = x.astype(np.float32, copy=False)
        if x.ndim == 2:
            x = x.mean(axis=1)
        if x.ndim != 1:
            raise ValueError(f"expected audio [n] or [n, channels], got shape {x.shape}")
        if sr is not None and sr != self.sample_rate:
            x = soxr.resample(x, sr, self.sample_rate).astype(np.float32)
        if len(x) == 0:
            raise ValueError("empty audio")
        return np.clip(x, -1.0, 1.0)

    def speaker_index(self, speaker: int | str) -> int:
        if isinstance(speaker, str) and not speaker.isdigit():
            if speaker not in self.speakers:
                raise ValueError(f"unknown speaker {speaker!r} (known: {self.speakers})")
            return self.speakers.index(speaker)
        idx = int(speaker)
        n = self.meta["model_config"]["decoder"]["n_speakers"]
        if not 0 <= idx < n:
            raise ValueError(f"speaker index {idx} outside [0, {n})")
        return idx

    def max_samples(self, n_frames: int) -> int:
        """The most original samples whose padded utterance has ``n_frames`` frames."""
        left = self.geometry.pad_left
        n = max(1, (n_frames - 1) * self.hop + self.geometry.encoder_rf - left)
        while n > 1 and self.geometry.padding(n)[2] > n_frames:
            n -= 1
        if self.geometry.padding(n)[2] != n_frames:
            raise ValueError(f"{n_frames} frames are too few for any utterance")
        return n

    # --- encoding -----------------------------------------------------------------------------

    def encode(
        self, wav: np.ndarray, sr: int | None = None, *, chunk_frames: int = 500, batch: int = 4
    ) -> np.ndarray:
        """Codes ``[F]`` (int64) of one utterance, chunk by chunk (``chunk_frames`` frames per
        chunk, ``batch`` chunks per call); equal to whole-file encoding."""
        x = self.to_model_rate(wav, sr)
        left, right, n_frames = self.geometry.padding(len(x))
        return self.encode_padded(np.pad(x, (left, right)), n_frames, chunk_frames, batch)

    def encode_padded(
        self, padded: np.ndarray, n_frames: int, chunk_frames: int = 500, batch: int = 4
    ) -> np.ndarray:
        """Codes of frames ``[0, n_frames)`` of an already padded utterance ``[L]``."""
        if chunk_frames < 1 or batch < 1:
            raise ValueError("chunk_frames and batch must be >= 1")
        geo = self.geometry
        n = min(chunk_frames, n_frames)
        codes = np.empty(n_frames, dtype=np.int64)
        starts = list(range(0, n_frames, n))
        for i in range(0, len(starts), batch):
            rows = []
            for j0 in starts[i : i + batch]:
                a = int(geo.frame_samples(j0)[0])
                b = int(geo.frame_samples(j0 + n - 1)[1]) + 1
                seg = padded[a:b]
                rows.append(np.pad(seg, (0, b - a - len(seg))))  # frames past F are dropped
            out = self._encoder.run(None, {"wave": np.stack(rows).astype(np.float32)})[0]
            for j0, row in zip(starts[i : i + batch], out):
                m = min(n, n_frames - j0)
                codes[j0 : j0 + m] = row[:m]
        return codes

    # --- conditioning -------------------------------------------------------------------------

    def condition(self, codes: np.ndarray, speaker: int | str) -> np.ndarray:
        """Per-layer conditioning ``[C, L*2G]`` (C = F - cond_kernel + 1) of codes ``[F]``."""
        codes = np.asarray(codes)
        if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be a 1-D integer array, got {codes.dtype} {codes.shape}")
        if len(codes) < self.cond_kernel:
            raise ValueError(f"need at least {self.cond_kernel} frames, got {len(codes)}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        feeds = {
            "codes": codes.astype(np.int64)[None],
            "speaker": np.array([self.speaker_index(speaker)], dtype=np.int64),
        }
        cond = self._conditioner.run(None, feeds)[0][0]  # [L*2G, C]
        return np.ascontiguousarray(cond.T)

    # --- decoding -----------------------------------------------------------------------------

    def decode(
        self,
        codes: np.ndarray,
        speaker: int | str = 0,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
        *,
        n_samples: int | None = None,
        segment: int | None = None,
        overlap: int | None = None,
    ) -> np.ndarray:
        """Waveform ``[n]`` float32 at `sample_rate` from codes ``[F]``.

        Args:
            progress: called with (steps done, total steps) from the calling thread.
            segment: samples per folded segment (default `default_segment`); a segment at least
                as long as the utterance disables folding.
            overlap: cross-fade samples between segments (default one hop).
        """
        req = DecodeRequest(codes, speaker, n_samples, seed)
        return self.decode_many([req], progress=progress, segment=segment, overlap=overlap)[0]

    @property
    def default_segment(self) -> int:
        """Long enough that the warm-up (``wavenet_context`` steps per segment) stays cheap."""
        return max(4 * self.context, self.sample_rate // 2)

    def decode_many(
        self,
        requests: Sequence[DecodeRequest],
        *,
        progress: Callable[[int, int], None] | None = None,
        segment: int | None = None,
        overlap: int | None = None,
    ) -> list[np.ndarray]:
        """Decode several utterances as one batch of folded segments (see the module doc)."""
        segment = segment or self.default_segment
        overlap = self.hop if overlap is None else overlap
        if segment < 1 or overlap < 0:
            raise ValueError("segment must be >= 1 and overlap >= 0")
        conds, streams, plans = [], [], []
        offset = 0
        for r, req in enumerate(requests):
            cond = self.condition(req.codes, req.speaker)
            n_frames = len(req.codes)
            n = self.max_samples(n_frames) if req.n_samples is None else int(req.n_samples)
            if n < 1 or self.geometry.padding(n)[2] != n_frames:
                raise ValueError(
                    f"request {r}: {n_frames} frames do not encode {n} samples "
                    f"({self.geometry.padding(max(n, 1))[2]} frames would)"
                )
            if int(req.seed) < 0:
                raise ValueError("seeds must be >= 0")
            bounds = self._segments(n, segment, overlap)
            plans.append((n, bounds))
            for k, (a, b) in enumerate(bounds):
                g = a - (overlap if k > 0 else 0)
                streams.append(
                    _Stream(
                        request=r,
                        tau0=self.geometry.pad_left + g - self.context,
                        length=b - g,
                        cond_offset=offset,
                        cond_count=len(cond),
                        seed=(int(req.seed), k),
                    )
                )
            conds.append(cond)
            offset += len(cond)
        results = self._run(streams, np.concatenate(conds), progress)
        outs, i = [], 0
        for n, bounds in plans:
            wave = np.zeros(n, dtype=np.float32)
            for k, (a, b) in enumerate(bounds):
                seg = mulaw_decode(results[i], self.q)
                i += 1
                if k == 0:
                    wave[a:b] = seg
                    continue
                ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap)
                head = seg[:overlap]
                fade_out = np.sqrt(np.clip(1 - ramp**2, 0, 1))
                wave[a - overlap : a] = wave[a - overlap : a] * fade_out + head * ramp
                wave[a:b] = seg[overlap:]
            outs.append(np.clip(wave, -1.0, 1.0))
        return outs

    def _segments(self, n: int, segment: int, overlap: int) -> list[tuple[int, int]]:
        """Boundaries ``[a_k, b_k)`` (original-sample indices) of the folded segments."""
        k = max(1, round(n / segment))
        while k > 1 and n // k <= overlap:
            k -= 1
        edges = [round(i * n / k) for i in range(k + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def resynthesize(
        self,
        wav: np.ndarray,
        sr: int | None = None,
        speaker: int | str = 0,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Encode and decode (in another speaker's voice if asked); ``[n]`` at the model rate."""
        x = self.to_model_rate(wav, sr)
        codes = self.encode(x)
        return self.decode(codes, speaker, seed, progress, n_samples=len(x))

    # --- teacher forcing (checks and quality) -------------------------------------------------

    def teacher_forced(
        self, waves: Sequence[np.ndarray], speaker: int | str = 0, *, logits: bool = True
    ) -> list[np.ndarray]:
        """Drive the incremental decoder with the true samples of each utterance (at the model
        rate): per utterance, logits ``[n, Q]`` or (``logits=False``) the NLL ``[n]`` of each
        true sample. Equal to the parallel PyTorch model's teacher-forced outputs."""
        conds, streams, offset = [], [], 0
        for r, w in enumerate(waves):
            x = self.to_model_rate(w)
            left, right, n_frames = self.geometry.padding(len(x))
            padded = np.pad(x, (left, right))
            cond = self.condition(self.encode_padded(padded, n_frames), speaker)
            tau0 = left - self.context
            classes = mulaw_encode(padded, self.q)
            streams.append(
                _Stream(
                    request=r,
                    tau0=tau0,
                    length=len(x),
                    cond_offset=offset,
                    cond_count=len(cond),
                    seed=(0, r),
                    forced=classes[tau0 - 1 : left + len(x) - 1],
                    targets=None if logits else classes[left : left + len(x)],
                )
            )
            conds.append(cond)
            offset += len(cond)
        return self._run(streams, np.concatenate(conds), None)

    def cross_entropy(self, waves: Sequence[np.ndarray], speaker: int | str = 0) -> float:
        """Teacher-forced cross-entropy (nats/sample) over all samples of the utterances."""
        nll = self.teacher_forced(waves, speaker, logits=False)
        return float(np.concatenate(nll).astype(np.float64).mean())

    # --- the generation engine ----------------------------------------------------------------

    def _ring_tables(self):
        """Read/write positions in one flat ring store, per step modulo the rings' period.

        Layer ``i`` owns ``(k-1) d_i`` rows; its input at step ``s`` lives in row
        ``o_i + s mod size_i``, so the taps ``s - j d_i`` (``j = k-1 .. 1``) are read before
        the current input overwrites the oldest."""
        sizes = [(self.kernel - 1) * d for d in self.dilations]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        period = math.lcm(*sizes)
        s = np.arange(period)[:, None]
        read = [
            offsets[i] + (s - j * d) % sizes[i]
            for i, d in enumerate(self.dilations)
            for j in range(self.kernel - 1, 0, -1)
        ]
        write = [offsets[i] + s % sizes[i] for i in range(self.n_layers)]
        return period, int(sum(sizes)), np.hstack(read), np.hstack(write)

    def _run(self, streams: list[_Stream], cond: np.ndarray, progress) -> list[np.ndarray]:
        """Run all streams, split between worker threads; results in stream order."""
        order = sorted(range(len(streams)), key=lambda i: -streams[i].length)
        workers = max(1, min(self.workers, len(streams) // self.streams_per_worker))
        groups = [order[w::workers] for w in range(workers)]
        groups = [g for g in groups if g]
        results: list[np.ndarray | None] = [None] * len(streams)
        done = [0] * len(groups)
        errors: list[BaseException] = []
        total = sum(self.context + streams[g[0]].length for g in groups)

        def work(w: int) -> None:
            try:
                outs = self._run_group([streams[i] for i in groups[w]], cond, done, w)
                for i, out in zip(groups[w], outs):
                    results[i] = out
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)

        threads = [
            threading.Thread(target=work, args=(w,), daemon=True) for w in range(1, len(groups))
        ]
        for t in threads:
            t.start()
        if progress is None:
            work(0)
        else:
            main = threading.Thread(target=work, args=(0,), daemon=True)
            main.start()
            threads.append(main)
            while any(t.is_alive() for t in threads):
                progress(sum(done), total)
                time.sleep(0.25)
            progress(total, total)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def _past(self, rows: np.ndarray, taps: int) -> np.ndarray:
        """Ring rows ``[L * taps, B, R]`` -> the step's ``past [L, B, taps * R]``."""
        n, b, r = self.n_layers, rows.shape[1], rows.shape[2]
        if taps == 1:
            return rows
        return rows.reshape(n, taps, b, r).transpose(0, 2, 1, 3).reshape(n, b, taps * r)

    def _run_group(
        self, streams: list[_Stream], cond: np.ndarray, done: list[int], worker: int
    ) -> list[np.ndarray]:
        """The step loop for one batch of streams (``B`` rows in lockstep)."""
        b, ctx = len(streams), self.context
        n_steps = ctx + max(s.length for s in streams)
        period, rows, read, write = self._rings
        taps = self.kernel - 1
        r = self.residual_channels
        store = np.zeros((rows, b, r), dtype=np.float32)  # ring rows of every layer
        tau0 = np.array([s.tau0 for s in streams], dtype=np.int64)[:, None]
        lo = np.array([s.cond_offset for s in streams], dtype=np.int64)[:, None]
        hi = lo + np.array([s.cond_count - 1 for s in streams], dtype=np.int64)[:, None]
        rngs = [np.random.default_rng(s.seed) for s in streams]
        forced = streams[0].forced is not None
        want_nll = forced and streams[0].targets is not None
        if forced:
            prev_all = np.stack(
                [np.pad(s.forced, (0, n_steps - len(s.forced)), mode="edge") for s in streams]
            ).T.copy()  # [steps, B]
        if want_nll:
            targets = np.stack([np.pad(s.targets, (0, n_steps - ctx - s.length)) for s in streams])
            out = np.zeros((b, n_steps - ctx), dtype=np.float32)
            fetch = ["logits", "current"]
        elif forced:
            out = np.zeros((b, n_steps - ctx, self.q), dtype=np.float32)
            fetch = ["logits", "current"]
        else:
            out = np.zeros((b, n_steps - ctx), dtype=np.int64)
            fetch = ["sample", "current"]
        zero_class = mulaw_encode(np.zeros(1), self.q)[0]
        prev = np.full(b, zero_class, dtype=np.int64)
        run = self._step.run
        rows_b = np.arange(b)
        for start in range(0, n_steps, _BLOCK):
            steps = np.arange(start, min(n_steps, start + _BLOCK))
            cidx = self.geometry.cond_index(tau0 + steps[None]) + lo
            cidx = np.minimum(np.maximum(cidx, lo), hi).T.copy()  # [n, B] rows of `cond`
            noise = np.stack([r.random(len(steps)) for r in rngs], 1).astype(np.float32)
            for j, s in enumerate(steps):
                p = s % period
                if forced:
                    prev = prev_all[s]
                feeds = {
                    "prev": prev,
                    "past": self._past(store[read[p]], taps),
                    "cond": cond[cidx[j]],
                    "noise": noise[j],
                }
                first, current = run(fetch, feeds)
                store[write[p]] = current.reshape(b, self.n_layers, r).transpose(1, 0, 2)
                if s >= ctx:
                    if want_nll:
                        m = first.max(1, keepdims=True)
                        lse = np.log(np.exp(first - m).sum(1)) + m[:, 0]
                        out[:, s - ctx] = lse - first[rows_b, targets[:, s - ctx]]
                    else:
                        out[:, s - ctx] = first
                        if not forced:
                            prev = first
                done[worker] = s + 1
        return [out[i, : s.length] for i, s in enumerate(streams)]
