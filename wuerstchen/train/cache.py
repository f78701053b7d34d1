"""Precomputed Stage C inputs: each image's text states and semantic latent, computed once.

Stage C's inputs come from two frozen networks (a CLIP text model and the semantic compressor);
with `--cache PATH` they run over the data once, the results go to one safetensors file, and every
epoch after reads that instead of decoding images and running the encoders again:

    wuerstchen train c --data photos/ --init-from wuerstchen-v2 --cache photos.cache.safetensors --max-steps 0
    wuerstchen train c --data photos/ --init-from wuerstchen-v2 --cache photos.cache.safetensors

The first command only builds the cache (do that with one process before a `torchrun` run); the
second trains from it (building it first if it is missing). The file holds

    text           (N, 77, D)   last hidden states of each caption
    empty_text     (77, D)      the empty caption's states, for caption dropout
    pooled, empty_pooled  (N, 1, D'), (1, D')  Stable Cascade only: the pooled text embeddings
    semantic.{i}   (N_i, 16, h, w) semantic latents of the items of shape i (one per bucket)

and JSON metadata: the items (key, caption, shape, row), the skipped items and a fingerprint of the
settings it was made with; a cache made with other settings is refused. Crops are the centre crops:
random crops and flips are not cached.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import UserError
from ..io.checkpoint import load_tensors, save_tensors
from .config import StageCTrainConfig
from .data import BucketBatchSampler, SkipLog, make_loader

logger = logging.getLogger(__name__)

CACHE_FORMAT = "wuerstchen-stage-c-cache/1"


def fingerprint(cfg: StageCTrainConfig, resolution_multiple: float, pooled: bool = False) -> dict[str, Any]:
    """What the cached tensors depend on; a cache is reused only when all of it matches. `pooled`:
    the cache holds pooled text embeddings too (Stable Cascade's prior reads them)."""
    data = str(Path(cfg.data).resolve()) if cfg.data and Path(cfg.data).exists() else cfg.data
    return {
        "data": data,
        "image_size": cfg.image_size,
        "bucket_multiple": cfg.bucket_multiple,
        "holdout": cfg.holdout if not cfg.eval_data else 0,
        "text_encoder": cfg.text_encoder or cfg.init_from or cfg.pipeline,
        "semantic": cfg.semantic or cfg.init_from or cfg.pipeline,
        "resolution_multiple": resolution_multiple,
    } | ({"pooled": True} if pooled else {})


@torch.no_grad()
def build_cache(
    path: Path,
    source: Dataset,
    encode_text: Callable[[list[str]], Tensor | tuple[Tensor, Tensor]],
    encode_semantic: Callable[[Tensor], Tensor],
    device: torch.device,
    cfg: StageCTrainConfig,
    expected: dict[str, Any],
) -> None:
    """Run the frozen encoders over `source` (a data set with a skip log) once and write the cache
    file atomically: `encode_text(captions)` → (B, 77, D) text states (or those and the (B, 1, D')
    pooled embeddings), `encode_semantic(images)` →
    (B, 16, h, w) semantic latents; `expected` is the fingerprint stored with it."""
    dtype = torch.bfloat16 if cfg.cache_dtype == "bfloat16" else torch.float32
    loader = make_loader(source, cfg.batch_size, cfg.num_workers, seed=0, shuffle=False, drop_last=False)
    loader.set_epoch(0)
    texts: list[Tensor] = []
    pooled: list[Tensor] = []
    shapes: dict[tuple[int, ...], list[Tensor]] = {}
    index: list[list[Any]] = []
    for batch in tqdm(loader, desc="caching text states and semantic latents", disable=None if cfg.progress else True):
        encoded = encode_text(batch["caption"])
        if isinstance(encoded, tuple):
            encoded, pooled_rows = encoded
            pooled.append(pooled_rows.cpu())
        texts.append(encoded.cpu())
        latents = encode_semantic(batch["image"].to(device))
        shape = tuple(latents.shape[1:])
        rows = shapes.setdefault(shape, [])
        shape_id, start = list(shapes).index(shape), sum(len(r) for r in rows)
        for i, (key, caption) in enumerate(zip(batch["key"], batch["caption"], strict=True)):
            index.append([key, caption, shape_id, start + i])
        rows.append(latents.cpu())
    if not index:
        raise UserError(f"{cfg.data}: no items to cache")
    empty = encode_text([""])
    empty_text, empty_pooled = empty if isinstance(empty, tuple) else (empty, None)
    tensors = {"text": torch.cat(texts).to(dtype), "empty_text": empty_text[0].to(dtype)}
    if pooled:
        tensors |= {"pooled": torch.cat(pooled).to(dtype), "empty_pooled": empty_pooled[0].to(dtype)}
    for i, rows in enumerate(shapes.values()):
        tensors[f"semantic.{i}"] = torch.cat(rows).to(dtype)
    metadata = {
        "format": CACHE_FORMAT,
        "index": json.dumps(index),
        "skipped": json.dumps(source.skipped_keys),
        "fingerprint": json.dumps(expected),
    }
    save_tensors(tensors, path, metadata=metadata)
    logger.info("cached %d items in %s; %s", len(index), path, source.log_skipped())


class StageCCache(SkipLog, Dataset):
    """The cache file as a dataset of ``{"text", "semantic", "caption", "key"}`` items, bucketed by
    latent shape; its skip log is the one recorded when it was built."""

    def __init__(self, path: str | Path, expected: dict[str, Any] | None = None) -> None:
        super().__init__()
        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise UserError(f"{path}: not a readable cache file ({e}); delete it to rebuild") from e
        if meta.get("format") != CACHE_FORMAT:
            raise UserError(f"{path}: not a Stage C cache ({CACHE_FORMAT}); delete it or pick another --cache")
        found = json.loads(meta["fingerprint"])
        if expected is not None and found != expected:
            diff = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
            raise UserError(
                f"{path} was made with other settings ({', '.join(diff)}): delete it or use another --cache"
            )
        tensors = load_tensors(path)
        self.text, self.empty_text = tensors["text"], tensors["empty_text"]
        self.pooled, self.empty_pooled = tensors.get("pooled"), tensors.get("empty_pooled")
        self.semantic = [tensors[f"semantic.{i}"] for i in range(sum(k.startswith("semantic.") for k in tensors))]
        self.index = json.loads(meta["index"])
        self.bucket_ids = [shape_id for _, _, shape_id, _ in self.index]
        self.merge_skipped(json.loads(meta["skipped"]))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key, caption, shape_id, row = self.index[i]
        item = {"text": self.text[i], "semantic": self.semantic[shape_id][row], "caption": caption, "key": key}
        return item | ({"pooled": self.pooled[i]} if self.pooled is not None else {})


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    names = [name for name in ("text", "semantic", "pooled") if name in items[0]]
    out = {name: torch.stack([item[name] for item in items]) for name in names}
    return out | {"caption": [item["caption"] for item in items], "key": [item["key"] for item in items]}


class CacheLoader(DataLoader):
    """Batches of cached items with `set_epoch(epoch, start_batch)`, like `data.make_loader`'s loader
    (whose iterator keeps only batches with images)."""

    def __init__(self, cache: StageCCache, plan: BucketBatchSampler, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        super().__init__(cache, batch_sampler=plan, collate_fn=collate_cached, generator=generator)
        self.source, self.plan = cache, plan

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.plan.set_epoch(epoch, start_batch)


def cache_loader(cache: StageCCache, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> CacheLoader:
    """Batches of cached items for this rank, in the same (seed, epoch) order as `make_loader`'s."""
    sampler = BucketBatchSampler(cache.bucket_ids, batch_size, seed=seed, rank=rank, world_size=world_size)
    return CacheLoader(cache, sampler, seed)


def ensure_cache(path: Path, expected: dict[str, Any], build: Callable[[], None]) -> StageCCache:
    """Open the cache at `path`, calling `build()` first (on rank 0; the others wait) when it is
    missing; a cache whose fingerprint is not `expected` is refused."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if not path.exists() and rank == 0:
        logger.info("building the Stage C cache %s", path)
        build()
    if dist.is_initialized():
        dist.barrier()
    return StageCCache(path, expected)
