"""The step machinery: ring buffers, onnxruntime I/O bindings and the step loop.

Decoding runs one ``decoder_step.onnx`` call per sample for a batch of streams (`Stream`). Each
layer keeps a ring buffer of its past inputs in numpy; the step graph takes one tensor per tap
and writes one per layer, so every tap is bound to the ring slot it reads and every output to
the slot it overwrites (`StepBatch`), and no step copies the rings. Each ring is longer than it
must hold, so the slot a step writes is never one it reads, and all ring sizes divide one
period (`ring_layout`), so the bindings depend only on the step modulo the period and are built
once.

`StepEngine` splits the streams between worker threads, each with its own step session and one
intra-op thread, and runs each worker's rows in lockstep: a row that finishes its stream takes
the next from the worker's queue, and a draining batch drops its idle rows. The bookkeeping is
done in blocks of at most `BLOCK` steps (`StepEngine` gathers a block's inputs before it and
scatters its outputs after), so a step costs the onnxruntime call and a few copies.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
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


class Live:
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


BLOCK = 128  # steps between `StepEngine`'s bookkeeping of rows and streams, at most
KEEP_ROW_COUNTS = 4  # binding sets a step batch keeps, one per row count


class StepBatch:
    """One worker's step call: the ring store, the conditioning, input and output buffers, and
    one onnxruntime binding per step phase (built on first use) that points each tap at its
    ring slot and each layer's output at the slot it overwrites. Rows ``[0, m)`` take part;
    `keep` drops idle rows so that a draining batch stops computing them."""

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


class Rows:
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
    """

    # A second worker starts from this many streams.
    streams_per_worker: int = 1
    # Rows per worker; more streams wait in its queue. Its rings take rows x R floats per slot.
    max_rows: int = 128

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

    def run(
        self,
        streams: list[Stream],
        cond: np.ndarray,
        progress,
        *,
        live: Live | None = None,
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
            live = Live(len(streams))
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

    def _run_group(
        self,
        streams: list[Stream],
        queue: list[int],
        cond: np.ndarray,
        live: Live,
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

    def _step_loop(self, streams, queue, cond, live, worker: int, batch: StepBatch) -> None:
        """`_run_group`'s loop over the batch it took."""
        ctx = self.context
        forced = batch.logits is not None  # teacher forcing, as `_run_group` took it
        want_nll = forced and streams[queue[0]].targets is not None
        steps = ctx + max(streams[i].length for i in queue)
        rows = Rows(batch.m, steps, ctx, forced, want_nll, self.q)
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
                if st.primed is not None:  # `Codec.primed_state`: after the primer's speech
                    place(row, at, st.primed[0])
                    batch.prev[row] = st.primed[1]
                elif st.steady:  # endless silence under the first conditioning row
                    steady.append(row)
                elif self.parallel_warmup:  # the warm-up steps, computed in parallel
                    prev = rows.prev[row, :ctx] if forced else np.full(ctx, zero_class)
                    place(row, at, self.warm_rings(prev, cond, rows.cidx[row, :ctx]))
            if steady:  # fill their rings with each layer's constant input
                x = self.steady(cond[rows.cidx[steady, ctx]], zero_class)
                for i, (offset, size) in enumerate(self.writes):
                    batch.store[offset : offset + size, steady] = x[:, i]
                rows.start[steady] = at - ctx
                live.done[worker] += ctx * len(steady)

        def place(row: int, at: int, state: np.ndarray) -> None:
            """Start ``row`` at its local step ``ctx`` from the rings ``state``."""
            offset, lag, size = self.state_layout
            batch.store[offset + (at - lag) % size, row] = state
            rows.start[row] = at - ctx
            live.done[worker] += ctx

        load(range(batch.m), 0)
        s = 0
        while (rows.sid >= 0).any() and not live.cancelled:
            busy = rows.sid >= 0
            end = int((rows.start + rows.last)[busy].min())  # the first row to finish, its step
            mark = -(-s // BLOCK) * BLOCK  # blocks end after steps divisible by BLOCK
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
        and a few copies rather than per-step bookkeeping. Returns the steps run (fewer once
        the call is cancelled)."""
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

    def warm_rings(self, prev: np.ndarray, cond: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The rings after ``context`` steps fed the classes ``prev`` under the conditioning
        rows ``cond[at]``, computed in parallel (one `decoder_warmup.onnx` call)."""
        feeds = {"prev": prev[None], "cond": cond[at[0] : at[-1] + 1][None]}
        return self.warm.run(None, {**feeds, "index": (at - at[0])[None]})[0][0]
