"""Every CLI command over a table of bad arguments and conditions (issue 11, item 5; issue 27, item 8): exit
code 2, one line `error: ...` naming the input and what to do, no traceback, no hang over 30 s; each case
fails before a model loads. Conditions: special files where outputs go (FIFO, socket, device, a folder where a
file goes), unknown URL schemes and missing database drivers, a tracking server that refuses or never answers,
deep and huge parameter values, damaged resume checkpoints, damaged reviewers files, and (where a tmpfs can be
mounted: root) a full disk under build-data, train, fit-backbone, generate and others.

The module prints how many cases ran and how many ended in a traceback (the closing note of issue 27)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app  # the console script's app: the library's commands plus demo, serve-flows

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


# Cases run and cases that ended in a traceback or ran over 30 s, printed when the module ends.
TALLY = {"cases": 0, "tracebacks": 0, "over_30s": 0}
NOT_SCRYPT = "reviewers:\n  bob: plain-text-password\n"
BAD_INT = "reviewers:\n  bob: scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA\n"
BAD_BASE64 = "reviewers:\n  bob: scrypt$16384$8$1$not*base64$AAAA\n"
# n = 2**30 asks scrypt for 128 GiB: hashlib refuses with a ValueError (memory limit exceeded).
HUGE_COST = "reviewers:\n  bob: scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44 + "\n"


@pytest.fixture(scope="module", autouse=True)
def _closing_note(request):
    yield
    note = (
        f"test_cli_fuzz: {TALLY['cases']} cases ran, {TALLY['tracebacks']} ended in a traceback, "
        f"{TALLY['over_30s']} ran over 30 s"
    )
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None:
        print(note)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(note)


def _listening_socket() -> socket.socket:
    """A TCP socket on loopback that accepts connections into its backlog and never answers: a server that
    hangs."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


