"""The step machinery: ring buffers, onnxruntime I/O bindings, and the scheduler that runs the
streams of every request in shared step batches.

Decoding runs one ``decoder_step.onnx`` call per sample for a batch of streams (`Stream`). Each
layer keeps a ring buffer of its past inputs in numpy; the step graph takes one tensor per tap
and writes one per layer, so every tap is bound to the ring slot it reads and every output to
the slot it overwrites (`StepBatch`), and no step copies the rings. Each ring is longer than it
must hold, so the slot a step writes is never one it reads, and all ring sizes divide one
period (`ring_layout`), so the bindings depend only on the step modulo the period and are built
once.

`Scheduler` runs requests (a `Job`: the streams of one call and the conditioning they read) on
the engine's worker threads, each with its own step session and one intra-op thread, and each
running its batch of rows in lockstep. Rows are shared between requests (continuous batching):
at every block boundary a worker frees the rows of finished and cancelled streams and gives
free rows to the queued streams of earliest deadline over all requests, up to `max_rows` rows
per worker; a draining batch drops its idle rows. The bookkeeping is done in blocks of at most
`BLOCK` steps (a block's inputs are gathered before it and its outputs scattered after), so a
step costs the onnxruntime call and a few copies. A row's values never depend on the rows
beside it in fp32 (and in int8 with per-row activation scales), so a request decodes to the
same samples whoever shares its batch.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model.geometry import CodecGeometry
from vqwavenet.audio import mulaw_encode
from vqwavenet.model_dir import StepSpec, step_names


def ring_layout(needs: Sequence[int]) -> tuple[int, list[int]]:
    """Period and ring sizes for layers that must keep ``needs[i]`` past inputs.

    Each ring is longer than it needs, so the slot a step writes is never one it reads (both
    are bound to the same step call); all sizes divide one period, so the bindings of a step
    depend only on the step modulo the period and are built once. Both the ring memory (the
    sum of the sizes) and the bindings to build (the period) grow with the period, so the one
    with the least of their sum is taken, rather than the smallest period that always works
    (every ring half again its need)."""

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


@dataclass
class Stream:
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
    steady: bool = False  # start from `StepEngine.steady` rings instead of the exact warm-up
    primed: tuple[np.ndarray, int] | None = None  # start from these rings and input class
    at: float = 0.0  # seconds into its utterance where its output starts (`Job.deadline`)


class Live:
    """What the workers publish about one request while they run, for `Codec.decode_stream`:
    finished streams' outputs, running streams' outputs with their produced counts, and the
    steps done. ``lock`` is a condition the workers notify whenever they publish."""

    def __init__(self, n_streams: int):
        self.lock = threading.Condition()
        self.results: list[np.ndarray | None] = [None] * n_streams
        self.partial: list[tuple[np.ndarray, int] | None] = [None] * n_streams
        self.done: list[int] = [0]  # steps done (a list: `sum(live.done)` is the count)
        self.total = 1
        self.cancelled = False  # set when the consumer goes away: its rows are freed

    def produced(self, i: int) -> int:
        if self.results[i] is not None:
            return len(self.results[i])
        return self.partial[i][1] if self.partial[i] is not None else 0

    def view(self, i: int) -> np.ndarray:
        if self.results[i] is not None:
            return self.results[i]
        return self.partial[i][0] if self.partial[i] is not None else np.zeros(0, np.int64)


class Busy(RuntimeError):
    """The engine holds as many requests as it admits (`StepEngine.max_requests`): the request
    is refused at once rather than queued without bound; try again shortly."""


class Job:
    """One call's streams in a `Scheduler`: the streams, the conditioning rows they read
    (``cond``; each stream its range ``[cond_offset, cond_offset + cond_count)``), the `Live`
    record the workers publish to, and at most ``limit`` rows at once (``None``: no cap
    beyond the workers' own).

    Streams queue by deadline: the job's arrival plus the stream's `Stream.at`, the moment a
    listener who started at the arrival would need the stream's audio. Earliest deadline first
    over all jobs interleaves requests by playback position, so a short request that arrives
    behind a long one is not kept waiting for the long one's later segments, and a deadline
    never moves, so every queued stream is reached (no starvation)."""

    def __init__(
        self,
        streams: Sequence[Stream],
        cond: np.ndarray,
        live: Live,
        *,
        limit: int | None = None,
        arrival: float | None = None,
    ):
        if limit is not None and limit < 1:
            raise ValueError("a job's row limit must be >= 1")
        self.streams, self.cond, self.live = list(streams), cond, live
        self.limit = limit
        self.arrival = arrival
        self.pending = deque(sorted(range(len(self.streams)), key=lambda i: self.streams[i].at))
        self.rows = 0  # rows it holds, over every worker
        self.left = len(self.streams)  # streams not finished
        self.error: BaseException | None = None
        self.done = threading.Event()  # finished, failed or cancelled, and holding no row
        self.finished = False  # (under the scheduler's lock) `done` is about to be set
        self.seq = 0
        self.scheduler: Scheduler | None = None

    def deadline(self, i: int) -> float:
        return self.arrival + self.streams[i].at

    @property
    def room(self) -> int:
        """Queued streams it may start now (its limit less the rows it holds)."""
        if self.live.cancelled:
            return 0
        cap = len(self.pending) if self.limit is None else self.limit - self.rows
        return max(0, min(len(self.pending), cap))


class Track:
    """A stream running in a row: its inputs per local step (conditioning row, noise,
    teacher-forced classes), its outputs, and the global step of its local step 0."""

    __slots__ = ("job", "index", "n", "start", "cidx", "noise", "prev", "targets", "out", "credit")

    def __init__(self, job: Job, index: int, n: int, start: int):
        self.job, self.index, self.n, self.start = job, index, n, start
        self.cidx = self.noise = self.prev = self.targets = self.out = None
        self.credit = 0  # steps done outside blocks (a placed warm-up), reported at a boundary


BLOCK = 128  # steps between the bookkeeping of rows and streams, at most
KEEP_ROW_COUNTS = 8  # binding sets a step batch keeps, one per row count
# Row counts a batch runs: powers of two and three times them. A batch whose rows come and go
# runs the next count up (idle rows compute too), so it steps through a few counts whose
# bindings it keeps, rather than binding every step phase again at every count.
ROW_COUNTS = sorted({2**i for i in range(16)} | {3 * 2**i for i in range(15)})


def row_count(rows: int) -> int:
    """The smallest of `ROW_COUNTS` at least ``rows`` (``rows`` itself beyond them)."""
    i = bisect.bisect_left(ROW_COUNTS, rows)
    return ROW_COUNTS[i] if i < len(ROW_COUNTS) else rows


class StepBatch:
    """One worker's step call: the ring store, the conditioning, input and output buffers, and
    one onnxruntime binding per step phase (built on first use) that points each tap at its
    ring slot and each layer's output at the slot it overwrites. Rows ``[0, m)`` take part;
    `resize` adds rows up to `capacity`, `keep` drops idle rows so that a draining batch stops
    computing them."""

    def __init__(
        self, engine: StepEngine, rows: int, *, logits: bool, session: ort.InferenceSession
    ):
        self.engine, self.m, self.session = engine, rows, session
        r, width = engine.residual_channels, 2 * engine.gate_channels
        # One spare row per slot keeps slots off power-of-two spacing (probably 4K aliasing of
        # a tap's reads against the output's writes, which slowed large decodes).
        self.store = np.zeros((engine.ring_slots, rows + 1, r), dtype=np.float32)[:, :rows]
        self.cond = np.zeros((engine.n_layers, rows, width), dtype=np.float32)
        self.prev = np.zeros(rows, dtype=np.int64)
        self.noise = np.zeros(rows, dtype=np.float32)
        self.sample = np.zeros(rows, dtype=np.int64)
        self.logits = np.zeros((rows, engine.q), dtype=np.float32) if logits else None
        # Bindings per row count: views of rows [0, m) stay valid for the batch's life, so a
        # count seen before (a call of the size the batch was made for, after draining to
        # fewer rows) binds no phase again. The most recent `KEEP_ROW_COUNTS` are kept.
        self._bound: dict[int, tuple[dict, dict, dict]] = {}
        self._use(rows)

    def run(self, s: int) -> None:
        """One step at global step ``s``: reads the taps of ``s``, writes its inputs."""
        phase = s % self.engine.period
        binding = self._bindings.get(phase)
        if binding is None:
            binding = self._bindings[phase] = self.bind(phase)
        self.session.run_with_iobinding(binding)

    @property
    def capacity(self) -> int:
        return self.store.shape[1]

    def reset(self, rows: int) -> None:
        """Run rows ``[0, rows)`` (at most `capacity`) for a new call. The rings keep the
        last call's values: every row is loaded before it is read, and a row's ring slots
        are read only after they are written or as the lags its start fills."""
        self._use(rows)

    def has_bindings(self, rows: int) -> bool:
        """Whether the batch keeps bindings for ``rows`` rows (reusing it binds less)."""
        return rows in self._bound

    def _use(self, rows: int) -> None:
        """Make ``rows`` the row count that steps run, with its bindings (built on use)."""
        self.m = rows
        if rows not in self._bound:
            self._bound[rows] = ({}, {}, {})
            while len(self._bound) > KEEP_ROW_COUNTS:
                del self._bound[next(iter(self._bound))]  # the oldest
        self._bindings, self._slots, self._fixed = self._bound[rows]

    def resize(self, rows: int) -> None:
        """Run rows ``[0, rows)`` (at most `capacity`) from now on."""
        self._use(rows)

    def clear(self, lo: int, hi: int, zero_class: int) -> None:
        """Zero rows ``[lo, hi)``'s rings and conditioning and give them the zero class as
        input: idle rows that join the steps then carry no stale or non-finite value (which
        int8 with one activation scale per call would spread to every row)."""
        self.store[:, lo:hi] = 0
        self.cond[:, lo:hi] = 0
        self.prev[lo:hi] = zero_class

    def copy_rows(self, other: StepBatch) -> None:
        """Take ``other``'s rows ``[0, other.m)`` (rings, conditioning, inputs) into rows
        ``[0, other.m)``: a batch that outgrew its capacity moves to a larger one."""
        m = other.m
        self.store[:, :m] = other.store[:, :m]
        self.cond[:, :m] = other.cond[:, :m]
        self.prev[:m] = other.prev[:m]

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
            value = self._slots[k] = ortvalue(self.store[k, : self.m])
        return value

    def bind(self, phase: int) -> ort.IOBinding:
        engine, m = self.engine, self.m
        if not self._fixed:  # the buffers every phase binds
            fixed = {"prev": self.prev[:m], "noise": self.noise[:m]}
            fixed |= {f"cond.{i}": self.cond[i, :m] for i in range(engine.n_layers)}
            fixed["sample"] = self.sample[:m]
            if self.logits is not None:
                fixed["logits"] = self.logits[:m]
            self._fixed.update({name: ortvalue(array) for name, array in fixed.items()})
        binding = self.session.io_binding()
        for name, value in self._fixed.items():
            if name in ("sample", "logits"):
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        names = step_names(engine.n_layers, engine.kernel)
        for name, (_, j, offset, size, d) in zip(names["inputs"][2:], engine.taps):
            binding.bind_ortvalue_input(name, self._slot(offset + (phase - j * d) % size))
        for i, (offset, size) in enumerate(engine.writes):
            binding.bind_ortvalue_output(f"current.{i}", self._slot(offset + phase % size))
        return binding


def ortvalue(array: np.ndarray) -> ort.OrtValue:
    """An `OrtValue` over a contiguous array's memory (no copy, the array must outlive it)."""
    if not array.flags.c_contiguous:
        raise ValueError("bound arrays must be contiguous")
    return ort.OrtValue.ortvalue_from_numpy(array)


def make_session(path: str | Path, threads: int) -> ort.InferenceSession:
    """A CPU onnxruntime session with ``threads`` intra-op threads and full optimisation."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class StepEngine:
    """Runs streams through the decoder step graph on worker threads (see the module doc).

    Args:
        spec: the decoder step's shape (`StepSpec`).
        geometry: the codec geometry (which conditioning row each step reads).
        q: mu-law classes.
        step_path: the step graph (fp32 or int8).
        warm_path: the warm-up graph, which computes a stream's rings after its zero-input
            warm-up in one parallel call.
        workers: worker threads, each with its own step session (two threads sharing one
            session ran erratically in int8, probably through the shared memory arena).

    Free-running streams (decoding) of every call go through one shared `Scheduler`, so
    concurrent calls share step batches; teacher-forced ones (scoring) run on a scheduler of
    their own per call.
    """

    # A second worker starts from this many streams.
    streams_per_worker: int = 1
    # Rows per worker; more streams wait in the queue. Its rings take rows x R floats per slot.
    max_rows: int = 128
    # Requests the shared scheduler holds at once (running or waiting for rows); one more is
    # refused with `Busy`. Each holds its conditioning (L x 2G floats per frame) until it ends.
    max_requests: int = 16

    def __init__(
        self,
        spec: StepSpec,
        geometry: CodecGeometry,
        q: int,
        step_path: Path,
        warm_path: Path,
        workers: int,
    ):
        self.spec, self.geometry, self.q = spec, geometry, q
        self.n_layers, self.kernel = spec.n_layers, spec.kernel_size
        self.residual_channels, self.gate_channels = spec.residual_channels, spec.gate_channels
        self.context = geometry.wavenet_context
        self.workers = workers
        self.sessions = [make_session(step_path, 1) for _ in range(workers)]
        self.warm_path = Path(warm_path)
        self.warm = make_session(warm_path, 1)
        # Off (tests): step through the warm-up instead, the reference the warm-up graph equals.
        self.parallel_warmup = True
        self.batches: list[StepBatch] = []  # idle step batches, see `_take_batch`
        self._batches_lock = threading.Lock()
        needs = [(self.kernel - 1) * d for d in spec.dilations]
        self.period, sizes = ring_layout(needs)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.ring_slots = int(sum(sizes))
        # (layer, lag multiple j, ring offset, ring size, dilation), in the graph's input order
        self.taps = [
            (i, j, int(offsets[i]), sizes[i], d)
            for i, d in enumerate(spec.dilations)
            for j in range(self.kernel - 1, 0, -1)
        ]
        self.writes = [(int(offsets[i]), sizes[i]) for i in range(self.n_layers)]
        self.state_layout = (  # per row of a warm state: ring offset, lag behind the start, size
            np.repeat(offsets, needs),
            np.concatenate([np.arange(n, 0, -1) for n in needs]),
            np.repeat(sizes, needs),
        )
        self.zero_class = int(mulaw_encode(np.zeros(1), q)[0])
        self.scheduler = Scheduler(self, logits=False, shared=True)

    # --- calls ----------------------------------------------------------------------------------

    def submit(
        self,
        streams: Sequence[Stream],
        cond: np.ndarray,
        live: Live | None = None,
        *,
        limit: int | None = None,
        arrival: float | None = None,
    ) -> Job:
        """Queue the streams of one call and return its `Job` at once; `wait` for it (or
        `cancel` it, then `wait`). Free-running streams join the shared scheduler (raises
        `Busy` when it holds `max_requests` requests); teacher-forced ones get a scheduler of
        their own. ``limit``: rows the call may hold at once; ``arrival``: the time its
        deadlines count from (default: now, on ``time.monotonic``'s clock)."""
        if live is None:
            live = Live(len(streams))
            live.total = sum(self.context + s.length for s in streams)
        job = Job(streams, cond, live, limit=limit, arrival=arrival)
        forced = bool(streams) and streams[0].forced is not None
        scheduler = Scheduler(self, logits=True, shared=False) if forced else self.scheduler
        scheduler.submit(job)
        return job

    def wait(self, job: Job, progress=None) -> list[np.ndarray]:
        """The outputs of ``job``'s streams once it ends, in stream order; ``progress(done,
        total)`` is called from this thread meanwhile. An exception (from ``progress`` too)
        cancels the job; returns once its rows are free and the workers it leaves idle have
        stopped."""
        live = job.live
        try:
            if progress is None:
                job.done.wait()
            else:
                while not job.done.wait(0.25):
                    with live.lock:
                        done = sum(live.done)
                    progress(done, live.total)
                if job.error is None and not live.cancelled:
                    progress(live.total, live.total)
        except BaseException:
            self.cancel(job)
            raise
        finally:
            job.scheduler.settle(job)
        if job.error is not None:
            raise job.error
        if live.cancelled:
            raise RuntimeError("decoding was cancelled")
        return list(live.results)

    def cancel(self, job: Job) -> None:
        """Stop ``job``: its queued streams never start and its rows are freed at their
        workers' next step (`wait` returns once they are)."""
        job.scheduler.cancel(job)

    def run(
        self, streams: list[Stream], cond: np.ndarray, progress, *, live: Live | None = None
    ) -> list[np.ndarray]:
        """Run the streams and return their outputs in stream order (`submit`, then
        `wait`)."""
        return self.wait(self.submit(streams, cond, live), progress)

    def workers_for(self, n_streams: int, spread: bool = False) -> int:
        """Worker threads that run ``n_streams`` streams: a second one from
        `streams_per_worker` each, or whenever there are two with ``spread``."""
        fill = 1 if spread else self.streams_per_worker
        return max(1, min(self.workers, n_streams // fill))

    # --- starts ---------------------------------------------------------------------------------

    def steady(self, cond_rows: np.ndarray, zero_class: int) -> np.ndarray:
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
            taps = {name: x[i] for name, (i, *_rest) in zip(names["inputs"][2:], self.taps)}
            x = np.stack(self.sessions[0].run(names["outputs"][2:], {**fixed, **taps}))
        return x.transpose(1, 0, 2)

    def warm_rings(self, prev: np.ndarray, cond: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The rings after ``context`` steps fed the classes ``prev`` under the conditioning
        rows ``cond[at]``, computed in parallel (one `decoder_warmup.onnx` call)."""
        feeds = {"prev": prev[None], "cond": cond[at[0] : at[-1] + 1][None]}
        return self.warm.run(None, {**feeds, "index": (at - at[0])[None]})[0][0]

    # --- step batches ---------------------------------------------------------------------------

    def _take_batch(self, rows: int, logits: bool, lane: int = 0) -> StepBatch:
        """A step batch for ``rows`` rows: an idle one from an earlier call where one fits
        (preferring one bound for the same row count), else a new one of exactly ``rows``
        (room for more rows spaces the ring slots further apart, which slows every step).

        Reuse saves what a new batch costs before its first useful step: faulting in its
        ring pages and one binding per step phase. A batch belongs to one step session,
        worker ``lane``'s; the largest idle batch of each session is kept, so a process holds
        the rings of its largest recent calls (`release_buffers` frees them)."""
        session = self.sessions[lane % len(self.sessions)]
        with self._batches_lock:
            fits = [
                b
                for b in self.batches
                if (b.logits is not None) == logits and b.capacity >= rows and b.session is session
            ]
            if fits:
                batch = min(fits, key=lambda b: (not b.has_bindings(rows), b.capacity))
                self.batches.remove(batch)
            else:
                batch = None
        if batch is None:
            batch = StepBatch(self, rows, logits=logits, session=session)
        batch.reset(rows)
        return batch

    def _give_batch(self, batch: StepBatch) -> None:
        with self._batches_lock:
            largest: dict[int, StepBatch] = {}  # per session
            for b in sorted([*self.batches, batch], key=lambda b: -b.capacity):
                largest.setdefault(id(b.session), b)
            self.batches = list(largest.values())

    def release_buffers(self) -> None:
        """Free the ring buffers kept between calls (the next call allocates new ones)."""
        with self._batches_lock:
            self.batches.clear()


class Scheduler:
    """Runs `Job`s on the engine's worker threads in shared step batches (see the module doc).

    Each worker owns one batch on its own step session and loops. At a block boundary, under
    the scheduler's lock, it records the streams that ended, frees the rows of finished and
    cancelled ones, and admits queued streams into free rows: earliest deadline first over all
    jobs (`Job.deadline`), each job within its row limit, each worker up to its share of the
    rows busy and admissible over all workers (split evenly between `StepEngine.workers_for`
    of them, at most `StepEngine.max_rows`). Then, without the lock, it loads the new streams
    and runs the next block, which ends early when a job arrives or is cancelled. A worker
    left with no row gives its batch back and stops; the next submission starts it again.

    ``logits``: the batches return logits (teacher forcing); ``shared``: the engine's one
    scheduler, which holds at most `StepEngine.max_requests` jobs at once.
    """

    def __init__(self, engine: StepEngine, *, logits: bool, shared: bool):
        self.engine, self.logits, self.shared = engine, logits, shared
        self.lock = threading.Lock()
        self.jobs: list[Job] = []  # submitted and not finished, in arrival order
        self.threads: list[threading.Thread | None] = [None] * engine.workers
        self.busy = [0] * engine.workers  # rows each worker holds
        self.exiting: list[threading.Thread] = []  # stopped workers, for `settle` to join
        self.interrupts = 0  # arrivals and cancellations so far: a running block ends early
        self._seq = itertools.count()

    # --- jobs -----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.shared and len(self.jobs) >= self.engine.max_requests:
                raise Busy(
                    f"the decoder is busy: {len(self.jobs)} requests are running or waiting, "
                    f"the most it takes at once; try again shortly"
                )
            job.scheduler = self
            job.seq = next(self._seq)
            if job.arrival is None:
                job.arrival = time.monotonic()
            if not job.pending:
                job.finished = True
                job.done.set()
                return
            self.jobs.append(job)
            self.interrupts += 1
            self._start_workers()

    def cancel(self, job: Job) -> None:
        signal: list[Job] = []
        with self.lock:
            if job.finished:
                return
            job.live.cancelled = True
            job.pending.clear()
            self.interrupts += 1
            if job.rows == 0:
                self._finish(job, signal)
            self._signal(signal)

    def settle(self, job: Job) -> None:
        """Wait until ``job`` holds no row, then for the workers that stopped meanwhile (a
        caller may exit the process next; a worker inside onnxruntime then aborts it)."""
        job.done.wait()
        me = threading.current_thread()
        with self.lock:
            self.exiting = [t for t in self.exiting if t.is_alive()]
            stopping = [t for t in self.exiting if t is not me]
        for t in stopping:
            t.join()

    def _finish(self, job: Job, signal: list[Job]) -> None:
        job.finished = True
        self.jobs.remove(job)
        signal.append(job)

    def _fail(self, job: Job, error: BaseException, signal: list[Job]) -> None:
        """``job`` cannot go on: its error is raised to its caller, its rows are freed."""
        if job.error is None:
            job.error = error
        job.live.cancelled = True
        job.pending.clear()
        self.interrupts += 1
        if job.rows == 0 and not job.finished:
            self._finish(job, signal)

    @staticmethod
    def _signal(jobs: list[Job]) -> None:
        for job in jobs:
            job.done.set()
            with job.live.lock:
                job.live.lock.notify_all()

    def _start_workers(self) -> None:
        """Start the stopped workers that the rows busy and admissible call for."""
        demand = sum(self.busy) + sum(job.room for job in self.jobs)
        if demand == 0:
            return
        for w in range(self.engine.workers_for(demand)):
            if self.threads[w] is None:
                thread = threading.Thread(
                    target=self._work, args=(w,), name=f"vqwavenet-worker{w}", daemon=True
                )
                self.threads[w] = thread
                thread.start()

    def _admit(self, w: int, mine: int) -> list[tuple[Job, int]]:
        """Queued streams worker ``w`` (holding ``mine`` rows) starts now, and their jobs."""
        jobs = [job for job in self.jobs if job.room > 0]
        if not jobs:
            return []
        demand = sum(self.busy) - self.busy[w] + mine + sum(job.room for job in jobs)
        workers = self.engine.workers_for(demand)
        if w >= workers:
            return []
        share = min(self.engine.max_rows, -(-demand // workers))
        picks = []
        while len(picks) < share - mine and jobs:
            job = min(jobs, key=lambda j: (j.deadline(j.pending[0]), j.seq))
            picks.append((job, job.pending.popleft()))
            job.rows += 1
            if job.room == 0:
                jobs.remove(job)
        return picks

    def _boundary(self, tracks: list[Track | None], s: int, ran: int, signal: list[Job]) -> None:
        """After a block of ``ran`` steps that ended at step ``s``: publish every row's
        progress, record the streams that ended and free their rows and those of cancelled
        jobs (under the lock)."""
        ctx = self.engine.context
        rows: dict[Job, list[tuple[int, Track]]] = {}
        for r, t in enumerate(tracks):
            if t is not None:
                rows.setdefault(t.job, []).append((r, t))
        for job, held in rows.items():
            live = job.live
            with live.lock:
                for r, t in held:
                    live.done[0] += ran + t.credit
                    t.credit = 0
                    if t.start + t.n <= s:  # its last step ran
                        live.results[t.index] = t.out
                        live.partial[t.index] = None
                        job.left -= 1
                    elif not live.cancelled:
                        live.partial[t.index] = (t.out, max(0, s - t.start - ctx))
                        continue
                    tracks[r] = None
                    job.rows -= 1
                live.lock.notify_all()
        for job in list(self.jobs):
            if job.rows == 0 and (job.left == 0 or job.live.cancelled):
                self._finish(job, signal)

    # --- a worker -------------------------------------------------------------------------------

    def _work(self, w: int) -> None:
        """Worker ``w``'s loop (see the class doc); it runs on step session ``w``."""
        batch: StepBatch | None = None
        tracks: list[Track | None] = []
        crow = np.zeros(0, dtype=np.int64)  # the conditioning row each row's `cond` holds
        picks: list[tuple[Job, int]] = []
        s = ran = 0
        try:
            while True:
                signal: list[Job] = []
                with self.lock:
                    self._boundary(tracks, s, ran, signal)
                    mine = sum(t is not None for t in tracks)
                    picks = self._admit(w, mine)
                    if mine + len(picks) == 0:
                        if batch is not None:
                            self.engine._give_batch(batch)
                        self._stop(w)
                        self._signal(signal)
                        return
                    self.busy[w] = mine + len(picks)
                    self._start_workers()
                    drain = not any(job.room for job in self.jobs)  # nothing waits for a row
                    seen = self.interrupts
                    self._signal(signal)
                batch, tracks, crow = self._place(w, batch, tracks, crow, picks, s, drain)
                busy = [r for r, t in enumerate(tracks) if t is not None]
                ran = 0
                if busy:  # blocks end after steps divisible by BLOCK, or where a row ends
                    end = min(tracks[r].start + tracks[r].n for r in busy) - 1
                    mark = -(-s // BLOCK) * BLOCK
                    ran = self._block(batch, tracks, busy, crow, s, min(end, mark) - s + 1, seen)
                    s += ran
        except BaseException as e:  # the engine failed: so do the jobs in this batch
            signal = []
            with self.lock:
                held = [t.job for t in tracks if t is not None] + [job for job, _ in picks]
                for job in held:
                    job.rows -= 1
                for job in dict.fromkeys(held):
                    self._fail(job, e, signal)
                self._stop(w)
                self._start_workers()  # for the others still queued
                self._signal(signal)

    def _stop(self, w: int) -> None:
        self.threads[w] = None
        self.busy[w] = 0
        self.exiting.append(threading.current_thread())

    def _place(self, w, batch, tracks, crow, picks, s, drain):
        """Load ``picks`` (taken from the list as they are placed) into idle rows from step
        ``s``, with more rows (and a larger batch) where they do not fit; ``drain``: nothing
        waits for a row, so a batch with at most half its rows busy drops its idle ones.
        ``tracks`` changes in place, so that should this fail, the worker still knows every
        row it holds. Returns the batch, its rows' tracks and their conditioning rows."""
        engine = self.engine
        zero, ctx = engine.zero_class, engine.context
        held = sum(t is not None for t in tracks)
        need = held + len(picks)
        m = 0 if batch is None else batch.m
        if need > m:
            rows = min(row_count(need), max(need, engine.max_rows))
            if batch is None:
                batch = engine._take_batch(rows, self.logits, w)
                batch.clear(need, rows, zero)  # rows no stream loads
            else:
                if rows > batch.capacity:  # move the rows to a batch with room
                    larger = engine._take_batch(rows, self.logits, w)
                    larger.copy_rows(batch)
                    engine._give_batch(batch)
                    batch = larger
                batch.clear(m, rows, zero)
                batch.resize(rows)
            tracks += [None] * (rows - len(tracks))  # in place: the caller's list
            crow = np.concatenate([crow, np.full(rows - len(crow), -1, dtype=np.int64)])
        steady: list[tuple[int, Track]] = []
        for r in range(batch.m):
            if not picks:
                break
            if tracks[r] is not None:
                continue
            job, i = picks.pop(0)
            try:
                t = self._load(batch, crow, job, i, r, s)
            except Exception as e:  # this request's start failed: only it fails
                self._drop(job, e)
                continue
            tracks[r] = t
            if t.start == s and job.streams[i].steady:
                steady.append((r, t))
        if steady:  # fill their rings with each layer's input after endless silence
            try:
                cond_rows = np.stack([t.job.cond[t.cidx[ctx]] for _, t in steady])
                x = engine.steady(cond_rows, zero)
            except Exception as e:
                for r, t in steady:
                    tracks[r] = None
                    self._drop(t.job, e)
            else:
                rows = [r for r, _ in steady]
                for i, (offset, size) in enumerate(engine.writes):
                    batch.store[offset : offset + size, rows] = x[:, i]
                for _, t in steady:
                    t.start, t.credit = s - ctx, ctx
        busy = [r for r, t in enumerate(tracks) if t is not None]
        if drain and 0 < len(busy) <= batch.m // 2:
            idle = [r for r, t in enumerate(tracks) if t is None]
            keep = busy + idle[: row_count(len(busy)) - len(busy)]
            batch.keep(np.array(keep))
            tracks[:] = [tracks[r] for r in keep]
            crow = crow[keep]
        return batch, tracks, crow

    def _drop(self, job: Job, error: BaseException) -> None:
        """A stream of ``job`` could not start: free its row and fail the job."""
        signal: list[Job] = []
        with self.lock:
            job.rows -= 1
            self._fail(job, error, signal)
            self._signal(signal)

    def _load(self, batch: StepBatch, crow: np.ndarray, job: Job, i: int, r: int, s: int) -> Track:
        """Stream ``i`` of ``job`` in row ``r`` from step ``s``: its inputs per local step, and
        its rings where it starts from a state (primed, or the parallel warm-up) rather than
        stepping through its warm-up (or, steady, from `StepEngine.steady`, which `_place`
        computes for every such row at once)."""
        engine, ctx = self.engine, self.engine.context
        st = job.streams[i]
        n = ctx + st.length
        t = Track(job, i, n, s)
        idx = engine.geometry.cond_index(st.tau0 + np.arange(n)) + st.cond_offset
        t.cidx = np.clip(idx, st.cond_offset, st.cond_offset + st.cond_count - 1)
        t.noise = np.random.default_rng(st.seed).random(n, dtype=np.float32)
        if self.logits:
            t.prev = np.asarray(st.forced, dtype=np.int64)
            if st.targets is not None:
                t.targets = np.asarray(st.targets, dtype=np.int64)
                t.out = np.zeros(st.length, dtype=np.float32)
            else:
                t.out = np.zeros((st.length, engine.q), dtype=np.float32)
        else:
            t.out = np.zeros(st.length, dtype=np.int64)
        crow[r] = -1  # another job's rows: its first step loads its own conditioning
        batch.prev[r] = engine.zero_class
        if st.primed is not None:  # `Codec.primed_state`: after the primer's speech
            state = st.primed[0]
            batch.prev[r] = st.primed[1]
        elif st.steady or not engine.parallel_warmup:
            return t
        else:  # the warm-up steps, computed in parallel
            prev = t.prev[:ctx] if self.logits else np.full(ctx, engine.zero_class)
            state = engine.warm_rings(prev, job.cond, t.cidx[:ctx])
        offset, lag, size = engine.state_layout
        batch.store[offset + (s - lag) % size, r] = state
        t.start, t.credit = s - ctx, ctx
        return t

    def _block(self, batch, tracks, busy, crow, s, k, seen) -> int:
        """Steps ``s .. s + k - 1`` of worker rows ``busy``, in which no row ends before the
        last: every row's inputs for them (noise, teacher-forced classes, conditioning
        changes) are gathered up front and its outputs scattered after, so a step costs
        onnxruntime's call and a few copies rather than per-step bookkeeping. Returns the
        steps run: fewer once a job arrives or is cancelled (``interrupts`` moved past
        ``seen``), so that the boundary comes at once."""
        engine = self.engine
        ctx, m, n_layers = engine.context, batch.m, engine.n_layers
        live = [tracks[r] for r in busy]
        cols = np.asarray(busy)
        l0 = np.array([s - t.start for t in live])  # each row's local step at ``s``
        noise = np.zeros((k, m), dtype=np.float32)  # [k, m]: one contiguous row per step
        noise[:, cols] = np.stack([t.noise[a : a + k] for t, a in zip(live, l0)], 1)
        ci = np.stack([t.cidx[a : a + k] for t, a in zip(live, l0)])  # [busy, k]
        change = ci != np.concatenate([crow[cols][:, None], ci[:, :-1]], 1)
        changes = {j: np.flatnonzero(change[:, j]) for j in np.flatnonzero(change.any(0))}
        forced = batch.logits is not None
        nll = forced and live[0].targets is not None
        if forced:
            prev = np.zeros((k, m), dtype=np.int64)
            prev[:, cols] = np.stack([t.prev[a : a + k] for t, a in zip(live, l0)], 1)
        if nll:
            targets = np.zeros((k, m), dtype=np.int64)
            for c, t, a in zip(cols, live, l0):
                targets[:, c] = t.targets[np.maximum(a + np.arange(k) - ctx, 0)]
        if not forced:  # draws feed back to generating rows only: warm-up rows keep silence,
            feed = np.zeros((k, m), dtype=bool)  # idle ones their last input
            feed[:, cols] = l0[None, :] + np.arange(k)[:, None] >= ctx
        shape = (k, m, engine.q) if forced and not nll else (k, m)
        out = np.zeros(shape, dtype=live[0].out.dtype)
        noise_in, prev_in, drawn = batch.noise[:m], batch.prev[:m], batch.sample[:m]
        every = np.arange(m)
        ran = k
        for j in range(k):
            if self.interrupts != seen:
                ran = j
                break
            changed = changes.get(j)
            if changed is not None:  # once per hop per row, from the row's own request
                for p in changed:
                    row = live[p].job.cond[ci[p, j]]
                    batch.cond[:, busy[p]] = row.reshape(n_layers, -1)
            noise_in[:] = noise[j]
            if forced:
                prev_in[:] = prev[j]
            batch.run(s + j)
            if nll:
                x = batch.logits[:m]
                mx = x.max(1, keepdims=True)
                lse = np.log(np.exp(x - mx).sum(1)) + mx[:, 0]
                out[j] = lse - x[every, targets[j]]
            elif forced:
                out[j] = batch.logits[:m]
            else:
                out[j] = drawn
                np.copyto(prev_in, drawn, where=feed[j])
        if ran:
            crow[cols] = ci[:, ran - 1]
        for c, t, a in zip(cols, live, l0):
            j0 = max(0, ctx - a)  # its first step of the block that outputs a sample
            if j0 < ran:
                t.out[a + j0 - ctx : a + ran - ctx] = out[j0:ran, c]
        return ran
