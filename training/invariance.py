"""Brute-force proof of stochastic batch-size invariance for any config.

    python -m training.invariance --config tiny
    python -m training.invariance --config default     # real geometry, narrowed channels
    python -m training.invariance --config tiny --device cuda   # the same proof on a GPU

For each case (N predictions per window, window phase against the stride, jitter on/off, a
batch of 3 utterances of different lengths with padding masks, accumulation split), the
gradient of every parameter (and the EMA codebook statistics) from one batched pass is compared
in float64 with the mean of the N per-prediction gradients, each from its own pass over that
prediction's minimal window. Three negative controls run the same comparison and must fail:
the naive loss (mean of d over the window's frames), jitter clamped to the window's own edges,
and framing relative to the window start. Exits 1 when ours exceeds 1e-9 or a control that
must fail stays below 1e-2. Invariance is a property of geometry and loss, so channels are
narrowed (``--width``) while strides, kernels and dilations are kept.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.autoencoder import Autoencoder, AutoencoderOutput, Windows
from model.config import ModelConfig
from model.jitter import jitter_offsets
from training.config import load_model_config
from training.loss import batch_loss
from training.windows import Utterance, WindowSpec, make_batch

TOLERANCE = 1e-9
CONTROL_FLOOR = 1e-2


def narrow(cfg: ModelConfig, width: int) -> ModelConfig:
    """Same geometry, at most ``width`` channels everywhere (and a small codebook)."""
    cfg = copy.deepcopy(cfg)
    cfg.encoder.channels = min(cfg.encoder.channels, width)
    cfg.quantizer.dim = min(cfg.quantizer.dim, width)
    cfg.quantizer.codebook_size = min(cfg.quantizer.codebook_size, 2 * width)
    d = cfg.decoder
    for name in ("cond_channels", "speaker_dim", "residual_channels", "gate_channels"):
        setattr(d, name, min(getattr(d, name), width))
    d.skip_channels = min(d.skip_channels, width)
    return cfg


def build_model(cfg: ModelConfig, seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    model = Autoencoder(cfg).double().train()
    # Non-trivial normalisation so the statistics' path is exercised too.
    dim = model.features.dim
    model.features.set_statistics(torch.linspace(-1, 1, dim), torch.linspace(5, 20, dim))
    return model


def synth_utterance(n: int, seed: int) -> torch.Tensor:
    """Speech-like float64 test signal: a few drifting partials plus noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / 16000
    f0 = 100 + 80 * torch.rand((), generator=g, dtype=torch.float64)
    x = sum(
        torch.sin(2 * torch.pi * f0 * h * t * (1 + 0.1 * torch.sin(7 * t)) + h) / h
        for h in range(1, 6)
    )
    x = x + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return 0.5 * x / x.abs().max()


# --- methods: ours and the negative controls ---------------------------------------------------


def our_loss(out: AutoencoderOutput, count: int) -> torch.Tensor:
    return batch_loss(out, count).loss


def naive_loss(out: AutoencoderOutput, count: int) -> torch.Tensor:
    """Control: commitment = mean of d over the window's slots, the same for every prediction."""
    ce = torch.nn.functional.cross_entropy(out.logits, out.targets, reduction="none")
    routed = out.quantizer.commitment.gather(1, out.slot_frames)
    n_valid = out.mask.sum(1)
    last = out.slot_hi.gather(1, (n_valid - 1)[:, None])
    used = (torch.arange(routed.shape[1], device=routed.device)[None] <= last).to(routed.dtype)
    window_mean = (routed * used).sum(1) / used.sum(1)
    per = ce + out.quantizer.beta * window_mean[:, None]
    return (per * out.mask).sum() / count


class WindowEdgeJitter:
    """Control: jitter clamped to the window's own slot range, outward at its edges."""

    def __init__(self, model: Autoencoder):
        self.model = model

    def __call__(self, slots: torch.Tensor, win: Windows) -> torch.Tensor:
        geo, p = self.model.geometry, self.model.cfg.decoder.jitter_probability
        first = geo.slot_range(win.t0)[0][:, None]
        last = geo.slot_range(win.t0 + win.n_valid - 1)[1][:, None]
        delta = jitter_offsets(p, win.seed, win.epoch, win.utt[:, None], slots)
        delta = torch.where(slots == first, -1, torch.where(slots == last, 1, delta))
        return torch.minimum(torch.maximum(slots + delta, first), last)


def window_framed_batch(model: Autoencoder, utterances, specs, **kw):
    """Control: rows start at a fixed distance before t0, so frames sit on a window grid."""
    geo = model.geometry
    wave, win, n = make_batch(geo, utterances, specs, **kw)
    # The largest distance from t0 back to its window's first frame, over all phases.
    t = geo.pad_left + geo.hop
    lead = max(u - geo.span(u, u + 1, 10**9).start for u in range(t, t + geo.hop))
    rows, starts = [], []
    for spec in specs:
        u = utterances[spec.index]
        start = max(spec.t0 - lead, 0)
        rows.append(u.padded[start : start + wave.shape[1] + lead])
        starts.append(start)
    length = max(len(r) for r in rows)
    wave = torch.stack([torch.nn.functional.pad(r, (0, length - len(r))) for r in rows])
    win.start = torch.tensor(starts)
    return wave, win, n


