"""The CUDA paths: batch invariance, bf16 autocast, torch.compile, resume, DDP and NCCL.

CI has no GPU, so every test here is skipped there; on a GPU machine run

    python -m pytest -m gpu tests/test_cuda.py

(`benchmarks/cuda_run.sh` does, with the CUDA benchmarks). Where the CPU suite has the same
check (invariance, bf16 autocast, DDP), it is reused with ``device="cuda"``, so the two cannot
drift apart. Their results on real GPUs are logged under benchmarks/results/.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from model.autoencoder import Autoencoder
from tests.conftest import run_process_group
from tests.test_data import tiny_train_config, write_clip_dataset
from tests.test_decoder import check_low_precision_sums, check_sum_by_index
from tests.test_train import (
    _assert_same,
    _ddp_windows,
    check_bf16_autocast_step,
    check_two_ranks_equal_one,
)
from training import checkpoint as ckpt_io
from training import train as train_mod
from training.config import load_model_config
from training.data import Loader
from training.dataset import Dataset
from training.invariance import CONTROL_FLOOR, TOLERANCE, Case, must_fail, prepare, run_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).resolve().parent.parent
TINY_HOP = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_clip_dataset(tmp_path_factory.mktemp("clips"))


@pytest.mark.parametrize("case", [Case(1, 3, False), Case(17, 1, True), Case(55, 8, True)])
def test_batch_invariance_holds_on_cuda_in_float64(case):
    """The invariance proof (docs/DESIGN.md) on the GPU: cuDNN's convolutions, the decoder's
    segment sums and CUDA's atomic adds elsewhere (slot routing, quantiser statistics) keep the
    batched gradient equal to the mean of per-prediction ones, and the naive loss still fails."""
    model = prepare(load_model_config("tiny"), width=8, jitter=0.5, device="cuda")
    controls = ("naive",) if must_fail(case, TINY_HOP, "naive") else ()
    errors = run_case(model, case, methods=("ours", *controls), splits=(1, 3))
    assert errors["ours"] <= TOLERANCE and errors["ours/split3"] <= TOLERANCE, errors
    for control in controls:
        assert errors[control] > CONTROL_FLOOR, errors


def test_real_geometry_invariance_on_cuda():
    model = prepare(load_model_config("default"), width=8, jitter=0.5, device="cuda")
    errors = run_case(model, Case(700, 160, True), methods=("ours",), chunk=32)
    assert errors["ours"] <= TOLERANCE, errors


def test_sum_by_index_on_cuda_equals_the_gathers_own_backward():
    check_sum_by_index("cuda")
    check_low_precision_sums("cuda")


def test_cuda_logits_equal_cpu_logits(data):
    """The same weights and windows on both devices: float64 agrees to rounding; fp32 agrees to
    TF32's precision (cuDNN may use TF32 for fp32 convolutions)."""
    dataset = Dataset(data)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-2)):
        torch.manual_seed(0)
        model = Autoencoder(load_model_config("small")).to(dtype).eval()
        loader = Loader(dataset, model.geometry, seed=3, dtype=dtype)
        batch = loader.batch(_ddp_windows(dataset, model.geometry)[:4], 0, 60)
        with torch.no_grad():
            cpu = model(batch.wave, batch.windows, batch.n).logits
            gpu = model.cuda()(*_on(batch, "cuda")).logits.cpu()
        err = float((gpu - cpu).abs().max() / cpu.abs().max())
        print(f"{dtype}: max relative logit difference {err:.2e}")
        assert err <= tol, (dtype, err)


def _on(batch, device):
    b = batch.to(device)
    return b.wave, b.windows, b.n


def test_bf16_autocast_step_on_cuda_keeps_the_quantiser_in_fp32(data):
    check_bf16_autocast_step(data, "cuda")


def test_two_ranks_sharing_the_gpu_equal_one_rank_in_float64(data, tmp_path):
    """DDP with CUDA tensors (device_ids, bucketed all-reduce, the EMA reduce and broadcast)
    over gloo; NCCL cannot put two ranks on one GPU."""
    check_two_ranks_equal_one(data, tmp_path, "cuda")


def _train(cfg, data, out, *extra) -> None:
    """One `python -m training.train` process on CUDA: each run starts cuBLAS afresh, after the
    trainer's deterministic settings (CUBLAS_WORKSPACE_CONFIG is read when cuBLAS starts)."""
    cmd = [sys.executable, "-m", "training.train", "--config", str(cfg), "--data", str(data)]
    cmd += ["--out", str(out), "--device", "cuda", "--no-progress", *extra]
    done = run_process_group(cmd, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_resume_on_cuda_continues_bit_for_bit_when_deterministic(data, tmp_path, compile_):
    """The CPU suite's exact-resume check on CUDA with bf16 autocast and ``deterministic =
    true``: 2N steps equal N + resume + N in every weight, optimiser moment, codebook
    statistic, RNG state and data position, eager and under torch.compile (each process
    compiles anew, or loads Inductor's cached kernels). (Without ``deterministic``, a first
    run here differed in ``quantizer.codes_used``: the atomic adds of the EMA statistics
    change the last bits.)"""
    cfg = tiny_train_config(
        tmp_path / "r.toml",
        accumulation=2,
        windows=2,
        amp=True,
        deterministic=True,
        compile=compile_,
    )
    _train(cfg, data, tmp_path / "straight", "--steps", "6")
    _train(cfg, data, tmp_path / "split", "--steps", "3")
    _train(cfg, data, tmp_path / "split", "--resume", "--steps", "6")
    a = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "straight", 6))
    b = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "split", 6))
    assert a["step"] == 6 and a["optimizer"]["state"]
    _assert_same(a, b)


def test_compiled_bf16_steps_on_cuda_track_eager_ones(data, tmp_path):
    """``compile = true`` with bf16 autocast on CUDA (Inductor and Triton): the same losses as
    eager up to bf16 rounding, over three steps."""
    runs = {}
    for compile_ in (False, True):
        cfg = tiny_train_config(tmp_path / f"c{compile_}.toml", compile=compile_, amp=True)
        trainer = train_mod.Trainer(
            load_model_config(cfg),
            train_mod.load_train_config(cfg),
            data,
            tmp_path / f"run{compile_}",
            device="cuda",
        )
        assert trainer.amp
        runs[compile_] = [trainer.train_step()["loss/total"] for _ in range(3)]
    print(f"eager {runs[False]} compiled {runs[True]}")
    assert all(math.isfinite(x) for x in runs[True])
    assert runs[True] == pytest.approx(runs[False], rel=2e-2)


def test_training_cli_under_torchrun_uses_nccl_on_cuda(data, tmp_path):
    """One rank per GPU is all one GPU allows: torchrun starts it, the process group is NCCL,
    and the run writes its checkpoint."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cfg = tiny_train_config(tmp_path / "d.toml", valid_every=2, amp=True)
    out = tmp_path / "run"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "1", "-m", "training.train"]
    cmd += ["--config", str(cfg), "--data", str(data), "--out", str(out), "--steps", "2"]
    env = {**os.environ, "TORCH_DISTRIBUTED_DEBUG": "DETAIL"}
    done = run_process_group(cmd + ["--no-progress"], timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process group: nccl, 1 rank(s); device cuda:0" in done.stderr
    ckpt = ckpt_io.load(ckpt_io.checkpoint_path(out, 2))
    assert ckpt["step"] == 2 and math.isfinite(ckpt["best_valid_ce"])
