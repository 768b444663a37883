"""The training forward under torch.compile: one graph, and the eager function.

A graph break costs a launch-bound GPU step (README, "Trainer throughput"): the forward used to
compile to 10 graphs, split by host reads of data-dependent sizes, the jitter hash kept eager
and the quantiser's usage hook. Now one graph ends at the hook's registration (`watch`), and a
new epoch does not recompile it.
"""

import dataclasses

import pytest
import torch

from model.jitter import uniform_hash
from tests.test_loss import tiny_jittered_batch
from training.loss import batch_loss


@pytest.fixture(scope="module")
def setup():
    model, _, _, wave, win, n = tiny_jittered_batch()
    return model, wave, win, n


@pytest.fixture(params=[0.0, 0.5], ids=["true-past", "drawn-past"])
def past(request, setup):
    """The forward as it is, and with the gradient-free first pass of `model.past_draws` (the
    tiny geometry's windows already hold that pass's context)."""
    model = setup[0]
    model.cfg.decoder.past_draws = request.param
    yield setup
    model.cfg.decoder.past_draws = 0.0


def test_training_forward_is_one_graph(past):
    model, wave, win, n = past
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(wave, win, n)
    stops = [(r.reason.splitlines()[0], r.user_stack[-1].line) for r in ex.break_reasons]
    assert ex.graph_count == 1, stops
    # The only stop is the quantiser's eager `watch`, the forward's last call.
    assert all("self.quantizer.watch" in line for _, line in stops), stops


def test_compiled_step_equals_the_eager_step(past):
    """Logits, loss, every gradient and the codebook's usage statistics (float64)."""
    model, wave, win, n = past
    results = []
    torch._dynamo.reset()
    for forward in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        model.quantizer.step_count.zero_()
        model.quantizer.step_sum.zero_()
        out = forward(wave, win, n)
        loss = batch_loss(out, int(out.mask.sum())).loss
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        stats = (model.quantizer.step_count.clone(), model.quantizer.step_sum.clone())
        results.append((out.logits.detach(), loss.detach(), grads, stats))
    (logits, loss, grads, stats), (c_logits, c_loss, c_grads, c_stats) = results
    assert torch.allclose(c_logits, logits, rtol=1e-10, atol=1e-12)
    assert torch.allclose(c_loss, loss, rtol=1e-12)
    assert grads.keys() == c_grads.keys() and len(grads) == len(list(model.parameters()))
    for k in grads:
        assert torch.allclose(c_grads[k], grads[k], rtol=1e-9, atol=1e-12), k
    assert float(stats[0].sum()) == pytest.approx(1.0, rel=1e-12)  # the hook ran
    assert torch.allclose(c_stats[0], stats[0], rtol=1e-12, atol=0)
    assert torch.allclose(c_stats[1], stats[1], rtol=1e-12, atol=1e-15)


def test_a_new_epoch_or_seed_does_not_recompile(setup):
    """Windows carry seed and epoch as tensors: as Python ints they were constants of the
    graph, and the first epoch change recompiled the whole forward (about a minute)."""
    model, wave, win, n = setup
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    forward = torch.compile(model, backend=count)
    logits = []
    for seed, epoch in ((7, 2), (7, 3), (8, 3)):
        w = dataclasses.replace(win, seed=seed, epoch=epoch)
        logits.append(forward(wave, w, n).logits)
        assert torch.equal(logits[-1], model(wave, w, n).logits), (seed, epoch)
    assert len(graphs) == 1
    assert not torch.equal(logits[0], logits[1])  # the epoch reaches the jitter


def test_short_window_fails_under_compile_too(setup):
    """Compiled, the length check is an asynchronous assert: a RuntimeError on CPU."""
    model, wave, win, n = setup
    torch._dynamo.reset()
    forward = torch.compile(model, backend="eager")
    with pytest.raises(RuntimeError, match="shorter than its predictions need"):
        forward(wave[:, : -model.geometry.hop], win, n)


def test_jitter_hash_keeps_its_values():
    """Golden values of the hash as it was with Python-int seed and epoch: the
    int64 tensors must not change a draw."""
    u = uniform_hash(123456789, 41, torch.tensor([[0], [7]]), torch.tensor([[-2, 0, 5, 100000]]))
    want = [[1971814321, 3166228598, 3443665199, 2872643233]]
    want.append([3068352686, 3168569708, 1383032815, 629052900])
    assert (u * 2**32).long().tolist() == want


def test_jitter_hash_compiles_with_symbolic_seed_and_epoch():
    """Under ``dynamic=True`` the seed and epoch are symbolic integers; Inductor (torch 2.11,
    CPU) typed them as float in C++ that did not build, when they entered the hash as Python
    integers (a CppCompileError when last checked)."""
    k = torch.arange(-3, 500)[None]
    utt = torch.arange(4)[:, None]
    torch._dynamo.reset()
    compiled = torch.compile(uniform_hash, dynamic=True)
    draws = [compiled(11, epoch, utt, k) for epoch in (1, 2, 3)]
    for epoch, u in zip((1, 2, 3), draws):
        assert torch.equal(u, uniform_hash(11, epoch, utt, k)), epoch
    assert not torch.equal(draws[0], draws[1])  # the epoch reaches the draw
