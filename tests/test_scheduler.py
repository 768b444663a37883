"""One scheduler for every decoding call of a codec (`vqwavenet.steps.Scheduler`): concurrent
requests share step batches and still get exactly their own samples, short requests are not
kept waiting behind long ones, admission is bounded, a request that goes away or fails frees
its rows without disturbing the others, and a playback stream starts where a player will not
stall."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vqwavenet import Codec, DecodeRequest, folding, steps
from vqwavenet import codec as codec_module
from vqwavenet.steps import Busy, Job, Scheduler


def random_codes(codec: Codec, seconds: float, seed: int) -> tuple[np.ndarray, int]:
    """Codes of ``seconds`` of audio drawn at random (the random-weight test model maps speech
    to nearly one code, so its own codes would give every frame the same conditioning)."""
    n = round(seconds * codec.sample_rate)
    frames = codec.geometry.padding(n)[2]
    return np.random.default_rng(seed).integers(0, codec.codebook_size, frames), n


class Sharing:
    """Records, per step block any worker runs, the jobs whose rows are in it."""

    def __init__(self, monkeypatch):
        self.blocks: list[set[int]] = []
        block = Scheduler._block

        def spy(sched, batch, tracks, busy, *args):
            self.blocks.append({tracks[r].job.seq for r in busy})
            return block(sched, batch, tracks, busy, *args)

        monkeypatch.setattr(Scheduler, "_block", spy)

    @property
    def most(self) -> int:
        return max((len(b) for b in self.blocks), default=0)

    def each_shared(self) -> bool:
        """Whether every job seen ran some block beside another job."""
        seen = set().union(*self.blocks)
        return bool(seen) and all(any(j in b and len(b) > 1 for b in self.blocks) for j in seen)


def no_worker_left() -> bool:
    return not any(t.name.startswith("vqwavenet-") for t in threading.enumerate())


@pytest.fixture()
def codec(app_model_dir):
    return Codec(app_model_dir)


def test_a_request_decodes_alike_alone_and_beside_others(codec, monkeypatch):
    """fp32: a file decoded while three others (other lengths, voices and seeds) run beside it
    in the same step batches gives exactly the samples it gives alone, by `decode` and by
    `decode_stream`, and so does each of the others. Controls: the requests did share blocks
    (each ran beside another, three at once in some), and another seed changes the samples,
    so the comparison can see a difference."""
    files = [random_codes(codec, s, i) for i, s in enumerate((1.2, 0.7, 2.0, 0.4))]
    reqs = [DecodeRequest(c, i % 3, n, seed=i + 5) for i, (c, n) in enumerate(files)]
    alone = [codec.decode(r.codes, r.speaker, r.seed, n_samples=r.n_samples) for r in reqs]
    sharing = Sharing(monkeypatch)
    start = threading.Barrier(len(reqs))

    def decode(i: int) -> np.ndarray:
        r = reqs[i]
        start.wait()
        if i % 2:  # half of them stream, as the app does
            chunks = codec.decode_stream(r.codes, r.speaker, r.seed, n_samples=r.n_samples)
            return np.concatenate(list(chunks))
        return codec.decode(r.codes, r.speaker, r.seed, n_samples=r.n_samples)

    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(decode, range(len(reqs))))
    assert sharing.each_shared() and sharing.most >= 3, sharing.blocks[:20]
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_array_equal(got, want)
    other = codec.decode(reqs[0].codes, reqs[0].speaker, 99, n_samples=reqs[0].n_samples)
    assert np.mean(other != alone[0]) > 0.5
    assert no_worker_left()


def test_playback_stream_yields_its_own_audio_in_order(codec, monkeypatch):
    """A playback stream of more segments than it may run at once (`Codec.playback_rows`)
    yields several chunks, in order, that concatenate to `decode` with the same segments, with
    a progress that only grows, and after the first chunk at most one per ``interval``; a
    stream beside it does the same with its own audio. Each stream has its own listener
    thread, and the first chunk goes on the first final audio (when a player may start is
    `_may_start`'s test): how many chunks come then depends on how the audio becomes final,
    not on when a listener that was busy with the other stream asks."""
    codec.playback_rows = 3
    (a, n), (b, m) = random_codes(codec, 1.5, 1), random_codes(codec, 1.1, 2)
    want_a = codec.decode(a, 1, 4, n_samples=n, segment=codec.min_segment)
    want_b = codec.decode(b, 2, 6, n_samples=m, segment=codec.min_segment)
    assert -(-n // codec.min_segment) > 2 * codec.playback_rows  # three waves of rows or more
    monkeypatch.setattr(Codec, "_may_start", lambda *args: 0.0)
    step = steps.StepBatch.run  # steps as slow as a real model's: the waves take their time
    monkeypatch.setattr(steps.StepBatch, "run", lambda b, s: (time.sleep(1e-4), step(b, s)))
    seen: list[int] = []
    first = codec.decode_stream(a, 1, 4, lambda d, t: seen.append(d), n_samples=n, interval=0.01)
    second = codec.decode_stream(b, 2, 6, n_samples=m, interval=0.1)

    def listen(stream) -> tuple[list[np.ndarray], list[float]]:
        chunks, times = [], []
        for chunk in stream:
            chunks.append(chunk)
            times.append(time.monotonic())
        return chunks, times

    with ThreadPoolExecutor(2) as pool:
        (chunks_a, _), (chunks_b, times) = pool.map(listen, [first, second])
    assert len(chunks_a) >= 3 and len(chunks_b) >= 2
    np.testing.assert_array_equal(np.concatenate(chunks_a), want_a)
    np.testing.assert_array_equal(np.concatenate(chunks_b), want_b)
    assert seen == sorted(seen) and seen[-1] > 0
    assert min(np.diff(times[:-1]), default=1) >= 0.1 - 1e-3  # the last may come at once


def plan_job(codec: Codec, seconds: float, seed: int, segment: int):
    codes, n = random_codes(codec, seconds, seed)
    return codec.plan([DecodeRequest(codes, 0, n, seed)], segment, None, None)


@pytest.mark.parametrize("order", ["deadline", "arrival"])
def test_a_short_request_behind_a_long_one_finishes_first(codec, monkeypatch, order):
    """One worker of four rows; a long request (40 segments) arrives first, a short one (2
    segments) a twentieth of a second later. Earliest deadline first gives the short one the
    next free rows, ahead of the long one's later segments, so it finishes first. Control
    (``arrival``): queued by arrival alone, the short one waits for all of the long one."""
    codec = Codec(codec.dir, workers=1)
    codec.max_rows = 4
    if order == "arrival":
        monkeypatch.setattr(Job, "deadline", lambda job, i: job.arrival)
    finished: list[str] = []
    finish = Scheduler._finish
    names: dict[int, str] = {}
    monkeypatch.setattr(
        Scheduler,
        "_finish",
        lambda s, job, sig: (finished.append(names[id(job)]), finish(s, job, sig)),
    )
    long, short = plan_job(codec, 2.5, 1, 1000), plan_job(codec, 0.12, 2, 1000)
    assert (len(long.streams), len(short.streams)) == (40, 2)
    now = time.monotonic()
    jobs = []
    for name, plan, arrival in (("long", long, now), ("short", short, now + 0.05)):
        job = codec.engine.submit(plan.streams, plan.cond, arrival=arrival)
        names[id(job)] = name
        jobs.append(job)
    for job in jobs:
        codec.engine.wait(job)
    assert finished == (["short", "long"] if order == "deadline" else ["long", "short"])


def test_requests_past_the_bound_are_refused_at_once(codec):
    """With `max_requests` requests running or queued, one more (decode, a stream's first
    chunk or a submission) raises `Busy` at once, not after a wait; once one ends the next is
    taken."""
    codec.max_requests = 2
    codes, n = random_codes(codec, 3.0, 1)
    streams = [codec.decode_stream(codes, 0, s, n_samples=n) for s in (1, 2)]
    for stream in streams:
        next(stream)
    small, m = random_codes(codec, 0.2, 3)
    started = time.monotonic()
    with pytest.raises(Busy, match="busy.*try again"):
        codec.decode(small, 0, 1, n_samples=m)
    with pytest.raises(Busy):
        next(codec.decode_stream(small, 0, 1, n_samples=m))
    assert time.monotonic() - started < 0.5
    streams[0].close()  # a listener leaves: its place is free
    assert codec.decode(small, 0, 1, n_samples=m).shape == (m,)
    streams[1].close()
    with pytest.raises(ValueError):
        codec.max_requests = 0


def test_a_request_that_goes_away_frees_its_rows_at_the_next_block(codec, monkeypatch):
    """Two long requests share the batches with one that stays; one listener closes its
    stream, the other's caller gives up through its progress callback (as the app's does when
    nobody reads). Each returns within a block with its rows free: it runs in no later block
    and the scheduler no longer holds it. The request that stays gives exactly the samples it
    gives alone. Control: the requests did share blocks before."""
    codec = Codec(codec.dir, workers=1)  # one batch for all
    codes, n = random_codes(codec, 0.5, 1)
    keep, m = random_codes(codec, 0.5, 2)
    whole = 10**6  # unfolded: one long stream each
    alone = codec.decode(keep, 1, 7, n_samples=m, segment=whole)
    scheduler = codec.engine.scheduler
    sharing = Sharing(monkeypatch)
    step = steps.StepBatch.run  # steps as slow as a real model's, so that all overlap
    monkeypatch.setattr(steps.StepBatch, "run", lambda b, s: (time.sleep(2e-4), step(b, s)))
    result: list[np.ndarray] = []

    def stay():
        result.append(codec.decode(keep, 1, 7, n_samples=m, segment=whole))

    thread = threading.Thread(target=stay)
    thread.start()
    while not scheduler.jobs:
        time.sleep(0.001)
    (stays,) = scheduler.jobs
    gone = codec.decode_stream(
        codes, 0, 3, n_samples=n, segment=whole, schedule="batch", interval=0.01
    )
    next(gone)
    (closed,) = [job for job in scheduler.jobs if job is not stays]
    started = time.monotonic()
    gone.close()
    assert time.monotonic() - started < 1
    assert closed.done.is_set() and closed.rows == 0 and closed not in scheduler.jobs
    closed_at = len(sharing.blocks)
    assert any({stays.seq, closed.seq} <= block for block in sharing.blocks)

    class GaveUp(Exception):
        pass

    def give_up(done, total):
        if done > 0:
            raise GaveUp

    with pytest.raises(GaveUp):
        codec.decode(codes, 0, 4, progress=give_up, n_samples=n, segment=whole)
    assert scheduler.jobs in ([stays], [])  # only the request that stays
    thread.join()
    np.testing.assert_array_equal(result[0], alone)
    later = set().union(*sharing.blocks[closed_at:])
    assert closed.seq not in later and stays.seq in later
    assert scheduler.jobs == [] and sum(scheduler.busy) == 0
    assert no_worker_left()


def test_a_request_that_fails_does_not_disturb_the_others(codec, monkeypatch):
    """A request refused by its checks (codes out of range) never reaches the engine; one
    whose start fails inside a shared batch (its warm-up raises) fails alone with its own
    error. The request beside them gives exactly the samples it gives alone, and the engine
    goes on serving. Control: the failing start ran in a batch with the other request."""
    codec = Codec(codec.dir, workers=1)  # one batch for all
    step = steps.StepBatch.run  # steps as slow as a real model's, so that both overlap
    monkeypatch.setattr(steps.StepBatch, "run", lambda b, s: (time.sleep(1e-4), step(b, s)))
    good, n = random_codes(codec, 1.5, 1)
    alone = codec.decode(good, 2, 3, n_samples=n)
    bad, m = random_codes(codec, 0.5, 2)
    with pytest.raises(ValueError, match="codes must lie"):
        codec.decode(bad + codec.codebook_size, 0, 1, n_samples=m)
    poisoned = codec.condition(bad, 0)
    warm = codec.engine.warm_rings
    tried = []

    def fragile(prev, cond, at):
        if cond is poisoned:
            tried.append(len(codec.engine.scheduler.jobs))
            raise FloatingPointError("this request's start failed")
        return warm(prev, cond, at)

    monkeypatch.setattr(codec.engine, "warm_rings", fragile)
    plan = codec.plan([DecodeRequest(good, 2, n, 3)], None, None, None)
    first = codec.engine.submit(plan.streams, plan.cond)
    bad_plan = codec.plan([DecodeRequest(bad, 0, m, 1)], None, None, None)
    failing = codec.engine.submit(bad_plan.streams, poisoned)
    with pytest.raises(FloatingPointError, match="start failed"):
        codec.engine.wait(failing)
    results = codec.engine.wait(first)
    (fold,) = plan.folds
    from vqwavenet import folding

    got = folding.compose(fold, results, 0, fold.n, codec.q)
    np.testing.assert_array_equal(got, alone)
    assert tried and max(tried) == 2  # it failed while the good request was in the engine
    assert codec.decode(bad, 0, 1, n_samples=m).shape == (m,)  # and the engine serves on


def test_first_chunk_waits_for_a_start_that_never_stalls(codec, monkeypatch):
    """`Codec._may_start`, played out: audio becomes final in lumps of ``A`` seconds every
    ``P`` seconds. A player that starts when it says so never runs out, whether the lumps come
    faster than real time (it starts on the first lump) or slower (it waits, and no longer
    than it must: within a lump of the latest start that never stalls). Control: starting on
    the first lump when lumps come slower than real time stalls."""
    sr = codec.sample_rate
    clock = [0.0]
    monkeypatch.setattr(codec_module.time, "monotonic", lambda: clock[0])

    def lumps(period: float, lump_s: float, total_s: float):
        n, a = round(total_s * sr), round(lump_s * sr)
        return [(period * (i + 1), min(n, a * (i + 1))) for i in range(-(-n // a))], n, a

    def start_time(arrivals, n, a):
        """When `_poll` would yield the first chunk: at a lump, or on waking at the time
        `_may_start` asked for."""
        for i, (t, final) in enumerate(arrivals):
            clock[0] = t
            wait = 0.0 if final == n else codec._may_start(0.0, t, final, n, a)
            if wait <= 0:
                return t
            nxt = arrivals[i + 1][0] if i + 1 < len(arrivals) else float("inf")
            if t + wait < nxt:
                return t + wait
        raise AssertionError("never started")

    def stalls(arrivals, start: float) -> bool:
        played = 0.0  # seconds of audio available when each next lump arrives
        for (_, final), (t_next, _) in zip(arrivals, arrivals[1:]):
            played = final / sr
            if t_next > start + played + 1e-9:
                return True
        return False

    for period, lump_s, total in ((0.3, 1.0, 4.0), (1.14, 1.0, 4.0), (0.5, 0.25, 8.0)):
        arrivals, n, a = lumps(period, lump_s, total)
        start = start_time(arrivals, n, a)
        assert not stalls(arrivals, start), (period, lump_s, start)
        latest = arrivals[-1][0] - (n - a) / sr  # the latest start that never stalls
        assert start <= max(arrivals[0][0], latest) + 1.05 * period, (period, start, latest)
        if period <= lump_s:  # faster than real time: at once
            assert start == arrivals[0][0]
        else:  # the control: the first lump is too early
            assert stalls(arrivals, arrivals[0][0])


def first_unfinished_only(fold, produced):
    """`folding.final_prefix` as it was: the first unfinished segment alone decides."""
    for k, (a, b) in enumerate(fold.bounds):
        g = fold.start(k)
        if produced[k] < b - g:
            return max(g + produced[k], a - fold.overlap if k > 0 else 0)
    return fold.n


def test_final_prefix_holds_a_tail_until_the_next_segment_has_its_head():
    """A segment that starts after its predecessor (rows taken as they free up) holds back
    the predecessor's cross-faded tail until it has generated its own head. Control: the
    former rule, right only when segments run in step, counts that tail final."""
    fold = folding.Fold(300, [(0, 100), (100, 200), (200, 300)], overlap=10, burn_in=0, first=0)
    assert folding.final_prefix(fold, [95, 0, 0]) == 90
    assert folding.final_prefix(fold, [100, 105, 0]) == 190
    assert folding.final_prefix(fold, [100, 110, 5]) == 195
    assert first_unfinished_only(fold, [95, 0, 0]) == 95  # the tail without segment 1's head


def test_segments_run_one_after_another_stream_the_decoded_audio(codec, monkeypatch):
    """One row for a stream's six segments: each starts only when the one before has ended,
    and the chunks, read while segments are half done (many more chunks than segments), still
    concatenate to `decode`'s samples. (Under the former rule a tail came out before the next
    segment's head existed: wrong samples, or a failed cross-fade.)"""
    codec = Codec(codec.dir, workers=1)
    codec.max_rows = 1
    step = steps.StepBatch.run  # slow enough steps that the reader sees tails being made
    monkeypatch.setattr(steps.StepBatch, "run", lambda b, s: (time.sleep(2e-4), step(b, s)))
    codes, n = random_codes(codec, 0.75, 3)
    kwargs = dict(n_samples=n, segment=2000, overlap=400)  # tails of several step blocks
    want = codec.decode(codes, 1, 2, **kwargs)
    chunks = list(codec.decode_stream(codes, 1, 2, **kwargs, schedule="batch", interval=0.001))
    assert len(chunks) > 12
    np.testing.assert_array_equal(np.concatenate(chunks), want)


