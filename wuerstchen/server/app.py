"""The HTTP API: one pipeline in memory, one worker thread, jobs run one at a time in submission order.

    from wuerstchen.server.app import Limits, create_app
    app = create_app(pipe, model="path/to/model", limits=Limits(max_side=2048))
    uvicorn.run(app, host="127.0.0.1", port=7860)

Endpoints (see docs/serve.md for examples):
- `POST /v1/images/generations`: OpenAI-compatible; waits for the images.
- `POST /v1/images/edits`, `POST /v1/images/variations`: OpenAI's multipart uploads (`image`, `mask`:
  transparent = repaint); an opaque image without a mask is image-to-image at `strength`.
- `POST /api/jobs` → `{"id": ...}`; `GET /api/jobs/{id}`; `GET /api/jobs/{id}/events` (Server-Sent
  Events: state, progress per step, Stage C previews); `POST /api/jobs/{id}/cancel`.
- `GET /api/images/{job}/{i}.png`: the PNG, with its generation parameters in text chunks.
- `GET /health`, `GET /api/info`, `GET /` (the web UI).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import random
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..image_inputs import image_hash, mask_from_alpha, open_image, prepare
from ..io.png import save_png
from ..parts import prior_times
from ..pipeline import WuerstchenPipeline
from .preview import preview_map, render_preview
from .ui import PAGE

logger = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")
MAX_SEED = 2**32 - 1
MAX_BODY = 1 << 20  # bytes: a request is a prompt and a few numbers
UPLOAD_PATHS = ("/api/jobs", "/v1/images/edits", "/v1/images/variations")  # these may carry images


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; every field is a `wuerstchen serve` flag."""

    max_side: int  # px, a multiple of the pipeline's size step
    max_images: int = 8
    max_steps: int = 200  # per stage
    max_prompt_chars: int = 2000
    max_guidance: float = 30.0
    max_queue: int = 16  # jobs waiting (not counting the running one)
    max_upload_bytes: int = 8 << 20  # one uploaded image (or mask) file
    max_upload_pixels: int = 4096 * 4096  # its width × height, read from its header before decoding
    max_streams: int = 128  # open event streams, all clients together
    max_streams_per_client: int = 32  # per client address (a UI following every queued job needs 17)


class ApiError(Exception):
    """An error answered as JSON in OpenAI's shape: {"error": {"message", "type", "param"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class JobCancelled(Exception):
    """Raised from the pipeline's step hook to stop a running job at the next step."""


# ----------------------------------------------------------------------------- request bodies
class JobRequest(BaseModel):
    """`POST /api/jobs`: every pipeline parameter. Strict types: "2" is not a number."""

    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None  # None: the model's native size
    height: int | None = None
    num_images: int = 1
    seed: int | None = None  # None: random; image i gets seed + i
    prior_steps: int | None = None  # None: the model's schedule (v2: DEFAULT_STAGE_C_TIMESTEPS)
    prior_guidance: float = 4.0
    decoder_steps: int | None = None  # None: the model's (v2 12, Stable Cascade 10)
    decoder_guidance: float = 0.0
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    image: str | None = None  # base64 (or a data: URL) of a PNG/JPEG/WebP: image-to-image, inpainting
    mask: str | None = None  # the same, of the image's size: white = repaint
    strength: float | None = None  # share of the Stage C steps run from the image (default 0.6; masks 1)
    decoder_strength: float | None = None
    variations: bool = False  # variations of `image` (the prompt may be empty)


class OpenAIImageRequest(BaseModel):
    """`POST /v1/images/generations`. OpenAI fields we cannot honour (model, quality, style, user)
    are ignored; ours go in the openai client's `extra_body`."""

    model_config = ConfigDict(strict=True, extra="ignore")
    prompt: str
    n: int | None = None
    size: str | None = None  # "WxH" or "auto"
    response_format: str | None = None  # b64_json (default) or url
    output_format: str | None = None  # png only
    negative_prompt: str | None = None
    seed: int | None = None
    prior_steps: int | None = None
    prior_guidance: float = 4.0
    decoder_steps: int | None = None
    decoder_guidance: float = 0.0
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    strength: float | None = None  # edits: image-to-image of an opaque image without a mask
    decoder_strength: float | None = None


