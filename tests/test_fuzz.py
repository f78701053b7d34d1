"""Fuzzing, bounded and on loopback only: generated malformed JSON bodies, headers, paths and
uploads against a running server; generated corrupt model folders against the loader; generated
bad flags and PNG metadata against `generate`. Every case must end in a 4xx (or a success) with a
one-line message, within a timeout, without writing outside its folder, and the server must answer
`/health` after each. The cases are drawn from fixed seeds, so a failure names a case that
reproduces.

    pytest tests/test_fuzz.py
"""

from __future__ import annotations

import http.client
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import png_bytes, serve  # noqa: E402  (tests/ is on the path, as for conftest's `tiny`)

# Values that break parsers and checks: wrong types, the edges of numbers, text that is not text.
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1.5, -0.0, 10**30, 1e308, -1e308, "", "1", "x" * 5000, "\u0000", "\u202e",
    [], [1], {}, {"a": 1}, [[[[[]]]]],
]  # fmt: skip
# Raw JSON that `json.dumps` would never write: non-standard numbers, escapes of no character.
ODD_RAW = ["NaN", "Infinity", "-Infinity", "1e400", "9" * 5000, '"\\ud800"', '"\\udfff x"', '"\\u0007"']

JOB = {"prompt": "a", "prior_steps": 1, "decoder_steps": 1, "width": 128, "height": 128, "seed": 1}
OPENAI = {"prompt": "a", "n": 1, "size": "128x128", "response_format": "b64_json"}


