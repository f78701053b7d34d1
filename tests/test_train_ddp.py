"""The training entry point under `torchrun` (2 CPU processes, gloo): DDP and FSDP give the gradients
a single process gives on the same global batch (batch 2 per process vs. 2 micro-batches of 2).

pytest -q tests/test_train_ddp.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import QUIET, make_data

from wuerstchen.train.config import build_config
from wuerstchen.train.loop import DUMP_GRADS_ENV, train

STAGES = {
    # Stage C fine-tunes the tiny prior at 128 px; Stage B trains the tiny decoder at 64 px; "c3"
    # fine-tunes the tiny Stable Cascade prior (image embeddings for half the samples).
    "c": dict(semantic="tiny", image_size=128, lr=1e-3),
    "b": dict(model="tiny", semantic="tiny", image_size=64, lr=1e-3),
    "c3": dict(semantic="tiny", image_size=128, lr=1e-3, image_embed_rate=0.5),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, str(v)]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_folder: Path, tiny_cascade_folder: Path) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    data = {size: make_data(root / f"data{size}", size=size) for size in (64, 128)}
    common = QUIET | dict(max_steps=2, checkpoint_every=2)
    runs = {}
    for name, values in STAGES.items():
        stage = name[0]
        folder = tiny_cascade_folder if name == "c3" else tiny_folder
        source = {"init_from" if stage == "c" else "pipeline": str(folder)}
        base = common | values | source | {"data": str(data[values["image_size"]])}
        # The reference: one process, the global batch of 4 as 2 micro-batches of 2.
        out, grads = root / f"single-{name}", root / f"single-{name}.safetensors"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(DUMP_GRADS_ENV, str(grads))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train(build_config(stage, base | dict(batch_size=2, grad_accum=2, output_dir=str(out))))
            finally:
                torch.set_num_threads(threads)
        runs[name] = dict(base=base, out=out, grads=grads)
    return {"root": root, "runs": runs}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy, name", [("ddp", "c"), ("fsdp", "b"), ("ddp", "c3")])
def test_two_processes_match_one(strategy: str, name: str, setup: dict) -> None:
    if strategy == "fsdp" and not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    run, stage = setup["runs"][name], name[0]
    out, grads = setup["root"] / f"{strategy}-{name}", setup["root"] / f"{strategy}-{name}.safetensors"
    values = run["base"] | dict(batch_size=2, strategy=strategy, output_dir=str(out))
    if strategy == "fsdp":
        values["fsdp_sharding"] = "full_shard"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "wuerstchen", "train", stage, *flags(values)]
    env = os.environ | {DUMP_GRADS_ENV: str(grads), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, single = load_file(str(grads)), load_file(str(run["grads"]))
    assert ours.keys() == single.keys()
    # Gradients range from ~1e-11 (rounding where the true gradient is 0, as a key's bias has) to
    # ~0.1, so an absolute 1e-5 would pass any error in the small ones: the bound is 1e-5 of the
    # largest gradient, plus 1e-5 relative. Measured: bit-identical here (the same micro-batches
    # summed; halving is exact).
    scale = max(g.abs().max().item() for g in single.values())
    for k in single:
        torch.testing.assert_close(ours[k], single[k], atol=1e-5 * scale, rtol=1e-5, msg=k)
    logged, expected = metrics(out), metrics(run["out"])
    assert [r["step"] for r in logged] == [1, 2]  # rank 0 alone writes: no line twice
    for a, b in zip(logged, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert (out / {"c": "prior", "b": "decoder"}[stage] / "config.json").is_file()
