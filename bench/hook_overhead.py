"""What calling the per-parameter hooks through pluggy costs on a Flux-sized load.

    python bench/hook_overhead.py            # a few seconds

A Flux transformer checkpoint has 1,160 tensors; the loader calls two per-parameter hooks for each
(``check_if_quantized_param``, then ``create_quantized_param`` or the plain path), so a load makes
about 2,320 hook calls. This times them through the load's real plugin manager (qcore's defaults
plus the example int8 backend's quantizer, with and without an observer wrapping every hook)
against calling the backend's methods directly, and prints microseconds per call and milliseconds
per load.
"""

from __future__ import annotations

import argparse
import time

import torch

import qcore
from qcore._plugins import make_plugin_manager
from qcore.testing import HookRecorder

TENSORS = 1160
HOOKS_PER_TENSOR = 2


class _Quantizer(qcore.Quantizer):
    """The hooks of a typical backend, with their work removed: only dispatch is measured."""

    @qcore.hookimpl
    def check_if_quantized_param(self, param_name: str) -> bool:
        return param_name.endswith(".weight")

    @qcore.hookimpl
    def create_quantized_param(self, param_name: str, param_value: torch.Tensor) -> None:
        return None


class _Config(qcore.QuantizationConfig):
    quant_method = "dispatch-only"


def _time(call: object, names: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for name in names:
            call(name)  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    quantizer = _Quantizer(_Config())
    model = torch.nn.Linear(1, 1)
    value = torch.zeros(1)
    names = [f"blocks.{i // 4}.layer{i % 4}.weight" for i in range(TENSORS)]
    state: dict[str, torch.Tensor] = {}

    def direct(name: str) -> None:
        if quantizer.check_if_quantized_param(name):
            quantizer.create_quantized_param(name, value)

    rows = [("direct method calls", _time(direct, names, args.repeat))]
    for label, observers in (("pluggy", ()), ("pluggy + observer wrapping every hook", (HookRecorder(),))):
        hooks = make_plugin_manager(quantizer, observers).hook

        def through_pluggy(name: str, hooks: object = hooks) -> None:
            if hooks.check_if_quantized_param(  # type: ignore[attr-defined]
                quantizer=quantizer, model=model, param_name=name, param_value=value, state_dict=state
            ):
                hooks.create_quantized_param(  # type: ignore[attr-defined]
                    quantizer=quantizer,
                    model=model,
                    param_name=name,
                    param_value=value,
                    target_device=value.device,
                    state_dict=state,
                    metadata={},
                )

        rows.append((label, _time(through_pluggy, names, args.repeat)))
    calls = TENSORS * HOOKS_PER_TENSOR
    print(f"{TENSORS} tensors x {HOOKS_PER_TENSOR} hooks = {calls} calls, best of {args.repeat}")
    for label, seconds in rows:
        print(f"  {label:40s} {seconds * 1e3:7.2f} ms per load  {seconds / calls * 1e6:6.2f} us per call")


if __name__ == "__main__":
    main()
