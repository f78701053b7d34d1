"""The shipped model's semantic compressor: its labels say what the scene holds, its training writes
a loadable compressor, and resumes.

pytest -q tests/test_shapes_compressor.py
"""

from __future__ import annotations

import json

import torch

from recipes.shapes.compressor import HEAD_PARTS, LabelHead, accuracies, label_loss, labels, train_compressor
from wuerstchen.io.checkpoint import load_model
from wuerstchen.models.semantic import SemanticCompressor
from wuerstchen.shapes.world import BACKGROUNDS, COLOURS, SHAPES, Obj, Scene


def test_labels_place_each_object_in_its_centre_cell():
    scene = Scene(
        (Obj("star", "orange", "large", cx=0.30, cy=0.70), Obj("circle", "blue", "small", cx=0.80, cy=0.20)), "grey"
    )
    t = labels(scene, 8)
    assert t["centre"].sum() == 2 and t["centre"][5, 2] == 1 and t["centre"][1, 6] == 1
    assert t["colour"][5, 2] == list(COLOURS).index("orange") and t["shape"][5, 2] == SHAPES.index("star")
    assert t["colour"][1, 6] == list(COLOURS).index("blue") and t["shape"][1, 6] == SHAPES.index("circle")
    assert t["size"][5, 2] == 1 and t["size"][1, 6] == 0  # large, small
    assert (t["colour"] >= 0).sum() == 2  # every other cell is ignored (-100)
    assert torch.allclose(t["offset"][:, 5, 2], torch.tensor([0.30 * 8 - 2, 0.70 * 8 - 5]))
    assert t["background"] == list(BACKGROUNDS).index("grey")
    # The 32 × 32 silhouette map: the object's colour class at its centre, background in a far corner.
    fine = t["fine"]
    assert fine.shape == (32, 32)
    assert fine[int(0.70 * 32), int(0.30 * 32)] == 1 + list(COLOURS).index("orange")
    assert fine[int(0.20 * 32), int(0.80 * 32)] == 1 + list(COLOURS).index("blue")
    assert fine[31, 31] == 0 and fine[0, 0] == 0
    # A large object covers more sub-blocks than a small one.
    assert (fine == fine[22, 9]).sum() > (fine == fine[6, 25]).sum()


def test_head_and_loss():
    torch.manual_seed(0)
    head = LabelHead(16)
    out = head(torch.randn(2, 16, 8, 8))
    assert out["fine"].shape == (2, len(COLOURS) + 1, 32, 32)
    assert out["shape"].shape == (2, len(SHAPES), 8, 8)
    assert set(out) == set(HEAD_PARTS)
    scene = Scene((Obj("square", "red", "large", cx=0.5, cy=0.5),), "beige")
    target = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in labels(scene, 8).items()}
    loss, metrics = label_loss(out, target), accuracies(out, target)
    assert loss.item() > 1 and metrics["shape_acc"] <= 1
    # Logits that put every mass on the targets: loss near 0 and every accuracy 1.
    perfect = {k: torch.zeros_like(v) for k, v in out.items()}
    perfect["fine"] = 50.0 * torch.nn.functional.one_hot(target["fine"], len(COLOURS) + 1).permute(0, 3, 1, 2).float()
    perfect["centre"] = (100.0 * (2 * target["centre"] - 1)).unsqueeze(1)
    for k in ("colour", "shape", "size"):
        cls = target[k].clamp(min=0)
        perfect[k] = 50.0 * torch.nn.functional.one_hot(cls, out[k].shape[1]).permute(0, 3, 1, 2).float()
    perfect["offset"] = torch.logit(target["offset"].clamp(1e-4, 1 - 1e-4))
    perfect["background"] = 50.0 * torch.nn.functional.one_hot(target["background"], len(BACKGROUNDS)).float()[
        :, :, None, None
    ].expand(-1, -1, 8, 8)
    loss, metrics = label_loss(perfect, target), accuracies(perfect, target)
    assert loss.item() < 1e-3
    assert all(v == 1.0 for v in metrics.values()), metrics


def test_training_writes_the_compressor_and_resumes(tmp_path):
    out = tmp_path / "semantic"
    metrics = train_compressor(out, steps=3, batch_size=4, bf16=False)
    assert set(metrics) >= {"shape_acc", "colour_acc", "fine_acc"}
    model = load_model(SemanticCompressor, out / "semantic")
    assert model(torch.rand(1, 3, 128, 128)).shape == (1, 16, 8, 8)
    assert json.loads((out / "metrics.json").read_text())["step"] == 3
    # Done: a rerun trains nothing; more steps go on from step 3.
    before = (out / "semantic" / "diffusion_pytorch_model.safetensors").read_bytes()
    train_compressor(out, steps=3, batch_size=4, bf16=False)
    assert (out / "semantic" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    train_compressor(out, steps=4, batch_size=4, bf16=False)
    assert json.loads((out / "metrics.json").read_text())["step"] == 4
    assert (out / "semantic" / "diffusion_pytorch_model.safetensors").read_bytes() != before
