"""
Mamba (v1) selective scans that start from a state.

Neither mamba-ssm's `selective_scan_fn` nor transformers' torch scan takes an initial state: a multi-token Mamba
forward always starts from zero. The scan is linear in its state, so the part an initial state `h0` adds is closed
form. Per channel d and state n, with `dt` after bias and softplus::

    h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t      =>      h_t = h_t|zero start  +  exp(A * sum_{i<=t} dt_i) h0
    y_t = (C_t . h_t + D x_t) * silu(z_t)        =>      y_t = y_t|zero start  +  (C_t . exp(A S_t) h0) * silu(z_t)

`mamba_initial_state_in_scan` wraps the scan function the mixer's module calls, for the suffix pass only, so that each
suffix continues from its group's prefix state (read from the pass's cache). The extra term costs one
`(b, d_inner, t, d_state)` tensor, the size of the torch scan's own discretized A.
"""

import contextlib
import sys

import torch
import torch.nn.functional as F

SCAN_NAME = "mamba_selective_scan"


def _scan_with_initial_state(scan, initial_state: torch.Tensor):
    def scan_from_state(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, **kwargs):
        """Same arguments as the wrapped scan: hidden_states, dt, z `(b, d, t)`, A `(d, n)`, B, C `(b, n, t)`."""
        result = scan(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                      return_last_state=return_last_state, **kwargs)
        out, last_state = result if return_last_state else (result, None)
        dt = dt.float()
        if delta_bias is not None:
            dt = dt + delta_bias.float()[..., None]
        if delta_softplus:
            dt = F.softplus(dt)
        decay = torch.exp(A.float()[None, :, None, :] * dt.cumsum(-1)[..., None])  # (b, d, t, n)
        h0 = initial_state.float()
        extra = torch.einsum("bdtn,bnt,bdn->bdt", decay, C.float(), h0)
        if z is not None:
            extra = extra * F.silu(z.float())
        out = (out.float() + extra).to(out.dtype)
        if return_last_state:
            last_state = (last_state.float() + decay[:, :, -1] * h0).to(last_state.dtype)
            return out, last_state
        return out

    return scan_from_state


@contextlib.contextmanager
def mamba_initial_state_in_scan(module: torch.nn.Module, cache):
    """Inside the block, the scan of `module`'s modeling file starts from the recurrent state cached for it."""
    initial_state = cache.get_recurrent_state(module.layer_idx) if cache.has_state() else None
    modeling = sys.modules[type(module).__module__]
    original = getattr(modeling, SCAN_NAME, None)
    if original is None:
        raise RuntimeError(
            f"{type(module).__name__}: its modeling file has no `{SCAN_NAME}` to continue from a prefix state; this "
            "transformers version is not supported by prefix grouping for Mamba layers. Set prefix_grouping=False."
        )
    if initial_state is None:
        yield
        return
    setattr(modeling, SCAN_NAME, _scan_with_initial_state(original, initial_state))
    try:
        yield
    finally:
        setattr(modeling, SCAN_NAME, original)