def test_an_engine_failure_fails_the_requests_of_its_batch_and_the_engine_serves_on(
    codec, monkeypatch
):
    """A step that raises (onnxruntime failing) fails the requests whose rows were in that
    batch with its error, promptly and without leaving a caller waiting; a request queued for
    the rows is then served, and so are later ones."""
    codec = Codec(codec.dir, workers=1)
    codec.max_rows = 2
    step = steps.StepBatch.run
    failed = []

    def failing(batch, s):
        # The first step that runs both requests' rows (they join at a block boundary, so a
        # fixed call count could fall before the second one joined).
        if batch.m == 2 and not failed:
            failed.append(s)
            raise RuntimeError("simulated onnxruntime failure")
        return step(batch, s)

    monkeypatch.setattr(steps.StepBatch, "run", failing)
    (a, n), (b, m) = random_codes(codec, 0.2, 1), random_codes(codec, 0.3, 2)
    plans = [
        codec.plan([DecodeRequest(c, 0, k, 1)], 10**6, None, None) for c, k in ((a, n), (b, m))
    ]
    first, second = (codec.engine.submit(p.streams, p.cond) for p in plans)
    third_plan = codec.plan([DecodeRequest(b, 0, m, 1)], 10**6, None, None)
    third = codec.engine.submit(third_plan.streams, third_plan.cond)  # waits for a row
    for job in (first, second):
        with pytest.raises(RuntimeError, match="simulated onnxruntime failure"):
            codec.engine.wait(job)
    (got,) = codec.engine.wait(third)
    assert len(got) == m and len(failed) == 1
    assert codec.decode(a, 0, 1, n_samples=n).shape == (n,)
    assert codec.engine.scheduler.jobs == [] and no_worker_left()
