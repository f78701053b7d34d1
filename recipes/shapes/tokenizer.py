"""A word-level tokenizer over the shapes world's vocabulary, with CLIP's conventions.

    from recipes.shapes.tokenizer import build_tokenizer, unknown_words
    tok = build_tokenizer()                      # a transformers PreTrainedTokenizerFast, 77 tokens
    tok("A red circle", padding="max_length", max_length=77, truncation=True)
    tok.save_pretrained("out/tokenizer")         # AutoTokenizer.from_pretrained("out/tokenizer") reads it back
    unknown_words(tok, "a magenta circle")       # ['magenta']

Like CLIP's tokenizer it lower-cases, splits at whitespace and punctuation, wraps every text in
`<|startoftext|> ... <|endoftext|>` and pads to 77 tokens. Unlike CLIP it has one token per word of
`world.vocabulary()` (the world has 57 words, so BPE would gain nothing) and it drops punctuation:
no caption contains any, so a punctuation token would never be trained, and "a red circle." should
mean exactly what "a red circle" means.

Ids: 0 `<|pad|>`, 1 `<|unk|>`, then the words in sorted order, then `<|startoftext|>` and
`<|endoftext|>` last. With EOS the largest id, both of transformers' CLIP pooling rules (the first
`eos_token_id`, or the legacy argmax of the ids) find the EOS position.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from wuerstchen.models.text import unknown_words
from wuerstchen.shapes.world import vocabulary

__all__ = ["BOS", "EOS", "PAD", "UNK", "build_tokenizer", "unknown_words"]

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"


def build_tokenizer(max_length: int = 77) -> PreTrainedTokenizerFast:
    """The tokenizer of `world.vocabulary()`, as a transformers fast tokenizer of `max_length` tokens."""
    words = vocabulary()
    vocab = {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Every run of characters that are neither letters nor digits separates words and is dropped
    # (whitespace, punctuation, underscores).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\p{L}\p{N}]+"), behavior="removed")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )
