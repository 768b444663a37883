"""Smoke test of the generation benchmark at the tiny config (seconds, not minutes)."""

from __future__ import annotations

import json

from benchmarks.generation import main

TINY = ["--configs", "tiny", "--seconds", "0.3", "--files", "3", "--encode-seconds", "1"]


def test_generation_benchmark_prints_every_method_and_a_table(capsys):
    assert main([*TINY, "--steps", "20", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows[0]["method"] == "matmul" and rows[0]["macs_per_s"] > 0
    got = {(r["method"], r["precision"]) for r in rows[1:]}
    folded = ("onnx_folded_2w", "onnx_folded_2w_steady", "onnx_folded_2w_no_burn_in")
    for method in ("onnx_batch1", *folded, "onnx_batch3"):
        assert {(method, "fp32"), (method, "int8")} <= got
    assert {("naive_torch", "fp32"), ("incremental_torch", "fp32"), ("encode", "fp32")} <= got
    decoding = [r for r in rows[1:] if "samples_per_s" in r]
    assert len(decoding) == 13  # 2 PyTorch rows, 6 fp32 and 5 int8 onnx rows
    assert all(r["samples_per_s"] > 0 and r["macs_per_sample"] == 4352 for r in decoding)
    assert "| tiny | onnx_batch3 | int8 |" in out
    streams = [r for r in rows if r["method"].startswith("stream_")]
    assert [r["method"] for r in streams] == ["stream_playback", "stream_batch"]
    for r in streams:  # a player cannot start before the first chunk, nor wait past the end
        assert 0 < r["first_s"] <= r["delay_s"] <= r["total_s"] < 30
    assert "| tiny | stream_playback | fp32 |  | plays without gaps after" in out


def test_generation_benchmark_refuses_bad_arguments(capsys):
    assert main([*TINY, "--files", "0"]) == 1
    assert "must be positive" in capsys.readouterr().err
