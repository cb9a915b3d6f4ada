"""What a user's terminal shows: Python and the qcore command line run in a child process that imports
``helpers`` from this tests folder, for the backends' tests of third-party import noise."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
CLI = "import sys; from qcore.cli import main; sys.exit(main())"


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python *args`` with ``helpers`` importable; stdout and stderr captured as text."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def lines_with(text: str, needles: Iterable[str]) -> list[str]:
    """The lines of ``text`` that contain any of ``needles``."""
    needles = tuple(needles)
    return [line for line in text.splitlines() if any(n in line for n in needles)]


def quantize_quiet_and_verbose(
    source: Path, out: Path, *options: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``qcore quantize`` of a TinyTransformer checkpoint, without and with ``-v``; both must succeed."""
    model = ["--model", "helpers.models:TinyTransformer", *options]
    quiet = run_python("-c", CLI, "quantize", str(source), str(out / "quiet"), *model)
    verbose = run_python("-c", CLI, "-v", "quantize", str(source), str(out / "verbose"), *model)
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    return quiet, verbose
