"""Shared fixtures: tiny reference (diffusers) components saved in both folder layouts."""

from __future__ import annotations

import os

# The test models are tiny: one thread is as fast as two, and it keeps an oversubscribed machine
# (the test process beside the server or torchrun processes it starts) from stalling on OpenMP
# thread hand-offs. Set before torch is imported, so child processes inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import cascade_components, diffusers_components  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """diffusers' combined pipeline over tiny random components, and the folders it was saved to."""
    from diffusers import WuerstchenCombinedPipeline, WuerstchenDecoderPipeline, WuerstchenPriorPipeline

    parts = diffusers_components(seed=0)
    ref = WuerstchenCombinedPipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("reference")
    ref.save_pretrained(root / "combined")
    WuerstchenDecoderPipeline(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        decoder=parts["decoder"],
        scheduler=parts["scheduler"],
        vqgan=parts["vqgan"],
    ).save_pretrained(root / "decoder-repo")
    WuerstchenPriorPipeline(
        tokenizer=parts["prior_tokenizer"],
        text_encoder=parts["prior_text_encoder"],
        prior=parts["prior_prior"],
        scheduler=parts["prior_scheduler"],
    ).save_pretrained(root / "prior-repo")
    return ref, root


@pytest.fixture(scope="session")
def cascade_reference(tmp_path_factory):
    """diffusers' Stable Cascade combined pipeline over tiny random components, saved as a combined
    folder and as the hub's two repos (decoder + vqgan, prior + image encoder), with the hub's
    `model_index.json` naming the VQGAN `["wuerstchen", "PaellaVQModel"]`."""
    import json

    from diffusers import StableCascadeCombinedPipeline, StableCascadeDecoderPipeline, StableCascadePriorPipeline

    parts = cascade_components(seed=0)
    ref = StableCascadeCombinedPipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("cascade")
    ref.save_pretrained(root / "combined")
    names = ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan")
    StableCascadeDecoderPipeline(**{n: parts[n] for n in names}).save_pretrained(root / "decoder-repo")
    names = ("tokenizer", "text_encoder", "prior", "scheduler", "image_encoder", "feature_extractor")
    StableCascadePriorPipeline(**{n: parts[f"prior_{n}"] for n in names}).save_pretrained(root / "prior-repo")
    index_path = root / "decoder-repo" / "model_index.json"
    index = json.loads(index_path.read_text())
    index["vqgan"] = ["wuerstchen", "PaellaVQModel"]  # as on the hub: diffusers cannot load it so
    index_path.write_text(json.dumps(index))
    return ref, root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A pipeline folder with our own tiny random weights (native size 128), semantic compressor included."""
    from wuerstchen.testing import random_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "model"
    random_pipeline("tiny", seed=1, semantic=True).save_pretrained(folder)  # with a compressor: image inputs
    return folder


@pytest.fixture(scope="session")
def tiny_cascade_folder(tmp_path_factory):
    """A Stable Cascade pipeline folder with our tiny random weights (tiny-c, tiny-b) and a tiny CLIP
    image encoder (32 px), so image embeddings are part of training."""
    from tiny import clip_vision_model
    from transformers import CLIPImageProcessor

    from wuerstchen.testing import random_cascade_pipeline

    pipe = random_cascade_pipeline("tiny", seed=1)
    pipe.image_encoder = clip_vision_model(7, projection=pipe.prior.config.clip_image_in_channels)
    pipe.feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("tiny-cascade") / "model"
    pipe.save_pretrained(folder)
    return folder
