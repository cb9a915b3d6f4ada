"""Every code block in docs/*.md and docs/backends/*.md runs, and the output the docs show is the real one.

- ```python blocks run in order, per file, in one namespace, in a fresh temporary working directory.
- ```console blocks: each line starting with ``$ `` is run by the shell in that same directory (after
  the python blocks before it); it must exit 0, or the status named by a trailing ``# exit N``. The lines
  after a command, up to the next command, are its expected output: compared with what it printed on
  stdout, or, for a command expected to fail, with qcore's own lines on stderr (those starting with
  ``qcore:``; a library's import chatter is not qcore's). A command with no lines after it is run only.
- An ```output block right after a ```python block is that block's expected stdout.
- Expected and real output are compared line by line after normalising: runs of spaces count as one
  (column widths follow the longest entry), trailing blank lines are dropped, and the working directory
  reads as ``.``. A line ``...`` stands for any number of lines; a line ending in `` ...`` for any line
  starting with the text before it.
- ```toml blocks must parse.
- A block with ``<!-- file: NAME -->`` on the line before it is written to NAME in that directory
  instead (a module later blocks import, a test file a console block runs).
- A block is skipped only with ``<!-- skip: reason -->`` on the line before it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import qcore

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
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
                    match.group(1),
                    "\n".join(body) + "\n",
                    start + 1,
                    skip.group(1) if skip else None,
                    file.group(1) if file else None,
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


def normalise(text: str, cwd: Path) -> list[str]:
    for directory in {str(cwd.resolve()), str(cwd)}:
        text = text.replace(directory + os.sep, "").replace(directory, ".")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def matches(expected: Sequence[str], actual: Sequence[str]) -> bool:
    """Line by line; ``...`` is any number of lines, ``text ...`` any line starting with text."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head == "...":
        return any(matches(rest, actual[i:]) for i in range(len(actual) + 1))
    if not actual:
        return False
    line = actual[0]
    same = line.startswith(head[:-4]) if head.endswith(" ...") else line == head
    return same and matches(rest, actual[1:])


def assert_output(shown: list[str], real: str, cwd: Path, where: str) -> None:
    expected, actual = normalise("\n".join(shown), cwd), normalise(real, cwd)
    assert matches(expected, actual), (
        f"{where}: the output shown in the docs is not the real one; update the docs.\n"
        + "--- shown ---\n"
        + "\n".join(expected)
        + "\n--- real ---\n"
        + "\n".join(actual)
    )


def commands(block: Block) -> Iterator[tuple[int, str, list[str]]]:
    """(line offset, command, the output lines shown after it) for each ``$ `` line of a console block."""
    current: tuple[int, str, list[str]] | None = None
    for offset, line in enumerate(block.code.splitlines()):
        if line.startswith("$ "):
            if current:
                yield current
            current = (offset, line[2:], [])
        elif current:
            current[2].append(line)
    if current:
        yield current


