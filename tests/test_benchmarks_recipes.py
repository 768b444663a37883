"""The recipe comparison on the tiny config: candidate configs, budgets, scores, resuming."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from benchmarks import recipes
from tests.test_data import tiny_train_config, write_clip_dataset
from training.config import CONFIG_DIR, load_model_config, load_train_config
from training.train import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_clip_dataset(tmp_path_factory.mktemp("clips"))


def test_candidate_configs_are_the_base_with_their_overrides(tmp_path):
    for name, overrides in recipes.CANDIDATES.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(recipes.to_toml(recipes.resolved("small", overrides)))
        text = tomllib.loads(path.read_text())
        base = tomllib.loads((CONFIG_DIR / "small.toml").read_text())
        for dotted, value in overrides.items():
            *tables, key = dotted.split(".")
            node = text
            for t in tables:
                node = node[t]
            assert node[key] == value, (name, dotted)
        load_model_config(path), load_train_config(path)  # valid configs
        if not overrides:
            assert text == base


def test_scores_tell_true_codes_from_permuted_and_constant_ones(data, tmp_path):
    """On a model whose codes vary (k-means codebook) and whose decoder leans on them (random
    weights with a strong conditioning projection), shuffling the codes or making them
    constant raises the cross-entropy's difference well above float noise."""
    cfg = tiny_train_config(tmp_path / "t.toml", valid_windows=8)
    run = tmp_path / "run"
    trainer = Trainer(load_model_config(cfg), load_train_config(cfg), data, run, device="cpu")
    with torch.no_grad():
        trainer.model.decoder.cond_proj.weight.mul_(30)
    trainer.save()
    s = recipes.score(run, str(data))
    assert s["step"] == 0 and s["codebook_size"] == 16
    assert s["codes_used"] > 2 and 1 < s["perplexity"] <= s["codes_used"]
    assert abs(s["ce_permuted"] - s["ce"]) > 1e-3
    assert abs(s["ce_constant"] - s["ce"]) > 1e-3
    assert s["gain"] == pytest.approx(s["ce_permuted"] - s["ce"])


def test_a_comparison_trains_scores_and_resumes_without_retraining(data, tmp_path, capsys):
    argv = ["--data", str(data), "--out", str(tmp_path / "runs"), "--base", "tiny"]
    argv += ["--cpu-minutes", "0.03", "--only", "base", "lr-2x"]
    assert recipes.main(argv) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["candidate"] for r in rows] == ["base", "lr-2x"]
    for r in rows:
        assert r["step"] >= 1 and r["predictions_seen"] > 0
        assert r["ce"] > 0 and r["ce_permuted"] > 0 and r["ce_constant"] > 0
    assert "| base |" in out and "| lr-2x |" in out
    log = tmp_path / "runs/base/train.log"
    before = log.stat().st_mtime_ns
    assert recipes.main(argv) == 0  # finished candidates are read back, not trained again
    assert log.stat().st_mtime_ns == before
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert again == rows
    assert recipes.main([*argv[:-3], "--cpu-minutes", "0"]) == 2