def json_bodies(base: dict[str, Any], rng: random.Random, count: int) -> Iterator[bytes]:
    """Malformed variants of a valid body: one field made odd, an unknown field, a body that is not
    an object, truncated or mangled bytes, deep nesting, other encodings."""
    valid = json.dumps(base)
    yield from (b"", b"null", b"[]", b"1", b'"a"', b"{", b"}", b"[" * 100_000, b'{"a":' * 50_000)
    yield "\ufeff".encode() + valid.encode()  # a byte-order mark
    yield valid.encode("utf-16")
    yield valid.encode()[:-1] + b"\xff\xfe}"  # not UTF-8
    yield valid[:-1].encode() + b', "prompt": "duplicate"}'
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            body = dict(base, **{rng.choice(list(base)): rng.choice(ODD_VALUES)})
            yield json.dumps(body).encode()
        elif kind == 1:
            yield (valid[:-1] + f', "{rng.choice(list(base))}": {rng.choice(ODD_RAW)}}}').encode()
        elif kind == 2:
            yield json.dumps(dict(base, **{f"x{rng.randrange(1000)}": rng.choice(ODD_VALUES)})).encode()
        elif kind == 3:
            yield valid.encode()[: rng.randrange(1, len(valid))]
        else:
            raw = bytearray(valid.encode())
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            yield bytes(raw)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, bytes, str]:  # fmt: skip
    """One request on its own connection → (status, body, content type); a timeout fails the test."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in ({"Content-Type": "application/json"} | (headers or {})).items():
            conn.putheader(name, value)
        if body is not None and "Content-Length" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read(), response.headers.get_content_type()
    finally:
        conn.close()


def check_answer(case: str, status: int, payload: bytes, kind: str) -> None:
    """A 4xx says what went wrong in one line (JSON from our handlers, or uvicorn's one plain line
    for what is not HTTP); nothing is a 5xx."""
    assert status < 500, f"{case}: {status} {payload[:300]!r}"
    if status < 400:
        return
    if kind == "application/json":
        message = json.loads(payload)["error"]["message"]
    else:
        message = payload.decode("utf-8", "replace").strip()
        assert len(message) < 300, f"{case}: {status} {message[:300]!r}"
    assert "\n" not in message and "Traceback" not in message, f"{case}: {message!r}"


@pytest.fixture(scope="module")
def fuzz_server(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    root = tmp_path_factory.mktemp("fuzz-server")
    out = root / "out"
    with serve(tiny_folder, "--max-queue", "2", "--dtype", "float32", "--output-dir", str(out), "--header-timeout",
               "2", log=root / "serve.log") as url:  # fmt: skip
        yield int(url.rsplit(":", 1)[1]), out


def still_serving(port: int, case: str) -> None:
    status, payload, _ = request(port, "GET", "/health")
    assert status == 200 and json.loads(payload)["status"] == "ok", f"after {case}: {status} {payload[:200]!r}"


def cancel_if_queued(port: int, status: int, payload: bytes) -> None:
    """A variant that happens to be valid starts a job: cancel it, so the queue stays free."""
    if status == 202:
        request(port, "POST", f"/api/jobs/{json.loads(payload)['id']}/cancel")


def test_generated_json_bodies(fuzz_server: tuple[int, Path], tiny_folder: Path) -> None:
    port, out = fuzz_server
    before = sorted(p.relative_to(tiny_folder) for p in tiny_folder.rglob("*"))
    rng = random.Random(24)
    for path, base in (("/api/jobs", JOB), ("/v1/images/generations", OPENAI)):
        for i, body in enumerate(json_bodies(base, rng, 120)):
            case = f"{path} #{i}: {body[:120]!r}"
            status, payload, kind = request(port, "POST", path, body)
            check_answer(case, status, payload, kind)
            cancel_if_queued(port, status, payload)
            still_serving(port, case)
    assert sorted(p.relative_to(tiny_folder) for p in tiny_folder.rglob("*")) == before  # the model is untouched
    assert all(p.suffix == ".png" for p in out.rglob("*") if p.is_file())  # only whole images, nothing else


def test_generated_headers_methods_and_paths(fuzz_server: tuple[int, Path]) -> None:
    port, _ = fuzz_server
    valid = json.dumps(JOB).encode()
    rng = random.Random(7)
    cases: list[tuple[str, str, bytes | None, dict[str, str]]] = []
    odd_json = "application/json\u00e9".encode().decode("latin-1")
    for content_type in ("text/plain", "multipart/form-data", "multipart/form-data; boundary=",
                         "application/json; charset=latin-1", "x" * 8000, "", odd_json):  # fmt: skip
        cases.append(("POST", "/api/jobs", valid, {"Content-Type": content_type}))
        cases.append(("POST", "/v1/images/edits", valid, {"Content-Type": content_type}))
    for length in ("abc", "-1", "1e3", " 5", "99999999999999999999999", "0"):
        cases.append(("POST", "/api/jobs", valid, {"Content-Length": length}))
    for host in ("", "a" * 5000, "localhost:99999", "[::1", "127.0.0.1:0", "xn--n3h.test", "local\u00e9"):
        cases.append(("GET", "/health", None, {"Host": host.encode().decode("latin-1")}))
    for event_id in ("", "-5", "1.5", "9" * 10000, "\u00b2", "0x10"):
        cases.append(("GET", "/api/jobs/none/events", None, {"Last-Event-ID": event_id}))
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"):
        cases.append((method, rng.choice(["/api/jobs", "/health", "/v1/images/generations"]), None, {}))
    for path in (
        "/api/images/../../etc/passwd",
        "/api/images/%2e%2e/%2e%2e/x.png",
        "/api/images/x/-1.png",
        "/api/images/x/99999999999999999999.png",
        "/api/jobs/" + "a" * 6000,
        "/api/jobs/%00",
        "/api/jobs/%ff%fe",
        "//health",
        "/v1/models/../../",
        "/api/images/x/1.png?index=../../x",
    ):
        cases.append(("GET", path, None, {}))  # fmt: skip
    for _ in range(30):  # a header that is a few random bytes
        name = "X-" + "".join(rng.choice("abcdefgh-_") for _ in range(rng.randrange(1, 20)))
        value = "".join(chr(rng.randrange(32, 256)) for _ in range(rng.randrange(0, 200)))
        cases.append(("GET", "/health", None, {name: value}))
    for i, (method, path, body, headers) in enumerate(cases):
        case = f"#{i} {method} {path[:60]} {str(headers)[:100]}"
        try:
            status, payload, kind = request(port, method, path, body, headers, timeout=10)
        except http.client.RemoteDisconnected:
            status, payload, kind = 400, b"", ""  # h11 closes what it cannot parse: a refusal, not a crash
        if not (path.startswith("/api/images") and status == 200):
            check_answer(case, status, payload, kind)
        cancel_if_queued(port, status, payload)
        still_serving(port, case)


def test_generated_raw_requests_are_closed_in_time(fuzz_server: tuple[int, Path]) -> None:
    """Bytes that are not HTTP, or HTTP cut short: the server answers or hangs up within its
    header timeout (2 s here), and keeps serving."""
    port, _ = fuzz_server
    rng = random.Random(3)
    heads = [b"\x00" * 100, b"GET", b"GET / HTTP/9.9\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 70000,
             b"POST /api/jobs HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{",
             b"POST /api/jobs HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
             b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"]  # fmt: skip
    heads += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(10)]

    def send(head: bytes) -> str | None:
        """None if the server answered or hung up within 15 s, else what went wrong."""
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            start = time.monotonic()
            try:
                sock.sendall(head)
                while sock.recv(65536):  # until the server closes
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
            except TimeoutError:
                return "the connection was still open after 15 s"
            return None if time.monotonic() - start < 15 else "it took 15 s or more"

    # All at once: each waits out the header timeout, and the server must hold them together.
    with ThreadPoolExecutor(len(heads)) as pool:
        problems = list(pool.map(send, heads))
    assert not any(problems), [(head[:60], p) for head, p in zip(heads, problems, strict=True) if p]
    still_serving(port, "raw requests")


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "fuzzb") -> bytes:
    out = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode()


def test_generated_uploads(fuzz_server: tuple[int, Path]) -> None:
    port, _ = fuzz_server
    rng = random.Random(11)
    image = png_bytes(Image.new("RGB", (128, 128), (200, 30, 30)))
    bodies: list[tuple[str, bytes, str]] = []

    def add(endpoint: str, parts: list[tuple[str, str | None, bytes]], boundary: str = "fuzzb") -> None:
        bodies.append((endpoint, multipart(parts, boundary), f"multipart/form-data; boundary={boundary}"))

    for _ in range(25):  # truncated or flipped PNG bytes
        data = bytearray(image[: rng.randrange(1, len(image))] if rng.random() < 0.5 else image)
        for _ in range(rng.randrange(0, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        endpoint = rng.choice(["edits", "variations"])
        add(endpoint, [("image", "x.png", bytes(data)), ("prompt", None, b"a"), ("n", None, b"1")])
    for field, value in (("n", b"-1"), ("n", b"1e9"), ("size", b"128x"), ("strength", b"nan"), ("prompt", b"\xff\xfe"),
                         ("prompt", b"a\x00b"), ("response_format", b"gif"), ("size", b"9" * 5000)):  # fmt: skip
        add("edits", [("image", "x.png", image), ("prompt", None, b"a"), (field, None, value)])
    add("edits", [("image", "../../etc/passwd", image), ("prompt", None, b"a"), ("n", None, b"1")])
    add("edits", [("image", None, image), ("prompt", None, b"a")])  # a field, not a file
    add("edits", [("image", "x.png", image)] * 3 + [("prompt", None, b"a")])
    add("variations", [(f"f{i}", "f.png", b"x") for i in range(200)])
    add("edits", [("prompt", None, b"a")], boundary="")
    bodies.append(("edits", b"--fuzzb\r\n" + b"A" * 1000, "multipart/form-data; boundary=fuzzb"))  # never ends
    bodies.append(("variations", image, "image/png"))
    for i, (endpoint, body, kind) in enumerate(bodies):
        case = f"#{i} {endpoint} {body[:100]!r}"
        status, payload, got_kind = request(port, "POST", f"/v1/images/{endpoint}", body, {"Content-Type": kind})
        check_answer(case, status, payload, got_kind)
        still_serving(port, case)


# -- corrupt model folders: each load in a worker process with a memory cap and a timeout ----------

CONFIGS = ["model_index.json", "prior_prior/config.json", "decoder/config.json", "vqgan/config.json",
           "semantic/config.json", "scheduler/scheduler_config.json",
           "prior_scheduler/scheduler_config.json"]  # fmt: skip
TRANSFORMERS_FILES = ["text_encoder/config.json", "tokenizer/tokenizer_config.json", "tokenizer/tokenizer.json"]
WEIGHTS = ["prior_prior/diffusion_pytorch_model.safetensors", "vqgan/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors"]  # fmt: skip


def folder_cases(folder: Path, rng: random.Random, count: int) -> list[tuple[str, str, str | bytes]]:
    """(case name, file, new contents): one field made odd, a file replaced by what is not its
    format, weights cut short or flipped, a sharded index that names files elsewhere."""
    cases: list[tuple[str, str, str | bytes]] = []
    for _ in range(count):
        name = rng.choice(CONFIGS)
        data = json.loads((folder / name).read_text())
        key = rng.choice(list(data))
        value = rng.choice(ODD_VALUES + [10**9, 2**63, -(2**63), 7, 3])
        cases.append((f"{name}:{key}={str(value)[:30]}", name, json.dumps(data | {key: value})))
    for name in CONFIGS + TRANSFORMERS_FILES:
        text = (folder / name).read_text()
        for label, contents in (("empty", ""), ("list", "[]"), ("null", "null"), ("deep", "[" * 100_000),
                                ("cut", text[: len(text) // 2]), ("nan", text.replace("}", ', "x": NaN}', 1)),
                                ("not utf-8", b"\xff\xfe" + text.encode()[:50])):  # fmt: skip
            cases.append((f"{name}:{label}", name, contents))
    for name in WEIGHTS:
        raw = (folder / name).read_bytes()
        flipped = bytearray(raw)
        for _ in range(8):
            flipped[rng.randrange(min(len(raw), 4096))] = rng.randrange(256)  # the header is at the start
        header = b"\xff" * 8 + raw[8:]  # a header length of 2⁶⁴ - 1
        for label, contents in (("empty", b""), ("cut", raw[: len(raw) // 3]), ("flipped", bytes(flipped)),
                                ("header length", header), ("text", b"{}")):  # fmt: skip
            cases.append((f"{name}:{label}", name, contents))
    weights = "vqgan/diffusion_pytorch_model.safetensors"
    for shard in ("../prior_prior/diffusion_pytorch_model.safetensors", "/etc/passwd", "", ".", None, 5):
        index = json.dumps({"weight_map": {"x": shard}})
        cases.append((f"shard {shard!r}", f"{weights}.index.json", index))  # the single file is removed
    return cases


WORKER = r"""
import json, sys, time, shutil, traceback
from pathlib import Path
from wuerstchen import WuerstchenPipeline
from wuerstchen.errors import UserError
src, root, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
for i, (label, name, contents, binary) in enumerate(cases):
    folder = root / f"case-{i}"
    shutil.copytree(src, folder)
    if name.endswith(".index.json"):
        (folder / name.removesuffix(".index.json")).unlink()
    path = folder / name
    if binary:
        path.write_bytes(bytes.fromhex(contents))
    else:
        path.write_text(contents, encoding="utf-8", errors="surrogatepass")
    print("FUZZ", json.dumps({"case": i, "start": True}), flush=True)
    start = time.monotonic()
    try:
        WuerstchenPipeline.from_pretrained(folder)
        result = {"ok": True}
    except UserError as e:
        result = {"ok": False, "message": str(e)}
    except BaseException:
        result = {"ok": False, "traceback": traceback.format_exc(limit=-3)}
    result.update(case=i, seconds=time.monotonic() - start)
    print("FUZZ", json.dumps(result), flush=True)
    shutil.rmtree(folder)
