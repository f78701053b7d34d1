"""Training data: folder and webdataset sources, skipping, shuffling, resume, buckets, ranks.

pytest -q tests/test_train_data.py
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wuerstchen.train.data import (
    BucketBatchSampler,
    FolderDataset,
    WebDatasetSource,
    make_buckets,
    make_loader,
    preprocess,
)


def png_bytes(w: int, h: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, n: int, sizes: list[tuple[int, int]] | None = None) -> list[str]:
    """n images `img00.png`… (the second half in `sub/`) with captions "caption i"; returns keys."""
    keys = []
    for i in range(n):
        key = f"img{i:02d}.png" if i < n // 2 else f"sub/img{i:02d}.png"
        (root / key).parent.mkdir(exist_ok=True)
        w, h = sizes[i % len(sizes)] if sizes else (40 + i, 36)
        (root / key).write_bytes(png_bytes(w, h, i))
        (root / key).with_suffix(".txt").write_text(f"caption {i}\n")
        keys.append(key)
    return keys


def add_bad_items(root: Path) -> None:
    """One corrupt image (random bytes named .png) with a caption, one image without a caption."""
    (root / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "corrupt.txt").write_text("a caption for noise")
    (root / "uncaptioned.png").write_bytes(png_bytes(32, 32, 99))


def keys_of(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


def test_folder_items(tmp_path: Path) -> None:
    keys = write_folder(tmp_path, 6)
    (tmp_path / "notes.txt").write_text("a caption without an image is ignored")
    data = FolderDataset(tmp_path, size=32)
    assert len(data) == 6 and [data[i]["key"] for i in range(6)] == sorted(keys)
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1 and item["image"].std() > 0.1
        assert item["caption"] == f"caption {int(item['key'][-6:-4])}"  # stripped of its newline
        assert set(item) == {"image", "caption", "key"}


def test_preprocess_resizes_short_side_and_center_crops() -> None:
    # 64×32, left half red, right half blue: the 16×16 center crop of the 32×16 resize keeps both
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32, 0] = 255
    pixels[:, 32:, 2] = 255
    out = preprocess(Image.fromarray(pixels), (16, 16))
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out[:, :, 0], torch.tensor([1.0, 0, 0])[:, None])  # left stays left: no flip
    assert torch.allclose(out[:, :, -1], torch.tensor([0, 0, 1.0])[:, None])
    # a phone photo: landscape pixels, EXIF "rotate 90°" → portrait, the red half on top
    buf, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif)
    photo = preprocess(Image.open(buf), (16, 8))
    assert photo[0, 0].mean() > 0.9 and photo[2, -1].mean() > 0.9
    palette = Image.fromarray(pixels).convert("RGBA").convert("P")
    assert preprocess(palette, (8, 12)).shape == (3, 8, 12)


def test_folder_skips_bad_items_and_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_folder(tmp_path, 5)
    add_bad_items(tmp_path)
    (tmp_path / "empty.png").write_bytes(png_bytes(32, 32, 7))
    (tmp_path / "empty.txt").write_text("  \n")
    data = FolderDataset(tmp_path, size=16)
    assert len(data) == 6  # the corrupt image is only found when decoded
    loader = make_loader(data, batch_size=3, num_workers=0, seed=0)
    for epoch in range(2):  # an item met again is not counted again
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 2 and all(b["image"].shape == (3, 3, 16, 16) for b in batches)
        assert "corrupt.png" not in {k for b in batches for k in b["key"]}
    assert data.skipped == {"corrupt image": 1, "missing caption": 1, "empty caption": 1}
    assert data.skipped_keys["uncaptioned.png"] == "missing caption"
    with caplog.at_level(logging.INFO, logger="wuerstchen.train.data"):
        line = data.log_skipped()
    assert line == "skipped 3 items: 1 corrupt image, 1 empty caption, 1 missing caption"
    assert line in caplog.text


def test_folder_skips_are_counted_across_workers(tmp_path: Path) -> None:
    write_folder(tmp_path, 5)
    add_bad_items(tmp_path)
    data = FolderDataset(tmp_path, size=16)
    batches = list(make_loader(data, batch_size=3, num_workers=2, seed=0))
    assert len(batches) == 2 and sum(len(b["key"]) for b in batches) == 6
    assert data.skipped == {"corrupt image": 1, "missing caption": 1}
    assert data.log_skipped() == "skipped 2 items: 1 corrupt image, 1 missing caption"


def test_folder_splits_its_holdout(tmp_path: Path) -> None:
    """The last n items by key are held out, decoded in their buckets; the rest is a source of the
    others; no item is in both, the same folder splits the same way, and the source stays whole."""
    keys = sorted(write_folder(tmp_path, 8, sizes=[(40, 20), (20, 40), (30, 30)]))
    data = FolderDataset(tmp_path, size=16, bucket_multiple=8)
    rest, held = data.split_holdout(3)
    assert len(rest) == len(rest.bucket_ids) == 5 and [item["key"] for item in held] == keys[-3:]
    trained = [k for batch in keys_of(make_loader(rest, 2, 0, seed=0, drop_last=False)) for k in batch]
    assert sorted(trained) == keys[:5] and not set(trained) & {item["key"] for item in held}
    assert [tuple(item["image"].shape[1:]) for item in held] == [data.buckets[b] for b in data.bucket_ids[-3:]]
    again, held_again = FolderDataset(tmp_path, size=16, bucket_multiple=8).split_holdout(3)
    assert again.items == rest.items and again.bucket_ids == rest.bucket_ids
    assert [a["key"] for a in held_again] == keys[-3:]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(held, held_again, strict=True))
    assert len(data) == 8 and data.split_holdout(0)[1] == []
    with pytest.raises(ValueError):
        data.split_holdout(8)  # nothing left to train on

    # a held-out image that does not decode is left out (not replaced by a training item) and counted
    (tmp_path / "zz.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "zz.txt").write_text("noise")
    data = FolderDataset(tmp_path, size=16)
    rest, held = data.split_holdout(2)
    assert [item["key"] for item in held] == [keys[-1]] and len(rest) == 7
    assert rest.skipped == {"corrupt image": 1} and data.skipped == {}


def write_shards(root: Path, shards: int, per_shard: int, bad: bool = False) -> dict[str, str]:
    """Tar shards of png + txt with webdataset's TarWriter; returns key → caption of the good samples."""
    import webdataset as wds

    captions = {}
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                key = f"s{s}_{i:02d}"
                if bad and s == 0 and i == 1:
                    sink.write({"__key__": key, "png": b"not a png at all", "txt": b"noise"})
                elif bad and s == 0 and i == 2:
                    sink.write({"__key__": key, "png": png_bytes(20, 20, i)})
                else:
                    sink.write({"__key__": key, "png": png_bytes(30 + i, 24, i), "txt": f"shard {s} item {i}".encode()})
                    captions[key] = f"shard {s} item {i}"
    return captions


