"""The codec: encode speech to codes and decode codes to speech with onnxruntime and numpy.

    from vqwavenet import Codec, BUNDLED_MODEL

    codec = Codec(BUNDLED_MODEL)
    codes = codec.encode(wave, sr)                     # [F] int64, 50 Hz
    audio = codec.decode(codes, speaker=0, seed=1)     # float32 [n] at codec.sample_rate
    audio = codec.resynthesize(wave, sr, speaker="Carlo")

Encoding runs in chunks of whole frames: frame ``j`` reads padded samples ``[j*S, j*S + Re)``
only (valid convolutions), so a chunk of frames cut with the geometry's sample ranges gives the
codes of whole-file encoding with bounded memory, and chunks are batched.

Decoding is incremental, one step graph call per sample for a batch of streams
(`vqwavenet.steps`). A long utterance is folded into segments generated side by side as one
batch and cross-faded (`vqwavenet.folding`). The first segment starts exactly, as the utterance
does from its zero padding. Later ones cannot start from the audio before them, which is
generated beside them: by default they start from the decoder's state after the model
directory's primer, a few milliseconds of real speech (`vqwavenet.primer`), and are as loud as
an unbroken decode from their first samples; from silence (``warmup="steady"``) a sampled
segment starts quiet and needs a longer burn-in. The segment length adapts to the call
(`Codec.auto_segment`): enough rows to keep the matrix products efficient, never segments so
short that joins dominate. `Codec.decode_stream` yields the audio as it becomes final.

Every decoding call of a codec, from any thread, goes through one scheduler
(`vqwavenet.steps.Scheduler`): concurrent calls share step batches, each call's segments
joining the running batches at the next step block and leaving when finished. Sampling noise
comes from ``numpy.random.default_rng([seed, segment])`` per stream, and a row's samples do not
depend on the rows beside it (fp32; int8 where the model's int8 step scales activations per
row, as exports do, `Codec.rows_independent`), so a call is reproducible for a seed whatever
runs beside it.

Only ``model.geometry`` (pure numpy) is imported from the model package, to rebuild the codec's
geometry from the layer specs in ``model.json``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from vqwavenet import folding, scoring
from vqwavenet.audio import load_audio, mulaw_encode
from vqwavenet.folding import Fold
from vqwavenet.model_dir import (
    CONDITIONER_FILE,
    ENCODER_FILE,
    INT8_FILES,
    STEP_FILE,
    WARMUP_FILE,
    ModelDirError,
    StepSpec,
    check_file,
    codes_hash,
    geometry_from_spec,
    read_meta,
)
from vqwavenet.steps import Job, Live, StepEngine, Stream, make_session

Progress = Callable[[int, int], None]


@dataclass
class DecodeRequest:
    """One utterance to decode: codes ``[F]``, speaker (index or name), original sample count
    (default: the most the codes can hold) and the sampling seed."""

    codes: np.ndarray
    speaker: int | str = 0
    n_samples: int | None = None
    seed: int = 0


@dataclass
class Plan:
    """Requests cut into streams (`Codec.plan`): the streams, the conditioning rows of every
    request stacked ``[C, L*2G]`` (each stream reads its own range), and a `Fold` per request."""

    streams: list[Stream]
    cond: np.ndarray
    folds: list[Fold]


class Codec:
    """A loaded model directory (`vqwavenet.model_dir`).

    Thread layout: each worker thread runs its own batch of streams on its own step session
    with one intra-op thread (`vqwavenet.steps.StepEngine`); a second worker starts as soon as
    there are two streams. A step's throughput keeps rising with the rows of a batch up to a
    point, so `decode_many` cuts segments to give each worker `target_streams` rows when the
    call holds enough audio, never shorter than `min_segment`. Concurrent calls share the
    workers' batches (`vqwavenet.steps.Scheduler`): at most `max_rows` rows per worker and
    `max_requests` calls at once (one more raises `vqwavenet.steps.Busy`), a playback stream
    at most `playback_rows` rows.

    Args:
        model_dir: directory with ``model.json`` and the graphs.
        int8: use the int8 graphs (``decoder_step.int8.onnx`` and, where exported,
            ``decoder_warmup.int8.onnx``; ``python -m export --int8``).
        workers: generation threads (default: 2, or 1 on a single core).
        threads: intra-op threads of the encoder and conditioner (default: all cores).
        check_hashes: verify every file against ``model.json``'s sha256.
        warmup: how a folded segment after the first starts. ``"primed"`` (the default where
            the model directory has a primer, `vqwavenet.primer`): the decoder's state after
            the primer's speech (`primed_state`, computed once per speaker), from which a
            sampled segment starts as loud as an unbroken decode. ``"steady"`` (the default
            otherwise): rings of endless silence under the segment's first conditioning frame
            (`StepEngine.steady`), from which it starts quiet and needs a long `burn_in`.
            ``"exact"``: the zero-input warm-up over the receptive field with the
            conditioning as it varies (one warm-up graph call per segment). A file's first
            segment and teacher forcing always start exactly, where silence is the true past.
        min_segment_s: shortest automatic segment in seconds (default: `min_segment`'s rule).
        burn_in: samples each folded segment after the first generates and drops before its
            cross-fade (default: `burn_in`'s rule).
    """

    # Rows `decode_many` aims to give each worker.
    target_streams: int = 64
    # Segments a playback stream (`decode_stream`) runs at once: a few times real time for a
    # listener alone, while the rows of a batch stay few enough that its first segments, and
    # those of requests arriving beside it, finish soon.
    playback_rows: int = 8

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        int8: bool = False,
        workers: int | None = None,
        threads: int | None = None,
        check_hashes: bool = True,
        warmup: str | None = None,
        min_segment_s: float | None = None,
        burn_in: int | None = None,
    ):
        if warmup not in (None, "primed", "steady", "exact"):
            raise ValueError(f"warmup must be 'primed', 'steady' or 'exact', not {warmup!r}")
        self._min_segment_s = min_segment_s
        self._burn_in = burn_in
        self.dir = Path(model_dir)
        self.meta = meta = read_meta(self.dir)
        files = meta["files"]
        step_file = INT8_FILES[STEP_FILE] if int8 else STEP_FILE
        warm_file = INT8_FILES[WARMUP_FILE] if int8 else WARMUP_FILE
        warm_file = warm_file if warm_file in files else WARMUP_FILE
        paths = {
            name: check_file(self.dir, name, files.get(name), check_hashes)
            for name in (ENCODER_FILE, CONDITIONER_FILE, step_file, warm_file)
        }
        self.warmup = warmup or ("primed" if "primer" in meta else "steady")
        self.int8 = int8
        self.model_id: str = meta["model_id"]
        self.sample_rate: int = int(meta["sample_rate"])
        self.codebook_size: int = int(meta["codebook_size"])
        self.speakers: list[str] = list(meta["speakers"])
        self.q: int = int(meta["quantization_channels"])
        self.geometry = geometry_from_spec(meta["geometry"])
        self.hop = self.geometry.hop
        if self.hop != meta["hop"]:
            raise ModelDirError(f"{self.dir}: hop {meta['hop']} disagrees with the geometry")
        spec = StepSpec.from_meta(meta["decoder_step"])
        self.n_layers, self.kernel = spec.n_layers, spec.kernel_size
        self.dilations = list(spec.dilations)
        self.residual_channels, self.gate_channels = spec.residual_channels, spec.gate_channels
        self.cond_kernel = spec.cond_kernel
        self.context = self.geometry.wavenet_context
        cores = os.cpu_count() or 1
        threads = threads or cores
        self._encoder = make_session(paths[ENCODER_FILE], threads)
        self._conditioner = make_session(paths[CONDITIONER_FILE], threads)
        workers = max(1, workers if workers is not None else min(2, cores))
        self.engine = StepEngine(
            spec, self.geometry, self.q, paths[step_file], paths[warm_file], workers
        )
        # The primer every voice starts from (key None) and voices' own (by speaker index).
        self.primers = self._load_primers(check_hashes) if self.warmup == "primed" else {}
        self._primed_states: dict[int, tuple[np.ndarray, int]] = {}  # per speaker
        self._primed_lock = threading.Lock()

    # --- engine settings ----------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Generation threads."""
        return self.engine.workers

    @property
    def streams_per_worker(self) -> int:
        """Streams per worker thread from which another worker starts."""
        return self.engine.streams_per_worker

    @streams_per_worker.setter
    def streams_per_worker(self, n: int) -> None:
        self.engine.streams_per_worker = n

    @property
    def max_rows(self) -> int:
        """Rows a worker runs at once; more streams wait in its queue."""
        return self.engine.max_rows

    @max_rows.setter
    def max_rows(self, rows: int) -> None:
        self.engine.max_rows = rows

    @property
    def rows_independent(self) -> bool:
        """Whether a stream's samples never depend on the streams beside it in a batch, so a
        request decodes to the same samples whatever runs beside it: always in fp32; in int8
        where the model's int8 step scales each row's activations on their own
        (``model.json``'s "int8_activations": "per_row", what ``python -m export --int8``
        writes; an older export's int8 step scales them over all rows of a step, ``python -m
        export --requantize-int8 DIR`` rewrites it)."""
        return not self.int8 or self.meta.get("int8_activations") == "per_row"

    @property
    def max_requests(self) -> int:
        """Requests the engine holds at once, running or waiting for rows; one more is
        refused at once with `vqwavenet.steps.Busy`."""
        return self.engine.max_requests

    @max_requests.setter
    def max_requests(self, n: int) -> None:
        if n < 1:
            raise ValueError("max_requests must be >= 1")
        self.engine.max_requests = n

    @property
    def parallel_warmup(self) -> bool:
        """Exact starts from one warm-up graph call (on), or stepped through (the reference)."""
        return self.engine.parallel_warmup

    @parallel_warmup.setter
    def parallel_warmup(self, on: bool) -> None:
        self.engine.parallel_warmup = on

    def workers_for(self, n_streams: int, spread: bool = False) -> int:
        """Worker threads that run ``n_streams`` streams (`StepEngine.workers_for`)."""
        return self.engine.workers_for(n_streams, spread)

    def release_buffers(self) -> None:
        """Free the ring buffers kept between calls (the next call allocates new ones)."""
        self.engine.release_buffers()

    @property
    def codes_hash(self) -> str:
        """Hash of the weights that give codes their meaning, recorded in codes files
        (`vqwavenet.model_dir.codes_hash`)."""
        return codes_hash(self.meta)

    @property
    def sampling_temperature(self) -> float:
        """The temperature the step graph samples at, fixed at export (``python -m export
        --temperature``): each sample is drawn from ``softmax(logits / T)``."""
        return float(self.meta.get("sampling_temperature", 1.0))

    # --- primers ------------------------------------------------------------------------------

    def _load_primers(self, check_hashes: bool) -> dict[int | None, np.ndarray]:
        """The primers' samples (`vqwavenet.primer`), checked against ``model.json``: the one
        every voice starts from (key ``None``) and voices' own (by speaker index)."""
        entry = self.meta.get("primer")
        if entry is None:
            raise ModelDirError(
                f"{self.dir}: no primer for warmup='primed' (python -m vqwavenet.primer "
                f"--model {self.dir} --wav CLIP)"
            )
        primers = {None: self._read_primer(entry, check_hashes)}
        for name, own in entry.get("speakers", {}).items():
            primers[self.speakers.index(name)] = self._read_primer(own, check_hashes)
        return primers

    def _read_primer(self, entry: dict, check_hashes: bool) -> np.ndarray:
        path = check_file(self.dir, entry["file"], entry["sha256"], check_hashes)
        wave, sr = sf.read(path, dtype="float32")
        if sr != self.sample_rate or wave.ndim != 1 or len(wave) < self.context + 1:
            raise ModelDirError(
                f"{path}: a primer must be mono at {self.sample_rate} Hz with at least "
                f"{self.context + 1} samples (rewrite it: python -m vqwavenet.primer)"
            )
        return wave

    def primer(self, speaker: int) -> np.ndarray:
        """The primer a decode in ``speaker``'s voice starts from: its own, else the shared one."""
        return self.primers.get(speaker, self.primers[None])

    def primed_state(self, speaker: int) -> tuple[np.ndarray, int]:
        """Rings and next input class after the last ``context`` samples of ``speaker``'s
        `primer`, decoded in that voice with the primer's own codes (one parallel warm-up
        call, kept per speaker): where a segment starts with ``warmup="primed"``
        (``python -m benchmarks.segment_loudness`` measures how loud it starts)."""
        with self._primed_lock:
            if speaker not in self._primed_states:
                x, ctx = self.primer(speaker), self.context
                cond = self.condition(self.encode(x), speaker)
                g = len(x)
                idx = self.geometry.cond_index(self.geometry.pad_left + g - ctx + np.arange(ctx))
                prev = mulaw_encode(x[g - ctx - 1 :], self.q)
                state = self.engine.warm_rings(prev[:ctx], cond, np.clip(idx, 0, len(cond) - 1))
                self._primed_states[speaker] = (state, int(prev[ctx]))
            return self._primed_states[speaker]

    # --- audio and speakers -------------------------------------------------------------------

    def to_model_rate(self, wav: np.ndarray, sr: int | None = None) -> np.ndarray:
        """Mono float32 in [-1, 1] at the model's rate from ``[n]`` or ``[n, channels]`` at
        ``sr`` (default: the model's; integer PCM is scaled): `vqwavenet.audio.load_audio`'s
        checks and conversion. Raises `AudioError` (a ``ValueError``)."""
        sr = self.sample_rate if sr is None else sr
        return load_audio((sr, np.asarray(wav)), self.sample_rate, None)

    def speaker_index(self, speaker: int | str) -> int:
        """A voice's index from its name or its index (an int, or a string of digits that is
        not itself a voice's name: a voice named "2" is that voice, not index 2)."""
        if isinstance(speaker, str) and speaker in self.speakers:
            return self.speakers.index(speaker)
        if isinstance(speaker, str) and not (speaker.isascii() and speaker.isdigit()):
            raise ValueError(f"unknown speaker {speaker!r} (known: {self.speakers})")
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
        burn_in: int | None = None,
    ) -> np.ndarray:
        """Waveform ``[n]`` float32 at `sample_rate` from codes ``[F]``.

        Args:
            progress: called with (steps done, total steps) from the calling thread.
            segment: samples per folded segment (default `auto_segment`); a segment at least
                as long as the utterance disables folding.
            overlap: cross-fade samples between segments (default one hop).
            burn_in: samples each later segment generates and drops before its cross-fade
                (default `Codec.burn_in`).
        """
        req = DecodeRequest(codes, speaker, n_samples, seed)
        return self.decode_many(
            [req], progress=progress, segment=segment, overlap=overlap, burn_in=burn_in
        )[0]

    @property
    def min_segment(self) -> int:
        """Shortest automatic segment: an eighth of a second from primed starts, a quarter
        from silent ones, and with exact starts at least the receptive field (each costs a
        warm-up over it). ``Codec(min_segment_s=...)`` overrides it.

        Primed eighth-second segments resynthesise as intelligibly as unbroken decodes and
        decode short files faster than quarter-second ones (more rows, less work per row);
        from silence, eighth-second segments lose intelligibility at the joins
        (``python -m benchmarks.resynth_quality``, ``benchmarks.decode_speed``)."""
        if self._min_segment_s is not None:
            return max(1, round(self._min_segment_s * self.sample_rate))
        shortest = self.sample_rate // (8 if self.warmup == "primed" else 4)
        return max(shortest, self.context if self.warmup == "exact" else 0)

    @property
    def burn_in(self) -> int:
        """Samples a folded segment after the first generates and drops before its cross-fade:
        10 ms from a primed start, 60 ms from silence, unless ``Codec(burn_in=...)`` says
        otherwise.

        From silence (``warmup="steady"`` or ``"exact"``) a sampled segment climbs to the
        loudness of an unbroken decode only slowly, and cross-fading into such a quiet start
        dips the loudness at every join, which costs intelligibility unless the quiet start is
        dropped. From the primer's speech a segment starts at full loudness, and the short
        burn-in only drops the samples still shaped by the primer's unrelated past
        (``python -m benchmarks.resynth_quality``, ``benchmarks.segment_loudness``)."""
        if self._burn_in is not None:
            return self._burn_in
        return round((0.01 if self.warmup == "primed" else 0.06) * self.sample_rate)

    def auto_segment(self, total_samples: int) -> int:
        """Segment length that gives every worker `target_streams` rows for ``total_samples``
        of audio in one batch, but no shorter than `min_segment`."""
        return max(self.min_segment, -(-total_samples // (self.workers * self.target_streams)))

    def decode_many(
        self,
        requests: Sequence[DecodeRequest],
        *,
        progress: Progress | None = None,
        segment: int | None = None,
        overlap: int | None = None,
        burn_in: int | None = None,
    ) -> list[np.ndarray]:
        """Decode several utterances as one batch of folded segments (see the module doc); no
        requests, no waves."""
        if not requests:
            return []
        plan = self.plan(requests, segment, overlap, burn_in)
        results = self.engine.run(plan.streams, plan.cond, progress)
        return [
            folding.compose(f, results[f.first : f.first + len(f.bounds)], 0, f.n, self.q)
            for f in plan.folds
        ]

    def decode_stream(
        self,
        codes: np.ndarray,
        speaker: int | str = 0,
        seed: int = 0,
        progress: Progress | None = None,
        *,
        n_samples: int | None = None,
        segment: int | None = None,
        overlap: int | None = None,
        burn_in: int | None = None,
        interval: float = 0.25,
        schedule: str = "playback",
    ) -> Iterator[np.ndarray]:
        """`decode`, yielding the waveform in consecutive chunks as soon as they are final.

        The request joins the engine's shared scheduler (`vqwavenet.steps.Scheduler`): its
        segments run in the step batches of every other request, earliest deadline first, so
        the chunks come as the segments finish. ``schedule="playback"`` (default) serves a
        listener: the file is cut into `min_segment` segments (not `auto_segment`'s), at
        most `playback_rows` of them run at once (enough to stay ahead of a listener alone,
        few enough that the first ones finish soon and others get rows), and the first chunk
        waits until the audio final so far, played from then on, is predicted to last until
        the rest is final (`_may_start`): where the engine outruns real time that is the
        first finished audio, under load later, so that a player that starts on the first
        chunk plays to the end without a gap. ``schedule="batch"`` runs `decode`'s segments
        with no row limit and yields every final prefix at once (the first segment's samples
        become final as they are generated).

        The final prefix is checked whenever the workers publish progress, at least every
        ``interval`` seconds (when ``progress`` is called). Either way the chunks are
        reproducible for a seed and concatenate to `decode`'s samples for the same
        ``segment``: a row's samples do not depend on the rows beside it (where
        `rows_independent`: fp32, and int8 with per-row activation scales).
        Closing the generator (a listener gone) frees the request's rows at the workers' next
        step and returns once they are free. Raises `vqwavenet.steps.Busy` (at the first
        ``next()``) when the engine already holds `max_requests` requests.
        """
        if schedule not in ("playback", "batch"):
            raise ValueError(f"schedule must be 'playback' or 'batch', not {schedule!r}")
        req = DecodeRequest(codes, speaker, n_samples, seed)
        playback = schedule == "playback"
        if playback:
            segment = segment or self.min_segment
        plan = self.plan([req], segment, overlap, burn_in)
        live = Live(len(plan.streams))
        live.total = sum(self.context + s.length for s in plan.streams)
        limit = self.playback_rows if playback else None
        job = self.engine.submit(plan.streams, plan.cond, live, limit=limit)
        try:
            yield from self._poll(job, plan.folds[0], progress, interval, playback)
        finally:  # also when the consumer stops early (closed generator): free its rows
            self.engine.cancel(job)  # nothing to cancel once it finished
            job.scheduler.settle(job)  # before close() returns: a process may exit right after

    def _poll(self, job: Job, fold: Fold, progress, interval: float, playback: bool):
        """`decode_stream`'s loop: yield the final prefix whenever it grew. In ``playback``
        the first chunk goes once `_may_start` says a player can start on it, and later ones
        at most every ``interval`` seconds (fewer, larger chunks for a player to encode)."""
        live, n = job.live, fold.n
        emitted = final = lump = 0  # samples yielded, final, and the most final at once
        started = reached = last = time.monotonic()  # reached: the final prefix last grew
        while emitted < n:
            with live.lock:
                produced = [live.produced(i) for i in range(len(live.results))]
                ready = folding.final_prefix(fold, produced)
                now = time.monotonic()
                if ready > final:
                    lump, final, reached = max(lump, ready - final), ready, now
                if not playback or ready == n:
                    wait = 0.0
                elif not emitted:
                    wait = self._may_start(started, reached, ready, n, lump, interval)
                else:
                    wait = last + interval - now
                go = ready > emitted and wait <= 0
                if go:
                    segs = [live.view(i) for i in range(len(live.results))]
                    chunk = folding.compose(fold, segs, emitted, ready, self.q)
                ended = job.done.is_set()
                if not go and not ended:
                    live.lock.wait(interval if wait <= 0 else min(interval, wait))
                done = sum(live.done)
            if job.error is not None:
                raise job.error
            if progress is not None:
                progress(done, live.total)
            if go:
                emitted, last = ready, time.monotonic()
                yield chunk
            elif ended and ready < n:
                raise RuntimeError("decoding stopped before the end of the audio")

    def _may_start(
        self, started: float, reached: float, final: int, n: int, lump: int, slack: float = 0.0
    ) -> float:
        """Seconds until a player may start on the first ``final`` samples of ``n`` (0: now).

        The audio becomes final in lumps (segments that ran side by side finish together), at
        the mean rate so far: ``final`` samples in ``reached - started`` seconds. Were it to go
        on so, in lumps of ``lump`` samples, the last lump would come at the predicted end, and
        a player that started at time ``t`` has not run out then if ``t + (n - lump) /
        sample_rate >= end``: the earliest start that never stalls, plus ``slack`` (how late
        a chunk may reach the player); where the audio comes faster than real time that is
        now. The rate counts with a twentieth less (later arrivals slow it)."""
        if final <= 0:
            return float("inf")
        rate = final / max(reached - started, 1e-9)  # samples per second
        end = reached + 1.05 * (n - final) / rate
        return end + slack - (n - lump) / self.sample_rate - time.monotonic()

    def plan(
        self,
        requests: Sequence[DecodeRequest],
        segment: int | None,
        overlap: int | None,
        burn_in: int | None,
    ) -> Plan:
        """Validate the requests and cut them into streams (``None``: the codec's defaults)."""
        if segment is not None and segment < 1:
            raise ValueError("segment must be >= 1")
        overlap, burn_in = self.resolve_join(overlap, burn_in)
        conds, lengths = [], []
        for r, req in enumerate(requests):
            conds.append(self.condition(req.codes, req.speaker))  # validates the codes
            n_frames = len(req.codes)
            n = self.max_samples(n_frames) if req.n_samples is None else int(req.n_samples)
            if n < 1 or self.geometry.padding(n)[2] != n_frames:
                raise ValueError(
                    f"request {r}: {n_frames} frames do not encode {n} samples "
                    f"({self.geometry.padding(max(n, 1))[2]} frames would)"
                )
            if int(req.seed) < 0:
                raise ValueError("seeds must be >= 0")
            lengths.append(n)
        segment = segment or self.auto_segment(sum(lengths))
        streams, folds, offset = [], [], 0
        for r, (req, n, cond) in enumerate(zip(requests, lengths, conds)):
            fold = folding.fold(n, segment, overlap, burn_in, len(streams))
            folds.append(fold)
            primed = self.later_segment_start(len(fold.bounds), req.speaker)
            for k, (_, b) in enumerate(fold.bounds):
                g = fold.start(k)
                streams.append(
                    Stream(
                        request=r,
                        tau0=self.geometry.pad_left + g - self.context,
                        length=b - g,
                        cond_offset=offset,
                        cond_count=len(cond),
                        seed=(int(req.seed), k),
                        steady=k > 0 and self.warmup == "steady",
                        primed=primed if k > 0 else None,
                        at=fold.bounds[k][0] / self.sample_rate,
                    )
                )
            offset += len(cond)
        return Plan(streams, np.concatenate(conds), folds)

    def later_segment_start(
        self, n_segments: int, speaker: int | str
    ) -> tuple[np.ndarray, int] | None:
        """The primed start (`primed_state`) of a fold's later segments; None where the codec
        is not primed or the fold has one segment."""
        if self.warmup != "primed" or n_segments < 2:
            return None
        return self.primed_state(self.speaker_index(speaker))

    def resolve_join(self, overlap: int | None, burn_in: int | None) -> tuple[int, int]:
        """``(overlap, burn_in)`` of a call, the codec's defaults where ``None``: one hop of
        cross-fade and `burn_in`."""
        overlap = self.hop if overlap is None else overlap
        burn_in = self.burn_in if burn_in is None else burn_in
        if overlap < 0 or burn_in < 0:
            raise ValueError("overlap and burn_in must be >= 0")
        return overlap, burn_in

    def resynthesize(
        self,
        wav: np.ndarray,
        sr: int | None = None,
        speaker: int | str = 0,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Encode and decode (in another speaker's voice if asked); ``[n]`` at the model rate."""
        x = self.to_model_rate(wav, sr)
        codes = self.encode(x)
        return self.decode(codes, speaker, seed, progress, n_samples=len(x))

    # --- teacher forcing (checks and quality, `vqwavenet.scoring`) ----------------------------

    def teacher_forced(
        self,
        waves: Sequence[np.ndarray],
        speaker: int | str = 0,
        *,
        logits: bool = True,
        codes: Sequence[np.ndarray] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[np.ndarray]:
        """Drive the incremental decoder with the true samples of each utterance (at the model
        rate): per utterance, logits ``[n, Q]`` or (``logits=False``) the NLL ``[n]`` of each
        true sample. Equal to the parallel PyTorch model's teacher-forced outputs. ``codes``
        conditions on given codes instead of the utterances' own
        (`vqwavenet.scoring.teacher_forced`)."""
        return scoring.teacher_forced(
            self, waves, speaker, logits=logits, codes=codes, progress=progress
        )

    def folded_nll(
        self,
        waves: Sequence[np.ndarray],
        speaker: int | str = 0,
        *,
        segment: int,
        overlap: int | None = None,
        burn_in: int | None = None,
    ) -> list[np.ndarray]:
        """What folding costs, teacher-forced (`vqwavenet.scoring.folded_nll`)."""
        return scoring.folded_nll(
            self, waves, speaker, segment=segment, overlap=overlap, burn_in=burn_in
        )

    def cross_entropy(
        self,
        waves: Sequence[np.ndarray],
        speaker: int | str = 0,
        *,
        codes: Sequence[np.ndarray] | None = None,
    ) -> float:
        """Teacher-forced cross-entropy (nats/sample) over all samples of the utterances,
        conditioned on their own codes or on ``codes``."""
        return scoring.cross_entropy(self, waves, speaker, codes=codes)
