"""`PrefixGroupedGRPOTrainer`: TRL's `GRPOTrainer` with each group's prompt forwarded once."""

import contextlib
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import trl.trainer.grpo_trainer as trl_grpo_module
import trl.trainer.utils as trl_utils_module
from trl import GRPOTrainer

from .head import scored_logprobs
from .integration import enable_prefix_grouping, expected_attention_layers, grouped_forward
from .layout import LAYOUT_KWARG, GroupLayout, build_group_layout, find_prompt_groups, plan_row_chunks
from .mixers import mixer_modules
from .multimodal import MultimodalUnsupported, has_visual_inputs, prepare_visual_batch, row_visual_keys
from .self_check import check_grouped_forward


def shuffle_groups_sequence_dict(seq_dict: dict[str, Sequence | None]) -> dict[str, Sequence | None]:
    """
    Shuffle a generation batch by whole prompt groups, drawing the random stream exactly as TRL's
    `shuffle_sequence_dict` does (one `torch.randperm(batch_size)`), so a seeded run samples the same completions.

    The row permutation TRL would use decides the order: groups come in the order their first row appears in it, and
    the rows of a group keep the order they have in it. Every group order stays equally likely, and rows of one
    prompt end up next to each other, so TRL's split into micro-batches cuts as few groups as possible.
    """
    batch_size = len(next(v for v in seq_dict.values() if v is not None))
    permutation = torch.randperm(batch_size)
    prompt_ids, prompt_mask = seq_dict.get("prompt_ids"), seq_dict.get("prompt_mask")
    if isinstance(prompt_ids, torch.Tensor) and isinstance(prompt_mask, torch.Tensor):
        # Rows with the same text but other images are other groups (see multimodal.py).
        visual_keys = row_visual_keys(seq_dict)
        group_of_row = find_prompt_groups(prompt_ids.cpu(), prompt_mask.cpu(), visual_keys)
        group_at = group_of_row[permutation]
        first_position = torch.full((batch_size,), batch_size, dtype=torch.long)
        first_position = first_position.scatter_reduce(0, group_at, torch.arange(batch_size), reduce="amin")
        sort_key = first_position[group_at] * batch_size + torch.arange(batch_size)
        permutation = permutation[torch.argsort(sort_key)]

    def permute(value: Sequence | None) -> Sequence | None:
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[permutation.to(value.device)]
        return [value[i] for i in permutation]

    return {key: permute(value) for key, value in seq_dict.items()}


