"""Entry-point discovery: lazy, by quant_method, with install hints; nothing imported before it is needed."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch

import qcore
from helpers import envs
from helpers.models import TinyTransformer, make_tiny


def _installed(name: str) -> bool:
    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True


def test_import_qcore_imports_no_backend_nor_testing_kit() -> None:
    code = (
        "import json, sys, qcore; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(("
        "'qcore_', 'qcore.testing', 'pytest', 'bitsandbytes', 'torchao', 'diffusers')))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=envs.clean_environ()
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize(
    ("distribution_name", "quant_method", "config_class"),
    [
        ("qcore-int8", "int8", "Int8Config"),
        ("qcore-bnb", "bitsandbytes", "BitsAndBytesConfig"),
        ("qcore-torchao", "torchao", "TorchAoConfig"),
    ],
)
def test_installed_backends_are_discovered(
    distribution_name: str, quant_method: str, config_class: str
) -> None:
    if not _installed(distribution_name):
        pytest.skip(f"{distribution_name} is not installed in this environment")
    infos = {(i.quant_method, i.distribution): i for i in qcore.available_backends()}
    info = infos[(quant_method, distribution_name)]
    assert info.status == "ok", info.error
    assert info.version == distribution(distribution_name).version
    assert info.config_class == config_class
    backend = qcore.get_backend(quant_method)
    assert backend.distribution == distribution_name and backend.config_class.__name__ == config_class


def test_unknown_quant_method_is_an_error_with_install_hint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    qcore.save_pretrained(make_tiny(), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "int3"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(qcore.BackendNotFoundError) as info:
        qcore.from_pretrained(TinyTransformer, path)
    assert "pip install qcore-int3" in str(info.value) and "'qcore.backends'" in str(info.value)
    assert info.value.quant_method == "int3"


def test_user_config_dict_for_unknown_method() -> None:
    with pytest.raises(qcore.BackendNotFoundError, match="'int3'"):
        qcore.get_backend("int3")


@pytest.fixture(scope="module")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> envs.FreshEnv:
    return envs.cached_env(tmp_path_factory, "example", ["qcore-int8"])


@pytest.mark.slow
def test_discovery_is_lazy(example_env: envs.FreshEnv) -> None:
    out = example_env.run_json(
        """
        import json, sys, qcore
        seen = {}
        seen["after_import"] = sorted(m for m in sys.modules if m.startswith("qcore_"))
        qcore.get_backend("int8")
        seen["after_get_int8"] = sorted(m for m in sys.modules if m.startswith("qcore_"))
        print(json.dumps(seen))
        """
    )
    assert out["after_import"] == []
    assert "qcore_int8" in out["after_get_int8"]
    assert not any(m.startswith(("qcore_bnb", "qcore_torchao")) for m in out["after_get_int8"])


@pytest.mark.slow
def test_same_distribution_seen_twice_is_not_a_duplicate(example_env: envs.FreshEnv) -> None:
    # site-packages on PYTHONPATH as well: the distribution is visible twice on sys.path.
    out = example_env.run_json(
        """
        import json, qcore
        b = qcore.get_backend("int8")
        infos = qcore.available_backends()
        print(json.dumps([b.distribution, [i.distribution for i in infos if i.quant_method == "int8"]]))
        """,
        PYTHONPATH=str(example_env.site_packages),
    )
    assert out == ["qcore-int8", ["qcore-int8"]]


@pytest.mark.slow
def test_in_process_registration_cannot_shadow_installed_backend(example_env: envs.FreshEnv) -> None:
    out = example_env.run_json(
        """
        import json, qcore, qcore_int8
        try:
            qcore.register_backend(qcore.Backend("int8", qcore_int8.Int8Config, qcore_int8.Int8Quantizer))
        except qcore.DuplicateBackendError as exc:
            print(json.dumps({"providers": exc.providers, "message": str(exc)}))
        """
    )
    assert "distribution 'qcore-int8'" in out["providers"]
    assert any("in-process registration" in p for p in out["providers"])


def test_in_process_registration_round_trip(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tiny_input: torch.Tensor
) -> None:
    """register_backend -> load by quant_method; the name cannot be registered twice."""
    model = qcore.from_pretrained(
        TinyTransformer, tiny_ckpt, quantization_config={"quant_method": "int8-test"}
    )
    assert model.hf_quantizer.quant_method == "int8-test"
    assert any(i.quant_method == "int8-test" and i.distribution is None for i in qcore.available_backends())
    with pytest.raises(qcore.DuplicateBackendError, match="int8-test"):
        qcore.register_backend(int8_backend)
