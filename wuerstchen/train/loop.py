"""One training loop for every stage, from a laptop CPU to `torchrun`.

    wuerstchen train c --data photos/ --init-from wuerstchen-v2 --max-steps 2000 --lr 1e-5
    torchrun --nproc_per_node 8 -m wuerstchen train c --config prior.json                  # DDP
    torchrun --nproc_per_node 8 -m wuerstchen train c --config prior.json --strategy fsdp
    wuerstchen train c --config prior.json --resume                                      # continue

    from wuerstchen.train.loop import train
    result = train(StageCTrainConfig(data="photos/", init_from="model/", output_dir="runs/x"))

A step is `grad_accum` micro-batches (the task prepares each with its frozen encoders, the wrapped
loss module runs under optional bf16 autocast, backward), then gradient clipping, AdamW with linear
warm-up, and an EMA update. The random draws of a micro-batch (timesteps, noise, caption drops) come
from a generator seeded by (seed, step, its index in the global batch), so a step's gradient does not
depend on the number of processes, and a resumed run draws exactly what an uninterrupted one would.

OUTPUT (only rank 0 writes):
    config.json                      the resolved config
    metrics.jsonl                    a JSON object per logged step ("kind": "train") or evaluation ("eval")
    samples/step-NNNNNN.png          samples through the real pipeline
    checkpoints/step-NNNNNN/         model/ema/optimizer .safetensors, state.json, manifest.json (sizes, sha256)
    prior/ | decoder/ (+semantic/) | vqgan/   the trained model, diffusers layout (EMA weights when EMA is on)
    pipeline/                        the whole pipeline, when the frozen parts came from a pipeline folder
    lora.safetensors                 with --lora-rank, instead of the model folders (+ lora_comfyui.safetensors
                                     for a Stable Cascade prior: ComfyUI's lora_prior_unet_* keys)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import UserError
from ..io.checkpoint import load_tensors, save_model, write_json
from .cascade import CASCADE_TASKS, is_cascade
from .config import TrainConfig
from .stages import TASKS, Task

logger = logging.getLogger(__name__)

DUMP_GRADS_ENV = "WUERSTCHEN_DUMP_GRADS"  # debug: rank 0 writes the first step's gradients to this file
STEP_DIR = re.compile(r"^step-(\d{6,})$")


# ----------------------------------------------------------------------------- processes


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    """One process, or one of WORLD_SIZE started by torchrun (RANK, LOCAL_RANK from the env):
    gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(rank, world, device, owns)


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def _broadcast(value: Any, d: Dist) -> Any:
    if d.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any, d: Dist) -> list[Any]:
    if d.world_size == 1:
        return [value]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, value)
    return out