@contextlib.contextmanager
def _module_global_swapped(module, name: str, replacement):
    """`module.<name>` is `replacement` inside the block: TRL looks these globals up at call time."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _group_shuffle_in_trl():
    # TRL's `_prepare_inputs` calls its module-level `shuffle_sequence_dict`; swapping it for the duration of our call
    # changes only this trainer's shuffle and keeps the rest of `_prepare_inputs` TRL's own.
    return _module_global_swapped(trl_grpo_module, "shuffle_sequence_dict", shuffle_groups_sequence_dict)


class _CpuLogProbHead:
    """
    Stands in for TRL's `ChunkedLogProbFunction` (same `apply` signature and outputs) while our forward runs: float32
    CPU calls that ask for log-probs and entropies go to `head.ScoredLogProbFunction`, which gives the same values in
    far fewer passes over the logits than TRL's torch fallback for devices without Triton; every other call (GPU,
    other dtypes or autocast, other outputs) goes to TRL's function unchanged.
    """

    original = trl_utils_module._ChunkedLogProbFunction

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        eligible = (
            hidden.device.type == "cpu"
            and hidden.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32)
            and not torch.is_autocast_enabled("cpu")
            and set(outputs) <= {"log_probs", "entropy"}
        )
        if not eligible:
            return cls.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
        logprobs, entropy = scored_logprobs(
            hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
            compute_entropy="entropy" in outputs, gather=trl_utils_module.maybe_gather_lm_head_ctx,
        )
        return logprobs, entropy, None, None, None


def _cpu_head_in_trl():
    # The swap covers our forward only (the backward runs the function recorded in the graph), so GRPOTrainer
    # elsewhere is untouched.
    return _module_global_swapped(trl_utils_module, "_ChunkedLogProbFunction", _CpuLogProbHead)


@contextlib.contextmanager
def _scored_positions_only(model, scored_positions: torch.Tensor, captured: dict | None = None):
    """
    Hand TRL's fused LM head only the hidden states it has to score (the completion positions).

    The fused head scores every position it is given on devices without Triton (CPU), and the prompt positions of a
    packed row have nothing to score. The hook keeps `model.base_model`'s output to `(1, N, hidden)`; the labels
    passed as `shift_labels` are the `(1, N)` labels of the same positions, so the head computes exactly what TRL's
    would on those positions. `captured`, when given, receives the backbone's `router_logits` (MoE models).
    """

    def keep_scored(module, args, output):
        if captured is not None:
            captured["router_logits"] = getattr(output, "router_logits", None)
        output.last_hidden_state = output.last_hidden_state[:, scored_positions]
        return output

    handle = model.base_model.register_forward_hook(keep_scored)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _tokens_left_out(args):
    """
    The training arguments with every `*_token` field (e.g. `hub_token`) set to None, restored on exit.

    transformers pickles the whole arguments object into `training_args.bin` of every checkpoint and saved model; a
    token given in the config would be stored there in clear (its own `to_dict`, used for logging, already masks the
    same `*_token` fields).
    """
    tokens = {name: value for name, value in vars(args).items() if name.endswith("_token") and value is not None}
    for name in tokens:
        setattr(args, name, None)
    try:
        yield
    finally:
        for name, value in tokens.items():
            setattr(args, name, value)


def _weighted_aux_loss(inner, router_logits, layout: GroupLayout, fused_aux_loss):
    """The repeated forward's MoE load-balancing loss from the packed row's router logits (see `_grouped_forward`)."""
    if router_logits is None or fused_aux_loss is None or layout.token_weights is None:
        return fused_aux_loss
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = inner.config.get_text_config()
    num_experts = getattr(text_config, "num_experts", None) or getattr(inner, "num_experts", None)
    top_k = getattr(text_config, "num_experts_per_tok", None) or getattr(inner, "num_experts_per_tok", None)
    if num_experts is None or top_k is None:
        raise RuntimeError(
            f"{type(inner).__name__} returns router logits, but its config names neither `num_experts` nor "
            "`num_experts_per_tok`, so its load-balancing loss cannot be weighted like the repeated forward's. Set "
            "router_aux_loss_coef=0.0 or prefix_grouping=False."
        )
    weights = layout.token_weights.to(router_logits[0].device)
    return load_balancing_loss_func(router_logits, num_experts, top_k, weights)


def _parameters_partitioned(model) -> bool:
    """Whether DeepSpeed ZeRO-3 holds the parameters (a forward outside its engine would see empty tensors)."""
    return any(hasattr(parameter, "ds_id") for parameter in model.parameters())


class PrefixGroupedGRPOTrainer(GRPOTrainer):
    """
    Drop-in replacement for TRL's `GRPOTrainer` that forwards each group's shared prompt once.

    Same constructor as `GRPOTrainer`. With a [`PrefixGroupedGRPOConfig`] whose `prefix_grouping` is False it is
    exactly `GRPOTrainer`; with a plain `GRPOConfig`, grouping is on. Policy, old-policy and reference log-probs and
    the entropies go through the shared-prefix forward (see `layout.py` and `attention.py`); generation, rewards,
    advantages, the loss, PEFT and DeepSpeed are TRL's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix_grouping = getattr(self.args, "prefix_grouping", True)
        self.prefix_grouping_shuffle_groups = self.prefix_grouping and getattr(
            self.args, "prefix_grouping_shuffle_groups", True
        )
        self._warned_multimodal_fallback: set[str] = set()
        self._checked_models: set[int] = set()
        self._mixer_kinds: dict[int, list[str]] = {}
        if self.prefix_grouping:
            for model in (self.model, self.ref_model):
                if model is not None:
                    inner = self._transformers_model(model)
                    enable_prefix_grouping(inner)
                    # Under ZeRO-3 the parameters only exist inside DeepSpeed's engine: checked at the first use.
                    if not _parameters_partitioned(inner):
                        self._check_model_once(model)

    def _check_model_once(self, model) -> None:
        """
        Compare the model's grouped forward with its repeated forward on a probe batch, once per model (see
        `self_check.py`): a token mixer that nothing splits is refused before it computes a log-prob.
        """
        inner = self._transformers_model(model)
        if id(inner) in self._checked_models:
            return
        with self.accelerator.autocast():
            check_grouped_forward(
                model, inner, grouped_forward, check_layout=lambda layout: self._check_layout_consumed(inner, layout)
            )
        self._checked_models.add(id(inner))

    def _transformers_model(self, model):
        """The `PreTrainedModel` inside PEFT / DeepSpeed / DDP wrappers."""
        model = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        model = getattr(model, "module", model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _prepare_inputs(self, generation_batch: dict[str, torch.Tensor | Any]) -> dict[str, torch.Tensor | Any]:
        if not (self.prefix_grouping_shuffle_groups and self.model.training):
            return super()._prepare_inputs(generation_batch)
        with _group_shuffle_in_trl():
            return super()._prepare_inputs(generation_batch)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_inputs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """
        Per-token log-probs `(B, K)`, entropies `(B, K)` or None, and the MoE aux loss or None, as TRL's method returns
        them, computed on packed rows. Where TRL chunks `batch_size` rows, we chunk whole groups into packed rows of at
        most `batch_size * L` tokens, so no chunk is larger than one of TRL's.
        """
        parent_call = lambda: super(PrefixGroupedGRPOTrainer, self)._get_per_token_logps_and_entropies(  # noqa: E731
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=batch_size,
            compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss,
            **multimodal_inputs,
        )
        if not self.prefix_grouping:
            return parent_call()
        self._check_model_once(model)
        visual = None
        if has_visual_inputs(multimodal_inputs):
            try:
                visual = prepare_visual_batch(
                    self._transformers_model(model), input_ids, attention_mask, logits_to_keep, multimodal_inputs
                )
            except MultimodalUnsupported as reason:
                self._warn_multimodal_fallback(model, str(reason))
                return parent_call()
        group_ids = None if visual is None else visual.group_ids

        num_rows, width = input_ids.shape
        if batch_size is None or batch_size >= num_rows:
            row_chunks = [None]
        else:
            row_chunks = plan_row_chunks(
                input_ids, attention_mask, logits_to_keep, token_budget=batch_size * width, group_ids=group_ids
            )

        logps_parts, entropy_parts, aux_losses, layouts = [], [], [], []
        for rows in row_chunks:
            chunk_ids = input_ids if rows is None else input_ids[rows]
            chunk_mask = attention_mask if rows is None else attention_mask[rows]
            chunk_groups = None if group_ids is None else (group_ids if rows is None else group_ids[rows])
            layout = build_group_layout(
                chunk_ids, chunk_mask, logits_to_keep, feed_every_token=compute_aux_loss, group_ids=chunk_groups
            )
            if layout is None:
                # Nothing to score in this chunk (every completion empty): TRL's forward returns zeros that stay
                # connected to the model, which the loss needs to backpropagate.
                logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                    model, chunk_ids, chunk_mask, logits_to_keep, None, compute_entropy, compute_aux_loss
                )
            else:
                logps, entropies, aux_loss = self._grouped_forward(
                    model, layout, compute_entropy, compute_aux_loss, visual=visual, rows=rows
                )
                layouts.append(layout)
            logps_parts.append(logps)
            entropy_parts.append(entropies)
            aux_losses.append(aux_loss)

        logps = torch.cat(logps_parts, dim=0)
        entropies = torch.cat(entropy_parts, dim=0) if compute_entropy else None
        if row_chunks[0] is not None:
            inverse = torch.argsort(torch.cat(row_chunks))
            logps = logps[inverse]
            entropies = entropies[inverse] if compute_entropy else None
        aux_loss = torch.stack(aux_losses).mean() if compute_aux_loss else None

        # Only the policy forward of the loss asks for entropies; log sharing once per micro-batch from there.
        if compute_entropy and layouts:
            self._log_sharing(layouts)
        return logps, entropies, aux_loss

    def _grouped_forward(
        self, model, layout: GroupLayout, compute_entropy: bool, compute_aux_loss: bool, visual=None, rows=None
    ):
        """
        Log-probs and entropies `(B, K)` of one packed row, and the MoE load-balancing loss. TRL's fused forward
        computes that loss over the tokens it is given, every token counting once; the repeated forward counts each
        prompt once per row. So with `compute_aux_loss` the layout feeds every token (`feed_every_token`) and the loss
        is recomputed from the router logits with `token_weights` (transformers' own `load_balancing_loss_func`
        takes them as its mask), which is exactly the repeated forward's.

        `visual` (a `multimodal.VisualBatch`, with the rows `rows` of its batch in this layout) adds the packed row's
        multimodal positions and its images' features, encoded once per distinct image.
        """
        model_inputs = {
            "input_ids": layout.input_ids,
            "position_ids": layout.position_ids,
            # Labels of the scored positions only: the backbone hook below hands the head just those positions.
            "shift_labels": layout.shift_labels[:, layout.scored_positions],
            LAYOUT_KWARG: layout,
        }
        if compute_aux_loss:
            model_inputs["output_router_logits"] = True
        inner = self._transformers_model(model)
        if visual is not None:
            # The vision tower runs outside `grouped_forward()`: it builds its own masks, which must not be dropped.
            with self.accelerator.autocast():
                model_inputs.update(visual.model_inputs(layout, rows))
        captured = {}
        with grouped_forward(), _scored_positions_only(inner, layout.scored_positions, captured), _cpu_head_in_trl():
            with self.accelerator.autocast():
                outputs = model(**model_inputs, fused_lm_head=True)
        self._check_layout_consumed(inner, layout)
        logps = layout.scatter_scored_to_rows(outputs.log_probs)
        entropies = layout.scatter_scored_to_rows(outputs.entropy) if compute_entropy else None
        aux_loss = None
        if compute_aux_loss:
            aux_loss = _weighted_aux_loss(inner, captured.get("router_logits"), layout, outputs.aux_loss)
        return logps, entropies, aux_loss

    def _check_layout_consumed(self, inner, layout: GroupLayout) -> None:
        if id(inner) not in self._mixer_kinds:
            self._mixer_kinds[id(inner)] = [kind.name for _, _, kind in mixer_modules(inner)]
        mixers = self._mixer_kinds[id(inner)]
        expected = expected_attention_layers(inner)
        without_attention = bool(mixers) and expected == 0
        if (layout.attention_calls == 0 and not without_attention) or (
            expected is not None and layout.attention_calls < expected
        ):
            raise RuntimeError(
                f"{type(inner).__name__}: the prefix-grouped layout reached {layout.attention_calls} attention "
                f"layer(s) of {expected}. Its modeling code does not pass `**kwargs` down to transformers' attention "
                "interface, so the packed row would be computed without the split attention and give wrong "
                "log-probs. Set prefix_grouping=False for this model."
            )
        if layout.mixer_calls < len(mixers):
            kinds = sorted(set(mixers))
            raise RuntimeError(
                f"{type(inner).__name__}: the prefix-grouped layout reached {layout.mixer_calls} of its {len(mixers)} "
                f"{' / '.join(kinds)} layers: its modeling code does not pass the keyword arguments of `model(...)` "
                "down to them, so those layers would run over the packed row as one sequence and give wrong "
                "log-probs. Set prefix_grouping=False for this model."
            )

    def _warn_multimodal_fallback(self, model, reason: str) -> None:
        name = type(self._transformers_model(model)).__name__
        if reason in self._warned_multimodal_fallback:
            return
        self._warned_multimodal_fallback.add(reason)
        warnings.warn(
            f"PrefixGroupedGRPOTrainer: a batch of {name} with multimodal inputs is computed with GRPOTrainer's "
            f"repeated forward (same result, no sharing): {reason}.",
            stacklevel=3,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Checkpoints and `save_model` write `training_args.bin` here; keep tokens out of it.
        with _tokens_left_out(self.args):
            super()._save(output_dir, state_dict=state_dict)

    def _log_sharing(self, layouts: list[GroupLayout]) -> None:
        mode = "train" if self.model.training else "eval"
        repeated = sum(layout.repeated_tokens for layout in layouts)
        packed = sum(layout.packed_tokens for layout in layouts)
        grouped_rows = sum(layout.num_grouped_rows for layout in layouts)
        groups = sum(layout.num_groups for layout in layouts)
        self._metrics[mode]["prefix_grouper/tokens_saved_frac"].append(1.0 - packed / max(repeated, 1))
        self._metrics[mode]["prefix_grouper/mean_group_size"].append(grouped_rows / max(groups, 1))


# Same constructor as GRPOTrainer, also for introspection (IDEs, `inspect.signature`, argument parsers).
PrefixGroupedGRPOTrainer.__init__.__signature__ = inspect.signature(GRPOTrainer.__init__)
