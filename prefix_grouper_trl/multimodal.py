"""
Vision-language prompts: every distinct image or video through the vision tower once, every prompt once, and the
multimodal rotary positions of the repeated forward.

TRL hands the log-prob funnel a vision-language micro-batch as (Qwen2.5-VL, Qwen3-VL, Qwen3.5)::

    input_ids, attention_mask  (B, L)    [prompt | completion]; a prompt holds runs of image (or video) placeholders
    pixel_values               (N, D)    one block of patches per image, in row order; a prompt's images are repeated
                                         for each of its G rows
    image_grid_thw             (n, 3)    the (t, h, w) patch grid of each image; it fills t*h*w / merge**2
                                         placeholders of its row
    num_images                 [B]       images per row
    mm_token_type_ids          (B, L)    0 text, 1 image, 2 video; zeros over the completion

Videos come the same way as `pixel_values_videos`, `video_grid_thw` (and Qwen2.5-VL's `second_per_grid_ts`), when a
caller passes them (TRL's generation passes images only).

The grouped forward of such a batch (`VisualBatch`):

1. Assigns each row its images and videos (placeholder counts, in order) and deduplicates them by content: patch
   blocks that are equal, with equal grids, get one id (a fingerprint finds candidates, `torch.equal` decides).
   Rows share a group only if their prompt tokens and their visual ids are equal: the same text with another image
   is another group, and is never merged.
2. Runs the model's own `get_image_features` / `get_video_features` once per distinct image or video (per chunk of
   TRL's chunked log-probs, cached across chunks), and gives the language model those features in the order their
   placeholders have in the packed row, as `mm_encoder_outputs` (the model then makes no vision call of its own).
   Qwen3-VL's deepstack features travel with them and land on the same tokens through `visual_pos_masks`::

       packed row:  [ text <img a> x4 text | suffixes ... ] [ text <img a> x4 <img b> x6 text | suffixes ... ]
       features:    (feat(a),                                 feat(a), feat(b))      a is encoded once, used twice

3. Computes the 3-D (M-RoPE) positions with the model's own `get_rope_index` once per group, over its prompt and all
   its completion columns, and gives each packed token the position its row and column have in the repeated forward:
   `position_ids` of shape `(3, 1, T)`. Completions continue their prompt's text positions exactly.

Families are registered by the class of their backbone (`register_vision_language_family`). A batch this module
cannot split exactly (an unregistered family, an input it does not know, placeholders inside a completion) raises
`MultimodalUnsupported`, and the trainer computes it with GRPOTrainer's repeated forward.
"""

from dataclasses import dataclass, field

import torch

from .layout import GroupLayout, find_prompt_groups


class MultimodalUnsupported(Exception):
    """A visual batch that prefix grouping does not split; the message says why."""


@dataclass(frozen=True)
class VisionLanguageFamily:
    """
    A family of vision-language models whose backbone has the Qwen-VL interface: `get_image_features` /
    `get_video_features(pixels, grid_thw, return_dict=True)`, `get_rope_index(input_ids, mm_token_type_ids,
    image_grid_thw, video_grid_thw, attention_mask=..., [second_per_grid_ts])`, and an `mm_encoder_outputs` argument.

    name: for messages. inputs: the multimodal keyword arguments it understands.
    """

    name: str
    inputs: frozenset = frozenset(
        {"pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
         "second_per_grid_ts"}
    )


_FAMILIES: dict[str, VisionLanguageFamily] = {}


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_vision_language_family(backbone_class: type | str, family: VisionLanguageFamily) -> None:
    """Register how batches of models whose backbone (`model.base_model`) is `backbone_class` are grouped."""
    _FAMILIES[backbone_class if isinstance(backbone_class, str) else _class_key(backbone_class)] = family


def vision_language_family(model) -> VisionLanguageFamily | None:
    return _FAMILIES.get(_class_key(type(model.base_model)))


