"""
The CPU log-prob head (`head.ScoredLogProbFunction`) against a float64 reference and TRL's `ChunkedLogProbFunction`,
and the routing that uses it only inside our forward and only where it applies.
"""

import pytest
import torch
import trl.trainer.utils as trl_utils_module
from trl.kernels import ChunkedLogProbFunction

import prefix_grouper_trl.head as head_module
from prefix_grouper_trl.head import scored_logprobs
from prefix_grouper_trl.trainer import _cpu_head_in_trl, _CpuLogProbHead

CASES = {
    # name: (tokens, vocab, hidden, bias, temperature, softcap, logit_scale, entropy)
    "plain": (37, 501, 16, False, 1.0, None, 1.0, True),
    "bias_temperature_softcap_scale": (50, 300, 8, True, 0.7, 30.0, 0.5, True),
    "log_probs_only": (20, 100, 8, False, 1.3, None, 2.0, False),
    "tight_softcap": (40, 100, 8, True, 1.0, 5.0, 1.0, True),
    "one_token": (1, 64, 8, False, 1.0, None, 1.0, True),
}


def _inputs(tokens, vocab, hidden_size, with_bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator)
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    grad_logprobs, grad_entropy = torch.randn(tokens, generator=generator), torch.randn(tokens, generator=generator)
    return hidden, weight, bias, targets, grad_logprobs, grad_entropy


def _run(path, case, dtype=torch.float32):
    tokens, vocab, hidden_size, with_bias, temperature, softcap, logit_scale, entropy = case
    hidden, weight, bias, targets, grad_logprobs, grad_entropy = _inputs(tokens, vocab, hidden_size, with_bias)
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias) if t is not None]
    hidden, weight, bias = leaves[0], leaves[1], leaves[2] if with_bias else None
    if path == "float64":
        y = hidden @ weight.t() + (bias if bias is not None else 0)
        z = y * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        log_p = (z / temperature).log_softmax(-1)
        logprobs = log_p.gather(-1, targets[:, None]).squeeze(-1)
        entropies = -(log_p.exp() * log_p).sum(-1) if entropy else None
    elif path == "trl":
        outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
        logprobs, entropies, *_ = ChunkedLogProbFunction.apply(
            hidden, weight, bias, targets, temperature, 32768, softcap, logit_scale, outputs
        )
    else:
        logprobs, entropies = scored_logprobs(
            hidden, weight, bias, targets, temperature, softcap, logit_scale, compute_entropy=entropy
        )
    loss = (logprobs.double() * grad_logprobs.double()).sum()
    if entropy:
        loss = loss + (entropies.double() * grad_entropy.double()).sum()
    loss.backward()
    named = {"logprobs": logprobs, "entropy": entropies, "grad_hidden": hidden.grad, "grad_weight": weight.grad,
             "grad_bias": bias.grad if bias is not None else None}
    return {name: t.detach().double() for name, t in named.items() if t is not None}


