"""Text conditioning: CLIP text models and tokenizers from `transformers`, and prompt weighting.

Würstchen v2's stages condition on the last hidden state of a CLIP text tower over 77 tokens
(Stage C on CLIP ViT-bigG/14, Stage B on CLIP ViT-H/14 for the official weights). Stable Cascade
(v3) reads CLIP ViT-bigG/14's last layer before its final LayerNorm and the projected pooled
embedding (`CLIPTextModelWithProjection.text_embeds`), as diffusers' Stable Cascade pipelines do.

Prompt weighting understands the syntax people know from AUTOMATIC1111 and ComfyUI:
`(word:1.3)` sets a weight, `(word)` multiplies by 1.1, `[word]` divides by 1.1, `\\(` is a literal
parenthesis. The token states are scaled by their weights and then rescaled so the mean of the
whole sequence is unchanged (A1111's method); with all weights 1 the states are exactly the
unweighted ones.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def parse_weights(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs. Unbalanced brackets are closed at the end."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _TOKEN.finditer(prompt):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            runs.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(runs))
        elif tok == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            runs.append([tok, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    merged: list[tuple[str, float]] = []
    for text, w in runs:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + text, w)
        elif text:
            merged.append((text, w))
    return merged or [("", 1.0)]


def _ids_with_weights(tokenizer, runs: list[tuple[str, float]]) -> tuple[list[int], list[float], int]:
    """Token ids and per-token weights of the runs, BOS/EOS added, truncated; returns the cut count."""
    ids: list[int] = []
    weights: list[float] = []
    for text, w in runs:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += toks
        weights += [w] * len(toks)
    room = tokenizer.model_max_length - 2
    cut = max(0, len(ids) - room)
    return (
        [tokenizer.bos_token_id, *ids[:room], tokenizer.eos_token_id],
        [1.0, *weights[:room], 1.0],
        cut,
    )


# A prompt's words as a person reads them: letters and digits, joined by apostrophes or hyphens
# ("don't", "sky-blue"), so that a warning names "sky-blue" rather than the fragment "sky".
_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words of `prompt` that `tokenizer` maps to its unknown token, each once, in order.

    Works for any fast tokenizer: one whose vocabulary covers every text (CLIP's byte-level BPE)
    simply returns []. For a warning such as "words outside the model's vocabulary: magenta".
    """
    unk = tokenizer.unk_token_id
    if unk is None or not getattr(tokenizer, "is_fast", False):
        return []
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans = [span for i, span in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if i == unk]
    found: list[str] = []
    for start, end in spans:
        # The whole word around the unknown piece; the piece itself if it is not part of a word.
        word = next((m.group() for m in _WORD.finditer(prompt) if m.start() <= start and end <= m.end()), None)
        word = word or prompt[start:end]
        if word not in found:
            found.append(word)
    return found


def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device | str,
    weighting: bool = True,
    warn: bool = True,
) -> Tensor:
    """Prompts → last hidden states (B, 77, D) in the text encoder's dtype.

    A prompt longer than the encoder's window is truncated with a warning that says how much was cut,
    and words outside the vocabulary are named; `warn=False` leaves both out (a second encoder of the
    same prompts, whose warnings would repeat the first's).
    """
    return _encode(tokenizer, text_encoder, prompts, device, weighting, warn, pooled=False)[0]


def encode_prompts_pooled(
    tokenizer,
    text_encoder,
    prompts: list[str],
    device: torch.device | str,
    weighting: bool = True,
    warn: bool = True,
) -> tuple[Tensor, Tensor]:
    """Stable Cascade's text conditions: the last layer's states before the final LayerNorm
    (B, 77, D) and the projected pooled embedding (B, 1, D'), from a `CLIPTextModelWithProjection`.
    Prompt weights scale the token states; the pooled embedding is the plain prompt's (as ComfyUI)."""
    return _encode(tokenizer, text_encoder, prompts, device, weighting, warn, pooled=True)


def _encode(tokenizer, text_encoder, prompts: list[str], device: torch.device | str, weighting: bool, warn: bool,
            pooled: bool) -> tuple[Tensor, ...]:  # fmt: skip
    max_len = tokenizer.model_max_length
    parsed = [parse_weights(p) if weighting else [(p, 1.0)] for p in prompts]
    for runs in parsed:
        unknown = unknown_words(tokenizer, "".join(t for t, _ in runs)) if warn else []
        if unknown:
            logger.warning(
                "words outside the text encoder's vocabulary, read as unknown: %s (this model knows only the "
                "words it was trained on)", ", ".join(unknown),
            )  # fmt: skip
    plain = all(w == 1.0 for runs in parsed for _, w in runs)
    if plain:
        # No weights: tokenize the (bracket-free) text as a whole, exactly as the reference does.
        texts = ["".join(t for t, _ in runs) for runs in parsed]
        batch = tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        full = tokenizer(texts, add_special_tokens=True)["input_ids"]
        for ids in full:
            if len(ids) > max_len and warn:
                cut = tokenizer.decode(ids[max_len - 1 : -1])
                logger.warning(
                    "prompt truncated: %d of %d tokens cut (the text encoder reads %d): %r",
                    len(ids) - max_len, len(ids) - 2, max_len, cut,
                )  # fmt: skip
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        weights = None
    else:
        rows, wrows, masks = [], [], []
        for runs in parsed:
            ids, w, cut = _ids_with_weights(tokenizer, runs)
            if cut and warn:
                logger.warning("prompt truncated: %d tokens cut (the text encoder reads %d)", cut, max_len)
            pad = max_len - len(ids)
            rows.append(ids + [tokenizer.pad_token_id] * pad)
            wrows.append(w + [1.0] * pad)
            masks.append([1] * len(ids) + [0] * pad)
        input_ids, mask = torch.tensor(rows), torch.tensor(masks)
        weights = torch.tensor(wrows)
    out = text_encoder(input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=pooled)
    states = out.hidden_states[-1] if pooled else out.last_hidden_state
    if weights is not None:
        w = weights.to(states.device, torch.float32)[:, :, None]
        before = states.float().mean(dim=(1, 2), keepdim=True)
        weighted = states.float() * w
        after = weighted.mean(dim=(1, 2), keepdim=True)
        # Restore the mean only where it is a real quantity: a text encoder whose final LayerNorm has
        # no bias (a fresh CLIP) gives states of mean ~1e-8 at magnitude ~1, and the ratio of two such
        # means is rounding noise (seen: -3.5, 4, ±inf), so those prompts keep their plain weights.
        scale = weighted.abs().mean(dim=(1, 2), keepdim=True)
        real = (before.abs() > 1e-3 * scale) & (after.abs() > 1e-3 * scale)
        states = (weighted * torch.where(real, before / after, torch.ones_like(after))).to(states.dtype)
    return (states, out.text_embeds[:, None]) if pooled else (states,)
