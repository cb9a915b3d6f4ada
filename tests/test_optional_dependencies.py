"""diffusers and transformers are optional: ``import qcore`` imports neither, qcore and qcore-bnb alone
quantize, save and reload a single model, and the ``pipelines`` extra's floors are the versions qcore
checks at run time and is tested with."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from helpers.envs import REPO, clean_environ, report_without_site_packages, site_without
from qcore._model import MINIMUM_VERSIONS

TESTS = Path(__file__).resolve().parent
OPTIONAL = ("diffusers", "transformers")
# Hidden with the optional libraries, so that the environment holds qcore and qcore-bnb only.
OTHER_BACKENDS = ("qcore_torchao", "qcore_gguf", "qcore_int8")


def test_import_qcore_imports_neither_library() -> None:
    code = "import sys, qcore; print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pipelines_extra_floors_are_the_checked_and_tested_releases() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "core" / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["optional-dependencies"]["pipelines"]:
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == ">=", line
        floors[requirement.name] = spec.version
    assert floors == MINIMUM_VERSIONS
    pins = {}
    for line in (REPO / "requirements-test.txt").read_text().splitlines():
        requirement = Requirement(line)
        if requirement.name in floors:
            (spec,) = requirement.specifier
            pins[requirement.name] = Version(spec.version)
    for name, floor in floors.items():
        # The floor is the minor release CI tests: an older one has never been tried.
        assert pins[name].release[:2] == Version(floor).release[:2], (name, floor, pins[name])


SINGLE_MODEL = """
import importlib.metadata, importlib.util, json, site, sys
site.addsitedir(SITE)
sys.path.insert(0, TESTS)

import torch
import bitsandbytes as bnb
import qcore
from qcore_bnb import BitsAndBytesConfig
from helpers.models import TinyTransformer, make_tiny

qcore.save_pretrained(make_tiny(), ROOT + "/tiny-bf16")
config = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
)
model = qcore.from_pretrained(
    TinyTransformer, ROOT + "/tiny-bf16", quantization_config=config, torch_dtype=torch.bfloat16
)
qcore.save_pretrained(model, ROOT + "/tiny-nf4")
reloaded = qcore.from_pretrained(TinyTransformer, ROOT + "/tiny-nf4", torch_dtype=torch.bfloat16)
x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
with torch.no_grad():
    equal = torch.equal(model(x), reloaded(x))


def absent(name):
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(name) is None
    return False


print(json.dumps({
    "equal": equal,
    "nf4_linears": sorted(n for n, m in reloaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)),
    "quant_method": json.load(open(ROOT + "/tiny-nf4/config.json"))["quantization_config"]["quant_method"],
    "absent": [name for name in ("diffusers", "transformers", "qcore-torchao") if absent(name)],
    "imported": sorted({m.split(".")[0] for m in sys.modules} & {"diffusers", "transformers"}),
}))
"""


def test_qcore_and_qcore_bnb_alone_load_a_single_model(tmp_path: Path) -> None:
    site = site_without(tmp_path, [*OPTIONAL, *OTHER_BACKENDS])
    preamble = f"SITE, TESTS, ROOT = {str(site)!r}, {str(TESTS)!r}, {str(tmp_path)!r}\n"
    report = report_without_site_packages(preamble + textwrap.dedent(SINGLE_MODEL), tmp_path, clean_environ())
    assert report["absent"] == ["diffusers", "transformers", "qcore-torchao"]  # as if never installed
    assert report["imported"] == []
    assert report["quant_method"] == "bitsandbytes"
    every_linear = [
        f"{stack}.{i}.{name}"
        for stack, n in (("blocks", 2), ("vace_blocks", 1))
        for i in range(n)
        for name in ("attn", "proj_out")
    ]
    assert report["nf4_linears"] == sorted([*every_linear, "proj_in", "proj_out"])
    assert report["equal"]
