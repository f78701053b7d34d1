"""The README's code blocks, run as a user would paste them: every ```bash and ```python block runs
here, in order, in one fresh folder (later blocks use what earlier ones wrote), unless the comment
line above it says `readme-test: not run (why)`. Blocks marked `the setup is skipped` run without
their set-up commands (venv, activate, pip install): this test runs inside that environment. The
server blocks run against a `wuerstchen serve` this test starts on a free port (the README's 7860
is replaced by it).

    pytest tests/test_readme.py
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
SETUP = re.compile(r"^(python3 -m venv \S+|\. \S+/bin/activate|pip install .*|sh ci/install_browser\.sh)$")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None  # the readme-test comment above it, if any


def blocks(text: str) -> list[Block]:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        above = MARK.search(lines[start - 1]) if start else None
        out.append(Block(start + 1, m.group(1), "\n".join(body) + "\n", above.group(1) if above else None))
        i += 1
    return out


def without_setup(code: str) -> str:
    """`python3 -m venv .venv && . .venv/bin/activate && pip install ... && CMD` → `CMD`."""
    parts = [p.strip() for p in code.replace("\\\n", " ").strip().split("&&")]
    kept = [p for p in parts if not SETUP.match(p)]
    assert kept, f"nothing left to run of {code!r}"
    return " && ".join(kept) + "\n"


def test_every_block_runs_or_says_why_not() -> None:
    found = blocks(README.read_text(encoding="utf-8"))
    code = [b for b in found if b.lang in ("bash", "python", "sh", "console")]
    assert len(code) >= 10
    for b in code:
        if b.mark is not None and b.mark.startswith("not run"):
            assert re.match(r"not run( as written)? \(.{10,}\)", b.mark), f"README line {b.line}: say why: {b.mark}"
    for b in found:
        assert b.lang in ("bash", "python", ""), f"README line {b.line}: unknown block language {b.lang!r}"


def test_the_test_command_is_cis() -> None:
    # The README's "set up and run every test" line is the one .ci/run runs on a fresh clone.
    test_blocks = [b for b in blocks(README.read_text(encoding="utf-8")) if "pytest" in b.code]
    assert len(test_blocks) == 1
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_blocks[0].code.strip() in ci.splitlines()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cwd: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "wuerstchen", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"wuerstchen serve exited: {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            # The socket is bound before the model loads: wait for /health to answer.
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("wuerstchen serve did not answer /health in 120 s")


def test_blocks_run_as_written(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["HF_HUB_OFFLINE"] = "1"  # nothing here may need the network
    server, port = None, _free_port()
    try:
        for b in blocks(README.read_text(encoding="utf-8")):
            if b.lang not in ("bash", "python"):
                continue
            mark = b.mark or ""
            if mark.startswith("not run"):
                if "starts this server itself" in mark:
                    server = _serve(tmp_path, port)
                continue
            code = without_setup(b.code) if mark.startswith("the setup is skipped") else b.code
            code = code.replace("127.0.0.1:7860", f"127.0.0.1:{port}")
            argv = ["bash", "-euo", "pipefail", "-c", code] if b.lang == "bash" else [sys.executable, "-c", code]
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"README line {b.line} ({b.lang}) failed:\n{code}\n{done.stderr[-3000:]}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    # What the blocks promise to write.
    assert (tmp_path / "outputs" / "00000-1.png").is_file()
    assert sorted(p.name for p in (tmp_path / "shapes").iterdir())[:2] == ["00000-7.png", "00001-8.png"]
    assert (tmp_path / "runs" / "prior" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "runs" / "lora" / "lora.safetensors").is_file()
    for name in ("circle.png", "shapes-0.png", "shapes-1.png", "first.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
