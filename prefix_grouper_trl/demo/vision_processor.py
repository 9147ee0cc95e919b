"""
An offline processor for the vision demo: the colour task's word-level tokenizer with Qwen-VL's placeholder tokens,
and transformers' PIL image processor for Qwen2-VL-style models, made in-process (no download, no torchvision).

transformers' Qwen-VL processors also hold a video processor, and its class needs torchvision, which has no build
matching the CPU torch these machines use. `ImageOnlyQwenVLProcessor` is Qwen2.5-VL's processor without the video
part: the same prompt expansion (one ``<|image_pad|>`` per merged patch), ``mm_token_type_ids`` and chat template use,
so TRL drives it exactly as it drives the hub's processors.
"""

from transformers import ProcessorMixin, Qwen2_5_VLProcessor

from .colour_task import COLOUR_WORDS, QUESTION, SHAPES

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
VISION_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ["user", "assistant"] + QUESTION.split() + COLOUR_WORDS + SHAPES + [f"w{index}" for index in range(24)]
VOCABULARY = SPECIAL_TOKENS + VISION_TOKENS + list(dict.fromkeys(WORDS))

# Qwen's chat layout with words separated by spaces (the tokenizer splits on whitespace); an image part becomes
# ``<|vision_start|><|image_pad|><|vision_end|>``, which the processor expands to one pad per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}{% endif %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)

# 48 x 48 images, 4 x 4 patches, 2 x 2 merge: 36 image tokens.
IMAGE_PROCESSOR_KWARGS = dict(
    patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=48 * 48, max_pixels=48 * 48
)


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor with an image processor and a tokenizer, and no video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_colour_tokenizer():
    """A `PreTrainedTokenizerFast` whose ids are the positions in `VOCABULARY`, Qwen's vision tokens special."""
    from .tokenizer import build_word_level_tokenizer

    return build_word_level_tokenizer(VOCABULARY, extra_special_tokens=VISION_TOKENS)


def build_colour_processor(tokenizer=None) -> ImageOnlyQwenVLProcessor:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return ImageOnlyQwenVLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR_KWARGS),
        tokenizer=tokenizer or build_colour_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def load_colour_processor(folder) -> ImageOnlyQwenVLProcessor:
    """The processor saved in `folder` (its tokenizer loaded as the generic fast class, not Qwen's byte-level one)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, padding_side="left", truncation_side="left")
    return build_colour_processor(tokenizer)