def test_webdataset_reads_shards_and_skips_bad_samples(tmp_path: Path) -> None:
    captions = write_shards(tmp_path, shards=2, per_shard=5, bad=True)
    source = WebDatasetSource(str(tmp_path / "shard-{000..001}.tar"), size=16)
    loader = make_loader(source, batch_size=4, num_workers=0, seed=0, shuffle=False, drop_last=False)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [4, 4]
    assert all(b["image"].shape[1:] == (3, 16, 16) and 0 <= b["image"].min() <= b["image"].max() <= 1 for b in batches)
    seen = {k: c for b in batches for k, c in zip(b["key"], b["caption"], strict=True)}
    assert seen == captions
    assert [k for b in batches for k in b["key"]] == sorted(captions)  # no shuffle: file order
    assert source.skipped == {"corrupt image": 1, "missing caption": 1}
    assert source.log_skipped() == "skipped 2 items: 1 corrupt image, 1 missing caption"
    assert {item["key"] for item in source} == set(captions)  # iterated directly, without a loader


def test_webdataset_splits_shards_by_rank_and_worker(tmp_path: Path) -> None:
    captions = write_shards(tmp_path, shards=4, per_shard=5, bad=True)
    urls = [str(tmp_path / f"shard-{s:03d}.tar") for s in range(4)]
    per_rank, skipped = [], Counter()
    for rank in range(2):
        source = WebDatasetSource(urls, size=16)
        loader = make_loader(source, batch_size=2, num_workers=2, seed=3, rank=rank, world_size=2)
        per_rank.append([k for keys in keys_of(loader) for k in keys])
        skipped += source.skipped  # forwarded from the worker that read shard 0
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0] + per_rank[1]) <= set(captions)
    assert len(per_rank[0] + per_rank[1]) == 4 + 4 + 4 + 2  # one shard per worker, 3 good in shard 0
    assert skipped == {"corrupt image": 1, "missing caption": 1}

    covering = []
    for rank in range(2):
        loader = make_loader(WebDatasetSource(urls, size=16), 2, 2, seed=3, drop_last=False, rank=rank, world_size=2)
        covering += [k for keys in keys_of(loader) for k in keys]
    assert sorted(covering) == sorted(captions)


