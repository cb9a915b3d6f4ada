"""Every code block in docs/*.md and docs/backends/*.md runs.

- ```python blocks run in order, per file, in one namespace, in a fresh temporary working directory.
- ```console blocks: each line starting with ``$ `` is run by the shell in that same directory (after
  the python blocks before it); it must exit 0, or the status named by a trailing ``# exit N``. The
  other lines show sample output and are not compared.
- ```toml blocks must parse.
- A block with ``<!-- file: NAME -->`` on the line before it is written to NAME in that directory
  instead (a module later blocks import, a test file a console block runs).
- A block is skipped only with ``<!-- skip: reason -->`` on the line before it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import qcore

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(\S.*?)\s*-->\s*$")
FILE = re.compile(r"^<!--\s*file:\s*(\S+)\s*-->\s*$")


@dataclass
class Block:
    lang: str
    code: str
    line: int
    skip: str | None
    file: str | None = None


def blocks(path: Path) -> list[Block]:
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match and match.group(1):
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            skip = SKIP.match(lines[start - 1]) if start else None
            file = FILE.match(lines[start - 1]) if start else None
            found.append(
                Block(
                    match.group(1), "\n".join(body) + "\n", start + 1,
                    skip.group(1) if skip else None, file.group(1) if file else None,
                )
            )
        i += 1
    return found


def doc_files() -> list[Path]:
    return sorted([*DOCS.glob("*.md"), *DOCS.glob("backends/*.md")])


@pytest.fixture
def registry_snapshot(tmp_path: Path) -> Iterator[None]:
    """Docs may register backends in-process; each file starts and ends with none of them."""
    before = {info.quant_method for info in qcore.available_backends() if info.distribution is None}
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:  # modules a doc wrote: the next file may reuse the name
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]
    for info in qcore.available_backends():
        if info.distribution is None and info.quant_method not in before:
            qcore.unregister_backend(info.quant_method)


def run_console(block: Block, path: Path, cwd: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("QCORE_PLUGINS", None)
    env.pop("QCORE_DISABLE_PLUGIN_AUTOLOAD", None)
    for offset, line in enumerate(block.code.splitlines()):
        if not line.startswith("$ "):
            continue
        command, _, expected = line[2:].partition("# exit ")
        result = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        want = int(expected) if expected.strip() else 0
        assert result.returncode == want, (
            f"{path.name}:{block.line + offset + 1}: `{command.strip()}` exited {result.returncode}, "
            f"expected {want}\n{result.stdout}\n{result.stderr}"
        )


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_code_blocks_run(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry_snapshot: None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # modules a doc writes are importable, as in a script
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    for block in blocks(path):
        if block.skip:
            continue
        if block.file:
            (tmp_path / block.file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / block.file).write_text(block.code, encoding="utf-8")
        elif block.lang == "python":
            code = compile(block.code, f"{path}:{block.line}", "exec")
            exec(code, namespace)  # noqa: S102 - running the docs is the point
        elif block.lang == "console":
            run_console(block, path, tmp_path)
        elif block.lang == "toml" and sys.version_info >= (3, 11):
            import tomllib

            tomllib.loads(block.code)


def test_docs_exist_and_skips_are_rare() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"user-guide.md", "backend-authors.md", "hooks.md", "cli.md"} <= names
    all_blocks = [b for p in doc_files() for b in blocks(p) if b.lang in ("python", "console")]
    skipped = [b for b in all_blocks if b.skip]
    assert all_blocks and len(skipped) <= max(2, len(all_blocks) // 5), [b.skip for b in skipped]
