"""
Vision-language models on a GPU (skipped without CUDA): the vision tower runs once per distinct image through its own
attention path (flash-attn's varlen kernel with `flash_attention_2`, per-image sdpa otherwise), the language model
through the split attention; both must stay exact.

- fp32: equal to GRPOTrainer's repeated forward (log-probs/entropies 1e-4, gradients 1e-3 relative);
- bf16: bounded by the repeated forward's own error against the same model in fp32 (STYLE habit 7):
  max |grouped - ref32| <= 2 * max |repeated - ref32| + 1e-3.
"""

import pytest
import torch
from helpers import VLM_ARCHITECTURES, assert_within_repeated_error, gpu_grouped_trainer, make_vlm_batch
from helpers import max_relative_diff, tiny_vlm
from test_multimodal import VLM_CASES
from trl import GRPOTrainer


pytestmark = pytest.mark.gpu

CASES = ["interleaved_groups", "multi_image_prompt", "different_sizes_and_lengths"]


def attention_implementations():
    implementations = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        implementations.append("flash_attention_2")
    except ImportError:
        pass
    return implementations


def trainer_for(tmp_path, arch, dtype, attn):
    return gpu_grouped_trainer(tmp_path, tiny_vlm(arch, attn_implementation=attn).to(dtype).cuda().eval(), dtype)


def batch_for(arch, case, dtype):
    input_ids, attention_mask, logits_to_keep, inputs = make_vlm_batch(arch, *VLM_CASES[case])
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return input_ids.cuda(), attention_mask.cuda(), logits_to_keep, inputs


def run(method, model, batch, weights):
    input_ids, attention_mask, logits_to_keep, inputs = batch
    model.zero_grad(set_to_none=True)
    logps, entropies, _ = method(model, input_ids, attention_mask, logits_to_keep, compute_entropy=True, **inputs)
    ((logps.float() * weights) + (entropies.float() * weights.flip(0))).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach().float(), entropies.detach().float(), grads


def repeated_method(trainer):
    return lambda *a, **k: GRPOTrainer._get_per_token_logps_and_entropies(trainer, *a, **k)


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
@pytest.mark.parametrize("case", CASES)
def test_fp32_equals_the_repeated_forward(tmp_path, arch, case):
    trainer = trainer_for(tmp_path, arch, torch.float32, "sdpa")
    batch = batch_for(arch, case, torch.float32)
    weights = torch.randn(batch[0].size(0), batch[2], generator=torch.Generator().manual_seed(1)).cuda()
    grouped = run(trainer._get_per_token_logps_and_entropies, trainer.model, batch, weights)
    repeated = run(repeated_method(trainer), trainer.model, batch, weights)
    assert (grouped[0] - repeated[0]).abs().max() <= 1e-4
    assert (grouped[1] - repeated[1]).abs().max() <= 1e-4
    for name in repeated[2]:
        assert max_relative_diff(grouped[2][name], repeated[2][name]) <= 1e-3, f"gradient of {name}"


@pytest.mark.parametrize("attn", attention_implementations())
@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
@pytest.mark.parametrize("case", CASES)
def test_bf16_within_the_repeated_forwards_error(tmp_path, arch, case, attn):
    trainer = trainer_for(tmp_path, arch, torch.bfloat16, attn)
    reference_trainer = trainer_for(tmp_path / "ref", arch, torch.float32, "sdpa")
    reference_trainer.model.load_state_dict({k: v.float() for k, v in trainer.model.state_dict().items()})
    batch = batch_for(arch, case, torch.bfloat16)
    reference_batch = batch[:3] + ({**batch[3], "pixel_values": batch[3]["pixel_values"].float()},)
    weights = torch.randn(batch[0].size(0), batch[2], generator=torch.Generator().manual_seed(1)).cuda()
    grouped = run(trainer._get_per_token_logps_and_entropies, trainer.model, batch, weights)
    repeated = run(repeated_method(trainer), trainer.model, batch, weights)
    reference = run(repeated_method(reference_trainer), reference_trainer.model, reference_batch, weights)
    assert_within_repeated_error(grouped, repeated, reference, f"{arch}/{case}/{attn}")
