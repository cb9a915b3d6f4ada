"""Real installs for discovery and isolation tests: wheels built from real projects, installed into
fresh virtual environments that sit next to the running one.

A fresh environment is ``python -m venv --without-pip`` plus a ``.pth`` file that runs
``site.addsitedir(<this interpreter's site-packages>)``: qcore, torch and pip come from the outer
environment (its own ``.pth`` files, e.g. an editable qcore, are processed too), while wheels
installed with ``FreshEnv.install`` land in the new environment only and come first on ``sys.path``.
Checks run there in a subprocess that prints one JSON document.

Wheels and environments are built once per pytest session (cached by the session's base temp
directory), whichever test module asks first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_PROJECT = REPO / "examples" / "qcore-int8"
OUTER_PURELIB = sysconfig.get_paths()["purelib"]

_cache: dict[tuple[str, str], Any] = {}


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result


def clean_environ(**overrides: str) -> dict[str, str]:
    """os.environ without qcore's own switches (the caller's shell cannot change a test), plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QCORE_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(overrides)
    return env


# --- distributions ------------------------------------------------------------------------------


def write_distribution(
    root: Path, name: str, package: str, entry_points: Mapping[str, str], modules: Mapping[str, str]
) -> Path:
    """A minimal hatchling project ``name`` with ``package`` and entry points in ``qcore.backends``."""
    project = root / name
    (project / package).mkdir(parents=True, exist_ok=True)
    eps = "\n".join(f'{ep} = "{target}"' for ep, target in entry_points.items())
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["hatchling>=1.21"]
            build-backend = "hatchling.build"

            [project]
            name = "{name}"
            version = "0.0.1"
            dependencies = ["qcore"]

            [project.entry-points."qcore.backends"]
            """
        )
        + eps
        + f'\n\n[tool.hatch.build.targets.wheel]\npackages = ["{package}"]\n'
    )
    for module, source in modules.items():
        (project / package / module).write_text(textwrap.dedent(source))
    return project


def build_wheels(projects: list[Path], dest: Path) -> dict[str, Path]:
    """Build every project (one pip call) into ``dest``; returns {distribution name: wheel}."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(dest),
            *map(str, projects),
        ]
    )
    wheels = {}
    for wheel in dest.glob("*.whl"):
        wheels[wheel.name.split("-")[0].replace("_", "-")] = wheel
    return wheels


_BACKEND_TEMPLATE = """
import qcore

class {cls}Config(qcore.QuantizationConfig):
    quant_method = "{method}"

    def __init__(self, modules_to_not_convert=None):
        self.modules_to_not_convert = modules_to_not_convert

class {cls}Quantizer(qcore.Quantizer):
    {body}

BACKEND = qcore.Backend("{method}", {cls}Config, {cls}Quantizer)
"""


def _backend_module(cls: str, method: str, body: str = "pass") -> str:
    return _BACKEND_TEMPLATE.format(
        cls=cls, method=method, body=textwrap.indent(textwrap.dedent(body), "    ").strip()
    )


def throwaway_distributions(root: Path) -> list[Path]:
    """Distributions that are broken (or conflicting) on purpose, each a real installable project."""
    return [
        write_distribution(
            root,
            "qcore-broken-import",
            "qcore_broken_import",
            {"broken-import": "qcore_broken_import:BACKEND"},
            {"__init__.py": 'raise RuntimeError("qcore_broken_import cannot be imported on purpose")\n'},
        ),
        write_distribution(
            root,
            "qcore-bad-hookargs",
            "qcore_bad_hookargs",
            {"bad-hookargs": "qcore_bad_hookargs:BACKEND"},
            {
                "__init__.py": _backend_module(
                    "BadArgs",
                    "bad-hookargs",
                    """
                @qcore.hookimpl
                def preprocess_model(self, model, not_a_spec_argument):
                    pass
            """,
                )
            },
        ),
        write_distribution(
            root,
            "qcore-unknown-hook",
            "qcore_unknown_hook",
            {"unknown-hook": "qcore_unknown_hook:BACKEND"},
            {
                "__init__.py": _backend_module(
                    "Unknown",
                    "unknown-hook",
                    """
                @qcore.hookimpl
                def preprocess_modle(self, model):
                    pass
            """,
                )
            },
        ),
        write_distribution(
            root,
            "qcore-not-a-backend",
            "qcore_not_a_backend",
            {"not-a-backend": "qcore_not_a_backend:BACKEND"},
            {"__init__.py": "BACKEND = {'quant_method': 'not-a-backend'}\n"},
        ),
        # Two working distributions that claim the same quant_method "dup".
        write_distribution(
            root,
            "qcore-dup-a",
            "qcore_dup_a",
            {"dup": "qcore_dup_a:BACKEND"},
            {"__init__.py": _backend_module("DupA", "dup")},
        ),
        write_distribution(
            root,
            "qcore-dup-b",
            "qcore_dup_b",
            {"dup": "qcore_dup_b:BACKEND"},
            {"__init__.py": _backend_module("DupB", "dup")},
        ),
    ]


