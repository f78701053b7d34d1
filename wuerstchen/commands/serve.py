"""Serve the web UI and the HTTP API from one process with one pipeline in memory.

    pip install 'wuerstchen[serve]'
    wuerstchen serve --model warp-ai/wuerstchen --dtype bfloat16      # then open http://127.0.0.1:7860/
    wuerstchen serve --port 8000 --max-images 4 --output-dir outputs/   # the shipped small model

    curl -s http://127.0.0.1:7860/v1/images/generations -H 'Content-Type: application/json' \\
         -d '{"prompt": "a red circle", "size": "1024x1024", "n": 1}'

Jobs run one at a time in submission order. The server listens on 127.0.0.1 unless --host says
otherwise; it has no authentication, so only open it (--host 0.0.0.0) on a network you trust.
Every request parameter is limited by the --max-* flags; a request outside them gets a 4xx answer.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from .common import add_model_arguments, load_from_args

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free port, printed at start)")
    g = p.add_argument_group("limits on each request")
    g.add_argument("--max-side", type=int, default=None, help="largest width/height in px (default: 2× native)")
    g.add_argument("--max-images", type=int, default=8, help="most images per request")
    g.add_argument("--max-steps", type=int, default=200, help="most steps per stage")
    g.add_argument("--max-prompt-chars", type=int, default=2000, help="longest prompt (and negative prompt)")
    g.add_argument("--max-guidance", type=float, default=30.0, help="largest guidance scale")
    g.add_argument("--max-queue", type=int, default=16, help="most jobs waiting; more are answered 429")
    g.add_argument("--max-streams", type=int, default=128, help="open event streams, all clients together")
    g.add_argument("--max-streams-per-client", type=int, default=32, help="open event streams of one address")
    g.add_argument("--max-connections", type=int, default=256, help="open connections; more are answered 503")
    g.add_argument("--header-timeout", type=float, default=10.0, help="seconds a request has to send its headers")
    g.add_argument("--max-upload-mb", type=float, default=8.0, help="largest uploaded image or mask file (MB)")
    g.add_argument("--max-upload-pixels", type=int, default=4096 * 4096, help="largest uploaded image, width × height")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="a Host name to answer besides the bound address (repeat; a loopback bind also answers localhost)",
    )
    p.add_argument("--keep-jobs", type=int, default=100, help="finished jobs (and their images) kept in memory")
    p.add_argument("--output-dir", default=None, help="also keep every image here (default: a temporary folder)")
    p.add_argument("--no-preview", action="store_true", help="no Stage C previews (they cost one small fit at start)")
    add_model_arguments(p)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart right after a stop
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    try:
        import uvicorn

        from ..server.app import Limits, allowed_hosts, create_app
        from ..server.http import header_timeout_protocol
    except ImportError as e:
        missing = f"the server needs FastAPI and uvicorn ({e.name} is missing)"
        raise UserError(f"{missing}: pip install 'wuerstchen[serve]'") from None
    for name in ("max_images", "max_steps", "max_prompt_chars", "max_queue", "keep_jobs", "max_streams",
                 "max_streams_per_client", "max_connections"):  # fmt: skip
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.max_guidance >= 0:
        raise UserError("--max-guidance must be ≥ 0")
    if not (0 < args.max_upload_mb <= 1024 and 0 < args.max_upload_pixels <= 10**9):
        raise UserError("--max-upload-mb must be in (0, 1024] and --max-upload-pixels from 1 to 10⁹")
    if not 0 < args.header_timeout <= 3600:
        raise UserError("--header-timeout must be from 0 to 3600 seconds")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    sock = _listen(args.host, args.port)

    pipe = load_from_args(args)
    step = pipe.size_step
    max_side = args.max_side if args.max_side is not None else 2 * pipe.settings.default_size
    if max_side < step:
        raise UserError(f"--max-side must be at least {step} px (this model's size step)")
    if max_side % step:
        logger.warning("--max-side %d is not a multiple of %d px; using %d", max_side, step, max_side - max_side % step)
    limits = Limits(
        max_side=max_side - max_side % step,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_prompt_chars=args.max_prompt_chars,
        max_guidance=args.max_guidance,
        max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_upload_pixels=args.max_upload_pixels,
        max_streams=args.max_streams,
        max_streams_per_client=args.max_streams_per_client,
    )
    output_dir = Path(args.output_dir) if args.output_dir else None
    host, port = sock.getsockname()[:2]
    hosts = allowed_hosts(args.host, args.allowed_host)
    app = create_app(pipe, args.model, limits, output_dir, args.keep_jobs, not args.no_preview, hosts)

    shown = f"[{host}]" if ":" in host else host
    print(f"wuerstchen serve: {args.model or 'shipped small model'} on {pipe.device}", file=sys.stderr)
    print(f"wuerstchen serve: open http://{shown}:{port}/ (Ctrl+C stops)", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print("wuerstchen serve: warning: no authentication; anyone who reaches this port can use it", file=sys.stderr)
    verbose = getattr(args, "verbose", False)
    config = uvicorn.Config(
        app,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=3,  # open event streams would otherwise hold Ctrl+C
        http=header_timeout_protocol(args.header_timeout),
        limit_concurrency=args.max_connections,
    )
    jobs = app.state.jobs

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            jobs.close()  # stop the running job and end event streams, so Ctrl+C does not wait on them
            super().handle_exit(sig, frame)

    Server(config).run(sockets=[sock])
    return 0
