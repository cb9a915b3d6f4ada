"""Observers: pluggy plugins that are not backends wrap lifecycle stages (wrapper=True) and see every
call without changing what the load produces."""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from helpers.models import TinyTransformer
from qcore.testing import HOOK_NAMES, LOAD_ORDER, HookRecorder


class StageTimer:
    """A timing/progress observer, written the way a user would write one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.params: list[str] = []
        self.quantizers: list[str] = []

    @qcore.hookimpl(wrapper=True)
    def preprocess_model(
        self, quantizer: qcore.Quantizer, model: torch.nn.Module
    ) -> Generator[None, Any, Any]:
        self.quantizers.append(quantizer.quant_method)
        start = time.perf_counter()
        result = yield
        self.seconds["preprocess_model"] = time.perf_counter() - start
        return result

    @qcore.hookimpl(wrapper=True)
    def create_quantized_param(self, param_name: str) -> Generator[None, Any, Any]:
        start = time.perf_counter()
        try:
            return (yield)
        finally:
            self.params.append(param_name)
            self.seconds["create_quantized_param"] = self.seconds.get("create_quantized_param", 0.0) + (
                time.perf_counter() - start
            )


def _load(path: Path, **kwargs: Any) -> torch.nn.Module:
    return qcore.from_pretrained(
        TinyTransformer, path, quantization_config={"quant_method": "int8-test"}, **kwargs
    )


def test_wrapper_observer_sees_calls_and_changes_nothing(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tiny_input: torch.Tensor, tmp_path: Path
) -> None:
    plain = _load(tiny_ckpt)
    timer = StageTimer()
    observed = _load(tiny_ckpt, observers=[timer])

    assert timer.quantizers == ["int8-test"]
    assert set(timer.seconds) == {"preprocess_model", "create_quantized_param"}
    quantized_weights = sorted(
        f"{name}.weight" for name, m in observed.named_modules() if type(m).__name__ == "Int8Linear"
    )
    assert sorted(timer.params) == quantized_weights
    with torch.no_grad():
        assert torch.equal(observed(tiny_input), plain(tiny_input))
    for key, value in plain.state_dict().items():
        assert torch.equal(observed.state_dict()[key], value), key


def test_hook_recorder_sees_the_whole_lifecycle(
    int8_backend: qcore.Backend, tiny_ckpt: Path, tiny_input: torch.Tensor, tmp_path: Path
) -> None:
    recorder = HookRecorder()
    model = _load(tiny_ckpt, observers=[recorder])
    load_calls = recorder.distinct()
    assert [c for c in load_calls if c in LOAD_ORDER and c != "check_quantized_param_shape"][:5] == list(
        LOAD_ORDER[:5]
    )
    assert load_calls[-2:] == ["update_missing_keys", "postprocess_model"]
    int8_layers = [m for m in model.modules() if type(m).__name__ == "Int8Linear"]
    assert int8_layers and recorder.count("create_quantized_param") == len(int8_layers)
    qcore.save_pretrained(model, tmp_path / "q")
    assert recorder.distinct()[-2:] == ["is_serializable", "get_state_dict_and_metadata"]
    qcore.dequantize(model)
    assert recorder.calls[-1] == "dequantize"
    assert set(recorder.seconds) <= set(HOOK_NAMES)


def test_several_observers_and_the_backend_all_run(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    first, second = HookRecorder(), HookRecorder()
    int8_backend.quantizer_class.calls.clear()
    _load(tiny_ckpt, observers=[first, second])
    assert first.calls == second.calls and first.calls
    assert int8_backend.quantizer_class.calls == ["preprocess_model", "postprocess_model"]


def test_observer_exception_propagates(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    class Cancel:
        @qcore.hookimpl(wrapper=True)
        def create_quantized_param(self) -> Generator[None, Any, Any]:
            yield
            raise KeyboardInterrupt  # e.g. a progress bar's cancel button, after the first parameter

    with pytest.raises(KeyboardInterrupt):
        _load(tiny_ckpt, observers=[Cancel()])


def test_invalid_observer_is_named(int8_backend: qcore.Backend, tiny_ckpt: Path) -> None:
    class Wrong:
        @qcore.hookimpl
        def preprocess_model(self, model: torch.nn.Module, no_such_argument: int) -> None: ...

    with pytest.raises(qcore.BackendValidationError, match="(?s)observer .*Wrong.*no_such_argument"):
        _load(tiny_ckpt, observers=[Wrong()])