def _register_builtin_families() -> None:
    for name, path in (
        ("Qwen2-VL", "qwen2_vl.modeling_qwen2_vl.Qwen2VLModel"),
        ("Qwen2.5-VL", "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLModel"),
        ("Qwen3-VL", "qwen3_vl.modeling_qwen3_vl.Qwen3VLModel"),
        ("Qwen3-VL-MoE", "qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeModel"),
        ("Qwen3.5", "qwen3_5.modeling_qwen3_5.Qwen3_5Model"),
        ("Qwen3.5-MoE", "qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeModel"),
    ):
        register_vision_language_family("transformers.models." + path, VisionLanguageFamily(name))


_register_builtin_families()


def has_visual_inputs(inputs: dict) -> bool:
    """Whether a batch's multimodal keyword arguments carry anything besides Nones."""
    return any(value is not None for value in inputs.values())


# ----------------------------------------------------------------------------------------------------------------------
# Deduplication by content
# ----------------------------------------------------------------------------------------------------------------------

_FINGERPRINT_SEED = 20250605


def _fingerprints(blocks: list[torch.Tensor]) -> list[float]:
    """A float64 random projection of each block: equal blocks get equal values; unequal ones almost never do."""
    if not blocks:
        return []
    longest = max(block.numel() for block in blocks)
    generator = torch.Generator().manual_seed(_FINGERPRINT_SEED)
    weights = torch.rand(longest, generator=generator, dtype=torch.float64).to(blocks[0].device)
    values = [block.reshape(-1).double() @ weights[: block.numel()] for block in blocks]
    return torch.stack(values).tolist()


def dedupe_blocks(blocks: list[torch.Tensor], shape_keys: list | None = None) -> list[int]:
    """
    Content ids of tensors: equal ids for equal tensors (same shape, same `shape_keys` entry, `torch.equal`).

    Returns `(len(blocks),)` ids numbered `0..` in order of first appearance. A tensor holding NaN equals nothing,
    not even itself, and gets an id of its own: never wrong, only unshared.
    """
    fingerprints = _fingerprints(blocks)
    candidates: dict[tuple, list[int]] = {}
    first_of_id: list[int] = []
    ids = []
    for index, block in enumerate(blocks):
        shape_key = None if shape_keys is None else shape_keys[index]
        key = (tuple(block.shape), shape_key, block.dtype, fingerprints[index])
        bucket = candidates.setdefault(key, [])
        found = next((known for known in bucket if torch.equal(blocks[first_of_id[known]], block)), None)
        if found is None:
            found = len(first_of_id)
            first_of_id.append(index)
            bucket.append(found)
        ids.append(found)
    return ids


def row_visual_keys(batch: dict) -> torch.Tensor | None:
    """
    `(B, 1)` content ids of each row's images, for TRL's generation-batch shuffle (where `pixel_values` and
    `image_grid_thw` are lists with one tensor per row), or None when the batch has no such images.
    """
    pixel_values, grids = batch.get("pixel_values"), batch.get("image_grid_thw")
    if not isinstance(pixel_values, (list, tuple)) or not pixel_values:
        return None
    if not all(isinstance(block, torch.Tensor) for block in pixel_values):
        return None
    shape_keys = None
    if isinstance(grids, (list, tuple)) and len(grids) == len(pixel_values):
        shape_keys = [tuple(grid.reshape(-1).tolist()) if isinstance(grid, torch.Tensor) else None for grid in grids]
    return torch.tensor(dedupe_blocks(list(pixel_values), shape_keys), dtype=torch.long).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------------
