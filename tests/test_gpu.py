"""
GPU paths (skipped without CUDA): flash-attn 2 varlen, torch's varlen kernel behind sdpa, and SDPA block masks, each
against an fp64 reference, bounded by the repeated forward's own error (STYLE habit 7):
|grouped - ref64| <= 2 * |repeated - ref64| + 1e-5.
"""

import importlib.util

import pytest
import torch
from helpers import grpo_args, prompt_dataset, tiny_model, tiny_tokenizer, token_count_reward
from test_equivalence import layout_batch
from trl import GRPOTrainer

from prefix_grouper_trl import PrefixGroupedGRPOTrainer

pytestmark = pytest.mark.gpu

IMPLEMENTATIONS = ["sdpa", "eager"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def logps_on(trainer, model, batch, grouped):
    if grouped:
        return trainer._get_per_token_logps_and_entropies(model, *batch)[0].double()
    return GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, *batch)[0].double()


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["uneven_groups", "empty_completions", "shuffled_rows"])
def test_grouped_logps_within_the_repeated_forward_error(tmp_path, attn, dtype, case):
    model = tiny_model("qwen2", attn if dtype != torch.float32 or attn != "flash_attention_2" else "sdpa", dtype)
    trainer = PrefixGroupedGRPOTrainer(
        model=model.cuda(),
        reward_funcs=token_count_reward,
        args=grpo_args(tmp_path, use_cpu=False, bf16=dtype == torch.bfloat16),
        train_dataset=prompt_dataset(),
        processing_class=tiny_tokenizer(),
    )
    batch = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in layout_batch(case))
    with torch.no_grad():
        grouped = logps_on(trainer, trainer.model, batch, grouped=True)
        repeated = logps_on(trainer, trainer.model, batch, grouped=False)
        reference_model = tiny_model("qwen2", "eager", torch.float64).cuda()
        reference_model.load_state_dict({k: v.double() for k, v in trainer.model.state_dict().items()})
        trainer_ref = PrefixGroupedGRPOTrainer(
            model=reference_model,
            reward_funcs=token_count_reward,
            args=grpo_args(tmp_path / "ref", use_cpu=False, bf16=False, prefix_grouping=False),
            train_dataset=prompt_dataset(),
            processing_class=tiny_tokenizer(),
        )
        reference = logps_on(trainer_ref, trainer_ref.model, batch, grouped=False)
    bound = 2 * (repeated - reference).abs() + 1e-5
    excess = (grouped - reference).abs() - bound
    assert excess.max() <= 0, f"{attn}/{dtype}: worst excess {excess.max().item():.3g} at {excess.argmax().item()}"
