"""`training.warm_start`: an exported model's graphs give back a trainable PyTorch model."""

from __future__ import annotations

import pytest
import torch

from tests.test_data import tiny_train_config, write_clip_dataset
from training import checkpoint as ckpt_io
from training import train as train_mod
from training import warm_start


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_clip_dataset(tmp_path_factory.mktemp("clips"))


def test_rebuilt_model_computes_what_the_graphs_compute(app_model_dir):
    """The folded biases are put back on other parameters, so the weights differ from the
    exported model's, but its teacher-forced log-probabilities equal the engine's."""
    model, speakers = warm_start.rebuild(app_model_dir)
    assert speakers[:3] == ["Allison", "Carlo", "IvrvoiceRU"]
    assert warm_start.check(model, app_model_dir) < 1e-4
    assert model.quantizer.ema_count.sum() == pytest.approx(1.0)
    # Negative control: one tap of one layer off, and the check refuses the model.
    with torch.no_grad():
        model.decoder.dilated[1].weight[:, :, 0].mul_(1.5)
    with pytest.raises(warm_start.WarmStartError, match="differs"):
        warm_start.check(model, app_model_dir)


def test_voices_follow_the_dataset(app_model_dir):
    model, speakers = warm_start.rebuild(app_model_dir)
    old = model.decoder.speaker.weight.detach()
    new = warm_start.remap_speakers(model, speakers, ["Carlo", "Newcomer"])
    assert new.cfg.decoder.n_speakers == 2
    rows = new.decoder.speaker.weight.detach()
    assert torch.equal(rows[0], old[speakers.index("Carlo")])
    assert torch.allclose(rows[1], old.mean(0))
    assert torch.equal(new.decoder.cond_proj.weight, model.decoder.cond_proj.weight)


def test_training_starts_from_the_rebuilt_weights(app_model_dir, data, tmp_path, capsys):
    init = tmp_path / "init.pt"
    argv = ["--model", str(app_model_dir), "--data", str(data), "--out", str(init)]
    assert warm_start.main(argv) == 0
    assert "new: spk-a, spk-b" in capsys.readouterr().out
    weights = torch.load(init, weights_only=False)["model"]
    cfg = tiny_train_config(tmp_path / "t.toml", checkpoint_every=1)
    out = tmp_path / "run"
    run = ["--config", str(cfg), "--data", str(data), "--out", str(out), "--no-progress"]
    assert train_mod.main([*run, "--init-from", str(init), "--steps", "1"]) == 0
    state = ckpt_io.load(ckpt_io.checkpoint_path(out, 1))
    assert state["speakers"] == ["spk-a", "spk-b"]
    # One small step from the rebuilt weights, not from a fresh initialisation.
    w0, w1 = weights["encoder.proj.weight"], state["model"]["encoder.proj.weight"]
    assert not torch.equal(w0, w1) and torch.allclose(w0, w1, atol=0.05)
    assert torch.equal(weights["features.mean"], state["model"]["features.mean"])
    # Combined with resuming, or with other voices, it is refused.
    assert train_mod.main([*run, "--init-from", str(init), "--resume"]) == train_mod.EXIT_ERROR
    other = tmp_path / "other.pt"
    torch.save(dict(torch.load(init, weights_only=False), speakers=["x", "y"]), other)
    fresh = ["--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "r2")]
    assert train_mod.main([*fresh, "--init-from", str(other)]) == train_mod.EXIT_ERROR
    assert "rebuild it for this dataset" in capsys.readouterr().err


def test_a_shorter_receptive_field_keeps_the_first_layers_of_each_cycle(app_model_dir):
    model, _ = warm_start.rebuild(app_model_dir)
    dec = model.cfg.decoder
    same = warm_start.truncate_layers(model, dec.dilation_depth)
    assert torch.equal(
        torch.cat([p.flatten() for p in same.state_dict().values()]),
        torch.cat([p.flatten() for p in model.state_dict().values()]),
    )
    depth = dec.dilation_depth - 1
    short = warm_start.truncate_layers(model, depth)
    assert short.decoder.dilations == [2**i for i in range(depth)] * dec.dilation_cycles
    assert short.geometry.wavenet_context < model.geometry.wavenet_context
    g2 = 2 * dec.gate_channels
    for cycle in range(dec.dilation_cycles):
        for i in range(depth):
            new, old = cycle * depth + i, cycle * dec.dilation_depth + i
            assert short.decoder.dilations[new] == model.decoder.dilations[old]
            assert torch.equal(short.decoder.dilated[new].weight, model.decoder.dilated[old].weight)
            assert torch.equal(short.decoder.skip[new].weight, model.decoder.skip[old].weight)
            assert torch.equal(
                short.decoder.cond_proj.weight[new * g2 : (new + 1) * g2],
                model.decoder.cond_proj.weight[old * g2 : (old + 1) * g2],
            )
    assert torch.equal(short.encoder.proj.weight, model.encoder.proj.weight)
    with pytest.raises(warm_start.WarmStartError, match="dilation-depth"):
        warm_start.truncate_layers(model, dec.dilation_depth + 1)


def test_average_of_checkpoints_is_the_mean_of_their_weights(data, tmp_path):
    from training import average

    cfg = tiny_train_config(tmp_path / "t.toml", checkpoint_every=1)
    out = tmp_path / "run"
    run = ["--config", str(cfg), "--data", str(data), "--out", str(out), "--no-progress"]
    assert train_mod.main([*run, "--steps", "2"]) == 0
    paths = [ckpt_io.checkpoint_path(out, s) for s in (1, 2)]
    states = [ckpt_io.load(p) for p in paths]
    avg_path = tmp_path / "avg.pt"
    assert average.main([*map(str, paths), "--out", str(avg_path)]) == 0
    avg = torch.load(avg_path, weights_only=False)
    assert avg["averaged_steps"] == [1, 2] and avg["step"] == 2
    for name, value in avg["model"].items():
        a, b = (s["model"][name] for s in states)
        if value.is_floating_point():
            assert torch.allclose(value, (a.double() + b.double()).div(2).to(a.dtype)), name
        else:
            assert torch.equal(value, b), name
    w = "decoder.head.3.weight"
    assert not torch.equal(states[0]["model"][w], states[1]["model"][w])  # a real average
    # A checkpoint of another model is refused.
    other = dict(states[0], model_config={**states[0]["model_config"], "x": 1})
    torch.save(other, tmp_path / "other.pt")
    assert average.main([str(paths[0]), str(tmp_path / "other.pt"), "--out", str(avg_path)]) == 2
