"""
Hybrid decoders on a GPU (skipped without CUDA): the mixers' own forward picks flash-linear-attention, causal-conv1d
and mamba-ssm where they are installed, and transformers' torch implementations otherwise; both must stay exact.

- fp32: the shared-prefix forward equals GRPOTrainer's (log-probs/entropies 1e-4, gradients 1e-3 relative: the
  kernels' own float32 rounding on a GPU is larger than on a CPU);
- bf16: bounded by the repeated forward's own error against the same model in fp32 (STYLE habit 7; the Gated DeltaNet
  kernels compute in float32 whatever the input, so float32 is the reference, not float64):
  max |grouped - ref32| <= 2 * max |repeated - ref32| + 1e-3.
"""

import pytest
import torch
from helpers import CONFIGS, assert_within_repeated_error, gpu_grouped_trainer, make_batch, max_relative_diff
from helpers import moderate_deltanet_decay
from test_equivalence import layout_batch
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer


pytestmark = pytest.mark.gpu

ARCHS = ["qwen3_5", "nemotron_h", "jamba", "lfm2"]
CASES = ["uneven_groups", "empty_completions", "long"]
LONG_CASE = ([300, 300, 300, 77, 77], [130, 1, 64, 200, 5], [0, 0, 0, 1, 1])


def gpu_hybrid(arch: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config.max_position_embeddings = 2048
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    moderate_deltanet_decay(model)
    return model.cuda().eval()


def batch_for(case):
    batch = make_batch(*LONG_CASE, seed=0) if case == "long" else layout_batch(case)
    return tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in batch)


def run(method, model, batch, weights):
    model.zero_grad(set_to_none=True)
    logps, entropies, _ = method(model, *batch, compute_entropy=True)
    ((logps.float() * weights) + (entropies.float() * weights.flip(0))).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach().float(), entropies.detach().float(), grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", CASES)
def test_fp32_equals_the_repeated_forward(tmp_path, arch, case):
    trainer = gpu_grouped_trainer(tmp_path, gpu_hybrid(arch, torch.float32), torch.float32)
    batch = batch_for(case)
    weights = torch.randn(batch[0].size(0), batch[2], generator=torch.Generator().manual_seed(1)).cuda()
    grouped = run(trainer._get_per_token_logps_and_entropies, trainer.model, batch, weights)
    repeated = run(lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k),
                   trainer.model, batch, weights)
    assert (grouped[0] - repeated[0]).abs().max() <= 1e-4
    assert (grouped[1] - repeated[1]).abs().max() <= 1e-4
    for name in repeated[2]:
        assert max_relative_diff(grouped[2][name], repeated[2][name]) <= 1e-3, f"gradient of {name}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", CASES)
def test_bf16_within_the_repeated_forwards_error(tmp_path, arch, case):
    model = gpu_hybrid(arch, torch.bfloat16)
    trainer = gpu_grouped_trainer(tmp_path, model, torch.bfloat16)
    reference_model = gpu_hybrid(arch, torch.float32)
    reference_model.load_state_dict({name: value.float() for name, value in model.state_dict().items()})
    reference_trainer = gpu_grouped_trainer(tmp_path / "ref", reference_model, torch.float32)
    batch = batch_for(case)
    weights = torch.randn(batch[0].size(0), batch[2], generator=torch.Generator().manual_seed(1)).cuda()
    repeated_method = lambda t: lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(t, *a, **k)  # noqa
    grouped = run(trainer._get_per_token_logps_and_entropies, trainer.model, batch, weights)
    repeated = run(repeated_method(trainer), trainer.model, batch, weights)
    reference = run(repeated_method(reference_trainer), reference_trainer.model, batch, weights)
    assert_within_repeated_error(grouped, repeated, reference, f"{arch}/{case}")
