"""
Per-token log-probabilities and entropies of `hidden @ weight.T` for CPU, in fewer passes over the logits.

TRL's fused LM head (`trl.kernels.ChunkedLogProbFunction`) folds each `(tokens, vocab)` tile of logits into online
log-sum-exp statistics with a Triton kernel; on devices without Triton it runs the same fold as a dozen and a half
separate torch element-wise ops per tile, forward and backward, and those passes cost more than the projection
itself on a CPU. `ScoredLogProbFunction` computes the same quantities with full-vocabulary rows:

    forward   z = transform(h @ W.T)           (N, V), one token tile at a time; `transform`: TRL's scale, softcap, 1/T
              m = max(z); e = exp(z - m); s = sum(e); log_z = m + log(s)
              log_p = z - log_z   in place;   logp_target = log_p[n, target[n]]
              entropy = -<e / s, log_p>        e / s in place, one batched row-dot
    backward  recompute z; log_p = z - log_z (saved log_z, in place); p = exp(log_p)
              (when all N x V log-probabilities fit KEEP_ELEMENTS, every tile's log_p is kept from the forward instead)
              dz = -p * (g_lp + g_ent * (log_p + entropy))  +  g_lp * onehot(target)
                                               one addcmul and one in-place mul, then an N-element scatter
              dh += dz @ W,  dW += dz.T @ h,  db += dz.sum(0)

It gives TRL's values up to float32 rounding (the tests compare both, and a float64 reference). It covers what TRL's
head is asked for by `GRPOTrainer` (log-probs, with or without entropy) in float32; the caller keeps TRL's own
function for anything else (see `trainer._cpu_head_in_trl`). Torch only.

The (n, V) buffers a tile needs only inside one forward or one backward (the exponentials, the backward's coefficient,
logits that are not kept) are reused from call to call (`_TileScratch`): a fresh tensor of that size is mapped anew
by the allocator and faults in every page, which on a CPU costs more than the pass that fills it (measured: 37 ms for
`exp` into a new 32 MiB tensor, 13 ms into an existing one).
"""

import contextlib
import threading
from collections.abc import Callable

import torch

# Elements of one logits tile: 2**24 fp32 values = 64 MiB, e.g. 2048 tokens of an 8192-token vocabulary or 110 of
# Qwen2.5's 151936. The forward and the backward each hold two or three such buffers at a time.
TILE_ELEMENTS = 2**24

# When the N x V log-probabilities of all scored positions take at most this many elements (2**28 fp32 values = 1
# GiB: 32768 positions of an 8192-token vocabulary, 1766 of Qwen2.5's; several tiles) and there is no softcap (whose
# backward needs its tanh), the forward's log-probability tiles are kept for the backward instead of recomputed: one
# (N, H) x (H, V) product and a pass over the logits fewer, for up to 1 GiB held from the forward to the backward,
# where the tiles stay as they are (a second backward through a retained graph reads them again). 0 turns it off.
# Measured 9% faster log-prob steps at 16 groups of P=128 C=128 G=4 than recomputing (benchmarks/README.md).
KEEP_ELEMENTS = 2**28


