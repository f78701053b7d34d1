"""The `wuerstchen` command as a user runs it (subprocesses): every command's --help, `generate`
writing PNGs that `--from-png` remakes pixel for pixel, and user mistakes as one line + exit 2.

    pytest tests/test_cli.py
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wuerstchen.cli import build_parser


def wuerstchen(*args: str | Path) -> subprocess.Popen:
    """Start `python -m wuerstchen ARGS`; several run at once (each pays ~3 s of imports)."""
    cmd = [sys.executable, "-m", "wuerstchen", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def test_help_of_every_command() -> None:
    names = commands()
    assert {"generate", "serve"} <= set(names)
    procs = {name: wuerstchen(*name.split(), "--help") for name in ["", *names]}
    for name, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 0, f"wuerstchen {name} --help: {err}"
        assert out.startswith("usage: wuerstchen") and not err, (name, err)


def test_generate_and_from_png_make_the_same_image(tiny_folder: Path, tmp_path: Path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    fast = ["--prior-steps", "2", "--decoder-steps", "2", "--quiet", "--model", str(tiny_folder)]
    argv = ["generate", "a red circle", "-n", "2", "--seed", "7", "--output-dir", str(first), *fast]
    code, out, err = finish(wuerstchen(*argv))
    assert code == 0, err
    paths = [Path(line) for line in out.splitlines()]
    assert [p.name for p in paths] == ["00000-7.png", "00001-8.png"] and all(p.exists() for p in paths)
    with Image.open(paths[1]) as im:
        params = json.loads(im.text["wuerstchen"])
        original = np.asarray(im.convert("RGB"))
    assert params["seed"] == 8 and params["prompt"] == "a red circle" and im.size == (128, 128)

    code, out, err = finish(wuerstchen("generate", "--from-png", paths[1], "--output-dir", again, "--quiet"))
    assert code == 2 and "pass --model" in err  # the PNG names its model, but never picks what to load
    code, out, err = finish(
        wuerstchen("generate", "--from-png", paths[1], "--output-dir", again, "--quiet", "--model", str(tiny_folder))
    )
    assert code == 0, err
    with Image.open(out.strip()) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), original)
        assert json.loads(im.text["wuerstchen"]) == params


def test_a_second_run_keeps_the_first_runs_images(tiny_folder: Path, tmp_path: Path) -> None:
    # The same command twice into one folder: numbering continues after the highest file number
    # (as AUTOMATIC1111's does), so the first run's PNGs stay byte for byte.
    argv = ["generate", "a red circle", "-n", "2", "--seed", "1", "--output-dir", str(tmp_path), "--quiet",
            "--prior-steps", "2", "--decoder-steps", "2", "--model", str(tiny_folder)]  # fmt: skip
    code, out, err = finish(wuerstchen(*argv))
    assert code == 0, err
    first = {p: p.read_bytes() for p in map(Path, out.splitlines())}
    code, out, err = finish(wuerstchen(*argv))
    assert code == 0, err
    assert [Path(p).name for p in out.splitlines()] == ["00002-1.png", "00003-2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-1.png", "00001-2.png", "00002-1.png", "00003-2.png"]
    assert all(p.read_bytes() == data for p, data in first.items())
    # A pattern without {index} would replace a file: refused before the model loads.
    code, _, err = finish(wuerstchen(*argv, "--pattern", "{seed}.png"))
    assert code == 0, err
    code, _, err = finish(wuerstchen(*argv, "--pattern", "{seed}.png"))
    assert code == 2 and "1.png exists: put {index} in --pattern" in err, err


def test_user_mistakes_are_one_line_and_exit_2(tiny_folder: Path, tmp_path: Path) -> None:
    mistakes = {
        "missing model": ("generate", "a cat", "--model", tmp_path / "no-such-model"),
        "height too small": ("generate", "a cat", "--model", tiny_folder, "--height", "64", "--quiet"),
        "no images": ("generate", "a cat", "-n", "0", "--model", tiny_folder),
        "size off the step": ("generate", "a cat", "--model", tiny_folder, "--width", "200", "--quiet"),
        "float16": ("generate", "a cat", "--model", tiny_folder, "--dtype", "float16"),
        "bad pattern": ("generate", "a cat", "--model", tiny_folder, "--pattern", "{nope}.png"),
        "resume without a run": ("train", "c", "--resume", "--output-dir", tmp_path / "no-run"),
        "guidance not a number": ("generate", "a cat", "--model", tiny_folder, "--prior-guidance", "nan"),
        "huge size": ("generate", "a cat", "--model", tiny_folder, "--height", "100000", "--width", "100000"),
        "bogus device": ("generate", "a cat", "--model", tiny_folder, "--device", "bogus"),
    }
    with socket.socket() as busy:  # `serve` binds before it loads the model, so a busy port fails at once
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        mistakes["busy port"] = ("serve", "--model", tiny_folder, "--port", str(busy.getsockname()[1]))
        procs = {name: wuerstchen(*args) for name, args in mistakes.items()}  # all at once: ~3 s of imports each
        results = {name: finish(proc) for name, proc in procs.items()}
    for name, (code, _, err) in results.items():
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, f"{name}: exit {code}, stderr:\n{err}"
        assert lines[0].startswith(f"wuerstchen {mistakes[name][0]}: error: "), lines[0]
    assert "no-such-model" in results["missing model"][2]
    assert "at least 128 px" in results["height too small"][2]
    assert "not a multiple of 128 px: use 128 or 256" in results["size off the step"][2]
    assert "float16 overflows" in results["float16"][2]
    assert "{index}, {seed}, {prompt}" in results["bad pattern"][2]
    assert "no run folder at" in results["resume without a run"][2]
    assert "cannot listen on 127.0.0.1" in results["busy port"][2]


@pytest.mark.parametrize("argv", [["serve", "--max-side", "512"], ["serve", "--host", "0.0.0.0", "--port", "8000"]])
def test_serve_parses_its_options(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.run.__module__ == "wuerstchen.commands.serve" and args.max_images == 8 and args.offload == "none"


def test_a_missing_gpu_is_one_line_before_loading() -> None:
    import torch

    from wuerstchen.commands.common import check_device
    from wuerstchen.errors import UserError

    assert check_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            check_device("cuda")
    with pytest.raises(UserError, match="not a device name"):
        check_device("gpu7")


def test_only_user_mistakes_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # A check's UserError is one line and exit 2; anything else (a bug, a library's own ValueError)
    # keeps its traceback, so it is never mistaken for a typo.
    from wuerstchen import cli
    from wuerstchen.commands import generate
    from wuerstchen.errors import UserError

    def mistake(_args: argparse.Namespace) -> int:
        raise UserError("--width 100 is not a multiple of 16 px")

    monkeypatch.setattr(generate, "run", mistake)
    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "a cat"])
    assert done.value.code == 2
    assert capsys.readouterr().err == "wuerstchen generate: error: --width 100 is not a multiple of 16 px\n"
    for bug in (KeyError("prior"), ValueError("not enough values to unpack"), TypeError("NoneType")):

        def broken(_args: argparse.Namespace, bug: Exception = bug) -> int:
            raise bug

        monkeypatch.setattr(generate, "run", broken)
        with pytest.raises(type(bug)):
            cli.main(["generate", "a cat"])


@pytest.mark.parametrize(
    "chunk, words",
    [
        ("[]", "JSON object"),
        ("null", "JSON object"),
        ('{"prompt": "a", "seed": 1, "prior_guidance": 4, "decoder_guidance": 0, "sampler": "ddpm", '
         '"prior_steps": 1e9}', "prior_steps must be an integer"),
        ('{"prompt": "a", "seed": 1, "prior_guidance": 4, "decoder_guidance": 0, "sampler": "ddpm", '
         '"height": 100000}', "height must be an integer from 1 to 8192"),
        ('{"prompt": "a", "seed": 1, "prior_guidance": 4, "decoder_guidance": 0, "sampler": "ddpm", '
         '"model": "someone/else"}', "pass --model"),
    ],
)
def test_a_crafted_png_is_a_one_line_error(tmp_path: Path, chunk: str, words: str) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("wuerstchen", chunk)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", pnginfo=info)
    code, _out, err = finish(wuerstchen("generate", "--from-png", tmp_path / "x.png", "--output-dir", tmp_path / "o"))
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_image_to_image_inpainting_and_variations_from_the_command_line(tmp_path: Path) -> None:
    """With the shipped model (it has a semantic compressor): each mode writes its PNG, the PNG
    records the source's hash, and --from-png remakes it only when given the same source again."""
    from PIL import ImageDraw

    source, mask, small = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "small.png"
    Image.new("RGB", (128, 128), (128, 128, 128)).save(source)
    painted = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(painted).rectangle([9, 37, 63, 91], fill=255)
    painted.save(mask)
    Image.new("L", (64, 64)).save(small)
    out, fast = tmp_path / "out", ["--prior-steps", "3", "--decoder-steps", "2", "--quiet", "--seed", "3"]
    runs = {
        "img2img": wuerstchen("generate", "a blue circle", "--image", source, "--strength", "0.7", "--output-dir",
                              out / "a", *fast),
        "inpaint": wuerstchen("generate", "a red star", "--image", source, "--mask", mask, "--output-dir", out / "b",
                              *fast),
        "variations": wuerstchen("generate", "--variations", source, "-n", "2", "--output-dir", out / "c", *fast),
        "mask size": wuerstchen("generate", "a", "--image", source, "--mask", small, "--output-dir", out / "d"),
        "mask alone": wuerstchen("generate", "a", "--mask", small, "--output-dir", out / "e"),
    }  # fmt: skip
    results = {name: finish(proc) for name, proc in runs.items()}
    for name in ("img2img", "inpaint", "variations"):
        assert results[name][0] == 0, results[name][2]
    assert len(results["variations"][1].split()) == 2
    assert results["mask size"][0] == 2 and "give a mask of the image's size" in results["mask size"][2]
    assert results["mask alone"][0] == 2 and "--mask needs --image" in results["mask alone"][2]
    made = Path(results["inpaint"][1].strip())
    with Image.open(made) as im:
        params, pixels = json.loads(im.text["wuerstchen"]), np.asarray(im.convert("RGB"))
        assert "Init image hash" in im.text["parameters"]
    assert params["image"] and params["mask"] and params["strength"] is None
    outside = np.asarray(painted) == 0
    assert (pixels[outside] == 128).all()  # the grey source, untouched outside the mask

    again = ["generate", "--from-png", made, "--output-dir", out / "again", "--quiet"]
    code, _, err = finish(wuerstchen(*again, "--image", source))
    assert code == 2 and "pass it again with --mask" in err
    code, _, err = finish(wuerstchen(*again, "--image", small, "--mask", mask))
    assert code == 2 and "is not the image" in err
    code, path, err = finish(wuerstchen(*again, "--image", source, "--mask", mask))
    assert code == 0, err
    with Image.open(path.strip()) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), pixels)


def test_a_size_that_cannot_fit_is_refused_before_sampling(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wuerstchen.hardware
    from wuerstchen import WuerstchenPipeline
    from wuerstchen.commands.generate import VQGAN_BYTES_PER_PIXEL_CHANNEL, _check_memory
    from wuerstchen.errors import UserError

    pipe = WuerstchenPipeline.from_pretrained(tiny_folder)
    weights = sum(p.numel() * p.element_size() for m in pipe.modules().values() for p in m.parameters())
    per_pixel = VQGAN_BYTES_PER_PIXEL_CHANNEL * pipe.vqgan.config.embed_dim  # float32 weights: 4-byte elements
    # A machine with room for the weights and a 256×256 image's VQGAN activations, not a 512×256 one's.
    monkeypatch.setattr(wuerstchen.hardware, "total_memory", lambda device: weights + per_pixel * 256 * 256)
    _check_memory(pipe, 256, 256)
    with pytest.raises(UserError, match=r"^256×512 px needs at least .* GiB on cpu .* ask for a smaller size$"):
        _check_memory(pipe, 512, 256)
    monkeypatch.setattr(wuerstchen.hardware, "total_memory", lambda device: None)  # unknown: no refusal
    _check_memory(pipe, 8192, 8192)