@pytest.mark.parametrize("keep", [True, False], ids=["tile_kept", "tile_recomputed"])
@pytest.mark.parametrize("tile_rows", [3, None], ids=["several_tiles", "one_tile"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_float64_as_closely_as_trls_head(case, tile_rows, keep, monkeypatch):
    if tile_rows is not None:
        monkeypatch.setattr(head_module, "TILE_ELEMENTS", tile_rows * case[1])
    if not keep:
        monkeypatch.setattr(head_module, "KEEP_ELEMENTS", 0)
    reference, trl, ours = _run("float64", case, torch.float64), _run("trl", case), _run("ours", case)
    assert ours.keys() == reference.keys() == trl.keys()
    for name, expected in reference.items():
        trl_error = (trl[name] - expected).abs().max().item()
        our_error = (ours[name] - expected).abs().max().item()
        # TRL's own float32 rounding sets the scale; both are a few 1e-6 here.
        assert our_error <= 4 * trl_error + 1e-5, f"{name}: ours {our_error:.2e} vs TRL's {trl_error:.2e}"


def test_frozen_weight_and_no_grad():
    hidden, weight, bias, targets, grad_logprobs, _ = _inputs(12, 50, 8, True)
    hidden.requires_grad_()
    logprobs, entropy = scored_logprobs(hidden, weight, bias, targets)
    logprobs.mul(grad_logprobs).sum().backward()  # entropy unused: its gradient is None
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        again, _ = scored_logprobs(hidden, weight, bias, targets)
    torch.testing.assert_close(again, logprobs.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("tile_rows", [7, None], ids=["several_tiles", "one_tile"])
def test_kept_tiles_give_the_recomputed_gradients_and_survive_a_retained_graph(tile_rows, monkeypatch):
    """The backward reads the forward's log-probability tiles instead of recomputing them, one tile or several; same
    numbers, and a second backward through a retained graph (which reads the kept tiles again) gives them again. Over
    `KEEP_ELEMENTS` nothing is kept."""
    hidden, weight, bias, targets, grad_logprobs, grad_entropy = _inputs(30, 200, 8, True)
    if tile_rows is not None:
        monkeypatch.setattr(head_module, "TILE_ELEMENTS", tile_rows * 200)

    def grads(keep_elements, backwards=1):
        monkeypatch.setattr(head_module, "KEEP_ELEMENTS", keep_elements)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logprobs, entropy = scored_logprobs(*leaves, targets, 0.9)
        loss = (logprobs * grad_logprobs).sum() + (entropy * grad_entropy).sum()
        kept = logprobs.grad_fn.saved_tensors[6:]  # after hidden, weight, bias, targets, log_z, entropy
        for i in range(backwards):
            for leaf in leaves:
                leaf.grad = None
            loss.backward(retain_graph=i + 1 < backwards)
        return [leaf.grad for leaf in leaves], kept

    recomputed, kept = grads(0)
    assert kept == ()
    _, kept = grads(30 * 200 - 1)  # one element over the budget
    assert kept == ()
    once, kept = grads(30 * 200)
    assert [tile.shape for tile in kept] == [(rows, 200) for rows in ((7, 7, 7, 7, 2) if tile_rows else (30,))]
    twice, _ = grads(30 * 200, backwards=2)
    for a, b, c in zip(recomputed, once, twice):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_routing_only_inside_our_forward_and_only_where_it_applies():
    assert trl_utils_module._ChunkedLogProbFunction is ChunkedLogProbFunction
    with _cpu_head_in_trl():
        assert trl_utils_module._ChunkedLogProbFunction is _CpuLogProbHead
    assert trl_utils_module._ChunkedLogProbFunction is ChunkedLogProbFunction

    hidden, weight, _, targets, _, _ = _inputs(6, 40, 8, False)
    args = (targets, 1.0, 32768, None, 1.0)
    ours = _CpuLogProbHead.apply(hidden, weight, None, *args, ("log_probs", "entropy"))
    assert ours[2:] == (None, None, None) and ours[1] is not None
    # Outputs our head does not compute, and dtypes other than float32, go to TRL's own function.
    extra = _CpuLogProbHead.apply(hidden, weight, None, *args, ("log_probs", "entropy", "is_top1"))
    assert extra[4] is not None
    trl_double = ChunkedLogProbFunction.apply(hidden.double(), weight.double(), None, *args, ("log_probs",))
    routed_double = _CpuLogProbHead.apply(hidden.double(), weight.double(), None, *args, ("log_probs",))
    torch.testing.assert_close(routed_double[0], trl_double[0], rtol=0, atol=0)


@pytest.mark.parametrize("keep", [True, False], ids=["tile_kept", "tile_recomputed"])
@pytest.mark.parametrize("case", ["plain", "bias_temperature_softcap_scale"])
def test_reused_tile_buffers_carry_nothing_from_one_call_to_the_next(case, keep, monkeypatch):
    """The forward's and backward's scratch tiles are shared by all calls: two forwards before their two backwards
    (as TRL's old-policy, policy and reference passes interleave) give each call's own numbers, the buffers are
    reused rather than reallocated, and `release_scratch` frees them."""
    tokens, vocab, hidden_size, with_bias, temperature, softcap, logit_scale, _ = CASES[case]
    monkeypatch.setattr(head_module, "TILE_ELEMENTS", 7 * vocab)
    if not keep:
        monkeypatch.setattr(head_module, "KEEP_ELEMENTS", 0)
    settings = (temperature, softcap, logit_scale)

    def call(seed):
        hidden, weight, bias, targets, grad_logprobs, grad_entropy = _inputs(
            tokens, vocab, hidden_size, with_bias, seed)
        leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
        logprobs, entropy = scored_logprobs(hidden, weight, bias, targets, *settings)
        loss = (logprobs * grad_logprobs).sum() + (entropy * grad_entropy).sum()
        return leaves, (logprobs.detach().clone(), entropy.detach().clone()), loss

    def alone(seed):
        leaves, outputs, loss = call(seed)
        loss.backward()
        return outputs, [leaf.grad for leaf in leaves]

    head_module.release_scratch()
    expected = {seed: alone(seed) for seed in (1, 2)}
    buffers = {key: buffer.data_ptr() for key, buffer in head_module._scratch.buffers.items()}
    assert 1 <= len(buffers) <= 2
    first, second = call(1), call(2)  # both forwards, then both backwards in the other order
    second[2].backward()
    first[2].backward()
    for seed, (leaves, outputs, _) in ((1, first), (2, second)):
        for got, want in zip([*outputs, *(leaf.grad for leaf in leaves)], [*expected[seed][0], *expected[seed][1]]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert {key: buffer.data_ptr() for key, buffer in head_module._scratch.buffers.items()} == buffers
    head_module.release_scratch()
    assert head_module._scratch.buffers == {}