"""


def lines(out: str) -> list[str]:
    """The worker's own lines: a library may print to stdout too."""
    return [line for line in out.splitlines() if line.startswith("FUZZ ")]


def _limit_memory() -> None:
    # 8 GiB of address space: torch and the tiny model need ~3 GiB; a config that allocates without
    # bound fails here instead of taking the machine down.
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the workers' environment


def run_worker(args: list[str], cases: list, cwd: Path, timeout: float) -> list[dict]:
    """Run `python -c WORKER args…` offline, under the memory limit, with stdin closed; its results,
    one per case, or a failure naming the case it was on when the time ran out."""
    proc = subprocess.Popen(
        [sys.executable, "-c", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env=OFFLINE,
        preexec_fn=_limit_memory,
        cwd=cwd,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        started = [json.loads(line[5:])["case"] for line in lines(out) if '"start"' in line]
        pytest.fail(f"case {cases[started[-1]][0]!r} did not end in {timeout} s")
    results = [json.loads(line[5:]) for line in lines(out) if '"start"' not in line]
    assert proc.returncode == 0 and len(results) == len(cases), out[-2000:]
    return results


def test_generated_corrupt_model_folders(tiny_folder: Path, tmp_path: Path) -> None:
    cases = folder_cases(tiny_folder, random.Random(5), 120)
    encoded = [(label, name, c.hex() if isinstance(c, bytes) else c, isinstance(c, bytes)) for label, name, c in cases]
    (tmp_path / "cases.json").write_text(json.dumps(encoded))
    work = tmp_path / "folders"
    work.mkdir()
    results = run_worker([WORKER, str(tiny_folder), str(work), str(tmp_path / "cases.json")], cases, tmp_path, 240)
    failures = []
    for result in results:
        label, name, _ = cases[result["case"]]
        if "traceback" in result:
            failures.append(f"{label}: not a one-line error:\n{result['traceback']}")
        elif result["seconds"] >= 30:
            failures.append(f"{label}: {result['seconds']:.0f} s")
        elif not result["ok"]:
            message = result["message"]
            component = name.split("/")[0] if "/" in name else name
            if "\n" in message or component not in message:
                failures.append(f"{label}: {message!r}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.json", "folders"]  # nothing written beside
    assert not any(work.iterdir())


# -- the command line: bad flags, odd files, odd PNG metadata, in one worker process -----------------

CLI_WORKER = r"""
import contextlib, io, json, sys, time
from pathlib import Path
from wuerstchen.cli import main
for i, argv in enumerate(json.loads(Path(sys.argv[1]).read_text())):
    print("FUZZ", json.dumps({"case": i, "start": True}), flush=True)
    err, start = io.StringIO(), time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            import traceback
            code, err = None, io.StringIO(traceback.format_exc(limit=-3))
    print("FUZZ", json.dumps({"case": i, "code": code, "stderr": err.getvalue()[-20000:],
                              "seconds": time.monotonic() - start}), flush=True)
"""

INT_FLAGS = ["--height", "--width", "-n", "--seed", "--prior-steps", "--decoder-steps"]
FLOAT_FLAGS = ["--prior-shift", "--prior-guidance", "--decoder-guidance", "--strength", "--decoder-strength"]
ODD_ARGS = ["", "abc", "-1", "0", "1e9", "nan", "inf", "-inf", "9" * 40, "0x10", "\u0661", "1_0", " 7 ", "-", "--",
            "1" * 5000, "\ud800", "a\x00b", "--width"]  # fmt: skip


def cli_cases(tmp: Path, source_png: Path, model: Path, rng: random.Random) -> list[tuple[str, list[str]]]:
    """(case name, argv): a fast valid command (128 px, one step each) with one thing made odd."""
    out = tmp / "out"
    base = ["generate", "a", "--model", str(model), "--prior-steps", "1", "--decoder-steps", "1", "--width", "128",
            "--height", "128", "--seed", "1", "--output-dir", str(out), "--quiet"]  # fmt: skip
    cases = []
    for flag in INT_FLAGS + FLOAT_FLAGS + ["--sampler", "--pattern", "--prompt-file", "--image", "--mask",
                                           "--variations", "--from-png", "--model", "--negative-prompt"]:  # fmt: skip
        for value in rng.sample(ODD_ARGS, 4):
            cases.append((f"{flag} {value[:30]!r}", base + [flag, value]))
    for pattern in ("../{seed}.png", str(tmp / "abs.png"), "{prompt.__class__}", "{0}", "{nope}", "{seed!r:>99999}",
                    "a/b/{index}.png", "x" * 300 + ".png", "{index:%}", ".png", "/", "{index}.gif"):  # fmt: skip
        cases.append((f"--pattern {pattern[:40]!r}", base + ["--pattern", pattern]))
    files = tmp / "files"
    files.mkdir()
    (files / "latin1.txt").write_bytes(b"caf\xe9\n")
    (files / "big.txt").write_bytes(b"a" * (17 << 20))  # over the 16 MiB a prompt file may be
    (files / "text.png").write_text("not a picture")
    (files / "cut.png").write_bytes(source_png.read_bytes()[:200])
    (files / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01\x00\x00\x00\x01\x00\x00\x08\x02\x00\x00\x00" + b"\x00" * 64
    )  # a header of 65536² pixels, no data
    os.mkfifo(files / "fifo")
    odd_files = ["/dev/zero", "/dev/null", str(files), str(files / "fifo"), str(files / "missing.png"),
                 *(str(p) for p in sorted(files.iterdir()) if p.name != "fifo")]  # fmt: skip
    for flag in ("--prompt-file", "--image", "--variations", "--from-png"):
        for path in odd_files:
            cases.append((f"{flag} {path}", base + [flag, path]))
    cases.append(("--mask without --image", base + ["--mask", str(source_png)]))
    cases.append(("--mask of another size", base + ["--image", str(source_png), "--mask", str(files / "huge.png")]))
    for model_arg in ("", ".", "/", "/dev/null", "../..", "org/name", "http://127.0.0.1:1/x", "a" * 5000,
                      str(model / "vqgan"), str(model / "model_index.json")):  # fmt: skip
        cases.append((f"--model {model_arg[:40]!r}", base + ["--model", model_arg]))
    with Image.open(source_png) as im:
        image, saved = im.copy(), json.loads(im.text["wuerstchen"])
    metadata: list[tuple[str, str]] = [("not json", "{"), ("list", "[]"), ("deep", "[" * 100_000), ("null", "null"),
                                       ("NaN", json.dumps(saved).replace("}", ', "x": NaN}'))]  # fmt: skip
    for _ in range(40):
        key = rng.choice(list(saved))
        value = rng.choice(ODD_VALUES + [{"$ref": "/etc/passwd"}, "/etc/passwd", "org/name"])
        metadata.append((f"{key}={str(value)[:30]}", json.dumps(saved | {key: value})))
    for key in rng.sample(list(saved), 5):
        metadata.append((f"no {key}", json.dumps({k: v for k, v in saved.items() if k != key})))
    for i, (label, text) in enumerate(metadata):
        info = PngInfo()
        info.add_text("wuerstchen", text)
        path = files / f"meta-{i}.png"
        image.save(path, pnginfo=info)
        cases.append((f"--from-png metadata {label}", ["generate", "--from-png", str(path), "--model", str(model),
                                                       "--output-dir", str(out), "--quiet"]))  # fmt: skip
    return cases


def test_generated_command_lines(tiny_folder: Path, tmp_path: Path) -> None:
    """Every case ends with exit 0, or exit 2 and one `wuerstchen …: error:` line last on stderr,
    within 60 s; only PNGs appear, and only in --output-dir."""
    src = tmp_path / "src"
    cmd = [sys.executable, "-m", "wuerstchen", "generate", "a", "--model", str(tiny_folder), "--prior-steps", "1",
           "--decoder-steps", "1", "--seed", "3", "--output-dir", str(src), "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True, env=OFFLINE, stdin=subprocess.DEVNULL, capture_output=True, timeout=180)
    (source_png,) = src.iterdir()
    cases = cli_cases(tmp_path, source_png, tiny_folder, random.Random(8))
    (tmp_path / "argv.json").write_text(json.dumps([argv for _, argv in cases]))
    before = {p.name for p in tmp_path.iterdir()}
    results = run_worker([CLI_WORKER, str(tmp_path / "argv.json")], cases, tmp_path, 240)
    failures = []
    for result in results:
        label = cases[result["case"]][0]
        last = (result["stderr"].strip().splitlines() or [""])[-1]
        if result["code"] not in (0, 2) or "Traceback" in result["stderr"]:
            failures.append(f"{label}: exit {result['code']}\n{result['stderr'][-1500:]}")
        elif result["code"] == 2 and not (last.startswith("wuerstchen") and ": error: " in last):
            failures.append(f"{label}: the last line is not one error: {last[:300]!r}")
        elif result["seconds"] >= 60:
            failures.append(f"{label}: {result['seconds']:.0f} s")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert {p.name for p in tmp_path.iterdir()} <= {*before, "out"}  # nothing written beside --output-dir
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert all(p.suffix == ".png" for p in written), written


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
