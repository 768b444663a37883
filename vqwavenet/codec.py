"""Inference without PyTorch: onnxruntime and numpy (audio in through `vqwavenet.audio`).

    codec = Codec("exported/small")
    codes = codec.encode(wave, sr)                     # [F] int64, 50 Hz
    audio = codec.decode(codes, speaker=0, seed=1)     # float32 [n] at codec.sample_rate
    audio = codec.resynthesize(wave, sr, speaker="p225")

Encoding runs in chunks of whole frames: frame ``j`` reads padded samples ``[j*S, j*S + Re)``
only (valid convolutions), so a chunk of frames cut with the geometry's sample ranges gives the
codes of whole-file encoding with bounded memory, and chunks are batched.

Decoding is incremental: one `decoder_step.onnx` call per sample for a batch of streams, with
per-layer ring buffers of past layer inputs in numpy. The step graph takes one tensor per ring
slot it reads and writes one per layer, so onnxruntime reads the taps from the rings and writes
the current inputs into them in place (I/O binding; no copies into or out of a stacked array). A
long utterance is folded into segments generated side by side as one batch and cross-faded over
``overlap`` samples, and each after the first generates ``burn_in`` samples more before its
cross-fade and drops them (`Codec.burn_in`). The first starts exactly, as the utterance does
from its zero padding (the rings after ``wavenet_context`` zero-input steps, one parallel
`decoder_warmup.onnx` call). Later ones cannot start from the audio before them, which is
generated beside them: by default they start from the decoder's state after the model
directory's primer, a few milliseconds of real speech (`vqwavenet.primer`; computed once per
speaker), and are as loud as an unbroken decode from their first samples. From silence
(``Codec(warmup="steady")``, the rings of endless silence under the segment's first
conditioning frame, a fixed point found in ``L`` step calls; the default for a model directory
without a primer) a sampled segment takes about 1000 samples to climb to that loudness, and
its joins cost STOI unless it drops 960 samples first. Several
requests share the batch, and the segment length adapts to it (`Codec.auto_segment`): enough
rows to keep the matrix products efficient, never segments so short that joins dominate. Streams
are split between up to ``workers`` threads, each calling onnxruntime with one intra-op thread
(see `Codec` for when a second worker pays); a worker runs at most `Codec.max_rows` rows and a
row that finishes its stream takes the next from the worker's queue. `Codec.decode_stream`
yields the audio as it becomes final. Sampling noise comes from
``numpy.random.default_rng([seed, segment])`` per stream, so a call is reproducible for a seed
(bit-identical for the same requests and settings; batching a file with others changes the batch
shape of the matrix products, which may change the last bits and so the draw).

Only ``model.geometry`` (pure numpy) is imported from the model package, to rebuild the codec's
geometry from the layer specs in ``model.json``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf

from model.geometry import CodecGeometry, Conv, Upsample
from vqwavenet.audio import load_audio

FORMAT = "vqwavenet-onnx"
VERSION = 2  # 2: the step graph takes one tensor per ring slot (`step_names`)
_LAYERS = {"Conv": Conv, "Upsample": Upsample}
WARM_FILE = "decoder_warmup.onnx"
WARM_INT8_FILE = "decoder_warmup.int8.onnx"


class ModelDirError(ValueError):
    """The model directory is missing files, has the wrong format or fails its hashes."""


def step_names(n_layers: int, kernel: int) -> dict[str, list[str]]:
    """Input and output names of ``decoder_step.onnx``: per layer ``i``, the taps
    ``past.{i}.{j}`` (its input at ``tau - j d_i``, oldest first), ``cond.{i}``, and the
    output ``current.{i}`` (its input at ``tau``)."""
    past = [f"past.{i}.{j}" for i in range(n_layers) for j in range(kernel - 1, 0, -1)]
    return {
        "inputs": ["prev", "noise", *past, *(f"cond.{i}" for i in range(n_layers))],
        "outputs": ["sample", "logits", *(f"current.{i}" for i in range(n_layers))],
    }


def ring_layout(needs: Sequence[int]) -> tuple[int, list[int]]:
    """Period and ring sizes for layers that must keep ``needs[i]`` past inputs.

    Each ring is longer than it needs, so the slot a step writes is never one it reads (both
    are bound to the same step call); all sizes divide one period, so the bindings of a step
    depend only on the step modulo the period and are built once. Both the ring memory (the
    sum of the sizes) and the bindings to build (the period) grow with the period, so the one
    with the least of their sum is taken: for dilations 1 ... 512 the period is 520 (rings of
    2, 4, 5, 10, 20, 40, 65, 130, 260 and 520 slots) instead of 768 (each ring 1.5x its need),
    with 31 % less memory and 32 % fewer bindings."""

    def sizes(period: int) -> list[int]:  # each need's smallest divisor of the period above it
        divisors = _divisors(period)
        return [divisors[bisect.bisect_right(divisors, need)] for need in needs]

    base = math.lcm(*needs)  # a period that always works: every need's double divides it
    fallback = base * 3 // 2 if base % 2 == 0 else base * 2
    periods = range(max(needs) + 1, min(fallback, 4 * max(needs) + 4) + 1)
    period = min(periods, key=lambda p: p + sum(sizes(p)), default=fallback)
    return period, sizes(period)


def _divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending."""
    small = [q for q in range(1, math.isqrt(n) + 1) if n % q == 0]
    return sorted(set(small + [n // q for q in small]))


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
    steady: bool = False  # start from `Codec._steady` rings instead of the exact warm-up
    primed: tuple[np.ndarray, int] | None = None  # start from these rings and input class


@dataclass(frozen=True)
class _Fold:
    """One utterance of ``n`` samples cut into segments ``[a_k, b_k)`` (``bounds``), whose
    streams start at index ``first``. Segment ``k > 0`` starts generating at `start` ``(k)``,
    ``burn_in + overlap`` samples before ``a_k``: the first ``burn_in`` samples are dropped
    (a sampled segment climbs out of the silence it starts from), the next ``overlap`` are
    cross-faded with the end of segment ``k - 1``."""

    n: int
    bounds: list[tuple[int, int]]
    overlap: int
    burn_in: int
    first: int

    def start(self, k: int) -> int:
        return self.bounds[k][0] - self.overlap - self.burn_in if k > 0 else 0


class _Live:
    """What the workers publish while they run, for `Codec.decode_stream`: finished streams'
    outputs, running streams' output rows with their produced counts, and the work done."""

    def __init__(self, n_streams: int):
        self.lock = threading.Lock()
        self.results: list[np.ndarray | None] = [None] * n_streams
        self.partial: list[tuple[np.ndarray, int] | None] = [None] * n_streams
        self.done: list[int] = []
        self.total = 1
        self.cancelled = False  # set when the consumer goes away: workers stop at their next step

    def produced(self, i: int) -> int:
        if self.results[i] is not None:
            return len(self.results[i])
        return self.partial[i][1] if self.partial[i] is not None else 0

    def view(self, i: int) -> np.ndarray:
        if self.results[i] is not None:
            return self.results[i]
        return self.partial[i][0] if self.partial[i] is not None else np.zeros(0, np.int64)


_BLOCK = 128  # steps between `Codec._step_loop`'s bookkeeping of rows and streams, at most
_KEEP_ROW_COUNTS = 4  # binding sets a step batch keeps (`_StepBatch._use`)


class _StepBatch:
    """One worker's step call: the ring store, the conditioning, input and output buffers, and
    one onnxruntime binding per step phase (built on first use) that points each tap at its
    ring slot and each layer's output at the slot it overwrites. Rows ``[0, m)`` take part;
    `keep` drops idle rows so that a draining batch stops computing them."""

    def __init__(self, codec: Codec, rows: int, *, logits: bool, session: ort.InferenceSession):
        self.codec, self.m, self.session = codec, rows, session
        r, width = codec.residual_channels, 2 * codec.gate_channels
        # One spare row per slot keeps slots off power-of-two spacing (probably 4K aliasing of
        # a tap's reads against the output's writes): 8 s decodes at `default` ran 2.7 %
        # faster (18 alternating runs each, 15.9 s against 16.35 s).
        self.store = np.zeros((codec._ring_slots, rows + 1, r), dtype=np.float32)[:, :rows]
        self.cond = np.zeros((codec.n_layers, rows, width), dtype=np.float32)
        self.prev = np.zeros(rows, dtype=np.int64)
        self.noise = np.zeros(rows, dtype=np.float32)
        self.sample = np.zeros(rows, dtype=np.int64)
        self.logits = np.zeros((rows, codec.q), dtype=np.float32) if logits else None
        # Bindings per row count: views of rows [0, m) stay valid for the batch's life, so a
        # count seen before (a call of the size the batch was made for, after draining to
        # fewer rows) binds no phase again. The most recent `_KEEP_ROW_COUNTS` are kept.
        self._bound: dict[int, tuple[dict, dict, dict]] = {}
        self._use(rows)

    def run(self, s: int) -> None:
        """One step at global step ``s``: reads the taps of ``s``, writes its inputs."""
        phase = s % self.codec._period
        binding = self._bindings.get(phase)
        if binding is None:
            binding = self._bindings[phase] = self._bind(phase)
        self.session.run_with_iobinding(binding)

    @property
    def capacity(self) -> int:
        return self.store.shape[1]

    def reset(self, rows: int) -> None:
        """Run rows ``[0, rows)`` (at most `capacity`) for a new call. The rings keep the
        last call's values: every row is loaded before it is read, and a row's ring slots
        are read only after they are written or as the lags its start fills."""
        self._use(rows)

    def _use(self, rows: int) -> None:
        """Make ``rows`` the row count that steps run, with its bindings (built on use)."""
        self.m = rows
        if rows not in self._bound:
            self._bound[rows] = ({}, {}, {})
            while len(self._bound) > _KEEP_ROW_COUNTS:
                del self._bound[next(iter(self._bound))]  # the oldest
        self._bindings, self._slots, self._fixed = self._bound[rows]

    def keep(self, rows: np.ndarray) -> None:
        """Move ``rows`` (in order) to the front and run only those from now on."""
        k = len(rows)
        self.store[:, :k] = self.store[:, rows]
        self.cond[:, :k] = self.cond[:, rows]
        self.prev[:k] = self.prev[rows]
        self._use(k)

    def _slot(self, k: int) -> ort.OrtValue:
        """Ring slot ``k``'s first ``m`` rows as an `OrtValue` over the same memory (binding
        one costs a sixth of binding a raw pointer)."""
        value = self._slots.get(k)
        if value is None:
            value = self._slots[k] = _value(self.store[k, : self.m])
        return value

    def _bind(self, phase: int) -> ort.IOBinding:
        codec, m = self.codec, self.m
        if not self._fixed:  # the buffers every phase binds
            fixed = {"prev": self.prev[:m], "noise": self.noise[:m]}
            fixed |= {f"cond.{i}": self.cond[i, :m] for i in range(codec.n_layers)}
            fixed["sample"] = self.sample[:m]
            if self.logits is not None:
                fixed["logits"] = self.logits[:m]
            self._fixed.update({name: _value(array) for name, array in fixed.items()})
        binding = self.session.io_binding()
        for name, value in self._fixed.items():
            if name in ("sample", "logits"):
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        names = step_names(codec.n_layers, codec.kernel)
        for name, (_, j, offset, size, d) in zip(names["inputs"][2:], codec._taps):
            binding.bind_ortvalue_input(name, self._slot(offset + (phase - j * d) % size))
        for i, (offset, size) in enumerate(codec._writes):
            binding.bind_ortvalue_output(f"current.{i}", self._slot(offset + phase % size))
        return binding


def _value(array: np.ndarray) -> ort.OrtValue:
    """An `OrtValue` over a contiguous array's memory (no copy, the array must outlive it)."""
    if not array.flags.c_contiguous:
        raise ValueError("bound arrays must be contiguous")
    return ort.OrtValue.ortvalue_from_numpy(array)


class _Rows:
    """Per-row bookkeeping of a worker's batch: the stream each row runs (-1: idle), its
    timeline and inputs per local step, and its outputs."""

    def __init__(self, rows: int, steps: int, ctx: int, forced: bool, nll: bool, q: int):
        self.sid = np.full(rows, -1, dtype=np.int64)
        self.start = np.zeros(rows, dtype=np.int64)  # global step of the row's local step 0
        self.last = np.zeros(rows, dtype=np.int64)  # its final local step
        self.crow = np.full(rows, -1, dtype=np.int64)  # row of `cond` in the batch's buffer
        self.cidx = np.zeros((rows, steps), dtype=np.int64)  # row of `cond` per local step
        self.noise = np.zeros((rows, steps), dtype=np.float32)
        self.prev = np.zeros((rows, steps), dtype=np.int64) if forced else None
        self.targets = np.zeros((rows, steps - ctx), dtype=np.int64) if nll else None
        if nll:
            self.out = np.zeros((rows, steps - ctx), dtype=np.float32)
        elif forced:
            self.out = np.zeros((rows, steps - ctx, q), dtype=np.float32)
        else:
            self.out = np.zeros((rows, steps - ctx), dtype=np.int64)

    def keep(self, rows: np.ndarray) -> None:
        for name, value in vars(self).items():
            if value is not None:
                setattr(self, name, value[rows])


class Codec:
    """A loaded model directory (see `export.onnx_export`).

    Thread layout: each worker thread runs its own batch of streams with one intra-op thread.
    A second worker starts as soon as there are two streams (`streams_per_worker`): each has
    its own step session, and with that two workers decoded every length measured faster
    than one (``python -m benchmarks.decode_speed --compare-streams-per-worker N``, the
    bundled model, medians of 5): 0.5 s files (2 segments) 1.03x (int8) and 1.09x (fp32),
    1.5 s (6) 1.11x and 1.24x, 3 s (12) 1.27x int8. When the workers shared one session they
    lost at few streams and int8 fell into a slow mode for whole processes (below, at
    ``_steps``), and the threshold was 16 streams each: files of 2-7.875 s ran on one worker.
    A step's throughput keeps rising up to about 64 rows per worker (``small``; 128 for
    ``default``), so `decode_many` cuts segments to give each worker `target_streams` rows
    when the batch holds enough audio, never shorter than `min_segment`.

    Args:
        model_dir: directory with ``model.json`` and the graphs.
        int8: use the int8 graphs (``decoder_step.int8.onnx`` and, where exported,
            ``decoder_warmup.int8.onnx``; ``python -m export --int8``).
        workers: generation threads (default: 2, or 1 on a single core).
        threads: intra-op threads of the encoder and conditioner (default: all cores).
        check_hashes: verify every file against ``model.json``'s sha256.
        warmup: how a folded segment after the first starts. ``"primed"`` (the default where
            the model directory has a primer, `vqwavenet.primer`): the decoder's state after the
            primer's speech (`_primed`, computed once per speaker), from which a sampled
            segment starts as loud as an unbroken decode. ``"steady"`` (the default
            otherwise): rings of endless silence under the segment's first conditioning frame
            (`_steady`, ``L`` single-row step calls), from which it starts quiet and needs a
            long `burn_in`. ``"exact"``: the zero-input warm-up over the receptive field with
            the conditioning as it varies (``decoder_warmup.onnx``, about 1300 row-steps of
            work). Teacher-forced, silent starts cost the same (``benchmarks.fold_quality``,
            README); a file's first segment and teacher forcing always start exactly, where
            silence is the true past.
        min_segment_s: shortest automatic segment in seconds (default: `min_segment`'s rule).
        burn_in: samples each folded segment after the first generates and drops before its
            cross-fade (default: `burn_in`'s rule).
    """

    streams_per_worker: int = 1
    target_streams: int = 64
    # Per worker; more streams wait in its queue. Its rings take rows x R floats per slot,
    # 2112 slots at `default`: 279 MB for 128 rows.
    max_rows: int = 128
    # Segments in `decode_stream`'s first wave (`min_segment` long). With quarter-second
    # segments from silence, one 8 s `small` file played without gaps after 3.4-4.4 s with
    # 1, 2 or 3 (noise decides); 2 delivered the first chunk after about 1 s, 4 after 2 s.
    first_wave: int = 2

    def __init__(
        self,
        model_dir: str | Path,
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
        meta_path = self.dir / "model.json"
        if not meta_path.is_file():
            raise ModelDirError(f"{self.dir}: no model.json (export a checkpoint first)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ModelDirError(
                f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')} "
                f"is not {FORMAT} v{VERSION} (re-export it: python -m export --checkpoint ...)"
            )
        self.meta = meta
        step_file = "decoder_step.int8.onnx" if int8 else "decoder_step.onnx"
        needed = ["encoder.onnx", "conditioner.onnx", step_file]
        warm_file = WARM_INT8_FILE if int8 and WARM_INT8_FILE in meta["files"] else WARM_FILE
        needed.append(warm_file)
        for name in needed:
            path = self.dir / name
            if name not in meta["files"] or not path.is_file():
                hint = " (export with --int8)" if "int8" in name else ""
                raise ModelDirError(f"{self.dir}: missing {name}{hint}")
            if check_hashes and file_sha256(path) != meta["files"][name]:
                raise ModelDirError(f"{path}: sha256 differs from model.json (corrupt or edited)")
        self.warmup = warmup or ("primed" if "primer" in meta else "steady")
        cores = os.cpu_count() or 1
        self.workers = max(1, workers if workers is not None else min(2, cores))
        threads = threads or cores
        self._encoder = self._session(self.dir / "encoder.onnx", threads)
        self._conditioner = self._session(self.dir / "conditioner.onnx", threads)
        # One step session per worker. Sharing one, two workers decoded an 8 s file of the
        # bundled model in int8 at a median 2.7-2.9x real time in 6 of 7 processes (4.0x in
        # the others); with one each, 4.3-4.5x in every process, and fp32 3.2-3.3x instead
        # of 3.0x. A shared session without a memory arena had no slow mode either, so the
        # arena shared by both threads is the likely cause (not verified further).
        self._steps = [self._session(self.dir / step_file, 1) for _ in range(self.workers)]
        self._step = self._steps[0]
        self._warm = self._session(self.dir / warm_file, 1)
        # Off (tests): step through the warm-up instead, the reference the warm-up graph equals.
        self.parallel_warmup = True
        self._batches: list[_StepBatch] = []  # idle step batches, see `_take_batch`
        self._batches_lock = threading.Lock()
        self._waves_fell_behind = False  # see `decode_stream`
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
        self.gate_channels = int(step["gate_channels"])
        self.cond_kernel = int(step["cond_kernel"])
        self.context = self.geometry.wavenet_context
        needs = [(self.kernel - 1) * d for d in self.dilations]
        self._period, sizes = ring_layout(needs)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._ring_slots = int(sum(sizes))
        self._taps = [  # (layer, lag multiple j, ring offset, ring size, dilation), graph order
            (i, j, int(offsets[i]), sizes[i], d)
            for i, d in enumerate(self.dilations)
            for j in range(self.kernel - 1, 0, -1)
        ]
        self._writes = [(int(offsets[i]), sizes[i]) for i in range(self.n_layers)]
        self._state_layout = (  # per row of a warm state: ring offset, lag behind the start, size
            np.repeat(offsets, needs),
            np.concatenate([np.arange(n, 0, -1) for n in needs]),
            np.repeat(sizes, needs),
        )
        # The primer every voice starts from (key None) and voices' own (by speaker index).
        self._primers = self._load_primers(check_hashes) if self.warmup == "primed" else {}
        self._primed_states: dict[int, tuple[np.ndarray, int]] = {}  # per speaker
        self._primed_lock = threading.Lock()

    def _load_primers(self, check_hashes: bool) -> dict[int | None, np.ndarray]:
        """The primers' samples (`vqwavenet.primer`), checked against ``model.json``: the one
        every voice starts from (key ``None``) and voices' own (by speaker index)."""
        entry = self.meta.get("primer")
        if entry is None:
            raise ModelDirError(
                f"{self.dir}: no primer for warmup='primed' (python -m vqwavenet.primer --model "
                f"{self.dir} --wav CLIP)"
            )
        primers = {None: self._read_primer(entry, check_hashes)}
        for name, own in entry.get("speakers", {}).items():
            primers[self.speakers.index(name)] = self._read_primer(own, check_hashes)
        return primers

    def _read_primer(self, entry: dict, check_hashes: bool) -> np.ndarray:
        path = self.dir / entry["file"]
        if not path.is_file():
            raise ModelDirError(f"{self.dir}: missing {entry['file']} (a primer)")
        if check_hashes and file_sha256(path) != entry["sha256"]:
            raise ModelDirError(f"{path}: sha256 differs from model.json (corrupt or edited)")
        wave, sr = sf.read(path, dtype="float32")
        if sr != self.sample_rate or wave.ndim != 1 or len(wave) < self.context + 1:
            raise ModelDirError(
                f"{path}: a primer must be mono at {self.sample_rate} Hz with at least "
                f"{self.context + 1} samples (rewrite it: python -m vqwavenet.primer)"
            )
        return wave

    def _primer_for(self, speaker: int) -> np.ndarray:
        """The primer a decode in ``speaker``'s voice starts from: its own, else the shared one."""
        return self._primers.get(speaker, self._primers[None])

    def _primed(self, speaker: int) -> tuple[np.ndarray, int]:
        """Rings and next input class after the last ``context`` samples of ``speaker``'s
        primer (`_primer_for`), decoded in that voice with the primer's own codes (one
        parallel warm-up call, kept per speaker): where a segment starts with
        ``warmup="primed"``. Sampled from there, the bundled model's later segments had 78 %
        of the unbroken decode's RMS over their first 80 samples and 94-118 % over each 80
        after; from silence (`_steady`), 19 %, then 37-85 % up to sample 1280 (``python -m
        benchmarks.segment_loudness``, README)."""
        with self._primed_lock:
            if speaker not in self._primed_states:
                x, ctx = self._primer_for(speaker), self.context
                cond = self.condition(self.encode(x), speaker)
                g = len(x)
                idx = self.geometry.cond_index(self.geometry.pad_left + g - ctx + np.arange(ctx))
                prev = mulaw_encode(x[g - ctx - 1 :], self.q)
                state = self._warm_rings(prev[:ctx], cond, np.clip(idx, 0, len(cond) - 1))
                self._primed_states[speaker] = (state, int(prev[ctx]))
            return self._primed_states[speaker]

    def _warm_rings(self, prev: np.ndarray, cond: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The rings after ``context`` steps fed the classes ``prev`` under the conditioning
        rows ``cond[at]``, computed in parallel (one `decoder_warmup.onnx` call)."""
        feeds = {"prev": prev[None], "cond": cond[at[0] : at[-1] + 1][None]}
        return self._warm.run(None, {**feeds, "index": (at - at[0])[None]})[0][0]

    @property
    def codes_hash(self) -> str:
        """Hash of the weights that give codes their meaning (encoder and conditioner graphs),
        recorded in codes files. The decoder step (fp32 or int8) decodes the same codes, so it
        is left out and either engine accepts the other's files."""
        files = self.meta["files"]
        blob = "\n".join(f"{name}={files[name]}" for name in ("encoder.onnx", "conditioner.onnx"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

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
        """Mono float32 in [-1, 1] at the model's rate from ``[n]`` or ``[n, channels]`` at
        ``sr`` (default: the model's; integer PCM is scaled): `vqwavenet.audio.load_audio`'s
        checks and conversion, silence allowed. Raises `AudioError` (a ``ValueError``)."""
        sr = self.sample_rate if sr is None else sr
        return load_audio((sr, np.asarray(wav)), self.sample_rate, None, allow_silence=True)

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

        The bundled model's resynthesis of 20 held-out clips (``python -m
        benchmarks.resynth_quality``, README) scored as intelligibly as the unbroken decode
        with primed eighth-second segments (STOI +0.004 ± 0.009 fp32, +0.007 ± 0.010 int8)
        as with quarter-second ones (-0.005), and they decoded one file 1.5-1.6x faster at
        0.5-1 s, 1.3x at 2-4 s and 1.1-1.2x at 8 s (``benchmarks.decode_speed
        --compare-min-segment-s``): more rows, each generating 2000 + 480 samples instead of
        4000 + 480. From silence eighth-second segments scored 0.023 below it even with the
        960-sample burn-in they need, and were no faster."""
        if self._min_segment_s is not None:
            return max(1, round(self._min_segment_s * self.sample_rate))
        shortest = self.sample_rate // (8 if self.warmup == "primed" else 4)
        return max(shortest, self.context if self.warmup == "exact" else 0)

    @property
    def burn_in(self) -> int:
        """Samples a folded segment after the first generates and drops before its cross-fade:
        10 ms (160 at 16 kHz) from a primed start, 60 ms (960) from silence, unless
        ``Codec(burn_in=...)`` says otherwise.

        From silence (``warmup="steady"`` or ``"exact"``), teacher-forced, the bundled model
        forgets the start within ~320 samples, but sampled, a segment climbs to the loudness
        of an unbroken decode only over about 1000 (``benchmarks.fold_quality`` cannot see
        that; its samples are the true ones). Cross-fading into such a quiet start dips the
        loudness at every join: STOI of the resynthesis fell 0.048 ± 0.010 below the unbroken
        decode at quarter-second segments without a burn-in, 0.030 with 320 samples and 0.009
        with 960. From the primer's speech (``"primed"``) a segment starts at full loudness,
        and the short burn-in only drops the samples still shaped by the primer's unrelated
        past (README, ``benchmarks.resynth_quality``)."""
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
        progress: Callable[[int, int], None] | None = None,
        segment: int | None = None,
        overlap: int | None = None,
        burn_in: int | None = None,
    ) -> list[np.ndarray]:
        """Decode several utterances as one batch of folded segments (see the module doc)."""
        streams, cond, folds = self._plan(requests, segment, overlap, burn_in)
        results = self._run(streams, cond, progress)
        return [self._compose(f, results[f.first : f.first + len(f.bounds)], 0, f.n) for f in folds]

    def decode_stream(
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
        interval: float = 0.25,
        schedule: str = "playback",
    ) -> Iterator[np.ndarray]:
        """`decode`, yielding the waveform in consecutive chunks as soon as they are final.

        ``schedule="playback"`` (default) serves a listener. The file is cut into
        `min_segment` segments (not `auto_segment`'s), generated in waves of consecutive
        segments: the first `first_wave` segments, each next wave twice as many. Each wave is
        one chunk, generated while the earlier ones play, so a player can start on the first
        chunk and run without gaps where the engine is faster than real time (the
        ``stream_playback`` rows of ``benchmarks.generation``). One batch would make the
        listener wait for all of it.
        Small waves cost throughput (the last chunk of an 8 s ``small`` file comes 1.4-1.7x
        later), so once a wave takes longer than the audio it holds, the rest runs as one
        batch, and so do the codec's later playback streams (`decode`'s segments) until one
        of them runs at over twice real time.

        ``schedule="batch"`` runs `decode`'s schedule, so the chunks concatenate to exactly its
        output. The first segment's samples become final as they are generated, the others
        when the whole batch ends. The final prefix is polled every ``interval`` seconds and
        yielded when it grew.

        Either way a stream is reproducible for a seed. The waves generate the same segments
        from the same noise as one batch. In fp32 they give `decode`'s samples for the same
        ``segment`` (a row's products do not depend on the rows beside it). int8 quantises
        each product's input with one scale over its rows, so int8 samples depend on the
        batch.
        """
        if schedule not in ("playback", "batch"):
            raise ValueError(f"schedule must be 'playback' or 'batch', not {schedule!r}")
        req = DecodeRequest(codes, speaker, n_samples, seed)
        waves = schedule == "playback" and not self._waves_fell_behind
        if waves:
            segment = segment or self.min_segment
        streams, cond, (fold,) = self._plan([req], segment, overlap, burn_in)
        n, bounds = fold.n, fold.bounds
        live = _Live(len(streams))
        live.total = sum(self.context + s.length for s in streams)
        # Chunks end where waves end: a player that starts on a part of a wave stalls.
        marks: list[int] | None = [] if waves else None
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if marks is None:
                    started = time.perf_counter()
                    self._run(streams, cond, None, live=live)
                    if schedule == "playback" and not live.cancelled:  # do waves pay again?
                        fast = 2 * (time.perf_counter() - started) < n / self.sample_rate
                        self._waves_fell_behind = not fast
                    return
                lo, size = 0, max(1, self.first_wave)
                while lo < len(streams) and not live.cancelled:
                    hi = len(streams) if len(streams) - lo < 2 * size else lo + size
                    marks.append(bounds[hi][0] - fold.overlap if hi < len(streams) else n)
                    started = time.perf_counter()
                    self._run(streams, cond, None, live=live, order=range(lo, hi), spread=True)
                    seconds = (bounds[hi - 1][1] - bounds[lo][0]) / self.sample_rate
                    if time.perf_counter() - started > seconds:  # the listener overtakes
                        size = len(streams)  # waves: the rest as one batch, the fastest way
                        self._waves_fell_behind = True
                    lo, size = hi, 2 * size
            except BaseException as e:  # re-raised by the generator
                failure.append(e)

        worker = threading.Thread(target=run, name="vqwavenet-stream", daemon=True)
        worker.start()
        try:
            yield from self._poll(live, worker, failure, fold, progress, interval, marks)
        finally:  # also when the consumer stops early (closed generator): stop the workers
            live.cancelled = True  # they stop after their current call
            worker.join()  # before close() returns: a process may exit right after it

    def _poll(self, live, worker, failure, fold: _Fold, progress, interval, marks):
        """`decode_stream`'s loop: yield the final prefix whenever it grew (``marks=None``)
        or reached one of ``marks`` (sample counts, the last being ``n``; appended to as the
        work is planned)."""
        emitted, n = 0, fold.n
        while emitted < n:
            ended = not worker.is_alive()
            if failure:
                raise failure[0]
            with live.lock:
                produced = [live.produced(i) for i in range(len(live.results))]
                ready = self._final_prefix(fold, produced)
                if marks is not None:  # the last mark reached, if any passed since `emitted`
                    ready = max([emitted] + [m for m in marks if m <= ready])
                if ready > emitted:
                    segs = [live.view(i) for i in range(len(live.results))]
                    chunk = self._compose(fold, segs, emitted, ready)
            if progress is not None:
                progress(sum(live.done), live.total)
            if ready > emitted:
                emitted = ready
                yield chunk
            elif ended:
                raise RuntimeError("decoding stopped before the end of the audio")
            else:
                time.sleep(interval)

    def _plan(
        self,
        requests: Sequence[DecodeRequest],
        segment: int | None,
        overlap: int | None,
        burn_in: int | None,
    ) -> tuple[list[_Stream], np.ndarray, list[_Fold]]:
        """Validate the requests and cut them into streams.

        Returns (streams, conditioning rows of every request stacked, a `_Fold` per request)."""
        if segment is not None and segment < 1:
            raise ValueError("segment must be >= 1")
        overlap, burn_in = self._join(overlap, burn_in)
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
            fold = self._fold(n, segment, overlap, burn_in, len(streams))
            folds.append(fold)
            primed = self._start(len(fold.bounds), req.speaker)
            for k, (_, b) in enumerate(fold.bounds):
                g = fold.start(k)
                streams.append(
                    _Stream(
                        request=r,
                        tau0=self.geometry.pad_left + g - self.context,
                        length=b - g,
                        cond_offset=offset,
                        cond_count=len(cond),
                        seed=(int(req.seed), k),
                        steady=k > 0 and self.warmup == "steady",
                        primed=primed if k > 0 else None,
                    )
                )
            offset += len(cond)
        return streams, np.concatenate(conds), folds

    @staticmethod
    def _final_prefix(fold: _Fold, produced: Sequence[int]) -> int:
        """Samples of the waveform that no longer change, given how many samples each
        segment has generated."""
        for k, (a, b) in enumerate(fold.bounds):
            g = fold.start(k)
            if produced[k] < b - g:  # its head also finalises the previous segment's tail
                return max(g + produced[k], a - fold.overlap if k > 0 else 0)
        return fold.n

    def _compose(self, fold: _Fold, segs: Sequence[np.ndarray], lo: int, hi: int) -> np.ndarray:
        """Samples ``[lo, hi)`` of the waveform from its segments' classes (burn-in dropped,
        cross-faded with an equal-power sine ramp over ``overlap`` samples); ``segs[k]`` need
        only cover them."""
        out = np.zeros(hi - lo, dtype=np.float32)
        overlap = fold.overlap
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / max(overlap, 1))
        fade = np.sqrt(np.clip(1 - ramp**2, 0, 1))
        for k, (a, b) in enumerate(fold.bounds):
            g = fold.start(k)
            x0, x1 = max(a - overlap if k > 0 else 0, lo), min(b, hi)
            if x0 >= x1:
                continue
            x = np.arange(x0, x1)
            w = np.ones(x1 - x0)
            if k > 0:
                head = x < a
                w[head] = ramp[x[head] - (a - overlap)]
            if k + 1 < len(fold.bounds):
                tail = x >= b - overlap
                w[tail] = fade[x[tail] - (b - overlap)]
            out[x0 - lo : x1 - lo] += mulaw_decode(segs[k][x0 - g : x1 - g], self.q) * w
        return np.clip(out, -1.0, 1.0)

    def _start(self, n_segments: int, speaker: int | str) -> tuple[np.ndarray, int] | None:
        """The primed start of a fold's later segments (None: not primed, or one segment)."""
        if self.warmup != "primed" or n_segments < 2:
            return None
        return self._primed(self.speaker_index(speaker))

    def _join(self, overlap: int | None, burn_in: int | None) -> tuple[int, int]:
        """``(overlap, burn_in)`` of a call, the codec's defaults where ``None``."""
        overlap = self.hop if overlap is None else overlap
        burn_in = self.burn_in if burn_in is None else burn_in
        if overlap < 0 or burn_in < 0:
            raise ValueError("overlap and burn_in must be >= 0")
        return overlap, burn_in

    def _fold(self, n: int, segment: int, overlap: int, burn_in: int, first: int) -> _Fold:
        return _Fold(n, self._segments(n, segment, overlap, burn_in), overlap, burn_in, first)

    @staticmethod
    def _segments(n: int, segment: int, overlap: int, burn_in: int = 0) -> list[tuple[int, int]]:
        """Boundaries ``[a_k, b_k)`` of about ``n / segment`` segments, fewer where a segment
        would not be longer than its cross-fade and burn-in together."""
        k = max(1, round(n / segment))
        while k > 1 and n // k <= overlap + burn_in:
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

    def folded_nll(
        self,
        waves: Sequence[np.ndarray],
        speaker: int | str = 0,
        *,
        segment: int,
        overlap: int | None = None,
        burn_in: int | None = None,
    ) -> list[np.ndarray]:
        """What folding costs, teacher-forced: per utterance, the NLL ``[n]`` of each true
        sample under `decode`'s schedule. Segment ``k`` starts from silence at
        ``a_k - overlap - burn_in`` as in decoding, is then fed the true samples, and owns
        ``[a_k, b_k)``; compare with `teacher_forced` (full context) to see how long the model
        needs to recover from a segment start (``benchmarks/fold_quality.py``)."""
        overlap, burn_in = self._join(overlap, burn_in)
        zero = mulaw_encode(np.zeros(1), self.q)[0]
        conds, streams, folds, offset = [], [], [], 0
        for r, w in enumerate(waves):
            x = self.to_model_rate(w)
            left, right, n_frames = self.geometry.padding(len(x))
            padded = np.pad(x, (left, right))
            cond = self.condition(self.encode_padded(padded, n_frames), speaker)
            classes = mulaw_encode(padded, self.q)
            fold = self._fold(len(x), segment, overlap, burn_in, len(streams))
            folds.append(fold)
            primed = self._start(len(fold.bounds), speaker)
            for k, (_, b) in enumerate(fold.bounds):
                g = fold.start(k)
                true_prev = classes[left + g : left + b - 1]  # samples g .. b-2 feed g+1 .. b-1
                first = np.full(self.context + 1, zero)  # warm-up inputs, then the first one
                if k > 0 and primed is not None:
                    first[-1] = primed[1]
                streams.append(
                    _Stream(
                        request=r,
                        tau0=left + g - self.context,
                        length=b - g,
                        cond_offset=offset,
                        cond_count=len(cond),
                        seed=(0, r),
                        forced=np.concatenate([first, true_prev]),
                        steady=k > 0 and self.warmup == "steady",
                        primed=primed if k > 0 else None,
                        targets=classes[left + g : left + b],
                    )
                )
            conds.append(cond)
            offset += len(cond)
        nll = self._run(streams, np.concatenate(conds), None)
        outs = []
        for f in folds:
            owned = [nll[f.first + k][a - f.start(k) :] for k, (a, _) in enumerate(f.bounds)]
            outs.append(np.concatenate(owned))
        return outs

    def cross_entropy(self, waves: Sequence[np.ndarray], speaker: int | str = 0) -> float:
        """Teacher-forced cross-entropy (nats/sample) over all samples of the utterances."""
        nll = self.teacher_forced(waves, speaker, logits=False)
        return float(np.concatenate(nll).astype(np.float64).mean())

    # --- the generation engine ----------------------------------------------------------------

    def _run(
        self,
        streams: list[_Stream],
        cond: np.ndarray,
        progress,
        *,
        live: _Live | None = None,
        order: Sequence[int] | None = None,
        spread: bool = False,
    ) -> list[np.ndarray]:
        """Run the streams ``order`` (default: all), split between worker threads; results in
        stream order.

        Workers take streams round-robin in order (so the first segments of a file come
        first, for `decode_stream`); each owns a queue and a batch of at most `max_rows` rows,
        and a row that finishes its stream takes the next one from its queue. ``spread``: use
        every worker however few the streams (latency over throughput, see the class)."""
        order = list(range(len(streams))) if order is None else list(order)
        workers = self.workers_for(len(order), spread)
        groups = [g for g in (order[w::workers] for w in range(workers)) if g]
        if live is None:
            live = _Live(len(streams))
            live.total = sum(self.context + s.length for s in streams)
        first = len(live.done)  # a live record may span several calls (`decode_stream`)
        live.done.extend([0] * len(groups))
        errors: list[BaseException] = []

        def work(w: int) -> None:
            try:
                self._run_group(streams, groups[w], cond, live, first + w, w)
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)

        threads = [
            threading.Thread(target=work, args=(w,), name=f"vqwavenet-worker{w}", daemon=True)
            for w in range(1, len(groups))
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
                progress(sum(live.done), live.total)
                time.sleep(0.25)
            progress(live.total, live.total)
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return list(live.results)

    def workers_for(self, n_streams: int, spread: bool = False) -> int:
        """Worker threads that run ``n_streams`` streams: a second one from
        `streams_per_worker` each (see the class), or whenever there are two with ``spread``."""
        fill = 1 if spread else self.streams_per_worker
        return max(1, min(self.workers, n_streams // fill))

    def _steady(self, cond_rows: np.ndarray, zero_class: int) -> np.ndarray:
        """Every layer's input after endless silence under each of ``cond_rows``
        ``[n, L * 2G]``: constant in time, so a fixed point of the step with each tap fed the
        layer's own input (the rings hold it in every slot). Layer ``i``'s input depends on
        the layers below it only, so ``L`` step calls, each feeding back the last one's
        inputs, reach it. Returns ``[n, L, R]``."""
        names = step_names(self.n_layers, self.kernel)
        n, r = len(cond_rows), self.residual_channels
        conds = cond_rows.reshape(n, self.n_layers, -1).transpose(1, 0, 2)
        fixed = {"prev": np.full(n, zero_class), "noise": np.zeros(n, np.float32)}
        fixed |= {f"cond.{i}": np.ascontiguousarray(c) for i, c in enumerate(conds)}
        x = np.zeros((self.n_layers, n, r), dtype=np.float32)
        for _ in range(self.n_layers):
            taps = {name: x[i] for name, (i, *_rest) in zip(names["inputs"][2:], self._taps)}
            x = np.stack(self._step.run(names["outputs"][2:], {**fixed, **taps}))
        return x.transpose(1, 0, 2)

    def _take_batch(self, rows: int, logits: bool, lane: int = 0) -> _StepBatch:
        """A step batch for ``rows`` rows: an idle one from an earlier call where one fits
        (preferring one bound for the same row count), else a new one of exactly ``rows``
        (room for more rows spaces the ring slots further apart, which made a ``default``
        decode 5 % slower).

        Reuse saves what a new batch costs before its first useful step: faulting in its
        ring pages (about 0.2 s per 200 MB here) and one binding per step phase (0.07 ms
        each, 520 phases at ``small``); repeated 2 s decodes at ``small`` took 9 % less
        time. A batch belongs to one step session, worker ``lane``'s; the largest idle batch
        of each session is kept, so a process holds the rings of its largest recent calls
        (`release_buffers` frees them)."""
        session = self._steps[lane % len(self._steps)]
        with self._batches_lock:
            fits = [
                b
                for b in self._batches
                if (b.logits is not None) == logits and b.capacity >= rows and b.session is session
            ]
            if fits:
                batch = min(fits, key=lambda b: (rows not in b._bound, b.capacity))
                self._batches.remove(batch)
            else:
                batch = None
        if batch is None:
            batch = _StepBatch(self, rows, logits=logits, session=session)
        batch.reset(rows)
        return batch

    def _give_batch(self, batch: _StepBatch) -> None:
        with self._batches_lock:
            largest: dict[int, _StepBatch] = {}  # per session
            for b in sorted([*self._batches, batch], key=lambda b: -b.capacity):
                largest.setdefault(id(b.session), b)
            self._batches = list(largest.values())

    def release_buffers(self) -> None:
        """Free the ring buffers kept between calls (the next call allocates new ones)."""
        with self._batches_lock:
            self._batches.clear()

    def _run_group(
        self,
        streams: list[_Stream],
        queue: list[int],
        cond: np.ndarray,
        live: _Live,
        worker: int,
        lane: int = 0,
    ) -> None:
        """The step loop of one worker (``lane``: its thread in this call, which picks its step
        session): rows in lockstep, each at its own stream's local step ``l`` (``l <
        context``: warm-up on zero input; then one output per step)."""
        forced = streams[queue[0]].forced is not None
        batch = self._take_batch(min(len(queue), self.max_rows), forced, lane)
        try:
            self._step_loop(streams, queue, cond, live, worker, batch)
        finally:
            self._give_batch(batch)

    def _step_loop(self, streams, queue, cond, live, worker: int, batch: _StepBatch) -> None:
        """`_run_group`'s loop over the batch it took."""
        ctx = self.context
        forced = batch.logits is not None  # teacher forcing, as `_run_group` took it
        want_nll = forced and streams[queue[0]].targets is not None
        steps = ctx + max(streams[i].length for i in queue)
        rows = _Rows(batch.m, steps, ctx, forced, want_nll, self.q)
        zero_class = mulaw_encode(np.zeros(1), self.q)[0]
        pending = iter(queue)
        left = len(queue)  # streams not yet loaded

        def load(targets: Sequence[int], at: int) -> None:
            """Give each row of ``targets`` the next queued stream (or none), from step
            ``at``; rows that start from steady rings get them in one batched call."""
            nonlocal left
            steady = []
            for row in targets:
                i = next(pending, None)
                rows.sid[row] = -1 if i is None else i
                if i is None:
                    continue
                left -= 1
                st = streams[i]
                n = ctx + st.length
                idx = self.geometry.cond_index(st.tau0 + np.arange(n)) + st.cond_offset
                lo, hi = st.cond_offset, st.cond_offset + st.cond_count - 1
                rows.cidx[row, :n] = np.clip(idx, lo, hi)
                rows.noise[row, :n] = np.random.default_rng(st.seed).random(n, dtype=np.float32)
                if forced:
                    rows.prev[row, :n] = st.forced
                if want_nll:
                    rows.targets[row, : st.length] = st.targets
                rows.start[row], rows.last[row], batch.prev[row] = at, n - 1, zero_class
                if st.primed is not None:  # `Codec._primed`: after the primer's speech
                    place(row, at, st.primed[0])
                    batch.prev[row] = st.primed[1]
                elif st.steady:  # endless silence under the first conditioning row
                    steady.append(row)
                elif self.parallel_warmup:  # the warm-up steps, computed in parallel
                    prev = rows.prev[row, :ctx] if forced else np.full(ctx, zero_class)
                    place(row, at, self._warm_rings(prev, cond, rows.cidx[row, :ctx]))
            if steady:  # fill their rings with each layer's constant input
                x = self._steady(cond[rows.cidx[steady, ctx]], zero_class)
                for i, (offset, size) in enumerate(self._writes):
                    batch.store[offset : offset + size, steady] = x[:, i]
                rows.start[steady] = at - ctx
                live.done[worker] += ctx * len(steady)

        def place(row: int, at: int, state: np.ndarray) -> None:
            """Start ``row`` at its local step ``ctx`` from the rings ``state``."""
            offset, lag, size = self._state_layout
            batch.store[offset + (at - lag) % size, row] = state
            rows.start[row] = at - ctx
            live.done[worker] += ctx

        load(range(batch.m), 0)
        s = 0
        while (rows.sid >= 0).any() and not live.cancelled:
            busy = rows.sid >= 0
            end = int((rows.start + rows.last)[busy].min())  # the first row to finish, its step
            mark = -(-s // _BLOCK) * _BLOCK  # blocks end after steps divisible by _BLOCK
            k = self._block(batch, rows, cond, s, min(end, mark) - s + 1, busy, live)
            live.done[worker] += int(busy.sum()) * k
            s += k
            ending = np.flatnonzero(busy & (rows.start + rows.last == s - 1))
            with live.lock:
                for row in ending:
                    i = rows.sid[row]
                    live.results[i] = rows.out[row, : streams[i].length].copy()
                    live.partial[i] = None
                load(ending, s)
                if left == 0 and 0 < (rows.sid >= 0).sum() <= batch.m // 2:
                    keep = np.flatnonzero(rows.sid >= 0)  # idle rows would still compute
                    batch.keep(keep)
                    rows.keep(keep)
                for row in np.flatnonzero(rows.sid >= 0):  # produced: 0 until warm
                    produced = max(0, s - rows.start[row] - ctx)
                    live.partial[rows.sid[row]] = (rows.out[row], produced)

    def _block(self, batch, rows, cond, s, k, busy, live) -> int:
        """Steps ``s .. s + k - 1`` of `_step_loop`, in which no row ends before the last:
        every row's inputs for them (noise, teacher-forced classes, conditioning changes) are
        gathered up front and its outputs scattered after, so a step costs onnxruntime's call
        and a few copies. A one-row ``small`` decode took 0.140 ms a step instead of 0.166 with
        the bookkeeping done step by step (the bare call: 0.125); one 8 s fp32 file on two
        workers, 8-10 % less time. Returns the steps run (fewer once the call is cancelled)."""
        ctx, m, n_layers = self.context, batch.m, self.n_layers
        every = np.arange(m)[:, None]
        local = np.where(busy, s - rows.start, 0)[:, None] + np.arange(k)  # [m, k]
        local[~busy] = 0  # idle rows read their first (unused) inputs
        gen = busy[:, None] & (local >= ctx)  # rows whose output at that step is a sample
        noise = rows.noise[every, local].T.copy()  # [k, m]: one contiguous row per step
        ci = rows.cidx[every, local]
        change = busy[:, None] & (ci != np.concatenate([rows.crow[:, None], ci[:, :-1]], 1))
        changes = {j: np.flatnonzero(change[:, j]) for j in np.flatnonzero(change.any(0))}
        rows.crow[busy] = ci[busy, -1]
        forced, nll = batch.logits is not None, rows.targets is not None
        if forced:
            prev = rows.prev[every, local].T.copy()
        if nll:
            targets = rows.targets[every, np.maximum(local - ctx, 0)].T.copy()
        if not forced:  # draws feed back to generating rows only: warm-up rows keep silence,
            feed = gen.T.copy()  # idle ones their last input (int8 scales span every row)
        out = np.zeros((k, m, self.q) if forced and not nll else (k, m), dtype=rows.out.dtype)
        noise_in, prev_in, drawn = batch.noise[:m], batch.prev[:m], batch.sample[:m]
        for j in range(k):
            if live.cancelled:
                return j
            changed = changes.get(j)
            if changed is not None:  # once per hop per row
                rows_cond = cond[ci[changed, j]].reshape(len(changed), n_layers, -1)
                batch.cond[:, changed] = rows_cond.transpose(1, 0, 2)
            noise_in[:] = noise[j]
            if forced:
                prev_in[:] = prev[j]
            batch.run(s + j)
            if nll:
                x = batch.logits[:m]
                mx = x.max(1, keepdims=True)
                lse = np.log(np.exp(x - mx).sum(1)) + mx[:, 0]
                out[j] = lse - x[every[:, 0], targets[j]]
            elif forced:
                out[j] = batch.logits[:m]
            else:
                out[j] = drawn
                np.copyto(prev_in, drawn, where=feed[j])
        r, j = np.nonzero(gen)
        rows.out[r, local[r, j] - ctx] = out[j, r]
        return k