@dataclass
class Method:
    name: str
    loss: Callable = our_loss
    route: type | None = None
    batch: Callable | None = None


METHODS = {
    "ours": Method("ours"),
    "naive": Method("naive", loss=naive_loss),
    "window_jitter": Method("window_jitter", route=WindowEdgeJitter),
    "window_framing": Method("window_framing", batch=window_framed_batch),
}


# --- gradients ---------------------------------------------------------------------------------


def _collect(model: Autoencoder) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            raise AssertionError(f"parameter {name} received no gradient")
        grads[name] = p.grad.detach().cpu().clone()
    q = model.quantizer
    if q.ema:
        grads["ema.step_count"] = q.step_count.cpu().clone()
        grads["ema.step_sum"] = q.step_sum.cpu().clone()
    return grads


def _reset(model: Autoencoder) -> None:
    model.zero_grad(set_to_none=False)
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if model.quantizer.ema:
        model.quantizer.step_count.zero_()
        model.quantizer.step_sum.zero_()


def gradients(
    model: Autoencoder,
    utterances: list[Utterance],
    micro_batches: list[list[WindowSpec]],
    method: Method,
    count: int,
    *,
    seed: int = 0,
    epoch: int = 0,
) -> dict[str, torch.Tensor]:
    """Summed gradients of one optimiser step made of the given micro-batches, on the
    model's device (batches are cut on the CPU and moved there; gradients come back on the CPU)."""
    _reset(model)
    device = next(model.parameters()).device
    original = model.route
    if method.route is not None:
        model.route = method.route(model)
    try:
        for specs in micro_batches:
            if method.batch is not None:
                wave, win, n = method.batch(model, utterances, specs, seed=seed, epoch=epoch)
            else:
                wave, win, n = make_batch(model.geometry, utterances, specs, seed=seed, epoch=epoch)
            out = model(wave.to(device), win.to(device), n)
            method.loss(out, count).backward()
    finally:
        model.route = original
    return _collect(model)


def valid_predictions(utterances, specs) -> list[WindowSpec]:
    """One single-prediction window per valid prediction of the given windows."""
    singles = []
    for spec in specs:
        u = utterances[spec.index]
        for t in range(spec.t0, min(spec.t0 + spec.n, u.end)):
            singles.append(WindowSpec(spec.index, t, 1))
    return singles


def brute_force(
    model, utterances, specs, method: Method, chunk: int = 1, **kw
) -> dict[str, torch.Tensor]:
    """Mean of per-prediction gradients, each from its own minimal window.

    With ``chunk`` 1 every prediction runs in its own pass. A larger chunk stacks that many
    single-prediction windows as rows of one pass (each row still its own window): faster at
    the real geometry, and sound because rows never interact (the chunk-1 proof shows it).
    """
    singles = valid_predictions(utterances, specs)
    groups = [singles[i : i + chunk] for i in range(0, len(singles), chunk)]
    return gradients(model, utterances, groups, method, len(singles), **kw)


def relative_error(a: dict, b: dict) -> float:
    """Max over tensors of max|a - b| / max|b| (b is the reference)."""
    worst = 0.0
    for name, ref in b.items():
        scale = ref.abs().max().item()
        diff = (a[name] - ref).abs().max().item()
        if scale == 0.0:
            worst = max(worst, 0.0 if diff == 0.0 else float("inf"))
        else:
            worst = max(worst, diff / scale)
    return worst


# --- cases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    n: int
    phase: int
    jitter: bool


