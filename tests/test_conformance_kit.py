"""The conformance kit itself: it passes a correct backend and fails defective ones on the right check."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

BACKENDS = """
import pytest
import torch
from torch import nn

import qcore
from helpers.int8_backend import Int8TestConfig, Int8TestQuantizer
from qcore.testing import BackendConformance


def _config(method):
    return type(f"{method}Config", (Int8TestConfig,), {"quant_method": method})


class WrongScale(Int8TestQuantizer):
    @qcore.hookimpl
    def create_quantized_param(self, model, param_name, param_value, target_device, state_dict):
        super().create_quantized_param(model, param_name, param_value, target_device, state_dict)
        model.get_submodule(param_name.rpartition(".")[0]).weight_scale *= 1.5


class TrustsAnything(Int8TestQuantizer):
    @qcore.hookimpl
    def create_quantized_param(self, model, param_name, param_value, target_device, state_dict):
        module = model.get_submodule(param_name.rpartition(".")[0])
        scale = state_dict.get(f"{param_name}_scale")
        if not self.pre_quantized:
            return super().create_quantized_param(model, param_name, param_value, target_device, state_dict)
        module.weight = nn.Parameter(param_value.to(torch.int8), requires_grad=False)
        module.weight_scale = scale if scale is not None else torch.ones(module.out_features)


class LosesScales(Int8TestQuantizer):
    @qcore.hookimpl
    def get_state_dict_and_metadata(self, state_dict):
        return {k: v for k, v in state_dict.items() if not k.endswith("weight_scale")}, {}


BACKENDS = {
    "kit-good": Int8TestQuantizer,
    "kit-wrong-scale": WrongScale,
    "kit-trusts-anything": TrustsAnything,
    "kit-loses-scales": LosesScales,
}
CONFIGS = {name: _config(name) for name in BACKENDS}


@pytest.fixture(autouse=True, scope="session")
def _registered():
    for name, quantizer in BACKENDS.items():
        qcore.register_backend(qcore.Backend(name, CONFIGS[name], quantizer))
    yield
    for name in BACKENDS:
        qcore.unregister_backend(name)


class TestGood(BackendConformance):
    config_class = CONFIGS["kit-good"]
    forward_tolerance = 0.02


class TestWrongScale(BackendConformance):
    config_class = CONFIGS["kit-wrong-scale"]
    forward_tolerance = 0.02


class TestTrustsAnything(BackendConformance):
    config_class = CONFIGS["kit-trusts-anything"]
    forward_tolerance = 0.02


class TestLosesScales(BackendConformance):
    config_class = CONFIGS["kit-loses-scales"]
    forward_tolerance = 0.02
"""


def test_kit_separates_good_from_defective_backends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_backends=BACKENDS)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-rf")
    outcomes = result.parseoutcomes()
    failed = {
        line.split("::", 1)[1].split(" ")[0]
        for line in result.outlines
        if line.startswith(("FAILED", "ERROR")) and "::" in line
    }
    assert not any(name.startswith("TestGood::") for name in failed), failed
    assert "TestWrongScale::test_forward_close_to_reference" in failed
    assert "TestTrustsAnything::test_corrupted_checkpoint_names_the_tensor[wrong_dtype]" in failed
    assert "TestLosesScales::test_save_load_round_trip" in failed
    assert "TestLosesScales::test_save_load_round_trip_sharded" in failed
    assert outcomes["passed"] >= 4 * 20
    assert "warnings" not in outcomes, "the kit itself raises warnings under this pytest"