def _full(t: Tensor) -> Tensor:
    """A DTensor (FSDP shard) → the whole tensor (a collective); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def wrap(module: nn.Module, cfg: TrainConfig, d: Dist, bf16: bool) -> nn.Module:
    """DDP or FSDP (per-block units, then the root) around the loss module; as is in one process."""
    if d.world_size == 1:
        return module
    # Depthwise convs on channels-last activations get channels-last weight gradients, which DDP's
    # buckets copy (a speed note, not an error); FSDP notes that AttnBlock.text_kv returns views,
    # harmless as nothing writes to them in place.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from ..models.blocks import AttnBlock, ResBlock, ResBlockStageB
    from ..models.stage_a import MixingResidualBlock

    # bf16 parameters in the step, float32 gradient reduction: Stable Cascade's setting (GPU only).
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 and d.device.type == "cuda" else None
    opts: dict[str, Any] = dict(reshard_after_forward=cfg.fsdp_sharding == "full_shard")
    if mp is not None:
        opts["mp_policy"] = mp
    for m in list(module.modules()):
        if isinstance(m, AttnBlock | ResBlock | ResBlockStageB | MixingResidualBlock):
            fully_shard(m, **opts)
            if isinstance(m, AttnBlock):  # the prior/decoder call text_kv before the block's forward
                register_fsdp_forward_method(m, "text_kv")
    return fully_shard(module, **opts)


def _no_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def step_generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of micro-batch `index` (m · world_size + rank) of a step's global batch."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW, or bitsandbytes' 8-bit AdamW (`--optimizer adamw8bit`: its two moments in 8 bits,
    2 bytes a parameter instead of 8; the official LoRA trainer's optimizer). bitsandbytes is CUDA-only
    here: anything else is a one-line error saying what to do."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if device.type != "cuda":
        raise UserError(f"--optimizer adamw8bit needs a CUDA device (bitsandbytes), not {device}: use adamw")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes (or use adamw)") from None
    return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_task(cfg: TrainConfig, device: torch.device, allow_pipe_urls: bool = False) -> Task:
    """The task of `cfg`'s stage, with its frozen parts loaded and its loss module built on `device`.
    `allow_pipe_urls`: the user's command line allows `pipe:` data URLs (shell commands). A Stable
    Cascade model (preset, config or --init-from) gets the v3 task of its stage (`train/cascade.py`)."""
    cls = CASCADE_TASKS[cfg.stage] if cfg.stage in CASCADE_TASKS and is_cascade(cfg) else TASKS[cfg.stage]
    return cls(cfg, device, allow_pipe_urls)


# ----------------------------------------------------------------------------- EMA and RNG


class EMA:
    """Exponential moving average of the trained tensors: `ema = β·ema + (1 − β)·w` (buffers copied)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = {k: v.detach().clone() for k, v in tensors.items()}

    @torch.no_grad()
    def update(self, live: dict[str, Tensor], beta: float) -> None:
        for k, e in self.tensors.items():
            if beta == 0 or not e.is_floating_point():
                e.copy_(live[k].detach())
            else:
                e.lerp_(live[k].detach(), 1 - beta)


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (dropout, random crops in the main process) as JSON."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoint files


class CheckpointError(Exception):
    """A checkpoint folder that cannot be used (unfinished, truncated, corrupt)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def write_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, Tensor]], state: dict[str, Any]) -> Path:
    """Write `step-NNNNNN/` whole or not at all: files go to a temporary folder, each is fsynced, a
    manifest with every file's size and sha256 is written last, and the folder is renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        for name, group in tensors.items():
            save_file({k: v.contiguous() for k, v in group.items()}, str(tmp / name), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        sums = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files}
        manifest = {"step": step, "files": sums}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        if final.exists():  # the same step again, after resuming from an older checkpoint
            shutil.rmtree(final)
        os.chmod(tmp, 0o755)  # mkdtemp's folders are private
        os.rename(tmp, final)
        _fsync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The checkpoint's state.json, after checking every file against the manifest."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError("no manifest.json: the write did not finish")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"manifest.json is corrupt ({e})") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
        for i in files.values()
    ):
        raise CheckpointError("manifest.json is malformed (no {file: {bytes, sha256}} list)")
    if any(Path(name).name != name for name in files):
        raise CheckpointError("manifest.json names a file outside its folder")
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{name} has {size} bytes, the manifest says {info['bytes']} (truncated?)")
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 in the manifest (corrupt)")
    return json.loads((folder / "state.json").read_text(encoding="utf-8"))


