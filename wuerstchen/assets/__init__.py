"""Files that ship inside the package: the small Würstchen trained by the shapes recipe."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL_NAME = "shipped-small"  # how PNG metadata and the server name the shipped model


def shipped_model() -> Path:
    """The folder of the small model that ships inside the package (diffusers layout, 128 px).

    `WuerstchenPipeline.from_pretrained(wuerstchen.shipped_model())` loads it offline.
    """
    return Path(__file__).resolve().parent / "small"
