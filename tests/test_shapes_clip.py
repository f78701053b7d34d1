"""The shapes world's tokenizer and small CLIP: round trips, vocabulary coverage, a short training run.

pytest -q tests/test_shapes_clip.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tolerance import rel_err
from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

from recipes.shapes.clip import (
    CONFIGS,
    _contrastive,
    _embed,
    _twin_loss,
    build_clip,
    train_clip,
    training_batch,
    twin,
    twin_kind,
)
from recipes.shapes.tokenizer import BOS, EOS, PAD, UNK, build_tokenizer, unknown_words
from wuerstchen.shapes.world import HELDOUT_PAIRS, caption, eval_prompts, relation_of, sample_scene, vocabulary

PROMPTS = [
    "a red circle to the left of a blue square",
    "Two SMALL green stars, on a grey background.",
    "a magenta circle above a teal rhombus",
    "",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy shared machine two threads that wait
    for each other run several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _encode(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True)


def test_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 77
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (BOS, EOS, PAD, UNK)
    assert len(loaded) == len(tokenizer) == len(vocabulary()) + 4
    a, b = _encode(tokenizer, PROMPTS), _encode(loaded, PROMPTS)
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]

    ids = a["input_ids"][0]
    words = PROMPTS[0].split()
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and ids[len(words) + 1] == tokenizer.eos_token_id
    assert ids[len(words) + 2 :] == [tokenizer.pad_token_id] * (77 - len(words) - 2)
    assert a["attention_mask"][0] == [1] * (len(words) + 2) + [0] * (77 - len(words) - 2)
    assert tokenizer.convert_ids_to_tokens(ids[1 : len(words) + 1]) == words
    # Lower-cased, punctuation dropped: the same ids as the plain caption.
    assert a["input_ids"][1] == _encode(tokenizer, ["two small green stars on a grey background"])["input_ids"][0]
    assert a["input_ids"][2].count(tokenizer.unk_token_id) == 2  # magenta, teal
    assert a["input_ids"][3][:3] == [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]

    # Truncation keeps BOS … EOS within 77 tokens.
    long = loaded(" ".join(["red circle"] * 60), padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert len(long) == 77 and long[0] == loaded.bos_token_id and long[-1] == loaded.eos_token_id
    assert long[1:-1] == [loaded.convert_tokens_to_ids("red"), loaded.convert_tokens_to_ids("circle")] * 37 + [
        loaded.convert_tokens_to_ids("red")
    ]


def test_vocabulary_ids_are_distinct_and_eos_is_largest(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(vocabulary())
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids
    # Both of transformers' CLIP pooling rules (first eos_token_id; argmax of ids when it is 2) find EOS.
    assert tokenizer.eos_token_id == len(tokenizer) - 1 != 2


def test_unknown_words(tokenizer):
    assert unknown_words(tokenizer, "A Magenta circle left of a sky-blue square, don't 2 red") == [
        "Magenta",
        "sky-blue",
        "don't",
        "2",
    ]
    assert unknown_words(tokenizer, "magenta magenta circle") == ["magenta"]
    assert unknown_words(tokenizer, "A RED circle, to the left of a blue square!") == []
    rng = np.random.default_rng(0)
    texts = [caption(sample_scene(rng, split), rng) for split in ("train", "heldout") for _ in range(400)]
    texts += [p for split in ("train", "heldout") for p, _ in eval_prompts(60, seed=0, split=split)]
    assert len(texts) >= 500
    assert [t for t in texts if unknown_words(tokenizer, t)] == []


def test_twins_differ_in_one_stated_fact_and_keep_the_split():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(400):
        scene = sample_scene(rng, "train")
        other = twin(scene, rng)
        assert other is not None and other != scene
        assert not any(o.pair in HELDOUT_PAIRS for o in other.objects)
        assert other.kind == scene.kind
        if len(other.objects) < len(scene.objects):
            assert scene.kind == "count" and len(scene.objects) == 3
            assert set(other.objects) < set(scene.objects)
            kinds.add("count")
            assert twin_kind(scene, other) == "count"
        elif other.relation != scene.relation:
            a, b = other.objects
            assert other.relation == relation_of(a.cx, a.cy, b.cx, b.cy)
            assert [o.pair for o in other.objects] == [o.pair for o in scene.objects]
            kinds.add("relation")
            assert twin_kind(scene, other) == "relation"
        else:
            assert [(o.cx, o.cy, o.size) for o in other.objects] == [(o.cx, o.cy, o.size) for o in scene.objects]
            changed = [(o, p) for o, p in zip(scene.objects, other.objects, strict=True) if o != p]
            if scene.kind == "pair" and len(changed) == 2:  # binding: the colours (or shapes) swapped
                assert sorted(o.colour for o in other.objects) == sorted(o.colour for o in scene.objects)
                assert sorted(o.shape for o in other.objects) == sorted(o.shape for o in scene.objects)
                kinds.add("binding")
                assert twin_kind(scene, other) == "binding"
            else:  # one object's shape (single, pair) or every one's (count)
                assert all(o.colour == p.colour and o.shape != p.shape for o, p in changed)
                assert len(changed) == (1 if scene.kind == "pair" else len(scene.objects))
                kinds.add(f"{scene.kind} shape")
                assert twin_kind(scene, other) == "shape"
    assert kinds == {"relation", "binding", "count", "single shape", "pair shape", "count shape"}


def test_training_batch_is_a_function_of_seed_and_step():
    a, b = training_batch(3, 16, seed=5, size=32), training_batch(3, 16, seed=5, size=32)
    assert a[1] == b[1] and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[0], b[0], strict=True))
    assert len(a[0]) == 16 and a[1] != training_batch(4, 16, seed=5, size=32)[1]
    # Every twin sits right after its scene, and its caption differs.
    assert a[2] and all(j == i + 1 and a[1][i] != a[1][j] for i, j in a[2])
    assert training_batch(3, 16, seed=5, size=32, twins=0.0)[2] == []


def test_twin_loss_is_the_contrastive_loss_within_each_pair(tokenizer):
    m = build_clip(CONFIGS["test"], tokenizer)
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = m.logit_scale.exp().item()
    # Twins the towers cannot tell apart: each 2-way choice is a coin flip.
    same = torch.stack([e[0], e[0], e[1], e[1]])
    assert _twin_loss(m, same, same, [(0, 1), (2, 3)]).item() == pytest.approx(np.log(2), rel=1e-6)
    # Told apart: caption 0 matches image 0 (cosine 1) against the twin's image (cosine c).
    c = 0.9
    image = text = torch.tensor([[1.0, 0.0], [c, (1 - c * c) ** 0.5]])
    expected = np.log1p(np.exp(scale * (c - 1)))
    assert _twin_loss(m, image, text, [(0, 1)]).item() == pytest.approx(expected, rel=1e-4)
    assert _twin_loss(m, image, text, []).item() == 0.0


def test_short_training_lowers_loss_and_writes_a_text_encoder(tokenizer, tmp_path):
    cfg = CONFIGS["test"]
    train_clip(tmp_path, steps=40, batch_size=32, seed=0, lr=5e-3, warmup=5, config=cfg, log=lambda s: None)

    # The contrastive loss on batches training never saw, before (same seed: the same init) and after.
    before, after = build_clip(cfg, tokenizer, seed=0).eval(), CLIPModel.from_pretrained(tmp_path / "clip").eval()
    with torch.no_grad():
        losses = [
            [
                _contrastive(m, *_embed(m, tokenizer, *training_batch(10_000 + i, 32, seed=0)[:2]))[0].item()
                for i in range(3)
            ]
            for m in (before, after)
        ]
    assert np.mean(losses[1]) < np.mean(losses[0]) - 0.3, losses

    encoder, info = CLIPTextModel.from_pretrained(tmp_path / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert encoder.config.eos_token_id == tokenizer.eos_token_id
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    saved = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None  # not the last training call's
    batch = loaded_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
        ref = after.text_model(batch["input_ids"], attention_mask=batch["attention_mask"])
        short = loaded_tok(PROMPTS, padding="longest", return_tensors="pt")
        out_short = encoder(short["input_ids"], attention_mask=short["attention_mask"])
    assert out.last_hidden_state.shape == (len(PROMPTS), 77, cfg.width)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    # Pooled = the state at EOS; and the causal tower gives real tokens the same states whatever the
    # padding (what lets training pad only to the longest caption).
    eos = (batch["input_ids"] == tokenizer.eos_token_id).int().argmax(1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(len(PROMPTS)), eos])
    n = short["input_ids"].shape[1]
    mask = short["attention_mask"].bool()
    torch.testing.assert_close(out_short.last_hidden_state[mask], out.last_hidden_state[:, :n][mask])


def test_semantic_clip_sees_images_through_the_compressor(tokenizer, tmp_path):
    from recipes.shapes.clip import render_size, vision_input
    from wuerstchen.io.checkpoint import load_model, save_model
    from wuerstchen.models.semantic import SEMANTIC_PRESETS, SemanticCompressor

    torch.manual_seed(0)
    save_model(SemanticCompressor(SEMANTIC_PRESETS["small"]).eval(), tmp_path / "semantic")
    with pytest.raises(ValueError, match="semantic"):
        train_clip(tmp_path / "x", steps=1, batch_size=4, config="test-semantic", log=lambda s: None)
    with pytest.raises(ValueError, match="channels"):
        train_clip(tmp_path / "x", steps=1, batch_size=4, config="test", semantic=tmp_path / "semantic")
    metrics = train_clip(
        tmp_path / "clip", steps=3, batch_size=8, config="test-semantic", semantic=tmp_path / "semantic",
        eval_scenes=16, log=lambda s: None,
    )  # fmt: skip
    assert 0 <= metrics["heldout_twins_text_to_image"] <= 1

    model = CLIPModel.from_pretrained(tmp_path / "clip" / "clip").eval()
    compressor = load_model(SemanticCompressor, tmp_path / "semantic").eval()
    assert render_size(model, compressor) == 128 and render_size(model) == 8
    images = training_batch(0, 2, size=128)[0]
    x = vision_input(model, images, compressor)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    latent = compressor.encode(pixels, size=(8, 8))
    # The latent, then the latent times each cell's column and row in [-1, 1]. The latent's values
    # are ~1e-2 at most, so relative to them (torch's default atol, 1e-5, would be 0.1–0.2% of them):
    # the pixels reach the compressor by another float32 route: measured ≤ 1.6e-6 relative (2.1e-6
    # on AVX2 kernels).
    assert x.shape == (2, 48, 8, 8)
    for got, want in (
        (x[:, :16], latent),
        (x[:, 16:32, :, 0], -latent[..., 0]),
        (x[:, 16:32, :, -1], latent[..., -1]),
        (x[:, 32:, 0], -latent[:, :, 0]),
        (x[:, 32:, -1], latent[:, :, -1]),
        (x[:, 32:, :, 3], latent[:, :, :, 3] * torch.linspace(-1, 1, 8)),
    ):
        assert got.shape == want.shape and rel_err(got, want) <= 1e-5
    assert model.get_image_features(pixel_values=x).pooler_output.shape == (2, CONFIGS["test-semantic"].projection_dim)
    assert CLIPTextModel.from_pretrained(tmp_path / "clip" / "text_encoder").config.hidden_size == 32