def _closed_port() -> int:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: a connection is refused
    return port


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Named bad (and a few good) inputs; `{NAME}` in a case's arguments is replaced by the path (or value)."""
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
    # Special files where outputs go. The device is a private node of /dev/null's kind (root only): a test must
    # never point a command at /dev itself, since a regression would replace the machine's /dev/null.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(root / "socket"))
    try:
        os.mknod(root / "device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:
        pass  # not root: the cases naming {DEVICE} are skipped
    # Deep and huge parameter values.
    (root / "deep.yaml").write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "deep17.yaml").write_text("eval:\n  prompts: " + "[" * 17 + "]" * 17 + "\n")
    (root / "deep_map.yaml").write_text("train: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n")
    (root / "latin1.yaml").write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    # Reviewers files with damaged entries.
    for name, text in (
        ("rev_not_scrypt.yaml", NOT_SCRYPT),
        ("rev_bad_int.yaml", BAD_INT),
        ("rev_bad_base64.yaml", BAD_BASE64),
        ("rev_huge_cost.yaml", HUGE_COST),
    ):
        (root / name).write_text(text)
    (root / "rev_latin1.yaml").write_bytes("reviewers:\n  bob: caf\xe9\n".encode("latin-1"))
    # A small dataset version, and damaged resume checkpoints of the fitter and the trainer.
    from magicid.training.synthetic import write_synthetic_idzoom

    write_synthetic_idzoom(root / "dataset", n_images=2, crop_size=64, seed=0)
    # Fit checkpoints are safetensors + JSON (state.json names its tensor file).
    for name, payload in (("fit_garbage", b"garbage" * 10), ("fit_empty", b"")):
        (root / f"{name}.checkpoint").mkdir()
        (root / f"{name}.checkpoint" / "state.json").write_bytes(payload)
    (root / "fit_list.checkpoint").mkdir()
    # A state that names a torch pickle where the safetensors file goes.
    (root / "fit_list.checkpoint" / "state.json").write_text(
        '{"key": "k", "tensors": "tensors-1.safetensors"}'
    )
    torch.save([1, 2, 3], root / "fit_list.checkpoint" / "tensors-1.safetensors")
    for name in ("train_garbage", "train_fifo"):
        checkpoint = root / name / "checkpoints" / "checkpoint_1"
        checkpoint.mkdir(parents=True)
        for part in ("model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"):
            (checkpoint / part).write_bytes(b"\x00garbage")
    os.remove(root / "train_fifo" / "checkpoints" / "checkpoint_1" / "optimizer.bin")
    os.mkfifo(root / "train_fifo" / "checkpoints" / "checkpoint_1" / "optimizer.bin")
    names = {p.name.replace(".", "_").upper(): str(p) for p in root.iterdir()}
    names["ROOT"] = str(root)
    silent = _listening_socket()
    names["CLOSED_PORT"] = str(_closed_port())
    names["SILENT_PORT"] = str(silent.getsockname()[1])
    names["HUGE_VALUE"] = "x" * (2 << 20)
    names["LONG_NAME"] = "n" * 300
    yield names
    silent.close()
    listener.close()


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
# Issue 27, item 8: the conditions below. Tracking goes to the case's working folder (sqlite:///mlruns.db).
REVIEWER = ["review-add-reviewer", "alice", "--password", "long-enough"]
SPECIAL_FILES = [
    ["generate", "-p", "x", "--out", "{FIFO_PNG}"],
    ["restore", "{OK_PNG}", "--out", "{FIFO_PNG}"],
    ["build-data", "--input", "{EMPTY_DIR}", "--out", "{FIFO_PNG}"],
    ["build-data", "--input", "{EMPTY_DIR}", "--out", "{SOCKET}"],
    ["build-data", "--input", "{EMPTY_DIR}", "--out", "{DEVICE}"],
    ["build-data", "--input", "{FIFO_PNG}", "--out", "{ROOT}/out_fifo_input"],
    ["--set", "train.out_dir={DEVICE}", "train", "--data", "{DATASET}"],
    ["--set", "train.out_dir={FIFO_PNG}", "train", "--data", "{DATASET}"],
    ["--set", "train.out_dir={FILE_TXT}/run", "train", "--data", "{DATASET}"],
    ["train", "--data", "{FIFO_PNG}"],
    ["fit-backbone", "--data", "{DATASET}", "--out", "{DEVICE}"],
    ["fit-backbone", "--data", "{DATASET}", "--out", "{SOCKET}"],
    ["fit-backbone", "--data", "{DATASET}", "--out", "{FILE_TXT}"],
    ["fit-backbone", "--data", "{DEVICE}", "--out", "{ROOT}/fit_device_data"],
    ["validate", "{DATASET}", "--report-dir", "{DEVICE}"],
    ["validate", "{DEVICE}", "--report-dir", "{ROOT}/rep"],
    ["evaluate", "--out", "{FIFO_PNG}"],
    ["sample-data", "--out", "{DEVICE}"],
    ["demo", "--out-dir", "{SOCKET}"],
    ["forget", "--identity", "x", "--data", "{DEVICE}"],
    ["forget", "--identity", "x", "--data", "{FIFO_PNG}"],
    [*REVIEWER, "--reviewers", "{FIFO_PNG}"],
    [*REVIEWER, "--reviewers", "{DEVICE}"],
    [*REVIEWER, "--reviewers", "{FOLDER}"],
    ["--params", "{DEVICE}", "info"],
    ["--params", "{SOCKET}", "info"],
    ["--set", "tracking.uri=sqlite:///{FILE_TXT}/x.db", "promote"],
    ["--set", "tracking.uri=sqlite:///{DEVICE}", "register", "--adapter", "{FOLDER}"],
    ["--set", "review.db_url=sqlite:///{FOLDER}", "review-export"],
]
URL_SCHEMES = [
    ["--set", "tracking.uri=foo://x", "info"],
    ["--set", "tracking.uri=foo://x", "promote"],
    ["--set", "tracking.uri=http://", "promote"],
    ["--set", "tracking.uri=sqlite:mlruns.db", "train", "--data", "{DATASET}"],
    ["--set", "tracking.artifact_root=foo://bucket", "train", "--data", "{DATASET}"],
    ["--set", "review.db_url=bogus://", "review-export"],
    ["--set", "review.db_url=reviews.db", "review-export"],
    ["--set", "review.db_url=postgresql+nosuchdriver://u@127.0.0.1/db", "review-export"],
    ["--set", "review.db_url=postgresql://u@127.0.0.1:notaport/db", "review-export"],
    ["--set", "storage.root=gs://bucket", "info"],
    ["--set", "storage.s3_endpoint_url=localhost:9000", "info"],
]
# A driver that is not installed is one line; one that is installed meets a closed port: one line too.
DRIVERS = [
    ["--set", "review.db_url=postgresql://u@127.0.0.1:{CLOSED_PORT}/db", "review-export"],
    ["--set", "review.db_url=mysql://u@127.0.0.1:{CLOSED_PORT}/db", "review-export"],
    ["--set", "tracking.uri=postgresql://u@127.0.0.1:{CLOSED_PORT}/db", "promote"],
    ["--set", "tracking.uri=mysql+pymysql://u@127.0.0.1:{CLOSED_PORT}/db", "train", "--data", "{DATASET}"],
    ["--set", "tracking.uri=mssql://u@127.0.0.1:{CLOSED_PORT}/db", "evaluate"],
]
CLOSED = "tracking.uri=http://127.0.0.1:{CLOSED_PORT}"
SERVERS = [
    ["--set", CLOSED, "promote"],
    ["--set", CLOSED, "promote", "--rollback"],
    ["--set", CLOSED, "register", "--adapter", "{FOLDER}"],
    ["--set", CLOSED, "evaluate"],
    ["--set", CLOSED, "review-export"],
    ["--set", CLOSED, "train", "--data", "{DATASET}"],
    ["--set", CLOSED, "fit-backbone", "--data", "{DATASET}", "--out", "{ROOT}/fit_http"],
    ["--set", "tracking.uri=http://127.0.0.1:{SILENT_PORT}", "promote"],  # accepts, never answers: 5 s
]
DEEP_OR_HUGE = [
    ["--params", "{DEEP_YAML}", "info"],
    ["--params", "{DEEP17_YAML}", "info"],
    ["--params", "{DEEP_MAP_YAML}", "info"],
    ["--params", "{LATIN1_YAML}", "info"],
    ["--set", "eval.prompts=" + "[" * 5000 + "]" * 5000, "info"],
    ["--set", "eval.prompts=" + "[" * 17 + "]" * 17, "info"],
    ["--set", "train.mmf=" + "{a: " * 2000 + "1" + "}" * 2000, "info"],
    ["--set", "model.backbone={HUGE_VALUE}", "info"],
    ["--set", "nope={HUGE_VALUE}", "info"],
    ["--set", "{HUGE_VALUE}", "info"],
    ["--set", "model.backbone=" + "b" * 5000, "info"],
    ["--set", "model.backbone={LONG_NAME}", "info"],
    ["--set", "tracking.experiment=" + "e" * 600, "train", "--data", "{DATASET}"],
    ["generate", "-p", "x", "--out", "{ROOT}/{LONG_NAME}.png"],
    ["build-data", "--input", "{EMPTY_DIR}", "--out", "{ROOT}/{LONG_NAME}"],
]
DAMAGED_RESUME = [
    ["fit-backbone", "--data", "{DATASET}", "--out", "{ROOT}/fit_garbage", "--resume"],
    ["fit-backbone", "--data", "{DATASET}", "--out", "{ROOT}/fit_empty", "--resume"],
    ["fit-backbone", "--data", "{DATASET}", "--out", "{ROOT}/fit_list", "--resume"],
    ["--set", "train.out_dir={TRAIN_GARBAGE}", "train", "--data", "{DATASET}", "--resume"],
    ["--set", "train.out_dir={TRAIN_FIFO}", "train", "--data", "{DATASET}", "--resume"],
]
REVIEWERS_FILES = [
    [*REVIEWER, "--reviewers", "{REV_NOT_SCRYPT_YAML}"],
    [*REVIEWER, "--reviewers", "{REV_BAD_INT_YAML}"],
    [*REVIEWER, "--reviewers", "{REV_BAD_BASE64_YAML}"],
    [*REVIEWER, "--reviewers", "{REV_HUGE_COST_YAML}"],
    [*REVIEWER, "--reviewers", "{REV_LATIN1_YAML}"],
]
CONDITIONS = SPECIAL_FILES + URL_SCHEMES + DRIVERS + SERVERS + DEEP_OR_HUGE + DAMAGED_RESUME + REVIEWERS_FILES
CASES = GLOBAL + GENERATE + RESTORE + DATA + CONDITIONS


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