# One micro-batch
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _VisualItems:
    """The images (or videos) of a batch: one entry per occurrence, rows' occurrences in order, ids by content."""

    kind: str  # "image" or "video"
    blocks: list[torch.Tensor]  # patch block of each occurrence
    grids: torch.Tensor  # (n, 3)
    rows: list[list[int]]  # per row, its occurrences in order
    content_ids: list[int]  # per occurrence
    seconds_per_grid: torch.Tensor | None = None  # Qwen2.5-VL videos: (n,)
    features: dict = field(default_factory=dict)  # content id -> (pooled (tokens, D), deepstack levels or None)
    output_class: type | None = None
    vision_calls: int = 0
    patches_encoded: int = 0

    def first_occurrence(self, content_id: int) -> int:
        return self.content_ids.index(content_id)

    def content_ids_of_row(self, row: int) -> list[int]:
        return [self.content_ids[occurrence] for occurrence in self.rows[row]]


def _split_items(kind, pixels, grids, input_ids, prompt_mask, completion_mask, token_id, merge, per_row=None):
    """Assign each occurrence of a batch's images (or videos) to its row by placeholder counts, in order."""
    if token_id is None:
        raise MultimodalUnsupported(f"the model config names no {kind} placeholder token id")
    prompt_width = prompt_mask.size(1)
    prompt_tokens = input_ids[:, :prompt_width]
    if ((input_ids[:, prompt_width:] == token_id) & completion_mask).any():
        raise MultimodalUnsupported(
            f"a completion holds {kind} placeholder tokens ({kind}s inserted by tool calls), which belong to no prompt"
        )
    counts = ((prompt_tokens == token_id) & prompt_mask).sum(1).tolist()
    tokens_per_item = (grids.prod(-1) // merge**2).tolist()
    sizes = grids.prod(-1).tolist()
    if sum(sizes) != pixels.size(0):
        raise MultimodalUnsupported(
            f"{kind} grids cover {sum(sizes)} patch rows but the pixel tensor has {pixels.size(0)}"
        )
    rows, item = [], 0
    for row, needed in enumerate(counts):
        mine = []
        while needed > 0 and item < len(tokens_per_item):
            needed -= tokens_per_item[item]
            mine.append(item)
            item += 1
        if needed != 0:
            raise MultimodalUnsupported(f"row {row}'s {kind} placeholders do not match the {kind} grids")
        rows.append(mine)
    if item != len(tokens_per_item):
        raise MultimodalUnsupported(f"{len(tokens_per_item) - item} {kind}(s) have no placeholders in any prompt")
    if per_row is not None and [len(mine) for mine in rows] != list(per_row):
        raise MultimodalUnsupported(f"num_{kind}s does not match the {kind} placeholders of the prompts")
    blocks = list(pixels.split(sizes))
    shape_keys = [tuple(grid) for grid in grids.tolist()]
    return _VisualItems(kind, blocks, grids, rows, dedupe_blocks(blocks, shape_keys))


class VisualBatch:
    """
    The visual side of one micro-batch, prepared once per log-prob call (see the module docstring).

    `group_ids` (`(B,)` long): the group of each row, by prompt tokens and visual content; pass it to
    `build_group_layout` / `plan_row_chunks`. `model_inputs(layout, rows)` gives the keyword arguments of the packed
    row's forward: `position_ids` `(3, 1, T)` and `mm_encoder_outputs`.
    """

    def __init__(self, model, input_ids, attention_mask, logits_to_keep: int, inputs: dict):
        self.model = model
        self.backbone = model.base_model
        config = model.config
        prompt_width = input_ids.size(1) - logits_to_keep
        mask = attention_mask.bool()
        prompt_mask, completion_mask = mask[:, :prompt_width], mask[:, prompt_width:]
        merge = config.vision_config.spatial_merge_size
        mm_token_type_ids = inputs.get("mm_token_type_ids")
        if mm_token_type_ids is None:
            raise MultimodalUnsupported(
                "the batch has no mm_token_type_ids, from which the model's multimodal positions are computed"
            )
        last_prompt_type = mm_token_type_ids[:, prompt_width - 1]
        if (last_prompt_type != 0).any():
            raise MultimodalUnsupported(
                "a prompt ends with an image or video placeholder, which its rows cannot share"
            )

        self.images = self.videos = None
        if inputs.get("pixel_values") is not None:
            self.images = _split_items(
                "image", inputs["pixel_values"], inputs["image_grid_thw"], input_ids, prompt_mask, completion_mask,
                getattr(config, "image_token_id", None), merge, inputs.get("num_images"),
            )
        if inputs.get("pixel_values_videos") is not None:
            self.videos = _split_items(
                "video", inputs["pixel_values_videos"], inputs["video_grid_thw"], input_ids, prompt_mask,
                completion_mask, getattr(config, "video_token_id", None), merge,
            )
            seconds = inputs.get("second_per_grid_ts")
            if seconds is not None:
                self.videos.seconds_per_grid = torch.as_tensor(seconds, dtype=torch.float32).reshape(-1)

        keys = [self._row_keys(items, input_ids.size(0)) for items in (self.images, self.videos) if items is not None]
        extra_keys = torch.cat(keys, dim=1) if keys else None
        self.group_ids = find_prompt_groups(input_ids[:, :prompt_width], prompt_mask, extra_keys)
        num_groups = int(self.group_ids.max()) + 1
        first_row = torch.full((num_groups,), input_ids.size(0), dtype=torch.long, device=self.group_ids.device)
        rows = torch.arange(input_ids.size(0), device=self.group_ids.device)
        self.group_rows = first_row.scatter_reduce(0, self.group_ids, rows, reduce="amin").tolist()
        self.positions = self._positions(input_ids, prompt_mask, mm_token_type_ids, logits_to_keep, inputs)

    @staticmethod
    def _row_keys(items: _VisualItems, batch_size: int) -> torch.Tensor:
        """`(B, max items per row)`: the content ids of each row's occurrences, -1 past the last."""
        width = max((len(row) for row in items.rows), default=0)
        keys = torch.full((batch_size, max(width, 1)), -1, dtype=torch.long)
        for row, occurrences in enumerate(items.rows):
            for slot, occurrence in enumerate(occurrences):
                keys[row, slot] = items.content_ids[occurrence]
        return keys

    def _positions(self, input_ids, prompt_mask, mm_token_type_ids, logits_to_keep, inputs) -> torch.Tensor:
        """
        `(3, num_groups, L)`: the model's multimodal positions of each group's row, every completion column included.

        The completion of a row is text that continues its prompt, so `get_rope_index` over the prompt and all K
        completion columns (marked real) gives each completion token j the position it has in any row of the group.
        """
        device = input_ids.device
        rows = torch.tensor(self.group_rows, dtype=torch.long, device=device)
        ones = torch.ones(len(self.group_rows), logits_to_keep, dtype=prompt_mask.dtype, device=device)
        attention_mask = torch.cat([prompt_mask[rows], ones], dim=1).long()
        prompt_width = prompt_mask.size(1)
        completion_types = torch.zeros_like(ones, dtype=mm_token_type_ids.dtype)
        token_types = torch.cat([mm_token_type_ids[rows, :prompt_width], completion_types], dim=1)
        kwargs = {"attention_mask": attention_mask}
        for items, name in ((self.images, "image_grid_thw"), (self.videos, "video_grid_thw")):
            if items is not None:
                occurrences = [occurrence for row in self.group_rows for occurrence in items.rows[row]]
                kwargs[name] = items.grids[torch.tensor(occurrences, dtype=torch.long, device=items.grids.device)]
        if self.videos is not None and self.videos.seconds_per_grid is not None:
            occurrences = [occurrence for row in self.group_rows for occurrence in self.videos.rows[row]]
            kwargs["second_per_grid_ts"] = self.videos.seconds_per_grid[occurrences]
        positions, _ = self.backbone.get_rope_index(input_ids[rows], token_types, **kwargs)
        return positions

    def _encoded(self, items: _VisualItems, content_ids: list[int]):
        """The vision tower's output for `content_ids` (in that order), running it once on those not seen yet."""
        missing = [content_id for content_id in dict.fromkeys(content_ids) if content_id not in items.features]
        if missing:
            occurrences = [items.first_occurrence(content_id) for content_id in missing]
            pixels = torch.cat([items.blocks[occurrence] for occurrence in occurrences])
            grids = items.grids[torch.tensor(occurrences, dtype=torch.long, device=items.grids.device)]
            encode = self.backbone.get_image_features if items.kind == "image" else self.backbone.get_video_features
            output = encode(pixels, grids, return_dict=True)
            deepstack = getattr(output, "deepstack_features", None)
            for index, content_id in enumerate(missing):
                levels = None if deepstack is None else [level[index] for level in deepstack]
                items.features[content_id] = (output.pooler_output[index], levels)
            items.output_class = type(output)
            items.vision_calls += 1
            items.patches_encoded += pixels.size(0)
        pooled = tuple(items.features[content_id][0] for content_id in content_ids)
        fields = {"pooler_output": pooled}
        levels = items.features[content_ids[0]][1]
        if levels is not None:
            fields["deepstack_features"] = [
                tuple(items.features[content_id][1][level] for content_id in content_ids)
                for level in range(len(levels))
            ]
        return items.output_class(**fields)

    def model_inputs(self, layout: GroupLayout, rows: torch.Tensor | None = None) -> dict:
        """
        Keyword arguments for the forward of `layout`'s packed row, built from the rows `rows` of this batch (all rows
        when None): `position_ids (3, 1, T)` and, where the packed row holds placeholders, `mm_encoder_outputs`.
        """
        token_rows = layout.token_rows if rows is None else rows.to(layout.token_rows.device)[layout.token_rows]
        token_groups = self.group_ids.to(token_rows.device)[token_rows]
        columns = layout.position_ids[0]
        position_ids = self.positions.to(columns.device)[:, token_groups, columns].unsqueeze(1)
        packed_groups = token_groups[torch.tensor(layout.group_starts, dtype=torch.long, device=token_rows.device)]
        encoder_outputs = {}
        for items in (self.images, self.videos):
            if items is None:
                continue
            order = [
                content_id
                for group in packed_groups.tolist()
                for content_id in items.content_ids_of_row(self.group_rows[group])
            ]
            if order:
                encoder_outputs[items.kind] = self._encoded(items, order)
        inputs = {"position_ids": position_ids}
        if encoder_outputs:
            inputs["mm_encoder_outputs"] = encoder_outputs
        return inputs

    @property
    def vision_calls(self) -> int:
        return sum(items.vision_calls for items in (self.images, self.videos) if items is not None)


def prepare_visual_batch(model, input_ids, attention_mask, logits_to_keep: int, inputs: dict) -> VisualBatch | None:
    """
    The [`VisualBatch`] of a micro-batch with visual inputs, or None when it has neither images nor videos.

    Args:
        model: the transformers `PreTrainedModel` (not a PEFT / DeepSpeed wrapper).
        input_ids, attention_mask (`(B, L)`), logits_to_keep: as TRL passes them.
        inputs: the multimodal keyword arguments TRL passes (None values are ignored).

    Raises:
        MultimodalUnsupported: the family is not registered, an input is unknown to it, or the batch cannot be split
            exactly; the message says which.
    """
    family = vision_language_family(model)
    if family is None:
        raise MultimodalUnsupported(
            f"{type(model).__name__} is not a vision-language family prefix grouping splits (supported: "
            f"{', '.join(family.name for family in _FAMILIES.values())})"
        )
    given = {key for key, value in inputs.items() if value is not None}
    unknown = sorted(given - family.inputs)
    if unknown:
        raise MultimodalUnsupported(f"{type(model).__name__} batches with {', '.join(unknown)} are not split")
    if "pixel_values" not in given and "pixel_values_videos" not in given:
        # No image or video: the model computes text positions, as for a text-only model.
        return None
    return VisualBatch(model, input_ids, attention_mask, logits_to_keep, {k: inputs[k] for k in given})
