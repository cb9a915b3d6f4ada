"""qcore-bnb on CUDA, and checkpoint interop with diffusers both ways (self-contained).

Makes its own tiny FluxTransformer2DModel checkpoint in a temporary directory, then checks:

- cuda/4bit/*: every nf4/fp4 x double-quant x quant_storage combination quantizes on the GPU to the bytes
  bitsandbytes.functional.quantize_4bit gives, runs, and round-trips through save/load bit-exactly;
- cuda/8bit: the same for LLM.int8: int8 weights and SCB right after loading, equal to what bitsandbytes' own
  Linear8bitLt holds after its move to the GPU (and to int8_vectorwise_quant of the float16 weight);
- diffusers->qcore/{nf4,8bit}: diffusers quantizes and saves; qcore loads it: same state, same output;
- qcore->diffusers/{nf4,8bit}: qcore quantizes and saves; diffusers loads it: same state, same output (the
  sharded variant, with statistics in other shards than their weights, is reported but not gating);
- same-quantization/{nf4,8bit}: quantize-on-load by qcore and by diffusers quantize the same modules and give
  identical tensors.

Prints one JSON line per check (max abs diff, relative error against bf16) and exits 1 if any failed.

    pip install ./core ./plugins/bnb bitsandbytes diffusers; python tests/gpu/bnb_interop.py
    PYTHONPATH=core/src:plugins/bnb/src:<bitsandbytes, diffusers wheels> python tests/gpu/bnb_interop.py
    python tests/gpu/bnb_interop.py --device cpu   # the qcore-only checks, without diffusers' CUDA-only loads
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The tiny Flux config is the test suite's own (tests/helpers/models.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.models import tiny_flux_config  # noqa: E402

FAILED: list[str] = []


def flux_inputs(device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    tokens, text = 16, 8
    inputs = dict(
        hidden_states=torch.randn(1, tokens, 16, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text, 32, generator=g).to(torch.bfloat16),
        pooled_projections=torch.randn(1, 32, generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.5]).to(torch.bfloat16),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
    )
    return {**{k: v.to(device) for k, v in inputs.items()}, "return_dict": False}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).cpu()


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> tuple[bool, str]:
    sa, sb = a.state_dict(), b.state_dict()
    if sorted(sa) != sorted(sb):
        # Both sides and full counts: a truncated symmetric difference hides which model lacks what.
        only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
        return False, (
            f"keys differ: {len(only_a)} only in the first ({only_a[:6]}), "
            f"{len(only_b)} only in the second ({only_b[:6]})"
        )
    for key in sa:
        if sa[key].dtype != sb[key].dtype and not key.endswith("bias"):
            return False, f"{key}: {sa[key].dtype} vs {sb[key].dtype}"
        if sa[key].dtype == sb[key].dtype and not torch.equal(bits(sa[key]), bits(sb[key])):
            return False, f"{key} differs"
    return True, ""


def quantized_modules(model: torch.nn.Module) -> list[str]:
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def figures(out: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    diff = (out.float() - other.float()).abs()
    return {"max_abs_diff": diff.max().item(), "rel_err": (diff.norm() / other.float().norm()).item()}


def check(name: str, fn: Callable[[], dict[str, Any]], gating: bool = True) -> None:
    try:
        result = fn()
        ok = bool(result.pop("ok"))
    except Exception as exc:  # a check's failure is reported, the others still run
        result, ok = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}, False
    if not ok and gating:
        FAILED.append(name)
    print(
        json.dumps({"check": name, "ok": ok, **({} if gating else {"gating": False}), **result}), flush=True
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = args.device

    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import diffusers
    from safetensors.torch import load_file

    import qcore
    import qcore_bnb
    from qcore_bnb import BitsAndBytesConfig

    try:
        qcore.get_backend("bitsandbytes")
    except qcore.BackendNotFoundError:
        # Run from source trees on PYTHONPATH (no installed entry point): register the same backend.
        qcore.register_backend(qcore_bnb.backend)

    Flux = diffusers.FluxTransformer2DModel
    print(
        json.dumps(
            {
                "env": {
                    "torch": torch.__version__,
                    "bitsandbytes": bnb.__version__,
                    "diffusers": diffusers.__version__,
                    "qcore": qcore.__version__,
                    "device": torch.cuda.get_device_name() if device == "cuda" else device,
                }
            }
        ),
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="bnb-interop-"))
    torch.manual_seed(0)
    original = Flux(**tiny_flux_config()).to(torch.bfloat16).eval()
    original.save_pretrained(tmp / "bf16")
    source = load_file(tmp / "bf16" / "diffusion_pytorch_model.safetensors")
    with torch.no_grad():
        ref = original.to(device)(**flux_inputs(device))[0]
    load_kw: dict[str, Any] = {"torch_dtype": torch.bfloat16, "device_map": device}

    def run(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(**flux_inputs(device))[0]

    def four_bit(qt: str, dq: bool, storage: str) -> dict[str, Any]:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=qt,
            bnb_4bit_use_double_quant=dq,
            bnb_4bit_quant_storage=storage,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = qcore.from_pretrained(Flux, tmp / "bf16", quantization_config=config, **load_kw)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        for name, module in layers.items():
            assert module.weight.device.type == torch.device(device).type, name
            packed, state = F.quantize_4bit(
                source[f"{name}.weight"].to(device),
                blocksize=64,
                compress_statistics=dq,
                quant_type=qt,
                quant_storage=getattr(torch, storage),
            )
            assert torch.equal(bits(module.weight.data), bits(packed)), f"{name}: packed bytes differ"
            assert torch.equal(module.weight.quant_state.absmax, state.absmax), f"{name}: absmax differs"
        out = run(model)
        target = tmp / f"q-{qt}-{dq}-{storage}"
        qcore.save_pretrained(model, target)
        reloaded = qcore.from_pretrained(Flux, target, **load_kw)
        same, why = same_state(model, reloaded)
        exact = torch.equal(run(reloaded), out)
        rel = figures(out, ref)["rel_err"]
        return {
            "ok": same and exact and rel < 0.2,
            "layers": len(layers),
            "rel_err_vs_bf16": rel,
            "reload_bit_exact": same and exact,
            "why": why,
        }

    for qt, dq, storage in itertools.product(
        ("nf4", "fp4"), (False, True), ("uint8", "bfloat16", "float16", "float32")
    ):
        check(
            f"{device}/4bit/{qt}/double_quant={dq}/storage={storage}",
            lambda qt=qt, dq=dq, storage=storage: four_bit(qt, dq, storage),
        )

    def eight_bit() -> dict[str, Any]:
        model = qcore.from_pretrained(
            Flux, tmp / "bf16", quantization_config=BitsAndBytesConfig(load_in_8bit=True), **load_kw
        )
        layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
        for name, module in layers.items():
            weight = module.weight
            assert weight.device.type == torch.device(device).type, name
            assert weight.dtype == torch.int8 and weight.SCB is not None, (
                f"{name}: left {weight.dtype} without SCB"
            )
            # bitsandbytes' own path (diffusers' too): a 16-bit CPU Int8Params moved to the device.
            own = bnb.nn.Int8Params(source[f"{name}.weight"], requires_grad=False, has_fp16_weights=False).to(
                device
            )
            assert torch.equal(weight.data, own.data) and torch.equal(weight.SCB, own.SCB), (
                f"{name}: != Int8Params"
            )
            cb, scb, _ = F.int8_vectorwise_quant(source[f"{name}.weight"].to(device, torch.float16))
            assert torch.equal(weight.data, cb) and torch.equal(weight.SCB, scb), (
                f"{name}: != int8_vectorwise_quant"
            )
        out = run(model)
        qcore.save_pretrained(model, tmp / "q-int8")
        reloaded = qcore.from_pretrained(Flux, tmp / "q-int8", **load_kw)
        same, why = same_state(model, reloaded)
        exact = torch.equal(run(reloaded), out)
        rel = figures(out, ref)["rel_err"]
        return {
            "ok": same and exact and rel < 0.03,
            "layers": len(layers),
            "rel_err_vs_bf16": rel,
            "reload_bit_exact": same and exact,
            "why": why,
        }

    check(f"{device}/8bit", eight_bit)

    if device != "cuda":
        print(json.dumps({"note": "diffusers loads bitsandbytes only on CUDA: interop checks skipped"}))
        return 1 if FAILED else 0

    modes = {
        "nf4": dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        "8bit": dict(load_in_8bit=True),
    }

    def diffusers_to_qcore(mode: str) -> dict[str, Any]:
        theirs = Flux.from_pretrained(
            tmp / "bf16",
            quantization_config=diffusers.BitsAndBytesConfig(**modes[mode]),
            torch_dtype=torch.bfloat16,
        )
        theirs_out = run(theirs)
        theirs.save_pretrained(tmp / f"diffusers-{mode}")
        ours = qcore.from_pretrained(Flux, tmp / f"diffusers-{mode}", **load_kw)
        same, why = same_state(theirs, ours)
        fig = figures(run(ours), theirs_out)
        return {
            "ok": same and fig["max_abs_diff"] == 0.0,
            **fig,
            "same_state": same,
            "why": why,
            "rel_err_vs_bf16": figures(theirs_out, ref)["rel_err"],
        }

    def qcore_to_diffusers(mode: str, max_shard_size: str) -> dict[str, Any]:
        ours = qcore.from_pretrained(
            Flux, tmp / "bf16", quantization_config=BitsAndBytesConfig(**modes[mode]), **load_kw
        )
        ours_out = run(ours)
        target = tmp / f"qcore-{mode}-{max_shard_size}"
        qcore.save_pretrained(ours, target, max_shard_size=max_shard_size)
        try:
            theirs = Flux.from_pretrained(target, torch_dtype=torch.bfloat16)
        except ValueError as exc:
            if "quantized_stats" not in str(exc):
                raise
            # diffusers' 4-bit loader wants a weight's statistics in the same shard as the weight; qcore
            # writes a valid checkpoint and reads it back itself.
            again, why_ours = same_state(ours, qcore.from_pretrained(Flux, target, **load_kw))
            return {
                "ok": False,
                "qcore_reload_same_state": again,
                "why": "known diffusers bug: its bitsandbytes 4-bit loader cannot load statistics stored in "
                "another shard than their weight (" + str(exc)[:160] + "); not gating. qcore reloads "
                "this sharded checkpoint " + ("bit-exactly" if again else f"WRONGLY: {why_ours}"),
            }
        same, why = same_state(ours, theirs)
        fig = figures(run(theirs), ours_out)
        return {"ok": same and fig["max_abs_diff"] == 0.0, **fig, "same_state": same, "why": why}

    def same_quantization(mode: str) -> dict[str, Any]:
        ours = qcore.from_pretrained(
            Flux, tmp / "bf16", quantization_config=BitsAndBytesConfig(**modes[mode]), **load_kw
        )
        theirs = Flux.from_pretrained(
            tmp / "bf16",
            quantization_config=diffusers.BitsAndBytesConfig(**modes[mode]),
            torch_dtype=torch.bfloat16,
        )
        selected = quantized_modules(ours) == quantized_modules(theirs)
        if not selected:
            only_ours = sorted(set(quantized_modules(ours)) - set(quantized_modules(theirs)))
            only_theirs = sorted(set(quantized_modules(theirs)) - set(quantized_modules(ours)))
            return {
                "ok": False,
                "same_modules": False,
                "why": f"quantized only by qcore: {only_ours}; only by diffusers: {only_theirs}",
            }
        same, why = same_state(ours, theirs)
        fig = figures(run(ours), run(theirs))
        return {
            "ok": same and fig["max_abs_diff"] == 0.0,
            **fig,
            "same_state": same,
            "why": why,
            "layers": len(quantized_modules(ours)),
        }

    for mode in modes:
        check(f"diffusers->qcore/{mode}", lambda mode=mode: diffusers_to_qcore(mode))
        check(f"qcore->diffusers/{mode}", lambda mode=mode: qcore_to_diffusers(mode, "10GB"))
        # Small shards put some statistics in another file than their weight; diffusers 0.42.1 loads
        # that for 8-bit but not for 4-bit (a known diffusers bug, named in "why"): reported, not gating.
        check(
            f"qcore->diffusers/{mode}/sharded",
            lambda mode=mode: qcore_to_diffusers(mode, "20KB"),
            gating=False,
        )
        check(f"same-quantization/{mode}", lambda mode=mode: same_quantization(mode))

    print(json.dumps({"summary": {"failed": FAILED}}), flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