def _invoke(args: list[str], limit_s: int = 60):
    """Run the CLI in-process under an alarm; count the case and whether it ended in a traceback."""

    def alarm(signum, frame):
        raise TimeoutError(f"hung: {args}")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit_s)
    started = time.perf_counter()
    try:
        result = runner.invoke(app, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - started
    TALLY["cases"] += 1
    crashed = not (result.exception is None or isinstance(result.exception, SystemExit))
    TALLY["tracebacks"] += crashed or "Traceback" in result.output
    TALLY["over_30s"] += seconds > 30
    return result, seconds


def _assert_one_line_exit_2(result, seconds: float, limit_s: float = 30) -> str:
    output = result.output  # click >= 8.2: stdout and stderr interleaved
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert result.exit_code == 2, output
    reasons = _reason_lines(output)
    assert len(reasons) == 1, output
    assert len(reasons[0]) < 600, reasons[0]
    assert seconds < limit_s
    return reasons[0]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a)[:60])
def test_bad_arguments_fail_with_one_line_reason(args, files, monkeypatch):
    if any("{DEVICE}" in a for a in args) and "DEVICE" not in files:
        pytest.skip("making a device node needs root")
    # Fail before any model loads: a case that reached one would be a bug (and slow).
    import magicid.generate
    import magicid.models.backbone
    import magicid.training.trainer

    def no_model(*_, **__):
        raise AssertionError("a model was loaded before the arguments were checked")

    # Patched where it is bound: these modules import it by name, so a first import while it is patched would
    # keep the patch for the later tests that load a model (the disk-full cases).
    for module in (magicid.models.backbone, magicid.generate, magicid.training.trainer):
        monkeypatch.setattr(module, "load_backbone", no_model)
    monkeypatch.chdir(files["ROOT"])
    result, seconds = _invoke(_fill(args, files))
    _assert_one_line_exit_2(result, seconds)


