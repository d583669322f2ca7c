"""Every CLI command over a table of bad arguments (issue 11, item 5): a non-zero exit, a one-line reason, no
traceback, and no hang, and each fails before a model loads (each case runs in well under a second or two)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from magicid.cli import app

runner = CliRunner()
BOMB = "".join(
    [
        'seed: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
        *(f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi", strict=True)),
    ]
)


def _png_header(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Named bad (and a few good) inputs; `{NAME}` in a case's arguments is replaced by the path."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "folder").mkdir()
    (root / "empty_dir").mkdir()
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not an image\n")
    (root / "huge.png").write_bytes(_png_header(40_000, 40_000))
    (root / "wide.png").write_bytes(_png_header(33_000, 16))
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 8)
    (root / "bomb.yaml").write_text(BOMB)
    (root / "dup.yaml").write_text("seed: 1\nseed: 2\n")
    (root / "file.txt").write_text("a file where a folder is expected\n")
    (root / "bad.parquet").write_bytes(b"PAR1 not really")
    os.mkfifo(root / "fifo.png")
    Image.new("RGB", (64, 64), (100, 120, 140)).save(root / "ok.png")
    dataset = root / "broken_dataset"
    dataset.mkdir()
    shutil.copyfile(root / "bad.parquet", dataset / "images.parquet")
    names = {p.name.replace(".", "_").upper(): str(p) for p in root.iterdir()}
    names["ROOT"] = str(root)
    return names


GLOBAL = [
    ["--params", "{MISSING}", "info"],
    ["--params", "{FOLDER}", "info"],
    ["--params", "{FIFO_PNG}", "info"],
    ["--params", "{BINARY_YAML}", "info"],
    ["--params", "{BOMB_YAML}", "info"],
    ["--params", "{DUP_YAML}", "info"],
    ["--set", "model.resolution", "info"],
    ["--set", "model.resolution=[1,", "info"],
    ["--set", "nope.key=1", "info"],
    ["--set", "train.steps=true", "info"],
    ["--set", "model.guidance_scale=.inf", "info"],
    ["--set", "seed=99999999999999999999", "info"],
    ["--set", "data.split.train=2", "info"],
    ["--set", "faces.tiles=[0,0]", "info"],
]
GENERATE = [
    ["generate", "-p", "x", "--out", "{FOLDER}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.jpg"],
    ["generate", "-p", "x", "--out", "{FILE_TXT}/a.png"],
    ["generate", "-p", "x", "--seed", "-1"],
    ["generate", "-p", "x", "--seed", "18446744073709551617"],
    ["generate", "-p", "x", "--seed", "abc"],
    ["generate", "--out", "{ROOT}/a.png"],  # missing --prompt
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--ref", "{MISSING}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--ref", "{FOLDER}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--ref", "{TEXT_PNG}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--ref", "{ZERO_PNG}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--ref", "{HUGE_PNG}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--ref", "{WIDE_PNG}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--ref", "{FIFO_PNG}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--skeleton", "{HUGE_PNG}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--skeleton", "{TEXT_PNG}"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--boxes", "1,2,3"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--boxes", "a,b,c,d"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--boxes", "nan,0,10,10"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--boxes", "0,0,99999,10"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--boxes", "20,20,10,10"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--boxes", ";;"],
    ["generate", "-p", "x", "--out", "{ROOT}/a.png", "--boxes", "0,0,10,10;20,20,40,40", "--ref", "{OK_PNG}"],
    [
        "generate",
        "-p",
        "x",
        "--out",
        "{ROOT}/a.png",
        "--ref",
        "{OK_PNG}",
        "--ref",
        "{OK_PNG}",
        "--boxes",
        "0,0,9,9",
    ],
]
RESTORE = [
    ["restore", "{MISSING}", "--out", "{ROOT}/r.png"],
    ["restore", "{FOLDER}", "--out", "{ROOT}/r.png"],
    ["restore", "{TEXT_PNG}", "--out", "{ROOT}/r.png"],
    ["restore", "{ZERO_PNG}", "--out", "{ROOT}/r.png"],
    ["restore", "{HUGE_PNG}", "--out", "{ROOT}/r.png"],
    ["restore", "{WIDE_PNG}", "--out", "{ROOT}/r.png"],
    ["restore", "{FIFO_PNG}", "--out", "{ROOT}/r.png"],
    ["restore", "{OK_PNG}", "--out", "{FOLDER}"],
    ["restore", "{OK_PNG}", "--out", "{ROOT}/r.webp"],
    ["restore", "{OK_PNG}", "--out", "{ROOT}/r.png", "--faces", "most"],
    ["restore", "{OK_PNG}", "--out", "{ROOT}/r.png", "--ref", "{TEXT_PNG}"],
    ["restore", "{OK_PNG}", "--out", "{ROOT}/r.png", "--ref", "{MISSING}"],
    ["restore"],  # missing image
]
DATA = [
    ["build-data", "--input", "{MISSING}", "--out", "{ROOT}/out"],
    ["build-data", "--input", "{FILE_TXT}", "--out", "{ROOT}/out"],
    ["build-data", "--input", "{EMPTY_DIR}", "--out", "{ROOT}/out"],
    ["build-data", "--input", "{ROOT}", "--out", "{ROOT}/out"],  # output inside input
    ["build-data", "--input", "{EMPTY_DIR}", "--out", "{FILE_TXT}"],
    ["validate", "{MISSING}", "--report-dir", "{ROOT}/rep"],
    ["validate", "{FILE_TXT}", "--report-dir", "{ROOT}/rep"],
    ["validate", "{EMPTY_DIR}", "--report-dir", "{ROOT}/rep"],
    ["validate", "{BROKEN_DATASET}", "--report-dir", "{ROOT}/rep"],
    ["sample-data", "--out", "{FILE_TXT}"],
    ["train", "--data", "{MISSING}"],
    ["train", "--data", "{FILE_TXT}"],
    ["train", "--data", "{BROKEN_DATASET}"],
    ["train", "--data", "{EMPTY_DIR}", "--steps", "0"],
    ["train", "--data", "{EMPTY_DIR}", "--steps", "many"],
    ["demo", "--out-dir", "{FILE_TXT}"],
    ["nosuchcommand"],
]
CASES = GLOBAL + GENERATE + RESTORE + DATA


def _fill(args: list[str], files: dict[str, str]) -> list[str]:
    names = dict(files, MISSING=str(Path(files["ROOT"]) / "missing.png"))
    return [re.sub(r"\{(\w+)\}", lambda m: names[m.group(1)], a) for a in args]


def _reason_lines(output: str) -> list[str]:
    """The lines that state why the command failed: ours (`error: ...`) or click's usage errors."""
    ours = [line for line in output.splitlines() if line.startswith("error: ")]
    if ours:
        return ours
    usage = re.compile(r"(Invalid value|Missing (argument|option)|No such (option|command)|Got unexpected)")
    return [line for line in output.splitlines() if usage.search(line)]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a)[:60])
def test_bad_arguments_fail_with_one_line_reason(args, files, monkeypatch):
    # Fail before any model loads: a case that reached one would be a bug (and slow).
    import magicid.models.backbone as backbone

    def no_model(*_, **__):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(backbone, "load_backbone", no_model)
    monkeypatch.chdir(files["ROOT"])

    def alarm(signum, frame):
        raise TimeoutError(f"hung: {args}")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    started = time.perf_counter()
    try:
        result = runner.invoke(app, _fill(args, files))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    output = result.output  # click >= 8.2: stdout and stderr interleaved
    assert result.exit_code != 0, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    reasons = _reason_lines(output)
    assert len(reasons) == 1, output
    assert len(reasons[0]) < 600, reasons[0]
    assert time.perf_counter() - started < 30
