"""Image–caption data for training every stage.

Two sources yield the same items, ``{"image": (3, H, W) float32 in [0, 1], "caption": str, "key": str}``:
a folder of images with same-named ``.txt`` captions, or webdataset tar shards of jpg/png/webp + txt.

    from wuerstchen.train.data import FolderDataset, make_loader

    data = FolderDataset("photos/", size=512, bucket_multiple=128)
    loader = make_loader(data, batch_size=8, num_workers=4, seed=0, rank=rank, world_size=world_size)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_batch=resume_batch if epoch == start_epoch else 0)
        for batch in loader:  # batch["image"]: (B, 3, H, W); batch["caption"]: list[str]
            ...
        data.log_skipped()  # "skipped 2 items: 1 corrupt image, 1 missing caption"

Bad items (undecodable image, missing or empty caption) are skipped and counted, never fatal. They are
recorded by key, so an item counts once however often it is met. A DataLoader worker records skips
in its own copy of the source, so it also attaches ``{key: reason}`` to the next item it returns;
`collate` gathers these into ``batch["skipped"]`` and the loader from `make_loader` merges them into
the source in the main process. A stream worker also sends the records it has not sent yet when it
ends. So the counts are exact in one process and, once an epoch is through, with workers too.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..errors import UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
Item = dict[str, Any]


# ----------------------------------------------------------------------------- preprocessing


def make_buckets(size: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(h, w) shapes of area ≈ size², both sides multiples of `multiple`, aspect ratio ≤ `max_ratio`,
    from tallest to widest. ``make_buckets(1024, 128)`` gives the shapes the official models know."""
    if size < multiple:
        raise UserError(f"size {size} is smaller than multiple {multiple}")
    shapes = set()
    for w in range(multiple, int(size * max_ratio) + 1, multiple):
        h = max(multiple, round(size * size / w / multiple) * multiple)
        if max(h, w) / min(h, w) <= max_ratio:
            shapes |= {(h, w), (w, h)}  # both ways round: rounding alone gives a lopsided set
    return sorted(shapes, key=lambda hw: -hw[0] / hw[1])