def test_conditions_name_the_input(files, monkeypatch):
    """The line names what to fix: the special file, the key and URL, the checkpoint, the reviewer."""
    monkeypatch.chdir(files["ROOT"])
    expected = {
        ("build-data", "--input", "{EMPTY_DIR}", "--out", "{SOCKET}"): ["--out", files["SOCKET"], "socket"],
        ("--set", CLOSED, "promote"): ["tracking.uri", files["CLOSED_PORT"], "does not answer"],
        ("--set", "review.db_url=bogus://", "review-export"): ["review.db_url", "bogus"],
        ("--set", "tracking.uri=foo://x", "promote"): ["tracking.uri", "foo://"],
        ("--params", "{DEEP_YAML}", "info"): [files["DEEP_YAML"], "nest"],
        ("--set", "model.backbone={LONG_NAME}", "info"): ["nnnn", "ENAMETOOLONG", "shorten"],
        tuple(DAMAGED_RESUME[0]): ["fit_garbage.checkpoint", "damaged", "without --resume"],
        tuple(DAMAGED_RESUME[3]): ["checkpoint_1", "train_garbage"],
        tuple(REVIEWERS_FILES[1]): ["'bob'", "review-add-reviewer bob"],
    }
    for args, words in expected.items():
        result, seconds = _invoke(_fill(list(args), files))
        line = _assert_one_line_exit_2(result, seconds)
        for word in words:
            assert word in line, (word, line)


def test_server_that_never_answers_is_bounded(files, monkeypatch):
    monkeypatch.chdir(files["ROOT"])
    result, seconds = _invoke(
        _fill(["--set", "tracking.uri=http://127.0.0.1:{SILENT_PORT}", "promote"], files)
    )
    line = _assert_one_line_exit_2(result, seconds)
    assert "no answer within 5 s" in line and 4 < seconds < 15, (line, seconds)


