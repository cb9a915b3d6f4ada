"""What a user's terminal shows: Python and the qcore command line run in a child process that imports
``helpers`` from this tests folder, for the backends' tests of third-party import noise."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
CLI = "import sys; from qcore.cli import main; sys.exit(main())"
CLI_WITH_INT8_TEST = (
    "import sys, qcore; from helpers.int8_backend import BACKEND; qcore.register_backend(BACKEND); "
    "from qcore.cli import main; sys.exit(main())"
)


def _environ() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python *args`` with ``helpers`` importable; stdout and stderr captured as text."""
    (result,) = run_python_together(args)
    return result


def run_python_together(*commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Each of ``commands`` as ``python *command`` (as :func:`run_python`), all started at once: a child
    spends most of its time importing torch, on a core of its own where there is one."""
    children = [
        subprocess.Popen(
            [sys.executable, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environ(),
        )
        for command in commands
    ]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr))
    return results


def lines_with(text: str, needles: Iterable[str]) -> list[str]:
    """The lines of ``text`` that contain any of ``needles``."""
    needles = tuple(needles)
    return [line for line in text.splitlines() if any(n in line for n in needles)]


def quantize_quiet_and_verbose(
    source: Path,
    out: Path,
    *options: str,
    model: str | None = "helpers.models:TinyTransformer",
    cli: str = CLI,
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``qcore quantize`` of ``source``, without and with ``-v``; both must succeed.

    ``model`` is the ``--model`` class (None: the diffusers class config.json names); ``cli`` the
    program that runs the command (:data:`CLI_WITH_INT8_TEST` adds the in-test ``int8-test`` backend).
    """
    options = ("--model", model, *options) if model else options
    quiet, verbose = run_python_together(
        ["-c", cli, "quantize", str(source), str(out / "quiet"), *options],
        ["-c", cli, "-v", "quantize", str(source), str(out / "verbose"), *options],
    )
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr + verbose.stderr
    return quiet, verbose