@dataclass(frozen=True)
class JobParams:
    """A request after its limits are checked: what the worker runs."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_images: int
    seed: int | None
    prior_steps: int | None
    prior_guidance: float
    decoder_steps: int
    decoder_guidance: float
    sampler: str
    image: str | None = None  # the source image's hash (`image_inputs.image_hash`), as PNGs record it
    mask: str | None = None
    strength: float | None = None
    decoder_strength: float | None = None
    variations: bool = False


def size_presets(native: int, step: int, max_side: int) -> list[tuple[int, int]]:
    """(width, height) presets around the native size: square, 2:3, 3:2, 1:2, 2:1, snapped down to
    the size step (1024 → 1024², 1024×1536, 1536×1024, 1024×2048, 2048×1024; 128 → 128², 128×256, 256×128)."""
    out: list[tuple[int, int]] = []
    for fw, fh in ((1, 1), (1, 1.5), (1.5, 1), (1, 2), (2, 1)):
        w, h = (int(native * f) // step * step for f in (fw, fh))
        if step <= min(w, h) and max(w, h) <= max_side and (w, h) not in out:
            out.append((w, h))
    return out


def default_side(pipe: WuerstchenPipeline, limits: Limits) -> int:
    """The size a request without one gets: the model's native size, unless --max-side is smaller."""
    return min(pipe.settings.default_size, limits.max_side)


def check_params(
    req: JobRequest | OpenAIImageRequest,
    limits: Limits,
    pipe: WuerstchenPipeline,
    inputs: dict[str, Any] | None = None,
    variations: bool = False,
) -> tuple[JobParams, str]:
    """Check every field against the limits (ApiError 400/422 with a message saying what works);
    returns the job parameters and the OpenAI response format. `inputs`: the request's decoded
    images ("image", "mask"); without a size the output has the image's, snapped to the size step."""
    step, native = pipe.size_step, default_side(pipe, limits)
    inputs = inputs or {}
    source = inputs.get("image")
    own = (source.width - source.width % step, source.height - source.height % step) if source else (native, native)

    def bad(param: str, message: str) -> ApiError:
        return ApiError(422, message, param)

    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise bad(name, f"{name} has {len(text)} characters; this server takes at most {limits.max_prompt_chars}")
        if text is not None and any("\ud800" <= c <= "\udfff" for c in text):  # JSON escapes can make them
            raise bad(
                name, f"{name} holds a lone UTF-16 surrogate (\\ud800–\\udfff), which is not text: send valid UTF-8"
            )
        if text is not None and any(c < " " and c not in "\t\n\r" for c in text):
            raise bad(name, f"{name} holds control characters: send plain text (tabs and line breaks are fine)")

    fmt = "b64_json"
    if isinstance(req, OpenAIImageRequest):
        fmt = req.response_format or "b64_json"
        if fmt not in ("b64_json", "url"):
            raise ApiError(400, f"response_format {fmt!r} is not supported: use 'b64_json' or 'url'", "response_format")
        if req.output_format not in (None, "png"):
            raise ApiError(400, f"output_format {req.output_format!r} is not supported: only 'png'", "output_format")
        width, height = own
        if req.size not in (None, "auto"):
            m = re.fullmatch(r"\s*(\d{1,6})\s*[x×]\s*(\d{1,6})\s*", req.size)
            if m is None:
                raise bad("size", f"size must look like '{native}x{native}' (width x height), got {req.size!r}")
            width, height = int(m[1]), int(m[2])
        num_images, size_param, n_param = 1 if req.n is None else req.n, "size", "n"
    else:
        width = own[0] if req.width is None else req.width
        height = own[1] if req.height is None else req.height
        num_images, size_param, n_param = req.num_images, "width/height", "num_images"

    for side in (width, height):
        if side % step or not step <= side <= limits.max_side:
            presets = ", ".join(f"{w}x{h}" for w, h in size_presets(native, step, limits.max_side)) or "none"
            raise bad(
                size_param,
                f"size {width}x{height} does not fit this model: width and height must be multiples of {step} px "
                f"from {step} to {limits.max_side} (e.g. {presets})",
            )
    if not 1 <= num_images <= limits.max_images:
        raise bad(n_param, f"{n_param} must be from 1 to {limits.max_images}, got {num_images}")
    for name in ("prior_steps", "decoder_steps"):
        value = getattr(req, name)
        if value is not None and not 1 <= value <= limits.max_steps:
            raise bad(name, f"{name} must be from 1 to {limits.max_steps}, got {value}")
    for name in ("prior_guidance", "decoder_guidance"):
        value = getattr(req, name)
        if not 0 <= value <= limits.max_guidance:  # also refuses NaN
            raise bad(name, f"{name} must be from 0 to {limits.max_guidance} (≤ 1 turns guidance off), got {value}")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED - limits.max_images:
        raise bad("seed", f"seed must be from 0 to {MAX_SEED - limits.max_images}, got {req.seed}")
    for name in ("strength", "decoder_strength"):
        value = getattr(req, name)
        if value is not None and not 0 <= value <= 1:
            raise bad(name, f"{name} must be from 0 to 1 (the share of the steps run from the image), got {value}")
        if value is not None and source is None:
            raise bad(name, f"{name} needs an image")
    variations = variations or bool(getattr(req, "variations", False))
    if source is not None:
        try:  # the library's own checks (mask size and mode, a semantic compressor), before the queue
            needs_compressor = not (variations and pipe.image_encoder is not None)
            if needs_compressor and pipe.semantic is None:
                raise UserError("this model has no semantic compressor: it takes no image to start from")
            prepare(pipe, source, inputs.get("mask"), req.strength, req.decoder_strength, height, width)
        except UserError as e:
            raise ApiError(400, str(e), {"mask_image": "mask"}.get(e.param, e.param) or "image") from None
    elif variations:
        raise bad("image", "variations need an image")
    params = JobParams(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or None,
        width=width,
        height=height,
        num_images=num_images,
        seed=req.seed,
        prior_steps=req.prior_steps,
        prior_guidance=float(req.prior_guidance),
        decoder_steps=req.decoder_steps or pipe.prior_part.defaults["decoder_steps"],
        decoder_guidance=float(req.decoder_guidance),
        sampler=req.sampler,
        image=image_hash(source) if source is not None else None,
        mask=image_hash(inputs["mask"]) if inputs.get("mask") is not None else None,
        strength=req.strength,
        decoder_strength=req.decoder_strength,
        variations=variations,
    )
    return params, fmt