def _tokens_per_tile(vocab: int) -> int:
    return max(1, TILE_ELEMENTS // max(vocab, 1))


def keeps_tiles(num_tokens: int, vocab: int, softcap: float | None = None) -> bool:
    """Whether `ScoredLogProbFunction` keeps the forward's log-probability tiles for the backward (`KEEP_ELEMENTS`)."""
    return softcap is None and num_tokens * vocab <= KEEP_ELEMENTS


class _TileScratch(threading.local):
    """
    Two reusable `(n, V)` buffers per thread, device and dtype, grown to the largest tile asked for (at most
    `TILE_ELEMENTS` values each, 2 x 64 MiB) and kept between calls. A buffer handed out by `get` is only valid until
    the next `get` of the same slot: it is never saved for the backward or returned.
    """

    def __init__(self):
        self.buffers: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, slot: int, like: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
        """A `(rows, vocab)` view of buffer `slot` with `like`'s device and dtype; off the CPU, where a caching
        allocator already reuses memory, a new tensor."""
        if like.device.type != "cpu":
            return like.new_empty(rows, vocab)
        needed, key = rows * vocab, (slot, like.device, like.dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < needed:
            self.buffers.pop(key, None)  # before allocating the larger one: never both at once
            buffer = torch.empty(needed, dtype=like.dtype, device=like.device)
            self.buffers[key] = buffer
        return buffer[:needed].view(rows, vocab)


_scratch = _TileScratch()


def release_scratch() -> None:
    """Free this thread's reusable tile buffers (up to 2 x 64 MiB); the next call allocates them again."""
    _scratch.buffers.clear()


def _logits(hidden_tile, weight, bias, logit_scale: float, softcap: float | None, inv_t: float, out: torch.Tensor):
    """`transform(hidden_tile @ weight.T + bias)`, `(n, V)`, and `tanh(y / softcap)` (or None) for the backward; the
    product is written into `out`."""
    if bias is None:
        z = torch.mm(hidden_tile, weight.t(), out=out)
    else:
        z = torch.addmm(bias, hidden_tile, weight.t(), out=out)
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    tanh = None
    if softcap is not None:
        tanh = z.div_(softcap).tanh_()
        z = tanh * softcap
    if inv_t != 1.0:
        z.mul_(inv_t)
    return z, tanh


class ScoredLogProbFunction(torch.autograd.Function):
    """
    `(logprobs (N,), entropy (N,) or None)` of the next-token distribution `softmax(transform(hidden @ weight.T))`.

    Args:
        hidden: `(N, H)` float32 hidden states of the positions to score.
        weight: `(V, H)` LM-head weight; bias: `(V,)` or None.
        targets: `(N,)` int64 target token ids.
        temperature, softcap, logit_scale: as TRL's fused head applies them: `z = softcap * tanh(logit_scale * y /
            softcap) / temperature` (no tanh when `softcap` is None).
        compute_entropy: whether to return (and backpropagate) the entropy.
        gather: `gather(weight, bias)` -> context manager under which the full weight is readable in the backward
            (DeepSpeed ZeRO-3 partitions it between forward and backward); defaults to no-op.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        softcap: float | None,
        logit_scale: float,
        compute_entropy: bool,
        gather: Callable | None = None,
    ):
        ctx.set_materialize_grads(False)
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        logprobs = hidden.new_empty(num_tokens, dtype=torch.float32)
        log_z = hidden.new_empty(num_tokens, dtype=torch.float32)
        entropy = hidden.new_empty(num_tokens, dtype=torch.float32) if compute_entropy else None
        step = _tokens_per_tile(vocab)
        keep = keeps_tiles(num_tokens, vocab, softcap) and any(ctx.needs_input_grad[:3])
        kept = []
        for start in range(0, num_tokens, step):
            end = min(start + step, num_tokens)
            # A kept tile is saved for the backward, so it gets its own memory; anything else is scratch.
            rows = end - start
            logits_out = hidden.new_empty(rows, vocab) if keep else _scratch.get(0, hidden, rows, vocab)
            z, _ = _logits(hidden[start:end], weight, bias, logit_scale, softcap, inv_t, out=logits_out)
            # logsumexp by hand: its exponentials are the probabilities' numerators, reused for the entropy.
            row_max = z.amax(dim=-1, keepdim=True)
            shifted_exp = torch.sub(z, row_max, out=_scratch.get(1, hidden, rows, vocab)).exp_()
            row_sum = shifted_exp.sum(dim=-1, keepdim=True)
            tile_log_z = row_sum.log().add_(row_max)
            log_z[start:end] = tile_log_z.view(-1)
            log_p = z.sub_(tile_log_z)
            logprobs[start:end] = log_p.gather(-1, targets[start:end, None]).squeeze(-1)
            if compute_entropy:
                p = shifted_exp.div_(row_sum)
                entropy[start:end] = -torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1)
            if keep:
                kept.append(log_p)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy, *kept)
        ctx.settings = (inv_t, softcap, logit_scale, gather)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        hidden, weight, bias, targets, log_z, entropy, *kept = ctx.saved_tensors
        inv_t, softcap, logit_scale, gather = ctx.settings
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 9
        num_tokens = hidden.shape[0]
        with (gather or (lambda w, b: contextlib.nullcontext()))(weight, bias):
            vocab = weight.shape[0]
            grad_hidden = torch.zeros_like(hidden) if needs_hidden else None
            grad_weight = torch.zeros_like(weight) if needs_weight else None
            grad_bias = torch.zeros_like(bias) if needs_bias else None
            # d(logp_target)/dz = onehot - p; d(entropy)/dz = -p * (log_p + entropy); both times d(z)/d(y), which is
            # `logit_scale * inv_t` (times `1 - tanh^2` with a softcap): fold the scalars into the per-token weights.
            scale = logit_scale * inv_t
            g_lp = grad_logprobs.float() * scale if grad_logprobs is not None else None
            g_ent = grad_entropy.float() * scale if grad_entropy is not None else None
            step = _tokens_per_tile(vocab)
            for tile, start in enumerate(range(0, num_tokens, step)):
                end = min(start + step, num_tokens)
                hidden_tile = hidden[start:end]
                rows = end - start
                if kept:  # no softcap
                    log_p, tanh = kept[tile], None
                else:
                    z, tanh = _logits(hidden_tile, weight, bias, logit_scale, softcap, inv_t,
                                      out=_scratch.get(0, hidden, rows, vocab))
                    log_p = z.sub_(log_z[start:end, None])
                p = torch.exp(log_p, out=_scratch.get(1, hidden, rows, vocab))
                # -(g_lp + g_ent * (log_p + entropy)) = (-g_lp - g_ent * entropy) + (-g_ent) * log_p, per row
                if g_ent is not None:
                    offset = -g_ent[start:end] * entropy[start:end]
                    if g_lp is not None:
                        offset -= g_lp[start:end]
                    # Into log_p's own storage, unless it is a kept tile (a second backward may read it again);
                    # then into scratch 0, which a kept tile's backward does not otherwise use.
                    out = _scratch.get(0, hidden, rows, vocab) if kept else log_p
                    coefficient = torch.addcmul(offset[:, None], log_p, -g_ent[start:end, None], out=out)
                    grad_z = p.mul_(coefficient)
                else:
                    grad_z = p.mul_(-g_lp[start:end, None])
                del log_p
                if g_lp is not None:
                    row_index = torch.arange(rows, device=grad_z.device)
                    grad_z.index_put_((row_index, targets[start:end]), g_lp[start:end], accumulate=True)
                if tanh is not None:
                    grad_z.mul_(1 - tanh.square_())
                if grad_hidden is not None:
                    grad_hidden[start:end].addmm_(grad_z, weight)
                if grad_weight is not None:
                    grad_weight.addmm_(grad_z.t(), hidden_tile)
                if grad_bias is not None:
                    grad_bias += grad_z.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def scored_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    compute_entropy: bool = True,
    gather: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Functional form of `ScoredLogProbFunction` (see there for the arguments)."""
    return ScoredLogProbFunction.apply(
        hidden, weight, bias, targets, temperature, softcap, logit_scale, compute_entropy, gather
    )