def run_console(block: Block, path: Path, cwd: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("QCORE_PLUGINS", None)
    env.pop("QCORE_DISABLE_PLUGIN_AUTOLOAD", None)
    env["COLUMNS"] = "80"  # argparse wraps help to the terminal: the width of a pipe, whatever runs the tests
    for offset, line, shown in commands(block):
        command, _, expected = line.partition("# exit ")
        result = subprocess.run(
            command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )
        want = int(expected) if expected.strip() else 0
        where = f"{path.name}:{block.line + offset + 1}: `{command.strip()}`"
        assert result.returncode == want, (
            f"{where} exited {result.returncode}, expected {want}\n{result.stdout}\n{result.stderr}"
        )
        if shown:
            own = "\n".join(line for line in result.stderr.splitlines() if line.startswith("qcore:"))
            assert_output(shown, result.stdout if want == 0 else own, cwd, where)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_code_blocks_run(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry_snapshot: None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # modules a doc writes are importable, as in a script
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    printed: str | None = None  # stdout of the python block just before, for an output block
    for block in blocks(path):
        if block.skip:
            printed = None
            continue
        if block.file:
            (tmp_path / block.file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / block.file).write_text(block.code, encoding="utf-8")
        elif block.lang == "output":
            assert printed is not None, (
                f"{path.name}:{block.line}: an output block must follow a python block"
            )
            assert_output(block.code.splitlines(), printed, tmp_path, f"{path.name}:{block.line}")
        elif block.lang == "python":
            code = compile(block.code, f"{path}:{block.line}", "exec")
            with contextlib.redirect_stdout(io.StringIO()) as stdout:
                exec(code, namespace)  # noqa: S102 - running the docs is the point
            printed = stdout.getvalue()
            sys.stdout.write(printed)
            continue
        elif block.lang == "console":
            run_console(block, path, tmp_path)
        elif block.lang == "toml" and sys.version_info >= (3, 11):
            import tomllib

            tomllib.loads(block.code)
        printed = None


def test_docs_exist_and_skips_are_rare() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"user-guide.md", "backend-authors.md", "hooks.md", "cli.md"} <= names
    all_blocks = [b for p in doc_files() for b in blocks(p) if b.lang in ("python", "console")]
    skipped = [b for b in all_blocks if b.skip]
    assert all_blocks and len(skipped) <= max(2, len(all_blocks) // 5), [b.skip for b in skipped]


def test_output_comparison(tmp_path: Path) -> None:
    real = f"checkpoint    {tmp_path}/flux-bf16\nfiles         1 weight file(s)\n"
    real += "  a  62 tensors\n  b  1 tensor\n\n"
    assert matches(
        normalise("checkpoint flux-bf16\nfiles 1 weight file(s)\n...", tmp_path), normalise(real, tmp_path)
    )
    assert matches(
        ["checkpoint flux-bf16", "files 1 ...", "a 62 tensors", "b 1 tensor"], normalise(real, tmp_path)
    )
    assert matches(["...", "b 1 tensor"], normalise(real, tmp_path))
    stale = ["checkpoint flux-bf16", "files 1 weight file(s)", "a 118 tensors", "b 1 tensor"]
    assert not matches(stale, normalise(real, tmp_path))
    assert not matches(["checkpoint flux-bf16"], normalise(real, tmp_path))  # shown output is all of it
    with pytest.raises(AssertionError, match="118 tensors"):
        assert_output(stale, real, tmp_path, "cli.md:1")


def test_console_commands_and_their_output() -> None:
    block = Block("console", "$ qcore a\nline 1\n\nline 2\n$ qcore b # exit 1\n$ qcore c\n", 1, None)
    assert list(commands(block)) == [
        (0, "qcore a", ["line 1", "", "line 2"]),
        (4, "qcore b # exit 1", []),
        (5, "qcore c", []),
    ]


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *(str(p.relative_to(REPO)) for p in doc_files())])
def test_relative_links_and_anchors_resolve(page: str) -> None:
    source = REPO / page
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, fragment = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        if not linked.exists():
            broken.append(target)
        elif fragment and linked.suffix == ".md":
            headings = re.findall(r"^#+\s+(.+)$", linked.read_text(encoding="utf-8"), flags=re.MULTILINE)
            if fragment not in {anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page}: links to missing files or headings: {broken}"


REPO_PATH = re.compile(
    r"\b(?:tests|plugins|examples|bench|scripts|core|docs)/[\w./*-]*\.(?:py|sh|md|toml|txt|jsonl)\b"
)


@pytest.mark.parametrize("page", ["README.md", *(str(p.relative_to(REPO)) for p in doc_files())])
def test_repository_paths_named_in_docs_exist(page: str) -> None:
    named = set(REPO_PATH.findall((REPO / page).read_text(encoding="utf-8")))
    missing = sorted(path for path in named if not any(REPO.glob(path)))
    assert not missing, f"{page} names files that are not in the repository: {missing}"


def test_user_guide_names_every_diffusers_keyword_qcore_does_not_implement() -> None:
    from qcore._arguments import DIFFUSERS_ONLY_OPTIONS

    guide = (DOCS / "user-guide.md").read_text(encoding="utf-8")
    section = guide.split("### diffusers' keyword arguments", 1)[1].split("\n#", 1)[0]
    missing = [name for name in DIFFUSERS_ONLY_OPTIONS if f"`{name}" not in section]
    assert not missing, f"docs/user-guide.md's list of diffusers' keywords omits {missing}"


@pytest.mark.parametrize("module", ["qcore", "qcore.testing"])
def test_every_public_name_is_in_the_api_reference(module: str) -> None:
    import importlib

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    names = importlib.import_module(module).__all__
    missing = [name for name in names if f"`{name}`" not in api]
    assert not missing, f"docs/api.md does not describe {module}.{missing}"