def read_image(data: bytes, name: str, limits: Limits) -> Image.Image:
    """An uploaded image file, checked (ApiError 413/400): within the byte and pixel limits, readable."""
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, f"{name} is larger than {limits.max_upload_bytes} bytes: send a smaller file", name)
    if not data:
        raise ApiError(400, f"{name} is empty: send a PNG, JPEG or WebP file", name)
    try:
        return open_image(data, name, limits.max_upload_pixels)
    except UserError as e:
        raise ApiError(400, str(e), name) from None


def b64_image(text: str, name: str, limits: Limits) -> Image.Image:
    """A base64 (or data: URL) image from a JSON body, checked as an upload is."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > limits.max_upload_bytes * 4 // 3 + 8:
        raise ApiError(413, f"{name} is larger than {limits.max_upload_bytes} bytes: send a smaller image", name)
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise ApiError(400, f"{name} is not base64: send the file's bytes base64-encoded", name) from None
    return read_image(data, name, limits)


# ----------------------------------------------------------------------------- jobs
@dataclass
class Job:
    id: str
    params: JobParams
    seed: int
    created: float = field(default_factory=time.time)
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    progress: dict[str, dict[str, int]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, data); index = SSE id
    # Previews are a latest value, not a log: a job keeps one (~tens of kB), and only while it runs.
    preview: dict[str, Any] | None = None
    preview_seq: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    inputs: dict[str, Any] = field(default_factory=dict, repr=False)  # "image", "mask": PIL images
    # The event streams waiting on this job: (their event loop, their event), set from any thread.
    waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=set, repr=False)

    def emit(self, name: str, data: dict[str, Any]) -> None:
        with self.lock:
            self.events.append((name, data))
        self.wake()

    def set_preview(self, data: dict[str, Any] | None) -> None:
        with self.lock:
            self.preview, self.preview_seq = data, self.preview_seq + 1
        self.wake()

    def wake(self) -> None:
        """Tell the streams there is news (the worker is a thread: through each stream's loop)."""
        with self.lock:
            waiting = list(self.waiters)
        for loop, event in waiting:
            loop.call_soon_threadsafe(event.set)

    def events_from(self, start: int, seen_preview: int) -> tuple[list[tuple[int, str, dict[str, Any]]], bool, Any]:
        """Events from index `start`; whether the job has ended (its last event is among them);
        the latest preview if it is newer than `seen_preview`, as (seq, data)."""
        with self.lock:
            batch = [(i, *self.events[i]) for i in range(start, len(self.events))]
            fresh = (self.preview_seq, self.preview) if self.preview_seq > seen_preview and self.preview else None
            # Ended once the final state is in the log (the state is set a moment before it is logged).
            last = self.events[-1] if self.events else None
            ended = last is not None and last[0] == "state" and last[1].get("state") in TERMINAL
            return batch, ended, fresh

    def to_json(self, b64: bool = False, position: int | None = None) -> dict[str, Any]:
        images = []
        for i, path in enumerate(self.files):
            item: dict[str, Any] = {"index": i, "seed": self.seed + i, "url": f"/api/images/{self.id}/{i}.png"}
            if b64:
                item["b64_json"] = base64.b64encode(path.read_bytes()).decode()
            images.append(item)
        out = {
            "id": self.id,
            "state": self.state,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "params": asdict(self.params),
            "seed": self.seed,
            "seeds": [self.seed + i for i in range(self.params.num_images)],
            "progress": dict(self.progress),
            "images": images,
            "error": self.error,
        }
        if position is not None:
            out["position"] = position
        return out


class JobQueue:
    """Jobs in submission order, run by one worker thread that alone touches the pipeline."""

    def __init__(
        self,
        pipe: WuerstchenPipeline,
        model: str | None,
        limits: Limits,
        output_dir: Path | None = None,
        keep_jobs: int = 100,
        preview: bool = True,
        dtype: str | None = None,
    ) -> None:
        self.pipe, self.model, self.limits, self.preview, self.dtype = pipe, model, limits, preview, dtype
        self.keep_jobs = keep_jobs
        self._temp = None if output_dir is not None else tempfile.mkdtemp(prefix="wuerstchen-serve-")
        self.output_dir = Path(output_dir if output_dir is not None else self._temp)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self.closing = False  # set from a signal handler: a plain flag that the worker and the streams poll
        self._thread = threading.Thread(target=self._work, name="wuerstchen-worker", daemon=True)

    # -- the HTTP side
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Begin shutting down (signal-safe: no locks): the running job stops at its next step,
        event streams and waiting requests end (within their one-second wait), no other job starts."""
        self.closing = True

    def stop(self) -> None:
        self.close()
        with self._lock:
            self._stopping = True
            for job in self._jobs.values():
                job.cancel.set()
            self._lock.notify_all()
        self._thread.join(timeout=10)
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)

    def submit(self, params: JobParams, inputs: dict[str, Any] | None = None) -> Job:
        with self._lock:
            if self.queued() >= self.limits.max_queue:
                waiting = self.limits.max_queue
                raise ApiError(429, f"the queue is full ({waiting} jobs waiting): retry later", kind="busy")
            seed = params.seed if params.seed is not None else random.randrange(MAX_SEED - self.limits.max_images)
            job = Job(secrets.token_hex(6), params, seed, inputs=dict(inputs or {}))
            job.emit("state", {"state": "queued", "position": self.queued()})
            self._jobs[job.id] = job
            self._lock.notify_all()
            return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for the last {self.keep_jobs})", "id")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.state == "queued":  # never started: it ends here; the worker skips it
                self._finish(job, "cancelled")
            elif job.state == "running":
                job.cancel.set()  # the step hook raises at the next step
            elif job.state in ("done", "failed"):
                raise ApiError(409, f"job {job_id} has already ended ({job.state})", "id")
        return job

    def queued(self) -> int:
        with self._lock:  # the worker thread changes the dict
            return sum(j.state == "queued" for j in self._jobs.values())

    def position(self, job: Job) -> int | None:
        if job.state != "queued":
            return None
        with self._lock:
            return sum(j.state == "queued" for j in self._jobs.values() if j.created < job.created)

    @property
    def running(self) -> Job | None:
        return self._running

    # -- the worker side
    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        """Under self._lock: end a job, tell its listeners, forget the oldest ended jobs."""
        job.state, job.error, job.finished = state, error, time.time()
        job.set_preview(None)
        job.emit("state", job.to_json())
        job.done.set()
        ended = [j for j in self._jobs.values() if j.state in TERMINAL]
        for old in ended[: max(0, len(ended) - self.keep_jobs)]:
            del self._jobs[old.id]
            if self._temp is not None:  # our own temporary files; a user's --output-dir keeps them
                for path in old.files:
                    path.unlink(missing_ok=True)

    def _next(self) -> Job | None:
        with self._lock:
            while True:
                if self._stopping or self.closing:
                    return None
                job = next((j for j in self._jobs.values() if j.state == "queued"), None)
                if job is not None:
                    job.state, job.started, self._running = "running", time.time(), job
                    job.emit("state", {"state": "running"})
                    return job
                self._lock.wait()

    def _work(self) -> None:
        # Fit the preview map before any job, so no pipeline call ever nests in another (a model with
        # its own previewer needs none).
        if self.preview and getattr(self.pipe, "previewer", None) is None:
            try:
                preview_map(self.pipe)
            except Exception:
                logger.exception("cannot fit the Stage C preview map; serving without previews")
                self.preview = False
        while (job := self._next()) is not None:
            try:
                self._generate(job)
            except JobCancelled:
                with self._lock:
                    self._finish(job, "cancelled")
            except Exception as e:  # a failed job must not take the server down
                logger.exception("job %s failed", job.id)
                with self._lock:
                    self._finish(job, "failed", f"{type(e).__name__}: {e}")
            else:
                with self._lock:
                    self._finish(job, "done")
            finally:
                self._running = None

    def _generate(self, job: Job) -> None:
        p, pipe = job.params, self.pipe
        times = prior_times(pipe.prior_part, p.prior_steps)
        last_preview = 0.0

        def hook(stage: str, step: int, total: int, latents: Any) -> None:
            nonlocal last_preview
            if job.cancel.is_set() or self.closing:
                raise JobCancelled
            job.progress[stage] = {"step": step, "total": total}
            job.emit("progress", {"stage": stage, "step": step, "total": total})
            # Previews cost a small matmul and a PNG; a few per second is what a person can follow.
            if stage == "prior" and self.preview and (time.monotonic() - last_preview > 0.25 or step == total):
                last_preview = time.monotonic()
                image = base64.b64encode(render_preview(pipe, latents)).decode()
                job.set_preview({"stage": stage, "step": step, "total": total, "image": image})

        if job.cancel.is_set():
            raise JobCancelled
        given: dict[str, Any] = {k: v for k, v in (("strength", p.strength), ("decoder_strength", p.decoder_strength))
                                 if v is not None}  # fmt: skip
        if "mask" in job.inputs:
            given["mask_image"] = job.inputs["mask"]
        if not p.variations and "image" in job.inputs:
            given["image"] = job.inputs["image"]

        def run(prompt: str, num_images_per_prompt: int, **kw: Any) -> Any:
            if p.variations:
                return pipe.variations(job.inputs["image"], num_images_per_prompt, prompt, **kw)
            return pipe(prompt, num_images_per_prompt=num_images_per_prompt, **kw)

        images = run(
            p.prompt,
            negative_prompt=p.negative_prompt,
            height=p.height,
            width=p.width,
            prior_timesteps=times,
            prior_guidance_scale=p.prior_guidance,
            num_inference_steps=p.decoder_steps,
            decoder_guidance_scale=p.decoder_guidance,
            num_images_per_prompt=p.num_images,
            seed=job.seed,
            sampler=p.sampler,
            step_hook=hook,
            **given,
        ).images
        files = []
        for i, image in enumerate(images):
            # The same keys `wuerstchen generate` writes, so `generate --from-png` remakes the image.
            params = dict(
                prompt=p.prompt,
                negative_prompt=p.negative_prompt,
                height=p.height,
                width=p.width,
                seed=job.seed + i,
                prior_timesteps=times,
                prior_steps=p.prior_steps,
                prior_guidance=p.prior_guidance,
                decoder_steps=p.decoder_steps,
                decoder_guidance=p.decoder_guidance,
                sampler=p.sampler,
                model=self.model,
                dtype=self.dtype,
                image=p.image,
                mask=p.mask,
                strength=p.strength,
                decoder_strength=p.decoder_strength,
                variations=p.variations,
            )
            path = self.output_dir / f"{job.id}-{i}-{job.seed + i}.png"
            save_png(image, path, params)
            files.append(path)
        job.files = files


# ----------------------------------------------------------------------------- the app
def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    # The openai client retries 409 and 5xx unless told not to; a failed generation would fail again.
    headers = {"x-should-retry": "false"} if status == 409 or status >= 500 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class _TooLarge(StarletteHTTPException):
    """A body that grew past its limit while it was read: an HTTP error, so that FastAPI's body
    parsing passes it on as it is (it turns other exceptions into a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes: send less")


class BodyLimit:
    """Refuse a body over its limit: MAX_BODY, or on the paths that take images room for two
    uploads (`upload`). By its Content-Length before reading, and by counting the bytes as they
    arrive (a chunked body has no length). A plain ASGI middleware: FastAPI's
    `@app.middleware("http")` would also wrap (and on shutdown, break) the event streams."""

    def __init__(self, app: Any, upload: int = MAX_BODY) -> None:
        self.app, self.upload = app, upload

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload if scope.get("path") in UPLOAD_PATHS else MAX_BODY
        too_large = _error(413, f"the request body is larger than {limit} bytes: send less")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await too_large(scope, receive, send)
            return
        seen, started = 0, False

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge(limit)
            return message

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if not started:  # else the app's handler has answered it already
                await too_large(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, "the request body is not valid JSON")
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return _error(400, 'the request body is empty: send a JSON object such as {"prompt": "a cat"}')
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{loc}: {msg}")
    return _error(422, "; ".join(parts), param=str(errors[0].get("loc", ["body"])[-1]) if errors else None)


FORM_NUMBERS = {"n": int, "seed": int, "prior_steps": int, "decoder_steps": int, "prior_guidance": float,
                "decoder_guidance": float, "strength": float, "decoder_strength": float}  # fmt: skip


async def read_form(request: Request, limits: Limits, names: tuple[str, ...]) -> tuple[dict[str, str], dict[str, Any]]:
    """A multipart/form-data body as OpenAI's client sends it: text fields, and the image files
    `names` (also as `name[]`, the client's form for lists: one is taken) read within the limits."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send multipart/form-data (the image as a file), as OpenAI's images endpoints take it")
    try:
        form = await request.form(max_files=len(names) + 1, max_fields=32, max_part_size=64 << 10)
    except _TooLarge:
        raise
    except Exception as e:  # a malformed body, too many parts, a field over 64 kB
        detail = getattr(e, "detail", None) or type(e).__name__
        raise ApiError(400, f"the multipart body cannot be read: {detail}") from None
    fields: dict[str, str] = {}
    files: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            name = key.removesuffix("[]")
            if isinstance(value, str):
                fields[name] = value
            elif name in names and name not in files:
                data = await value.read(limits.max_upload_bytes + 1)
                files[name] = read_image(data, name, limits)
            elif name not in names:
                raise ApiError(400, f"unexpected file field {name!r}: send {' and '.join(names)}", name)
    finally:
        await form.close()
    return fields, files


def form_request(fields: dict[str, str]) -> OpenAIImageRequest:
    """Text form fields → the request model (numbers parsed here: a form has only strings)."""
    values: dict[str, Any] = {}
    for key, text in fields.items():
        kind = FORM_NUMBERS.get(key)
        if kind is None:
            values[key] = text
            continue
        try:
            number = kind(text)
        except ValueError:
            raise ApiError(422, f"{key} must be {'an integer' if kind is int else 'a number'}, got {text[:40]!r}",
                           key) from None  # fmt: skip
        if kind is float and not math.isfinite(number):
            raise ApiError(422, f"{key} must be a finite number, got {text[:40]!r}", key)
        values[key] = number
    if "prompt" not in values:
        raise ApiError(400, "send a `prompt` field", "prompt")
    try:
        return OpenAIImageRequest(**values)
    except ValidationError as e:
        first = e.errors()[0]
        raise ApiError(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", str(first["loc"][-1])) from None


def _openai_mask(mask: Image.Image) -> Image.Image:
    """An OpenAI mask (transparent = repaint) → ours (an L mask, white = repaint)."""
    if "A" not in mask.getbands():
        raise ApiError(400, "the mask must be a PNG with transparency: its transparent pixels are the region to edit",
                       "mask")  # fmt: skip
    return mask_from_alpha(mask)


class HostCheck:
    """Answer only requests whose Host header names this server (DNS rebinding: a page on evil.com
    that resolves its name to 127.0.0.1 must not reach a loopback server). `allowed` None: any."""

    def __init__(self, app: Any, allowed: frozenset[str] | None) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
            name = host if host.count(":") > 1 and not host.startswith("[") else name  # a bare IPv6 address
            if name.lower() not in self.allowed:
                shown = repr(host[:100])
                message = f"Host {shown} is not this server's name: start it with --allowed-host NAME to allow one"
                await _error(421, message, "host")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def allowed_hosts(bound: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bound` answers: loopback names for a loopback address, the
    address itself otherwise, plus `extra`; None (any) for a wildcard bind without `extra`."""
    if bound in ("0.0.0.0", "::", "") and not extra:
        return None
    names = {bound.strip("[]").lower(), *(h.lower() for h in extra)}
    if bound in ("127.0.0.1", "::1", "localhost"):
        names |= {"127.0.0.1", "::1", "localhost"}
    return frozenset(names)


def create_app(
    pipe: WuerstchenPipeline,
    model: str | None,
    limits: Limits,
    output_dir: Path | None = None,
    keep_jobs: int = 100,
    preview: bool = True,
    hosts: frozenset[str] | None = None,
) -> FastAPI:
    """The FastAPI app around one pipeline; its worker thread starts and stops with the app.
    `hosts`: the Host header names it answers (`allowed_hosts`; None: any)."""
    from ..assets import SHIPPED_MODEL_NAME

    model_name = str(model) if model is not None else SHIPPED_MODEL_NAME  # what --model/--from-png accept again
    dtype = next((str(p.dtype).removeprefix("torch.") for m in pipe.modules().values() for p in m.parameters()), "?")
    jobs = JobQueue(pipe, model_name, limits, output_dir, keep_jobs, preview, dtype)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        jobs.start()
        yield
        jobs.stop()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN. /openapi.json stays.
    app = FastAPI(title="Würstchen", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    streams: dict[str, int] = {}  # open event streams per client address
    app.state.jobs = jobs

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    app.add_middleware(BodyLimit, upload=2 * limits.max_upload_bytes * 4 // 3 + MAX_BODY)
    app.add_middleware(HostCheck, allowed=hosts)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def ui() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running = jobs.running
        return {
            "status": "ok",
            "model": model_name,
            "device": str(pipe.device),
            "dtype": dtype,
            "queue": jobs.queued(),
            "running": running.id if running is not None else None,
        }

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        step, native = pipe.size_step, default_side(pipe, limits)
        return {
            "model": model_name,
            "device": str(pipe.device),
            "dtype": dtype,
            "size_step": step,
            "default_size": native,
            "presets": [{"width": w, "height": h} for w, h in size_presets(native, step, limits.max_side)],
            "limits": asdict(limits) | {"min_side": step, "min_guidance": 0, "max_seed": MAX_SEED - limits.max_images},
            "generation": pipe.prior_part.name,
            "defaults": JobRequest(prompt="").model_dump(exclude={"prompt"})
            | {"width": native, "height": native, "decoder_steps": pipe.prior_part.defaults["decoder_steps"]},
            "default_prior_steps": len(prior_times(pipe.prior_part, None)) - 1,
            "samplers": ["ddpm", "ddim"],
            "preview": preview,
        }

    @app.post("/api/jobs", status_code=202)
    async def submit(body: JobRequest) -> dict[str, Any]:
        inputs = {name: b64_image(text, name, limits) for name in ("image", "mask") if (text := getattr(body, name))}
        params, _ = check_params(body, limits, pipe, inputs)
        job = jobs.submit(params, inputs)
        return job.to_json(position=jobs.position(job))

    @app.get("/api/jobs/{job_id}")
    async def status(job_id: str, b64: bool = False) -> dict[str, Any]:
        job = jobs.get(job_id)
        return job.to_json(b64=b64 and job.state == "done", position=jobs.position(job))

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> dict[str, Any]:
        job = jobs.cancel(job_id)
        return job.to_json(position=jobs.position(job))

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        job = jobs.get(job_id)
        last = request.headers.get("last-event-id", "")
        # A reconnecting EventSource resumes where it was; anything but a plain small number starts over.
        start = int(last) + 1 if last.isascii() and last.isdigit() and len(last) <= 9 else 0
        client = request.client.host if request.client else "?"
        if sum(streams.values()) >= limits.max_streams or streams.get(client, 0) >= limits.max_streams_per_client:
            mine = streams.get(client, 0)
            raise ApiError(429, f"too many open event streams ({mine} of yours, {sum(streams.values())} in all): "
                           "close some, or poll GET /api/jobs/{id}", kind="busy")  # fmt: skip
        streams[client] = streams.get(client, 0) + 1
        news = asyncio.Event()
        waiter = (asyncio.get_running_loop(), news)
        with job.lock:
            job.waiters.add(waiter)
        released = False

        def release() -> None:  # once: from the stream's end, or after the response if it never started
            nonlocal released
            if not released:
                released = True
                with job.lock:
                    job.waiters.discard(waiter)
                streams[client] -= 1
                if not streams[client]:
                    del streams[client]

        async def stream() -> AsyncIterator[str]:
            i, seen, quiet = start, 0, 0
            try:
                while True:
                    news.clear()
                    batch, ended, fresh = job.events_from(i, seen)
                    for index, name, data in batch:
                        yield f"id: {index}\nevent: {name}\ndata: {json.dumps(data)}\n\n"
                        i = index + 1
                    if fresh is not None:  # no id: Last-Event-ID counts the log only
                        seen = fresh[0]
                        yield f"event: preview\ndata: {json.dumps(fresh[1])}\n\n"
                    if ended or jobs.closing or await request.is_disconnected():
                        return
                    try:  # woken by the job's next event; once a second to notice a disconnect or a shutdown
                        await asyncio.wait_for(news.wait(), timeout=1.0)
                        quiet = 0
                    except TimeoutError:
                        quiet += 1
                    if quiet >= 15:  # a comment line keeps proxies from closing a quiet stream
                        quiet = 0
                        yield ": keep-alive\n\n"
            finally:
                release()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers,
                                 background=BackgroundTask(release))  # fmt: skip

    @app.get("/api/images/{job_id}/{index}.png")
    async def image(job_id: str, index: int) -> FileResponse:
        job = jobs.get(job_id)
        if not 0 <= index < len(job.files):
            raise ApiError(404, f"job {job_id} has no image {index} ({len(job.files)} images, state {job.state})")
        name = f"wuerstchen-{job.seed + index}.png"
        return FileResponse(job.files[index], media_type="image/png", filename=name, content_disposition_type="inline")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "wuerstchen"}]}

    @app.post("/v1/images/generations")
    async def generations(body: OpenAIImageRequest, request: Request) -> JSONResponse:
        params, fmt = check_params(body, limits, pipe)
        return await answer(jobs.submit(params), fmt, request)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        """OpenAI's images.edit: `image` (+ `mask`, transparent = repaint; without one the image's
        own transparency, and an opaque image is image-to-image at `strength`)."""
        fields, files = await read_form(request, limits, ("image", "mask"))
        image = files.get("image")
        if image is None:
            raise ApiError(400, "send the image to edit as the multipart file `image`", "image")
        inputs = {"image": image.convert("RGB")}
        if "mask" in files:
            inputs["mask"] = _openai_mask(files["mask"])
        elif "A" in image.getbands() and image.getchannel("A").getextrema()[0] < 255:
            inputs["mask"] = mask_from_alpha(image)  # OpenAI: without a mask, the image's transparent pixels
        if inputs["image"].size != getattr(inputs.get("mask"), "size", inputs["image"].size):
            (w, h), (mw, mh) = inputs["image"].size, inputs["mask"].size
            raise ApiError(400, f"the mask is {mw}×{mh} px but the image is {w}×{h}: send a mask of the image's size",
                           "mask")  # fmt: skip
        params, fmt = check_params(form_request(fields), limits, pipe, inputs)
        return await answer(jobs.submit(params, inputs), fmt, request)

    @app.post("/v1/images/variations")
    async def variations(request: Request) -> JSONResponse:
        """OpenAI's images.create_variation: `image`, `n`, `size`, `response_format`."""
        fields, files = await read_form(request, limits, ("image",))
        if "image" not in files:
            raise ApiError(400, "send the image as the multipart file `image`", "image")
        inputs = {"image": files["image"].convert("RGB")}
        body = form_request({"prompt": "", **fields})
        params, fmt = check_params(body, limits, pipe, inputs, variations=True)
        return await answer(jobs.submit(params, inputs), fmt, request)

    async def answer(job: Job, fmt: str, request: Request) -> JSONResponse:
        """Wait for an OpenAI request's job, and answer as OpenAI does."""
        while not job.done.is_set():
            if jobs.closing:
                return _error(503, "the server is shutting down", kind="server_error")
            if await request.is_disconnected():  # nobody will read the images: free the queue
                jobs.cancel(job.id)
                return _error(499, "client disconnected")
            await asyncio.sleep(0.05)
        headers = {"x-job-id": job.id}
        if job.state == "cancelled":
            return _error(409, f"job {job.id} was cancelled", kind="cancelled")
        if job.state == "failed":
            return _error(500, f"the generation failed: {job.error}", kind="server_error")
        base = str(request.base_url).rstrip("/")
        data = []
        for i, path in enumerate(job.files):
            item: dict[str, Any] = {"seed": job.seed + i, "revised_prompt": None}
            if fmt == "url":
                item["url"] = f"{base}/api/images/{job.id}/{i}.png"
            else:
                item["b64_json"] = base64.b64encode(path.read_bytes()).decode()
            data.append(item)
        return JSONResponse({"created": int(job.created), "data": data}, headers=headers)

    return app
