"""Native stderr filter: MediaPipe/TF Lite INFO/WARNING chatter dropped, errors and Python output kept."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from magicid.native_logs import is_native_noise

ROOT = Path(__file__).resolve().parents[1]
FEEDBACK = (
    b"W0000 00:00:1796226248.153262   11508 inference_feedback_manager.cc:114] Feedback manager requires a model "
    b"with a single signature inference. Disabling support for feedback tensors."
)


def test_known_noise_shapes_only():
    assert is_native_noise(FEEDBACK)
    assert is_native_noise(
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
    )
    assert is_native_noise(b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
    assert not is_native_noise(b"E0000 00:00:1796226248.153262   11508 calculator_graph.cc:887] graph failed")
    assert not is_native_noise(b"F0000 00:00:1796226248.153262   11508 x.cc:1] check failed")
    assert not is_native_noise(b"Traceback (most recent call last):")


def test_filter_drops_noise_at_fd_2_and_keeps_errors_and_python_stderr():
    script = textwrap.dedent(
        f"""
        import os, sys
        from magicid.native_logs import filter_native_stderr
        with filter_native_stderr() as counts:
            os.write(2, {FEEDBACK!r} + b"\\n")
            os.write(2, b"E0000 00:00:1.0   1 graph.cc:1] real native error\\n")
            print("python warning", file=sys.stderr)
        print(counts, file=sys.stderr)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Feedback manager" not in done.stderr
    assert "real native error" in done.stderr and "python warning" in done.stderr
    assert "'dropped': 1, 'forwarded': 1" in done.stderr