def test_debug_shows_the_traceback(files, monkeypatch):
    """MAGICID_DEBUG=1 keeps the one line and exit code 2 and prints the traceback behind it."""
    monkeypatch.chdir(files["ROOT"])
    monkeypatch.setenv("MAGICID_DEBUG", "1")
    result, _ = _invoke(_fill(["--set", "model.backbone={LONG_NAME}", "info"], files))
    TALLY["tracebacks"] -= "Traceback" in result.output  # asked for: not a case that ended in a traceback
    assert result.exit_code == 2
    assert "Traceback" in result.output and "OSError" in result.output
    assert len(_reason_lines(result.output)) == 1


def test_error_line_for_each_kind_of_machine_or_store_error(tmp_path):
    """`environment_error_line` names the input for each kind it maps, and maps nothing else."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from magicid.cli import environment_error_line
    from magicid.config import load_params

    params = load_params(None, ["review.db_url=postgresql://u@db/reviews"])
    out = str(tmp_path / "run")
    invocation = ("review-export", [("--out", out, "folder")], params)
    enospc = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("file write failed")
    wrapped.__cause__ = OSError(errno.EACCES, "Permission denied", "/data/x.pt")
    driver = ModuleNotFoundError("No module named 'psycopg2'", name="psycopg2")
    refused = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
    cases = {
        enospc: [f"writing --out {out}", "ENOSPC", "free space"],
        OSError(errno.EACCES, "Permission denied", "/data/x"): ["/data/x", "EACCES", "permissions"],
        wrapped: ["/data/x.pt", "EACCES"],
        RuntimeError("Error while serializing: No space left on device (os error 28)"): ["--out", "ENOSPC"],
        driver: ["review.db_url=postgresql://u@db/reviews", "'psycopg2' is not installed"],
        refused: ["review.db_url=postgresql://u@db/reviews", "connection refused"],
        MlflowException("RESOURCE_DOES_NOT_EXIST"): ["tracking.uri=sqlite:///mlruns.db", "MLflow refused"],
    }
    for error, words in cases.items():
        line = environment_error_line(error, invocation)
        assert line is not None and all(word in line for word in words), (words, line)
    for bug in (ValueError("x"), KeyError("k"), ModuleNotFoundError("No module named 'foo'", name="foo")):
        assert environment_error_line(bug, invocation) is None
    assert environment_error_line(OSError(errno.ENOENT, "No such file", "/x"), invocation) is None


def test_a_bug_keeps_its_traceback(files, monkeypatch):
    """Errors that no input causes are not dressed up as one: a ValueError from inside a command propagates."""
    import magicid.info as info

    def broken(_params):
        raise ValueError("a bug")

    monkeypatch.setattr(info, "collect_info", broken)
    monkeypatch.chdir(files["ROOT"])
    result = runner.invoke(app, ["info"])
    assert isinstance(result.exception, ValueError) and result.exit_code == 1


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """An 8 MiB tmpfs: a real file system whose free space the disk-full cases set (`_leave_free`). Mounting
    needs root (CAP_SYS_ADMIN); elsewhere the disk-full cases are skipped."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount command here: the disk-full cases need a tmpfs mount")
    mount_point = tmp_path_factory.mktemp("small_disk")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()[:80]}): the disk-full cases need root"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _leave_free(mount_point: Path, free: int) -> Path:
    """Empty the tmpfs, then fill it with zeros until `free` bytes are left (0: until a write fails ENOSPC)."""
    import gc

    from magicid.utils import free_bytes

    # A failed torch.save keeps its deleted temporary file open until the writer is collected: the space comes
    # back only then.
    gc.collect()
    for child in mount_point.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    with open(mount_point / ".filler", "wb") as filler:
        try:
            while (left := free_bytes(mount_point) - free) > 0:
                filler.write(b"\0" * min(left, 1 << 16))
                filler.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    assert free_bytes(mount_point) <= max(free, 4096)
    return mount_point


TINY_TRAIN = ["--set", "model.resolution=64", "--set", "model.id_crop_size=32", "--set", "train.batch_size=2",
              "--set", "train.checkpoint_every=1"]  # fmt: skip
