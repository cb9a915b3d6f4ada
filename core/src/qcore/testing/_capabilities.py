"""BackendCapabilities: the composability checks (LoRA, fuse, QLoRA backward, compile, offload) a
backend declares it supports, and the capability matrix built from their results."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from .._saving import save_pretrained
from ._conformance import BackendSuite, first_tensor, relative_error

#: The capabilities the kit can check, in the order of the capability matrix.
CAPABILITIES: tuple[str, ...] = ("lora", "qlora_backward", "fuse_lora", "compile", "offload")

_ADAPTER = "default"


@dataclass(frozen=True)
class CapabilityResult:
    """One check's outcome: ``ok``, else the stage that failed and the exception's type (stable text,
    fit for a table) and its message (for the test report)."""

    capability: str
    ok: bool
    stage: str = ""
    error: str = ""
    message: str = ""
    #: The tolerance the check applied, where the backend states one (shown in the matrix).
    tolerance: float | None = None

    def cell(self) -> str:
        if not self.ok:
            return f"no ({self.stage}: {self.error})"
        return "yes" if self.tolerance is None else f"yes (within {self.tolerance:g})"


class _StageFailed(Exception):
    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage, self.cause = stage, cause


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    try:
        yield
    except _StageFailed:
        raise
    except Exception as exc:  # any failure of the library under test is the check's result
        raise _StageFailed(name, exc) from exc


class BackendCapabilities(BackendSuite):
    """Subclass this in a ``test_*.py`` file to certify what a backend composes with.

    Set ``config_class`` / ``config_kwargs`` as for :class:`qcore.testing.BackendConformance`, and
    ``supports`` to the capabilities of :data:`qcore.testing.CAPABILITIES` the backend has:

    - ``lora``: a peft LoRA adapter on every quantized layer changes each layer's output by exactly
      the adapter's delta (``scaling * B(A(x))``, within ``lora_tolerance``) and disabling the
      adapter gives the quantized output back exactly.
    - ``qlora_backward``: with the model frozen and an adapter added, one backward pass gives every
      LoRA parameter a finite, non-zero gradient and no other parameter a gradient.
    - ``fuse_lora``: merging the adapter into the quantized weights (peft's ``merge``, what
      diffusers' ``fuse_lora`` calls) gives the adapter's output within ``fuse_tolerance``, and
      unmerging gives back the original effective weights within ``fuse_tolerance``.
    - ``compile``: ``torch.compile(model, fullgraph=True, backend=compile_backend)`` compiles with no
      graph break and gives the eager output within ``compile_tolerance``.
    - ``offload``: moving the model to ``offload_device`` and back, and diffusers' group offloading
      (``apply_group_offloading``, block and leaf level), give the output exactly.

    ``test_capability`` runs every check: a declared capability must pass, an undeclared one must
    fail, so ``supports`` is exactly what works and the capability matrix can be built from it.
    Each check loads a fresh quantized model.
    """

    #: The capabilities this backend has (a subset of ``qcore.testing.CAPABILITIES``).
    supports: ClassVar[frozenset[str]] = frozenset()
    lora_rank: ClassVar[int] = 4
    #: Largest relative error of a layer's measured LoRA delta against ``scaling * B(A(x))``.
    lora_tolerance: ClassVar[float] = 0.05
    #: Largest relative error after fuse (output) and after fuse + unfuse (effective weights).
    fuse_tolerance: ClassVar[float] = 0.05
    compile_backend: ClassVar[str] = "aot_eager"
    #: Largest relative error of the compiled output against the eager one.
    compile_tolerance: ClassVar[float] = 1e-2
    #: Where ``offload`` onloads to; on a CPU-only machine it checks the hooks, not the transfer.
    offload_device: ClassVar[str] = "cuda" if torch.cuda.is_available() else "cpu"

    # --- the checks, each on a freshly loaded quantized model ---------------------------------------

    def quantized(self, checkpoint: Path) -> nn.Module:
        return self.load(checkpoint, quantization_config=self.make_config())

    def lora_targets(self, model: nn.Module, reference: nn.Module) -> list[str]:
        """The quantized Linear layers the adapter goes on."""
        return [
            name
            for name in self.linear_names(reference)
            if self.is_quantized_module(model.get_submodule(name), reference.get_submodule(name))
        ]

    def _add_adapter(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(self.seed + 2)
        # init_lora_weights=False: B is random, so the adapter changes the output from the start.
        config = LoraConfig(
            r=self.lora_rank, lora_alpha=2 * self.lora_rank, target_modules=targets, init_lora_weights=False
        )
        inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
        return {name: model.get_submodule(name) for name in targets}

    @staticmethod
    def _device(model: nn.Module) -> torch.device:
        return next((p.device for p in model.parameters()), torch.device("cpu"))

    def check_lora(self, checkpoint: Path, reference: nn.Module, inputs: Any) -> None:
        """A LoRA adapter on every quantized layer: each layer's output moves by exactly the adapter's
        delta, the model's output changes, and with the adapter disabled it is the quantized output."""
        model = self.quantized(checkpoint)
        quantized_output = self.forward(model, inputs)
        with _stage("peft wraps the layer"):
            layers = self._add_adapter(model, self.lora_targets(model, reference))
            assert layers, "no quantized layer to put an adapter on"
        with _stage("adapter delta"):
            generator = torch.Generator().manual_seed(self.seed + 3)
            for name, layer in layers.items():
                a, b = layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
                x = (
                    torch.randn(3, a.shape[1], generator=generator)
                    .to(self.torch_dtype)
                    .to(self._device(model))
                )
                with torch.no_grad():
                    measured = layer(x).float() - layer.base_layer(x).float()
                    expected = (x.float() @ a.float().T @ b.float().T) * layer.scaling[_ADAPTER]
                error = relative_error(measured, expected)
                assert error <= self.lora_tolerance, f"{name}: LoRA delta off by {error:.4f}"
            assert not torch.equal(self.forward(model, inputs), quantized_output), (
                "the adapter changed nothing"
            )
        with _stage("adapter disabled"):
            for layer in layers.values():
                layer.enable_adapters(False)
            assert torch.equal(self.forward(model, inputs), quantized_output)

    def check_qlora_backward(self, checkpoint: Path, reference: nn.Module, inputs: Any) -> None:
        """QLoRA: with the quantized model frozen and an adapter added, a backward pass reaches every
        LoRA parameter (finite, non-zero gradients) and no other parameter."""
        model = self.quantized(checkpoint)
        model.requires_grad_(False)
        with _stage("peft wraps the layer"):
            self._add_adapter(model, self.lora_targets(model, reference))
        with _stage("backward"):
            model.train()
            args, kwargs = inputs
            device = self._device(model)
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            loss = first_tensor(model(*args, **kwargs)).float().square().mean()
            loss.backward()
        with _stage("gradients"):
            lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
            assert lora, "the adapter has no parameters"
            for name, param in lora.items():
                assert param.grad is not None, f"{name} got no gradient"
                assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, (
                    f"{name}: bad gradient"
                )
            others = [n for n, p in model.named_parameters() if "lora_" not in n and p.grad is not None]
            assert not others, f"gradients reached frozen parameters: {others}"

    def _effective_weights(self, layers: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each base layer's weight as its forward sees it: ``f(I) - f(0)`` (works for any storage)."""
        weights = {}
        with torch.no_grad():
            for name, layer in layers.items():
                base = layer.get_base_layer()
                inputs = layer.lora_A[_ADAPTER].weight.shape[1]
                device = self._device(base) if any(True for _ in base.parameters()) else torch.device("cpu")
                eye = torch.eye(inputs, dtype=self.torch_dtype, device=device)
                zero = torch.zeros(1, inputs, dtype=self.torch_dtype, device=device)
                weights[name] = (base(eye).float() - base(zero).float()).cpu()
        return weights

    def check_fuse_lora(self, checkpoint: Path, reference: nn.Module, inputs: Any) -> None:
        """Fusing the adapter into the quantized weights gives the adapter's output, and unfusing gives
        back the original effective weights, both within ``fuse_tolerance``."""
        model = self.quantized(checkpoint)
        with _stage("peft wraps the layer"):
            layers = self._add_adapter(model, self.lora_targets(model, reference))
        before = self._effective_weights(layers)
        adapter_output = self.forward(model, inputs)
        with _stage("fuse"):
            for layer in layers.values():
                layer.merge(safe_merge=True, adapter_names=[_ADAPTER])
        with _stage("fused output"):
            error = relative_error(self.forward(model, inputs), adapter_output)
            assert error <= self.fuse_tolerance, f"fused output differs from the adapter's by {error:.4f}"
        with _stage("unfuse"):
            for layer in layers.values():
                layer.unmerge()
        with _stage("weights after unfuse"):
            after = self._effective_weights(layers)
            for name in layers:
                error = relative_error(after[name], before[name])
                assert error <= self.fuse_tolerance, f"{name}: weights after fuse+unfuse off by {error:.4f}"

    def check_compile(self, checkpoint: Path, reference: nn.Module, inputs: Any) -> None:
        """``torch.compile(fullgraph=True)`` compiles the quantized model with no graph break and gives
        the eager output within ``compile_tolerance``."""
        model = self.quantized(checkpoint)
        eager = self.forward(model, inputs)
        torch._dynamo.reset()
        try:
            with _stage("compile (fullgraph)"):
                compiled = torch.compile(model, fullgraph=True, backend=self.compile_backend)
                output = self.forward(compiled, inputs)
            with _stage("compiled output"):
                error = relative_error(output, eager)
                assert error <= self.compile_tolerance, f"compiled output differs by {error:.4f}"
        finally:
            torch._dynamo.reset()

    def check_offload(self, checkpoint: Path, reference: nn.Module, inputs: Any) -> None:
        """Moving the quantized model to ``offload_device`` and back, and diffusers' group offloading at
        block and leaf level, leave the output exactly as it was."""
        expected = self.forward(self.quantized(checkpoint), inputs)
        with _stage("to device and back"):
            model = self.quantized(checkpoint)
            model.to(self.offload_device)
            model.to("cpu")
            assert torch.equal(self.forward(model, inputs), expected)
        try:
            from diffusers.hooks import apply_group_offloading
        except ImportError:
            return
        for level in ("block_level", "leaf_level"):
            with _stage(f"group offload ({level})"):
                model = self.quantized(checkpoint)
                options = {"num_blocks_per_group": 1} if level == "block_level" else {}
                apply_group_offloading(
                    model,
                    onload_device=torch.device(self.offload_device),
                    offload_device=torch.device("cpu"),
                    offload_type=level,
                    **options,
                )
                args, kwargs = inputs
                device = torch.device(self.offload_device)
                with torch.no_grad():
                    moved = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
                    output = first_tensor(model(*moved, **kwargs)).cpu()
                assert torch.equal(output, expected)

    # --- running them -------------------------------------------------------------------------------

    def run_check(
        self, capability: str, checkpoint: Path, reference: nn.Module, inputs: Any
    ) -> CapabilityResult:
        """Run one check and report its outcome instead of raising."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; the kit checks {', '.join(CAPABILITIES)}")
        check: Callable[..., None] = getattr(self, f"check_{capability}")
        try:
            check(checkpoint, reference, inputs)
        except _StageFailed as failed:
            cause = failed.cause
            return CapabilityResult(capability, False, failed.stage, type(cause).__name__, str(cause)[:500])
        tolerance = self.fuse_tolerance if capability == "fuse_lora" else None
        return CapabilityResult(capability, True, tolerance=tolerance)

    @pytest.mark.parametrize("capability", CAPABILITIES)
    def test_capability(
        self, capability: str, reference_checkpoint: Path, reference_model: nn.Module, inputs: Any
    ) -> None:
        """A capability in ``supports`` passes its check; one not in ``supports`` fails it."""
        unknown = set(self.supports) - set(CAPABILITIES)
        assert not unknown, f"{type(self).__name__}.supports names unknown capabilities {sorted(unknown)}"
        needs = {"lora": "peft", "qlora_backward": "peft", "fuse_lora": "peft"}.get(capability)
        if needs is not None:
            pytest.importorskip(needs)
        result = self.run_check(capability, reference_checkpoint, reference_model, inputs)
        if capability in self.supports:
            assert result.ok, (
                f"{capability} is declared but fails at {result.stage}: {result.error}: {result.message}"
            )
        else:
            assert not result.ok, f"{capability} works: add it to {type(self).__name__}.supports"


def capability_matrix(suites: Sequence[tuple[str, type[BackendCapabilities]]], workdir: Path) -> str:
    """The capability matrix as a Markdown table, one row per ``(label, suite class)``, from the
    results of the kit's checks run now (not from the declarations)."""
    header = "| backend | " + " | ".join(f"`{c}`" for c in CAPABILITIES) + " |"
    lines = [header, "|" + "---|" * (len(CAPABILITIES) + 1)]
    for index, (label, suite_class) in enumerate(suites):
        suite = suite_class()
        reference = suite.make_model()
        checkpoint = workdir / f"reference-{index}"
        save_pretrained(reference, checkpoint)
        inputs = suite.make_inputs(reference)
        cells = [suite.run_check(c, checkpoint, reference, inputs).cell() for c in CAPABILITIES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