def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Wheels of qcore-int8 (the example backend) and of every throwaway distribution, built once."""
    key = (str(tmp_path_factory.getbasetemp()), "wheels")
    if key not in _cache:
        root = tmp_path_factory.mktemp("qcore-dists")
        projects = [EXAMPLE_PROJECT, *throwaway_distributions(root / "src")]
        _cache[key] = build_wheels(projects, root / "wheels")
    return dict(_cache[key])


# --- environments -------------------------------------------------------------------------------


@dataclass
class FreshEnv:
    root: Path
    python: Path
    site_packages: Path

    def install(self, *wheels: Path) -> None:
        # --ignore-installed: the outer environment may hold the same distribution (e.g. qcore-int8);
        # the copy in this environment must be installed anyway, and the outer one left alone.
        _run(
            [
                str(self.python),
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--no-index",
                "--ignore-installed",
                "--disable-pip-version-check",
                "-q",
                *map(str, wheels),
            ],
            env=clean_environ(),
        )

    def run(
        self, code: str, *, cwd: Path | None = None, timeout: float = 300, **environ: str
    ) -> subprocess.CompletedProcess[str]:
        return _run(
            [str(self.python), "-c", textwrap.dedent(code)],
            cwd=cwd or self.root,
            env=clean_environ(**environ),
            timeout=timeout,
        )

    def run_json(self, code: str, **environ: str) -> Any:
        """Run ``code`` (which prints one JSON document last) and return the document."""
        out = self.run(code, **environ).stdout.strip().splitlines()
        return json.loads(out[-1])


def make_env(root: Path) -> FreshEnv:
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    (site_packages / "_outer_environment.pth").write_text(
        f"import site; site.addsitedir({OUTER_PURELIB!r})\n"
    )
    return FreshEnv(root, python, site_packages)


def cached_env(tmp_path_factory: pytest.TempPathFactory, name: str, distributions: list[str]) -> FreshEnv:
    """A fresh environment with the named distributions from :func:`wheelhouse`, made once per session."""
    key = (str(tmp_path_factory.getbasetemp()), f"env:{name}")
    if key not in _cache:
        wheels = wheelhouse(tmp_path_factory)
        env = make_env(tmp_path_factory.mktemp(f"env-{name}"))
        env.install(*(wheels[d] for d in distributions))
        _cache[key] = env
    return _cache[key]


#: Everything built by :func:`wheelhouse`: the example backend and the broken/conflicting ones.
ALL_DISTRIBUTIONS = [
    "qcore-int8",
    "qcore-broken-import",
    "qcore-bad-hookargs",
    "qcore-unknown-hook",
    "qcore-not-a-backend",
    "qcore-dup-a",
    "qcore-dup-b",
]


def site_without(root: Path, hidden: Iterable[str]) -> Path:
    """A site directory of links to this environment's packages less the distributions ``hidden``
    (import names, e.g. ``qcore_gguf``): their code, metadata and the .pth of an editable install are
    left out, so to a Python started with ``-S`` and this site, imports and importlib.metadata alike,
    they are not installed."""
    hidden = {name.replace("-", "_").lower() for name in hidden}
    site = root / "site-packages"
    site.mkdir()
    paths = sysconfig.get_paths()
    for directory in dict.fromkeys([paths["purelib"], paths["platlib"]]):
        for entry in os.listdir(directory):
            stem = entry.removesuffix(".pth").removeprefix("_editable_impl_").removeprefix("__editable__.")
            if stem.split("-")[0].replace(".", "_").lower() not in hidden and not (site / entry).exists():
                (site / entry).symlink_to(Path(directory) / entry)
    return site


def report_without_site_packages(code: str, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``code`` in a Python started with ``-S`` (this environment's site-packages never added: the
    code adds a site of its own, e.g. one made by :func:`site_without`) and return the JSON object its
    last line of output prints."""
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