def remove_stale_writes(root: Path) -> None:
    """Remove the temporary folders of checkpoint writes that a crash interrupted (`.step-NNNNNN.*`:
    never renamed into place, so never used; gigabytes each for the official models)."""
    if root.is_dir():
        for stale in root.glob(".step-*"):
            if stale.is_dir() and STEP_DIR.match(stale.name[1:].split(".")[0]):
                logger.warning("removing %s: an unfinished checkpoint write", stale)
                shutil.rmtree(stale, ignore_errors=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; what a crash leaves (a partial last line, NUL padding from a
    preallocated block) is dropped with a warning instead of blocking a resume."""
    if not path.exists():
        return []
    records, dropped = [], 0
    for line in path.read_bytes().replace(b"\x00", b"").decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            dropped += 1
    if dropped:
        logger.warning("%s: dropped %d unreadable line(s) (a crash mid-write leaves one)", path, dropped)
    return records


def pick_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; unusable ones are logged and renamed `*.corrupt`."""
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
            return folder
        except (CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
            logger.error("checkpoint %s is unusable: %s; falling back to the previous one", folder, e)
            bad = folder.with_name(folder.name + ".corrupt")
            shutil.rmtree(bad, ignore_errors=True)
            folder.rename(bad)
    return None


# ----------------------------------------------------------------------------- the loop


@dataclass
class Position:
    """Where training stands: optimizer steps done, and this rank's batches consumed in `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float]  # step → loss (mean over the global batch), steps of this call
    output_dir: Path
    skipped: dict[str, int] = field(default_factory=dict)  # reason → items skipped (all ranks)
    module: nn.Module | None = None  # the trained loss module (unwrapped)
    task: Task | None = None  # the stage's task: its data, frozen parts and loss module


class Trainer:
    def __init__(self, cfg: TrainConfig, d: Dist, allow_pipe_urls: bool = False) -> None:
        self.cfg, self.d = cfg, d
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else d.device.type == "cuda"
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.task = task = make_task(cfg, d.device, allow_pipe_urls)
        if cfg.gradient_checkpointing:
            task.enable_gradient_checkpointing()
        if cfg.lora_rank:
            from ..lora import TARGET_SETS, apply_lora  # optional: needs peft

            targets = TARGET_SETS[cfg.lora_targets]
            task.module.model = apply_lora(task.module.model, cfg.lora_rank, cfg.lora_alpha, targets)
        self.module = task.module
        self.names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.names += [n for n, _ in self.module.named_buffers()]
        if not any(p.requires_grad for p in self.module.parameters()):
            raise UserError("nothing to train: every parameter is frozen")
        self.wrapped = wrap(self.module, cfg, d, self.bf16)
        self.params = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params, d.device)
        self.ema = EMA(self.live_tensors()) if cfg.ema_beta > 0 else None
        self.pos = Position()
        seed_everything(cfg.seed + d.rank)

    def live_tensors(self) -> dict[str, Tensor]:
        named = dict(self.wrapped.named_parameters()) | dict(self.wrapped.named_buffers())
        named = {k.removeprefix("module."): v for k, v in named.items()}  # DDP's prefix
        return {k: named[k] for k in self.names}

    # -- checkpoints --------------------------------------------------------------------------
    def full_state(self) -> dict[str, Tensor]:
        """The loss module's whole state on rank 0's CPU (a collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.wrapped, options=opts)
        return state if self.d.main else {}

    def save_checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = self.full_state()
        ema = {k: _full(v).cpu() for k, v in self.ema.tensors.items()} if self.ema else {}
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.wrapped, self.optimizer, options=opts)
        rngs = _gather(rng_state(), self.d)
        if self.d.main:
            tensors = {"model.safetensors": {k: full[k] for k in self.names}}
            if ema:
                tensors["ema.safetensors"] = ema
            flat = {f"{fqn}/{name}": v for fqn, s in optim["state"].items() for name, v in s.items()}
            tensors["optimizer.safetensors"] = {k: torch.as_tensor(v) for k, v in flat.items()}
            state = {
                "step": self.pos.step, "epoch": self.pos.epoch, "batch": self.pos.batch, "stage": self.cfg.stage,
                "world_size": self.d.world_size, "config": self.cfg.to_dict(), "rng": rngs,
                "param_groups": optim["param_groups"],
            }  # fmt: skip
            folder = write_checkpoint(self.ckpt_root, self.pos.step, tensors, state)
            for old in list_checkpoints(self.ckpt_root)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved %s", folder)
        _barrier(self.d)

    def resume(self, restart: bool = False) -> None:
        """Load the newest good checkpoint: weights, EMA, optimizer, RNG states and data position.
        Without a usable one a run that has trained stops with an error, unless `restart`."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        folder = _broadcast(pick_checkpoint(self.ckpt_root) if self.d.main else None, self.d)
        if folder is None:
            trained = False  # decided on rank 0, which alone reads the run folder
            if self.d.main:
                corrupt = list(self.ckpt_root.glob("step-*.corrupt")) if self.ckpt_root.is_dir() else []
                trained = bool(corrupt) or any(r["step"] > 0 for r in read_metrics(self.out / "metrics.jsonl"))
            if _broadcast(trained, self.d) and not restart:
                raise UserError(f"no usable checkpoint in {self.ckpt_root} (the corrupt ones are renamed *.corrupt), "
                                "but this run has trained: pass --restart to start again at step 0")  # fmt: skip
            logger.warning("no checkpoint to resume from in %s: starting at step 0", self.ckpt_root)
            if self.d.main and (self.out / "metrics.jsonl").exists():
                kept = self.out / f"metrics.{int(time.time())}.jsonl"
                os.replace(self.out / "metrics.jsonl", kept)  # the old run's metrics stay, under another name
                logger.warning("the earlier metrics are kept in %s", kept)
            return
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if state["stage"] != self.cfg.stage:
            raise UserError(f"{folder} is a Stage {state['stage'].upper()} checkpoint")
        weights = load_tensors(folder / "model.safetensors")
        if set(weights) != set(self.names):
            diff = sorted(set(weights) ^ set(self.names))
            raise UserError(f"{folder} does not fit this model (changed --model or --lora-rank?): {diff[:5]}")
        strict = len(self.names) == len(self.module.state_dict())
        set_model_state_dict(self.wrapped, weights, options=StateDictOptions(full_state_dict=True, strict=strict))
        if self.ema is not None and (folder / "ema.safetensors").exists():
            self._load_ema(load_tensors(folder / "ema.safetensors"))
        optim: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
        for key, v in load_tensors(folder / "optimizer.safetensors").items():
            fqn, name = key.rsplit("/", 1)
            optim["state"].setdefault(fqn, {})[name] = v
        for group in optim["param_groups"]:
            group["betas"] = tuple(group["betas"])
        set_optimizer_state_dict(self.wrapped, self.optimizer, optim, options=StateDictOptions(full_state_dict=True))
        if len(state["rng"]) == self.d.world_size:
            set_rng_state(state["rng"][self.d.rank])
        else:
            saved_on = len(state["rng"])
            logger.warning("resuming on %d processes, saved on %d: random states reseeded", self.d.world_size, saved_on)
            seed_everything(self.cfg.seed + self.d.rank + 7919 * state["step"])
        if state["world_size"] != self.d.world_size:
            # The data plan depends on the world size: restart the epoch's order rather than skip wrongly.
            logger.warning("the number of processes changed: epoch %d restarts its data order", state["epoch"])
            state["batch"] = 0
        self.pos = Position(state["step"], state["epoch"], state["batch"])
        if self.d.main:
            self._trim_metrics(self.pos.step)
        logger.info("resumed from %s (step %d, epoch %d, batch %d)", folder, *vars(self.pos).values())

    def _load_ema(self, saved: dict[str, Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for k, e in self.ema.tensors.items():
            v = saved[k].to(self.d.device)
            e.copy_(distribute_tensor(v, e.device_mesh, e.placements) if isinstance(e, DTensor) else v)

    def _trim_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint we resume from: those steps run again. Written
        whole (temporary file, then rename)."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            kept = "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(kept, encoding="utf-8")
            os.replace(tmp, path)

    # -- outputs ------------------------------------------------------------------------------
    def export(self) -> None:
        """The trained model (EMA weights when EMA is on) as diffusers folders, plus the pipeline."""
        if self.cfg.lora_rank:
            if self.d.main:
                self._export_lora()
            _barrier(self.d)
            return
        state = self.full_state()
        ema = {k: _full(v).cpu() for k, v in self.ema.tensors.items()} if self.ema else {}
        if self.d.main:
            models = self.task.components(state | ema)
            for name, model in models.items():
                save_model(model, self.out / name)
            pipe = self.task.assemble(models)
            if pipe is not None:
                pipe.save_pretrained(self.out / "pipeline")
            else:
                logger.info("no pipeline/ folder: give --init-from or --pipeline to supply the other stages")
        _barrier(self.d)

    @torch.no_grad()
    def _export_lora(self) -> None:
        """`lora.safetensors` (wuerstchen.lora's format), from the EMA weights when EMA is on."""
        from ..lora import save_lora

        live = self.live_tensors()
        kept = {k: v.clone() for k, v in live.items()}
        if self.ema is not None:
            for k, v in live.items():
                v.copy_(self.ema.tensors[k])
        meta = {"stage": self.cfg.stage, "step": self.pos.step, "ema": self.ema is not None}
        path = save_lora(self.module.model, self.out / "lora.safetensors", metadata=meta, prefix=self.task.component)
        if self.task.component == "prior" and getattr(self.module.model, "diffusers_class", "") == "StableCascadeUNet":
            from ..lora import convert_lora

            convert_lora(path, self.out / "lora_comfyui.safetensors", "comfyui")  # ComfyUI's lora_prior_unet_*
        for k, v in live.items():
            v.copy_(kept[k])

    def sample(self, metrics: MetricsLog) -> None:
        """Samples (and the task's evaluation, e.g. PSNR) from the live weights."""
        if self.cfg.strategy == "fsdp" and self.d.world_size > 1:
            state = self.full_state()  # collective; rank 0 samples from an unsharded copy
            models = {k: m.to(self.d.device) for k, m in self.task.components(state).items()} if self.d.main else {}
        else:
            models = self.task.live_models(self.module) if self.d.main else {}
        if self.d.main:
            path = self.out / "samples" / f"step-{self.pos.step:06d}.png"
            modes = {name: m.training for name, m in models.items()}
            try:
                result = self.task.sample({name: m.eval() for name, m in models.items()}, path)
            except Exception:  # a failed preview must not end a long run
                logger.exception("sampling at step %d failed", self.pos.step)
                result = {}
            finally:
                for name, m in models.items():
                    m.train(modes[name])
            if result:
                metrics.write({"kind": "eval", "step": self.pos.step, **result})
        _barrier(self.d)

    # -- training -----------------------------------------------------------------------------
    def batches(self, loader: Any) -> Iterator[dict[str, Any]]:
        """Batches forever, epoch after epoch, from the current position; keeps `pos` up to date."""
        empty = 0
        while True:
            loader.set_epoch(self.pos.epoch, self.pos.batch)
            if isinstance(getattr(loader, "generator", None), torch.Generator):
                # Worker seeds as a function of (seed, epoch), not of how many epochs this process ran.
                loader.generator.manual_seed(self.cfg.seed * 1_000_003 + self.pos.epoch)
            got = False
            for batch in loader:
                got = True
                self.pos.batch += 1
                yield batch
            self.pos.epoch, self.pos.batch = self.pos.epoch + 1, 0
            empty = 0 if got else empty + 1
            if empty >= 2:
                raise UserError(
                    f"{self.cfg.data}: no batches: fewer than batch_size × processes "
                    f"({self.cfg.batch_size} × {self.d.world_size}) usable images?"
                )

    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[Tensor, Tensor, dict[str, float]]:
        cfg, d = self.cfg, self.d
        lr = cfg.lr * min(1.0, (self.pos.step + 1) / max(1, cfg.warmup_steps))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=d.device)
        extra: dict[str, float] = {}
        for m in range(cfg.grad_accum):
            batch = next(batches)
            self.task.remember(batch)
            gen = step_generator(cfg.seed, self.pos.step, m * d.world_size + d.rank, d.device)
            autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.bf16)
            with torch.no_grad(), autocast:
                inputs = self.task.prepare(batch, gen, self.pos.step)
            with _no_sync(self.wrapped, m == cfg.grad_accum - 1), autocast:
                loss, metrics = self.wrapped(**inputs)
            (loss / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
        if self.pos.step == 0 and os.environ.get(DUMP_GRADS_ENV):
            self._dump_grads(os.environ[DUMP_GRADS_ENV])
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pos.step += 1
        if self.ema is not None and self.pos.step % cfg.ema_every == 0:
            self.ema.update(self.live_tensors(), cfg.ema_beta if self.pos.step > cfg.ema_start else 0.0)
        if d.world_size > 1:  # the loss of the global batch, for logs
            dist.all_reduce(total)
            total /= d.world_size
        return total, _full(norm), extra | {"lr": lr}

    def _dump_grads(self, path: str) -> None:
        """Debug: the first step's (reduced) gradients, by parameter name, from rank 0."""
        named = {k.removeprefix("module."): p for k, p in self.wrapped.named_parameters() if p.requires_grad}
        grads = {k: _full(p.grad).detach().cpu() for k, p in named.items() if p.grad is not None}
        if self.d.main:
            save_file({k: v.contiguous() for k, v in grads.items()}, path)

    def run(self, resume: bool, on_step: Callable[[int, float], None] | None, restart: bool = False) -> TrainResult:
        cfg, d = self.cfg, self.d
        if d.main:
            remove_stale_writes(self.ckpt_root)
        if resume:
            self.resume(restart)
        elif list_checkpoints(self.ckpt_root):
            raise UserError(f"{self.out} already has checkpoints: pass --resume, or another --output-dir")
        if d.main:
            write_json(cfg.to_dict(), self.out / "config.json")
        metrics = MetricsLog(self.out, enabled=d.main)
        loader = self.task.loader(d.rank, d.world_size)
        batches = self.batches(loader)
        losses: dict[int, float] = {}
        start_step, last_saved = self.pos.step, self.pos.step if resume else -1
        # disable=None: no bar when stderr is not a terminal (a log file would fill with carriage returns)
        show = None if d.main and cfg.progress else True
        bar = tqdm(total=cfg.max_steps, initial=self.pos.step, disable=show, desc="train")
        window_start, window_steps = time.perf_counter(), 0
        images_per_step = cfg.batch_size * cfg.grad_accum * d.world_size
        while self.pos.step < cfg.max_steps:
            loss, norm, extra = self.train_step(batches)
            value = float(loss)
            losses[self.pos.step] = value
            window_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{extra['lr']:.2e}")
            if self.pos.step % cfg.log_every == 0:
                elapsed = time.perf_counter() - window_start
                record = {
                    "kind": "train", "step": self.pos.step, "epoch": self.pos.epoch, "loss": value,
                    "grad_norm": float(norm), "steps_per_s": window_steps / elapsed,
                    "images_per_s": window_steps * images_per_step / elapsed, **extra,
                }  # fmt: skip
                if d.device.type == "cuda":
                    record["max_memory_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                metrics.write(record)
                if bar.disable and d.main and cfg.progress:  # no terminal: a plain log line instead of the bar
                    logger.info("step %d/%d loss %.4f lr %.2e %.2f steps/s", self.pos.step, cfg.max_steps, value,
                                extra["lr"], record["steps_per_s"])  # fmt: skip
            if cfg.checkpoint_every and self.pos.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.pos.step
                if cfg.export_on_checkpoint:
                    self.export()
            if cfg.sample_every and self.pos.step % cfg.sample_every == 0:
                self.sample(metrics)
            if on_step is not None:
                on_step(self.pos.step, value)
            if self.pos.step % cfg.log_every == 0:  # throughput of training alone, not checkpoints/samples
                window_start, window_steps = time.perf_counter(), 0
        bar.close()
        if self.pos.step > 0 and last_saved != self.pos.step:
            self.save_checkpoint()
        if self.pos.step > start_step or (self.pos.step > 0 and not (self.out / self.task.component).exists()):
            self.export()
        skipped = self._log_skipped(loader)
        metrics.close()
        return TrainResult(self.pos.step, losses, self.out, skipped, self.module, self.task)

    def _log_skipped(self, loader: Any) -> dict[str, int]:
        """Merge every rank's skipped items and log one line (rank 0)."""
        source = loader.source
        for records in _gather(dict(source.skipped_keys), self.d):
            source.merge_skipped(records)
        if self.d.main:
            source.log_skipped()
        return dict(source.skipped)


class MetricsLog:
    """metrics.jsonl (one JSON object a line) and, when installed, TensorBoard."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled, self.path, self.tb = enabled, out / "metrics.jsonl", None
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(
    cfg: TrainConfig,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    allow_pipe_urls: bool = False,
    restart: bool = False,
) -> TrainResult:
    """Train `cfg`'s stage in this process (one of many under torchrun). `on_step(step, loss)` runs
    after each step (after its checkpoint): a hook for tests and notebooks. `allow_pipe_urls`: data
    URLs that run shell commands (webdataset's `pipe:`) are allowed; only the CLI flag sets it.
    `restart`: with `resume` and no usable checkpoint, start again at step 0 instead of stopping."""
    d = setup_distributed(cfg)
    try:
        return Trainer(cfg, d, allow_pipe_urls).run(resume, on_step, restart)
    finally:
        if d.owns_group:
            dist.destroy_process_group()