def test_shuffle_is_a_function_of_seed_and_epoch(tmp_path: Path) -> None:
    write_folder(tmp_path, 12)
    data = FolderDataset(tmp_path, size=8)

    def order(seed: int, epoch: int) -> list[list[str]]:
        loader = make_loader(data, batch_size=3, num_workers=0, seed=seed)
        loader.set_epoch(epoch)
        return keys_of(loader)

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)
    assert sorted(k for b in order(0, 1) for k in b) == sorted(k for b in order(0, 0) for k in b)

    shards = tmp_path / "shards"
    shards.mkdir()
    write_shards(shards, shards=3, per_shard=4)
    source = WebDatasetSource(str(shards / "shard-{000..002}.tar"), size=8)
    loader = make_loader(source, batch_size=2, num_workers=0, seed=0)
    streams = []
    for epoch in (0, 0, 1):
        loader.set_epoch(epoch)
        streams.append(keys_of(loader))
    assert streams[0] == streams[1] and streams[0] != streams[2]


def test_resume_skips_batches(tmp_path: Path) -> None:
    write_folder(tmp_path, 14)
    loader = make_loader(FolderDataset(tmp_path, size=8), batch_size=2, num_workers=0, seed=5)
    loader.set_epoch(3)
    full = keys_of(loader)
    loader.set_epoch(3, start_batch=4)
    assert len(loader) == len(full) - 4 == 3
    assert keys_of(loader) == full[4:]

    # a stream with workers: batch j comes from worker j % num_workers
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shards(shards, shards=4, per_shard=6)
    stream = make_loader(WebDatasetSource(str(shards / "shard-{000..003}.tar"), size=8), 2, 2, seed=1)
    stream.set_epoch(2)
    full = keys_of(stream)
    assert len(full) == 12
    for start in (1, 2, 3):  # worker 0 plays the reader of batch `start`: both ways round
        stream.set_epoch(2, start_batch=start)
        assert keys_of(stream) == full[start:]


def test_buckets_make_same_shaped_batches(tmp_path: Path) -> None:
    official = make_buckets(1024, 128)
    assert (1024, 1024) in official and all(h % 128 == 0 and w % 128 == 0 for h, w in official)
    assert all(abs(h * w / 1024**2 - 1) < 0.15 and max(h, w) / min(h, w) <= 2 for h, w in official)
    assert {(w, h) for h, w in official} == set(official)

    write_folder(tmp_path, 12, sizes=[(200, 100), (100, 200), (120, 120), (150, 100)])
    data = FolderDataset(tmp_path, size=128, bucket_multiple=32)
    assert len(data.buckets) > 1
    loader = make_loader(data, batch_size=2, num_workers=0, seed=0, drop_last=False)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 12
    for batch in batches:
        _, _, h, w = batch["image"].shape
        assert h % 32 == 0 and w % 32 == 0 and abs(h * w / 128**2 - 1) < 0.15
        for key in batch["key"]:  # wide images in wide buckets, tall in tall
            src_w, src_h = Image.open(tmp_path / key).size
            assert (src_w > src_h) == (w > h) and (src_w < src_h) == (w < h)


def test_ranks_get_disjoint_covering_folder_subsets(tmp_path: Path) -> None:
    keys = write_folder(tmp_path, 12)
    data = FolderDataset(tmp_path, size=8)
    per_rank = []
    for rank in range(3):
        loader = make_loader(data, batch_size=2, num_workers=0, seed=7, rank=rank, world_size=3)
        loader.set_epoch(1)
        per_rank.append([k for batch in keys_of(loader) for k in batch])
    assert [len(r) for r in per_rank] == [4, 4, 4]
    assert sorted(sum(per_rank, [])) == sorted(keys)

    # uneven: drop_last trims to equal batch counts, else batches repeat to fill up
    trimmed = [len(BucketBatchSampler([0] * 14, 2, rank=r, world_size=3)) for r in range(3)]
    padded = [len(BucketBatchSampler([0] * 14, 2, drop_last=False, rank=r, world_size=3)) for r in range(3)]
    assert trimmed == [2, 2, 2] and padded == [3, 3, 3]


def test_pipe_urls_run_only_with_the_command_line_flag(tmp_path):
    """webdataset runs `pipe:` URLs as shell commands: a config file (or a resumed run's config.json)
    naming one is refused before anything runs; the CLI's --allow-pipe-urls lets it through."""
    from wuerstchen.train.config import load_config
    from wuerstchen.train.stages import training_data

    marker = tmp_path / "ran"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": f"pipe:touch {marker}; cat shard.tar", "holdout": 0}))
    cfg = load_config("c", config, {})
    with pytest.raises(ValueError, match="allow-pipe-urls"):
        training_data(cfg)
    source, _ = training_data(cfg, allow_pipe_urls=True)
    assert type(source).__name__ == "WebDatasetSource" and not marker.exists()  # nothing read yet