TINY_FIT = ["--set", "fit.resolution=64", "--set", "fit.vae_resolution=64", "--set", "fit.vae_steps=2",
            "--set", "fit.unet_steps=2", "--set", "fit.vae_batch=2", "--set", "fit.unet_batch=2",
            "--set", "fit.warmup_steps=1"]  # fmt: skip
TRAIN_ON = [*TINY_TRAIN, "train", "--data", "{DATASET}", "--steps", "1", "--no-register", "--no-progress"]
# A full disk (no byte free) under what each command writes: it stops before its work.
FULL_DISK = [
    ["build-data", "--input", "{RAW}", "--out", "{DISK}/dataset"],
    ["--set", "train.out_dir={DISK}/run", *TRAIN_ON],
    ["--set", "tracking.uri=sqlite:///{DISK}/mlruns.db", "--set", "train.out_dir={ROOT}/run_db", *TRAIN_ON],
    ["--set", "tracking.artifact_root={DISK}/artifacts", "--set", "train.out_dir={ROOT}/run_art", *TRAIN_ON],
    [*TINY_FIT, "fit-backbone", "--data", "{DATASET}", "--out", "{DISK}/fit"],
    ["generate", "-p", "x", "--out", "{DISK}/g.png"],
    ["restore", "{OK_PNG}", "--out", "{DISK}/r.png"],
    ["validate", "{DATASET}", "--report-dir", "{DISK}/report"],
    ["evaluate", "--out", "{DISK}/eval"],
    ["sample-data", "--out", "{DISK}/raw"],
    ["demo", "--out-dir", "{DISK}/demo"],
    [*REVIEWER, "--reviewers", "{DISK}/reviewers.yaml"],
]
GENERATE_BIG = ["generate", "-p", "x", "--out", "{DISK}/g.png"]
# A disk with a little space left (1.25 MiB): the command starts, and its first large write fails.
NEARLY_FULL_DISK = [
    ["build-data", "--input", "{RAW}", "--out", "{DISK}/dataset", "--no-progress"],
    ["--set", "train.out_dir={DISK}/run", *TRAIN_ON],
    [*TINY_FIT, "fit-backbone", "--data", "{DATASET}", "--out", "{DISK}/fit", "--no-progress"],
    # 768 px: a PNG of about 1.4 MB, larger than the space left
    ["--set", "model.resolution=768", "--set", "model.num_inference_steps=1", *GENERATE_BIG],
]


@pytest.fixture(scope="module")
def big_raw(tmp_path_factory) -> Path:
    """A raw folder holding one 1536 px photo (2.2 MB as PNG: more than the nearly full disk has left)."""
    from skimage import data

    raw = tmp_path_factory.mktemp("big_raw")
    Image.fromarray(data.astronaut()).resize((1536, 1536)).save(raw / "astronaut.png")
    return raw


@pytest.mark.parametrize("args", FULL_DISK, ids=lambda a: " ".join(a)[:60])
def test_full_disk_stops_before_the_work(args, files, small_disk, big_raw, monkeypatch):
    monkeypatch.chdir(files["ROOT"])
    disk = _leave_free(small_disk, 0)
    result, seconds = _invoke(_fill(args, dict(files, DISK=str(disk), RAW=str(big_raw))))
    line = _assert_one_line_exit_2(result, seconds, limit_s=30)
    assert str(disk) in line and "the disk holding it is full" in line and "free space" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("args", NEARLY_FULL_DISK, ids=lambda a: " ".join(a)[:60])
def test_disk_that_fills_during_the_run(args, files, small_disk, big_raw, monkeypatch):
    """The disk fills at a write inside the run (PIL, pyarrow, torch, safetensors): one line naming the disk's
    file or folder and saying to free space, exit code 2."""
    monkeypatch.chdir(files["ROOT"])
    disk = _leave_free(small_disk, 1_310_720)
    result, seconds = _invoke(_fill(args, dict(files, DISK=str(disk), RAW=str(big_raw))), limit_s=240)
    line = _assert_one_line_exit_2(result, seconds, limit_s=240)
    assert str(disk) in line and "No space left on device" in line and "free space" in line, line