def case_batch(model: Autoencoder, case: Case, seed: int = 0):
    """Three utterances of different lengths: one ending inside its window (a padding mask),
    one whose window starts at the utterance start (clamped jitter, frame 0), one interior."""
    s, n, ph = model.geometry.hop, case.n, case.phase
    geo = model.geometry
    lengths = [3 * s + ph + n + 4 * s, 2 * s + ph + n // 2 + 1, ph + n + 5 * s]
    offsets = [3 * s + ph, 2 * s + ph, ph]
    utts = [
        Utterance.prepare(synth_utterance(length, seed + i), geo, utt=11 + i, speaker=i % 2)
        for i, length in enumerate(lengths)
    ]
    specs = [WindowSpec(i, u.first + off, n) for i, (u, off) in enumerate(zip(utts, offsets))]
    return utts, specs


def run_case(
    model: Autoencoder,
    case: Case,
    methods=("ours",),
    splits=(1,),
    seed: int = 0,
    chunk: int = 1,
) -> dict[str, float]:
    """Relative gradient errors of each method (``ours/split2`` etc. for accumulation)."""
    model.cfg.decoder.jitter_probability = model.jitter_p if case.jitter else 0.0
    utts, specs = case_batch(model, case, seed)
    count = len(valid_predictions(utts, specs))
    kw = {"seed": 1234, "epoch": 3}
    errors = {}
    references = {}
    for name in methods:
        method = METHODS[name]
        # For one prediction the naive loss is ours, so its brute force is ours.
        shared = "ours" if name == "naive" else name
        if shared not in references:
            references[shared] = brute_force(model, utts, specs, METHODS[shared], chunk=chunk, **kw)
        reference = references[shared]
        for split in splits if name == "ours" else (1,):
            groups = [specs[i::split] for i in range(split)]
            batched = gradients(model, utts, groups, method, count, **kw)
            key = name if split == 1 else f"{name}/split{split}"
            errors[key] = relative_error(batched, reference)
    return errors


REAL_GEOMETRY_HOP = 64


def cases_for(hop: int) -> list[Case]:
    """docs/DESIGN.md's grid for small strides. At a real stride each single-prediction pass covers
    the 2047-sample field, so the grid is cut to N in {1, 2, S+1} at phases {0, S/2} (the test
    suite adds N = 700 with jitter)."""
    if hop >= REAL_GEOMETRY_HOP:
        return [
            Case(n, ph, j) for j in (False, True) for n in (1, 2, hop + 1) for ph in (0, hop // 2)
        ]
    ns = [1, 2, hop - 1, hop, hop + 1, 3 * hop + 7]
    phases = sorted({0, 1, hop // 2, hop - 1})
    return [Case(n, ph, j) for j in (False, True) for n in ns for ph in phases]


def must_fail(case: Case, hop: int, control: str) -> bool:
    """Where docs/DESIGN.md says a control must fail (it may coincide with ours elsewhere)."""
    if case.n <= hop:
        return False
    return control != "window_jitter" or case.jitter


def prepare(cfg: ModelConfig, width: int, jitter: float, device: str = "cpu") -> Autoencoder:
    cfg = narrow(cfg, width)
    model = build_model(cfg).to(device)
    model.jitter_p = jitter
    return model


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.invariance", description=__doc__)
    p.add_argument("--config", default="tiny", help="config name or TOML path")
    p.add_argument("--width", type=int, default=8, help="channel cap (geometry is kept)")
    p.add_argument("--jitter", type=float, default=0.5, help="jitter probability when on")
    p.add_argument("--n", type=int, nargs="*", help="window sizes (default: the DESIGN grid)")
    p.add_argument("--phases", type=int, nargs="*", help="window phases (default: 0 1 S/2 S-1)")
    p.add_argument(
        "--chunk",
        type=int,
        help="single-prediction windows per brute-force pass (default 1; 32 at a real stride)",
    )
    p.add_argument("--no-controls", action="store_true", help="skip the negative controls")
    p.add_argument("--device", default="cpu", help="cpu or cuda (float64 on either)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    model = prepare(load_model_config(args.config), args.width, args.jitter, args.device)
    hop = model.geometry.hop
    cases = cases_for(hop)
    if args.n:
        cases = [c for c in cases if c.n in args.n]
    if args.phases is not None and args.phases:
        cases = [c for c in cases if c.phase in args.phases]
    chunk = args.chunk or (32 if hop >= REAL_GEOMETRY_HOP else 1)
    controls = () if args.no_controls else ("naive", "window_jitter", "window_framing")
    cols = ["ours", "ours/split2", "ours/split3", *controls]
    print(
        f"# config={args.config} hop={hop} width={args.width} jitter_p={args.jitter} "
        f"float64 on {args.device}, brute force {chunk} window(s) per pass"
    )
    print(f"# ours must be <= {TOLERANCE:g}; controls marked * must be > {CONTROL_FLOOR:g}")
    header = f"{'N':>5} {'phase':>5} {'jitter':>6} " + " ".join(f"{c:>15}" for c in cols)
    print(header)
    failed = False
    started = time.time()
    for case in cases:
        wanted = [c for c in controls if must_fail(case, hop, c)]
        errors = run_case(model, case, methods=("ours", *wanted), splits=(1, 2, 3), chunk=chunk)
        cells = []
        for col in cols:
            if col not in errors:
                cells.append(f"{'-':>15}")
                continue
            err = errors[col]
            if col.startswith("ours"):
                bad = err > TOLERANCE
            else:
                bad = err <= CONTROL_FLOOR
            failed |= bad
            mark = "*" if not col.startswith("ours") else ""
            cells.append(f"{err:>14.2e}{mark or ' '}" + ("!" if bad else ""))
        jitter = "on" if case.jitter else "off"
        print(f"{case.n:>5} {case.phase:>5} {jitter:>6} " + " ".join(cells))
        sys.stdout.flush()
    print(f"# {len(cases)} cases in {time.time() - started:.1f} s: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
