"""docs/hooks.md is generated from the hook specification's docstrings; this test keeps it in sync.

Regenerate it after changing core/src/qcore/_hookspecs.py::

    python tests/test_docs_hooks.py
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from qcore import _hookspecs

HOOKS_MD = Path(__file__).resolve().parent.parent / "docs" / "hooks.md"
PROJECT = _hookspecs.PROJECT_NAME


def hook_functions() -> list[tuple[str, object]]:
    """The hook specs in the order they are defined (the order of the lifecycle)."""
    return [
        (name, obj)
        for name, obj in vars(_hookspecs).items()
        if callable(obj) and getattr(obj, f"{PROJECT}_spec", None) is not None
    ]


def _markdown(docstring: str | None) -> str:
    """reST roles and literals as Markdown code spans; a trailing ``::`` as a plain colon."""
    text = inspect.cleandoc(docstring or "")
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("::\n", ":\n")


def render() -> str:
    intro = _markdown(_hookspecs.__doc__)
    out = [
        "# Hook reference",
        "",
        "<!-- Generated from core/src/qcore/_hookspecs.py by `python tests/test_docs_hooks.py`; "
        "do not edit. -->",
        "",
        intro,
        "",
        "Mark a method of your `qcore.Quantizer` subclass with `@qcore.hookimpl` and name it like the hook.",
        "It may take any subset of the hook's arguments, by name (`self` stands for `quantizer`).",
        "A *firstresult* hook stops at the first implementation that returns something other than `None`;",
        "the others are called for every implementation.",
        "",
        "| hook | kind |",
        "|---|---|",
    ]
    hooks = hook_functions()
    for name, fn in hooks:
        opts = getattr(fn, f"{PROJECT}_spec")
        kind = "firstresult" if opts.get("firstresult") else "every implementation"
        out.append(f"| [`{name}`](#{name}) | {kind} |")
    for name, fn in hooks:
        opts = getattr(fn, f"{PROJECT}_spec")
        signature = str(inspect.signature(fn)).replace("'", "")
        out += [
            "",
            f"## {name}",
            "",
            "```text",
            f"{name}{signature}",
            "```",
            "",
            f"*{'firstresult' if opts.get('firstresult') else 'every implementation is called'}*",
            "",
            _markdown(fn.__doc__),
        ]
    return "\n".join(out).rstrip() + "\n"


def test_hooks_md_is_generated_from_the_spec() -> None:
    assert HOOKS_MD.read_text(encoding="utf-8") == render(), (
        "docs/hooks.md is out of date: run `python tests/test_docs_hooks.py`"
    )


def test_every_hook_is_documented() -> None:
    from qcore.testing import HOOK_NAMES

    text = HOOKS_MD.read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\w+)$", text, flags=re.M))
    assert sections == set(HOOK_NAMES)
    for name, fn in hook_functions():
        doc = fn.__doc__ or ""
        assert "Returns" in doc or "Returns:" in doc, f"hook {name} does not say what it returns"
    guide = (HOOKS_MD.parent / "backend-authors.md").read_text(encoding="utf-8")
    missing = [name for name in HOOK_NAMES if f"`{name}`" not in guide]
    assert not missing, f"docs/backend-authors.md does not mention {missing}"


if __name__ == "__main__":
    HOOKS_MD.write_text(render(), encoding="utf-8")
    print(f"wrote {HOOKS_MD}", file=sys.stderr)
