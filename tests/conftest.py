"""Shared fixtures: tiny reference (diffusers) components saved in both folder layouts."""

from __future__ import annotations

import os

# The test models are tiny: one thread is as fast as two, and it keeps an oversubscribed machine
# (the test process beside the server or torchrun processes it starts) from stalling on OpenMP
# thread hand-offs. Set before torch is imported, so child processes inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import diffusers_components  # noqa: E402

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
def tiny_folder(tmp_path_factory):
    """A pipeline folder with our own tiny random weights (native size 128)."""
    from wuerstchen.testing import random_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "model"
    random_pipeline("tiny", seed=1).save_pretrained(folder)
    return folder
