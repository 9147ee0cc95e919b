"""
A word-level tokenizer over the demo's closed vocabulary, built in-process (no download, no shipped file).

One word is one token, whitespace splits words, ``<eos>`` ends a completion and ``<pad>`` pads. Decoding joins
words with single spaces, so a decoded completion reads exactly like the task's answers.
"""

from .task import VOCABULARY


def build_key_lookup_tokenizer():
    """A `transformers.PreTrainedTokenizerFast` whose ids are the positions in `task.VOCABULARY`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(VOCABULARY)}
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
    )
