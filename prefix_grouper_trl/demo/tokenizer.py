"""
A word-level tokenizer over the demo's closed vocabulary, built in-process (no download, no shipped file).

One word is one token, whitespace splits words, ``<eos>`` ends a completion and ``<pad>`` pads. Decoding joins
words with single spaces, so a decoded completion reads exactly like the task's answers.
"""

from .task import VOCABULARY


def build_word_level_tokenizer(vocabulary: list[str], extra_special_tokens: list[str] | None = None):
    """
    A `transformers.PreTrainedTokenizerFast` whose ids are the positions in `vocabulary` (which starts with
    ``<pad>``, ``<eos>``, ``<unk>``). `extra_special_tokens` are matched before whitespace splitting, so runs such as
    ``<|vision_start|><|image_pad|>`` are split into their tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder with an unused prefix joins tokens with a space and nothing else.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        truncation_side="left",
        model_max_length=1024,
        **({"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}),
    )


def build_key_lookup_tokenizer():
    """The key-lookup demo's tokenizer: ids are the positions in `task.VOCABULARY`."""
    return build_word_level_tokenizer(VOCABULARY)