def nearest_bucket(hw: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket closest in aspect ratio (compared in log space, so 2:1 and 1:2 are alike)."""
    ratio = math.log(hw[0] / hw[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(h, w) as displayed, from the header: phones store a 90° rotation in EXIF, not in the pixels."""
    w, h = image.size
    return (w, h) if image.getexif().get(0x0112) in (5, 6, 7, 8) else (h, w)


def preprocess(
    image: Image.Image, hw: tuple[int, int], *, random_crop: bool = False, flip: bool = False
) -> torch.Tensor:
    """Decode an opened image to RGB, resize it to cover (h, w) (the short side to the target),
    crop to (h, w) → (3, h, w) float32 in [0, 1]. Raises whatever PIL raises on bad data."""
    th, tw = hw
    # JPEGs decode at 1/2, 1/4 or 1/8 scale almost for free; asking for the target's long side
    # both ways keeps enough pixels whatever the EXIF rotation. A no-op for other formats.
    image.draft("RGB", (max(hw), max(hw)))
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        if "A" in image.getbands() or "transparency" in image.info:
            # transparent pixels often hold black; put them on white, as a viewer shows them
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        image = image.convert("RGB")
    w, h = image.size
    scale = max(th / h, tw / w)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    image = image.resize((rw, rh), Image.Resampling.BICUBIC)
    if random_crop:
        top, left = int(torch.randint(rh - th + 1, ())), int(torch.randint(rw - tw + 1, ()))
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    image = image.crop((left, top, left + tw, top + th))
    # Off by default: captions say "left of" / "right of", which a mirrored image would make false.
    if flip and torch.rand(()) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def collate(items: list[Item]) -> Item:
    """Items → ``{"image": (B, 3, H, W), "caption": [B], "key": [B], "skipped": {key: reason}}``."""
    skipped: dict[str, str] = {}
    for item in items:
        skipped.update(item.get("skipped", {}))
    return {
        "image": torch.stack([item["image"] for item in items]),
        "caption": [item["caption"] for item in items],
        "key": [item["key"] for item in items],
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------- sources


class SkipLog:
    """Which items a source skipped and why, by key."""

    def __init__(self) -> None:
        self.skipped_keys: dict[str, str] = {}

    @property
    def skipped(self) -> Counter[str]:
        """Reason → number of items skipped for it."""
        return Counter(self.skipped_keys.values())

    def merge_skipped(self, records: dict[str, str]) -> None:
        """Add the skips a DataLoader worker reported (``batch["skipped"]``)."""
        self.skipped_keys.update(records)

    def log_skipped(self) -> str:
        """Log and return one line: ``skipped 2 items: 1 corrupt image, 1 missing caption``."""
        counts = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        line = f"skipped {len(self.skipped_keys)} items"
        if counts:
            line += ": " + ", ".join(f"{n} {reason}" for reason, n in counts)
        logger.info(line)
        return line

    def _skip(self, key: str, reason: str, pending: dict[str, str] | None = None) -> None:
        self.skipped_keys[key] = reason
        if pending is not None:  # to travel with the next item out of a worker
            pending[key] = reason


class FolderDataset(SkipLog, Dataset):
    """Images under `root` (recursive, sorted by path) with same-named captions: ``cat.png`` + ``cat.txt``.

    Keys are paths relative to `root`. Missing or empty captions are found here, at index time, so
    their count is exact whatever the number of workers. With `bucket_multiple`, each image goes to
    the aspect-ratio bucket of `make_buckets(size, bucket_multiple, max_ratio)`, which reads every
    header now (unreadable ones are skipped now too); without it every item is size × size.

    An image that fails to decode later is replaced by the next decodable item, cropped to the
    requested item's bucket. So a batch always has its full size and a single shape, with any number
    of workers, at the price of one item seen twice; the failed key is remembered so it is not decoded
    again by this process.
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        *,
        random_crop: bool = False,
        flip: bool = False,
        bucket_multiple: int | None = None,
        max_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.root, self.random_crop, self.flip = Path(root), random_crop, flip
        self.buckets = make_buckets(size, bucket_multiple, max_ratio) if bucket_multiple else [(size, size)]
        self.items: list[tuple[Path, str, str]] = []  # (image path, key, caption)
        self.bucket_ids: list[int] = []  # index into self.buckets, per item
        paths = {p.relative_to(self.root).as_posix(): p for p in self.root.rglob("*") if _is_image(p)}
        for key, path in sorted(paths.items()):
            caption_path = path.with_suffix(".txt")
            caption = None
            if caption_path.is_file():
                caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
            if not caption:
                self._skip(key, "missing caption" if caption is None else "empty caption")
                continue
            bucket = 0
            if len(self.buckets) > 1:
                try:
                    with Image.open(path) as image:
                        bucket = nearest_bucket(oriented_size(image), self.buckets)
                except Exception:
                    self._skip(key, "corrupt image")
                    continue
            self.items.append((path, key, caption))
            self.bucket_ids.append(bucket)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Item:
        hw = self.buckets[self.bucket_ids[index]]
        pending: dict[str, str] = {}
        for j in range(index, index + len(self.items)):
            item = self._load(self.items[j % len(self.items)], hw, pending)
            if item is not None:
                return (item | {"skipped": pending}) if pending else item
        raise RuntimeError(f"no decodable image under {self.root}")

    def split_holdout(self, n: int) -> tuple[FolderDataset, list[Item]]:
        """(a source of all but the last `n` items, those `n` items decoded): images for samples and
        evaluation that training never sees. The last by key, so a folder always holds out the same
        ones. A held-out image that does not decode is left out, not replaced by a training item; the
        returned source's skip log counts it. `self` is not changed."""
        if not 0 <= n < len(self):
            raise ValueError(f"cannot hold out {n} of {len(self)} items")
        cut = len(self) - n
        rest = copy.copy(self)  # the same root, buckets and preprocessing
        rest.items, rest.bucket_ids = self.items[:cut], self.bucket_ids[:cut]
        rest.skipped_keys = dict(self.skipped_keys)  # its own log, which gets the hold-out's failures too
        held = [rest._load(self.items[j], self.buckets[self.bucket_ids[j]]) for j in range(cut, len(self))]
        return rest, [item for item in held if item is not None]

    def _load(
        self, entry: tuple[Path, str, str], hw: tuple[int, int], pending: dict[str, str] | None = None
    ) -> Item | None:
        """The item of `entry` (image path, key, caption) cropped to `hw`; None if its image is known
        bad or fails to decode now (then it is recorded)."""
        path, key, caption = entry
        if key in self.skipped_keys:
            return None
        try:
            with Image.open(path) as image:
                pixels = preprocess(image, hw, random_crop=self.random_crop, flip=self.flip)
        except Exception:  # PIL raises many types on bad bytes: OSError, SyntaxError, ValueError, ...
            self._skip(key, "corrupt image", pending)
            return None
        return {"image": pixels, "caption": caption, "key": key}


def _is_image(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_SUFFIXES and path.is_file()


def _every(src: Iterator[Any], start: int, step: int) -> Iterator[Any]:
    """Every `step`-th element from `start`: webdataset's `split_by_node` / `split_by_worker`, but
    for a rank or worker given explicitly rather than read from the environment."""
    yield from itertools.islice(src, start, None, step)


class WebDatasetSource(SkipLog, IterableDataset):
    """Webdataset tar shards whose samples hold an image (jpg/jpeg/png/webp) and a ``txt`` caption.

    `urls` is anything webdataset takes: a list, a brace pattern (``shards-{000..009}.tar``),
    ``::``-joined lists, ``pipe:`` commands, http(s) URLs. Keys are the samples' ``__key__``.

    Splitting: the shard list (shuffled from seed and epoch, identically on every rank) goes to ranks
    by taking every world_size-th shard, then to DataLoader workers by taking every num_workers-th of
    those, exactly as webdataset's `split_by_node` and `split_by_worker` do; each (rank, worker) thus
    reads its own shards. Iterated directly, the source uses those two webdataset functions (rank from
    RANK/WORLD_SIZE or torch.distributed) and does not shuffle; `make_loader` passes its own rank,
    world size and seed to `samples` instead, and a worker index it may rotate to resume mid-epoch.
    Use at least world_size × num_workers shards (many more is better), or some readers get none.
    Ranks may get different numbers of samples: bound training by steps, not by the end of the data.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        size: int,
        *,
        random_crop: bool = False,
        flip: bool = False,
        bucket_multiple: int | None = None,
        max_ratio: float = 2.0,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        self.urls = urls if isinstance(urls, str) else list(urls)
        self.random_crop, self.flip, self.shuffle_buffer = random_crop, flip, shuffle_buffer
        self.buckets = make_buckets(size, bucket_multiple, max_ratio) if bucket_multiple else [(size, size)]

    def __iter__(self) -> Iterator[Item]:
        return self.samples()

    def samples(
        self,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        worker: int | None = None,
        num_workers: int | None = None,
        seed: str | None = None,
    ) -> Iterator[Item]:
        """Decoded items from one reader's shards: rank `rank` of `world_size`, DataLoader worker
        `worker` of `num_workers` (None: webdataset's `split_by_node` / `split_by_worker` find them).
        `seed` shuffles the shard order (the same on every rank) and the samples (a buffer of raw
        samples per reader); None keeps file order."""
        import webdataset as wds  # optional dependency (the `train` extra)

        pending: dict[str, str] = {}

        def on_read_error(exn: Exception) -> bool:  # webdataset appends the url to exn.args
            self._skip(f"{exn.args[-1]}: {type(exn).__name__}", "unreadable tar data", pending)
            return True

        by_rank = wds.split_by_node if world_size is None else partial(_every, start=rank, step=world_size)
        by_worker = wds.split_by_worker if num_workers is None else partial(_every, start=worker, step=num_workers)
        stages = [
            wds.SimpleShardList(self.urls, seed=seed),
            by_rank,
            by_worker,
            wds.tarfile_to_samples(handler=on_read_error),
        ]
        if seed is not None:
            rng = random.Random(f"{seed}/{rank}/{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        for sample in wds.DataPipeline(*stages):
            item = self._decode(sample, pending)
            if item is not None:
                if pending:
                    item["skipped"] = dict(pending)
                    pending.clear()
                yield item

    def _decode(self, sample: dict[str, Any], pending: dict[str, str]) -> Item | None:
        key = sample["__key__"]
        data = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
        caption = sample["txt"].decode("utf-8", errors="replace").strip() if "txt" in sample else None
        if data is None:
            reason = "missing image"
        elif caption is None:
            reason = "missing caption"
        elif not caption:
            reason = "empty caption"
        else:
            try:
                image = Image.open(io.BytesIO(data))
                hw = self.buckets[nearest_bucket(oriented_size(image), self.buckets)]
                pixels = preprocess(image, hw, random_crop=self.random_crop, flip=self.flip)
                return {"image": pixels, "caption": caption, "key": key}
            except Exception:  # PIL raises many types on bad bytes
                reason = "corrupt image"
        # keys repeat across shards (each writer counts from 0); the url makes the record unique
        self._skip(f"{sample.get('__url__', '')}:{key}", reason, pending)
        return None


# ----------------------------------------------------------------------------- batching


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices for one rank, shuffled from (seed, epoch), one bucket per batch.

    Every rank computes the same plan for the epoch and takes every world_size-th batch, so ranks see
    disjoint data. All ranks get the same number of batches, or DDP would wait forever for the rank
    that ran out: with `drop_last` the surplus batches are dropped (as are each bucket's partial
    batch), without it batches are repeated. ``set_epoch(epoch, start_batch=k)`` skips this rank's
    first k batches of the epoch without loading them, to resume a run where it stopped.
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.bucket_ids, self.batch_size, self.seed = list(bucket_ids), batch_size, seed
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch, from its start (ignoring `start_batch`)."""
        n, bs, ws = len(self.bucket_ids), self.batch_size, self.world_size
        rng = np.random.default_rng([self.seed, self.epoch])
        by_bucket: dict[int, list[int]] = {}
        for i in rng.permutation(n) if self.shuffle else range(n):
            by_bucket.setdefault(self.bucket_ids[i], []).append(int(i))
        batches = [b[k : k + bs] for b in by_bucket.values() for k in range(0, len(b), bs)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == bs]
        if self.shuffle:  # else the buckets would come one after the other
            batches = [batches[j] for j in rng.permutation(len(batches))]
        if self.drop_last:
            batches = batches[: len(batches) // ws * ws]
        elif batches:
            batches += [batches[j % len(batches)] for j in range(-len(batches) % ws)]
        return batches[self.rank :: ws]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_batches()[self.start_batch :])

    def __len__(self) -> int:
        return max(0, len(self.epoch_batches()) - self.start_batch)


class _StreamBatches(IterableDataset):
    """One rank's batches of a `WebDatasetSource`, made in each worker (what `make_loader` iterates)."""

    def __init__(
        self,
        source: WebDatasetSource,
        batch_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        self.source, self.batch_size, self.seed, self.shuffle = source, batch_size, seed, shuffle
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers in turn, starting with worker 0, so batch j
        # of an epoch comes from worker j % num_workers (while all workers have data). To resume
        # at batch k, worker w plays the reader that batch k + w came from, v = (w + k) % n, and drops
        # v's batches before k. A stream cannot seek: those are still read and decoded, not collated.
        virtual = (worker + self.start_batch) % num_workers
        skip = len(range(virtual, self.start_batch, num_workers))
        seed = f"{self.seed}/{self.epoch}" if self.shuffle else None
        items = self.source.samples(
            rank=self.rank, world_size=self.world_size, worker=virtual, num_workers=num_workers, seed=seed
        )
        known = set(self.source.skipped_keys)
        yield from itertools.islice(_batches_by_shape(items, self.batch_size, self.drop_last), skip, None)
        # Skips not forwarded with an item (after this worker's last one, in a dropped partial batch,
        # in batches skipped to resume) go out in one record-only batch, which the Loader consumes.
        news = {key: reason for key, reason in self.source.skipped_keys.items() if key not in known}
        if news:
            yield {"skipped": news}


def _batches_by_shape(items: Iterator[Item], batch_size: int, drop_last: bool) -> Iterator[Item]:
    """Collate a stream of items into batches of one image shape each (one per bucket)."""
    groups: dict[tuple[int, ...], list[Item]] = {}
    for item in items:
        shape = tuple(item["image"].shape)
        groups.setdefault(shape, []).append(item)
        if len(groups[shape]) == batch_size:
            yield collate(groups.pop(shape))
    if not drop_last:
        yield from (collate(group) for group in groups.values())


class Loader(DataLoader):
    """A DataLoader with ``set_epoch(epoch, start_batch)`` that merges the skips its workers report
    into the source, so ``source.skipped`` and ``source.log_skipped()`` cover every worker."""

    def __init__(self, source: SkipLog, plan: BucketBatchSampler | _StreamBatches, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source, self.plan = source, plan

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Shuffle as for `epoch` of this seed, and start after this rank's first `start_batch` batches."""
        self.plan.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[Item]:
        for batch in super().__iter__():
            self.source.merge_skipped(batch["skipped"])
            if "image" in batch:  # not a stream worker's final record-only batch
                yield batch


def make_loader(
    source: FolderDataset | WebDatasetSource,
    batch_size: int,
    num_workers: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
    *,
    pin_memory: bool = False,
) -> Loader:
    """A loader of collated batches for this rank, its order a function of (seed, epoch).

    Call ``loader.set_epoch(epoch, start_batch=k)`` before each epoch; to resume, pass the number of
    batches this rank already trained on in that epoch. For a folder that skip is free and exact.
    For shards it is exact with the same num_workers, but the skipped samples are still decoded.
    """
    # Not persistent: workers get a fresh copy of the source and plan (epoch, known-bad keys) each epoch.
    # The generator seeds the workers' torch RNG, which draws random crops and flips.
    common: dict[str, Any] = dict(
        num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed)
    )
    if isinstance(source, WebDatasetSource):
        stream = _StreamBatches(source, batch_size, seed, shuffle, drop_last, rank, world_size)
        return Loader(source, stream, dataset=stream, batch_size=None, **common)
    sampler = BucketBatchSampler(
        source.bucket_ids,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )
    return Loader(source, sampler, dataset=source, batch_sampler=sampler, collate_fn=collate, **common)
