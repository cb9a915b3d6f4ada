"""BackendConformance: the checks every qcore backend must pass, as a pytest base class."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from .._config import QuantizationConfig
from .._errors import CorruptCheckpointError, DequantizeError, DtypeCastError, QcoreError
from .._loading import from_pretrained
from .._quantized import dequantize
from .._quantizer import Quantizer, module_matches
from .._registry import get_backend
from .._saving import save_pretrained
from ._models import ConformanceModel
from ._observers import LOAD_ORDER, SAVE_ORDER, HookRecorder

CORRUPTIONS = ("truncated_tensor", "wrong_dtype", "missing_statistics", "truncated_file")

_DTYPE_CASTS: dict[str, Callable[[nn.Module], Any]] = {
    "to(float16)": lambda m: m.to(torch.float16),
    "to(dtype=float32)": lambda m: m.to(dtype=torch.float32),
    "to(cpu, float64)": lambda m: m.to("cpu", torch.float64),
    "half()": lambda m: m.half(),
    "float()": lambda m: m.float(),
    "bfloat16()": lambda m: m.bfloat16(),
    "double()": lambda m: m.double(),
}


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a forward's result (a tensor, a tuple/list, or a diffusers output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the output tensor in {type(output).__name__}")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds; for wrapper subclasses (e.g. torchao), the sum of their inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


class BackendSuite:
    """The settings, overridable methods, helpers and class-scoped fixtures the kit's suites share.

    :class:`BackendConformance` (the checks every backend must pass) and
    :class:`qcore.testing.BackendCapabilities` (the composability checks a backend declares) derive
    from it; subclass one of them, not this class.
    """

    # --- what the backend author sets -------------------------------------------------------------

    #: The backend's config class (required).
    config_class: ClassVar[type[QuantizationConfig]]
    #: Keyword arguments for ``config_class`` in every check.
    config_kwargs: ClassVar[Mapping[str, Any]] = {}
    #: The config option that lists modules to leave unquantized (bitsandbytes: ``llm_int8_skip_modules``).
    skip_modules_option: ClassVar[str] = "modules_to_not_convert"
    #: A module of the model, quantized by default, that the ``modules_to_not_convert`` check skips.
    module_to_not_convert: ClassVar[str] = "proj_out"
    #: The model class; a qcore.ModelMixin (or a diffusers ModelMixin) built from keyword arguments.
    model_class: ClassVar[type[nn.Module]] = ConformanceModel
    model_kwargs: ClassVar[Mapping[str, Any]] = {}
    torch_dtype: ClassVar[torch.dtype] = torch.bfloat16
    #: Passed to from_pretrained (e.g. ``"cuda"`` for a GPU-only backend).
    device_map: ClassVar[Any] = None
    #: Largest relative L2 error of the quantized output against the unquantized model's.
    forward_tolerance: ClassVar[float] = 0.05
    #: Largest relative L2 error of the dequantized model's output against the quantized one's.
    dequantize_tolerance: ClassVar[float] = 0.02
    #: Smallest ratio unquantized bytes / quantized bytes of the model.
    min_memory_ratio: ClassVar[float] = 1.5
    supports_dequantize: ClassVar[bool] = True
    supports_serialization: ClassVar[bool] = True
    #: The corruption cases to run (a subset of ``qcore.testing.CORRUPTIONS``).
    corruptions: ClassVar[tuple[str, ...]] = CORRUPTIONS
    seed: ClassVar[int] = 0

    # --- hooks for the author to override ---------------------------------------------------------

    def make_config(self, **overrides: Any) -> QuantizationConfig:
        return self.config_class(**{**copy.deepcopy(dict(self.config_kwargs)), **overrides})

    def make_model(self) -> nn.Module:
        """The unquantized model, in ``torch_dtype``, with seeded weights."""
        torch.manual_seed(self.seed)
        model = self.model_class(**self.model_kwargs)
        # Random init leaves biases near zero; real checkpoints do not.
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.normal_(0.0, 0.02)
        return model.to(self.torch_dtype).eval()

    def make_inputs(self, model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments of one forward (on CPU; moved to the model's device)."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        in_features = dict(self.model_kwargs).get("in_features", 128)
        return (torch.randn(4, in_features, generator=generator).to(self.torch_dtype),), {}

    def count_parameters(self, model: nn.Module) -> int:
        """Logical parameter count (override where the backend stores packed parameters)."""
        return sum(p.numel() for p in model.parameters())

    def memory_footprint(self, model: nn.Module) -> int:
        seen: set[int] = set()
        total = 0
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor_bytes(tensor)
        return total

    def is_quantized_module(self, module: nn.Module, reference: nn.Linear) -> bool:
        """Whether ``module`` (what ``reference`` became after loading) holds quantized weights."""
        weight = getattr(module, "weight", None)
        return (
            type(module) is not nn.Linear
            or not isinstance(weight, torch.Tensor)
            or type(weight) not in (torch.Tensor, nn.Parameter)
            or type(weight.data) is not torch.Tensor
            or weight.dtype != reference.weight.dtype
        )

    # --- helpers ----------------------------------------------------------------------------------

    def load(self, path: Path | str, **kwargs: Any) -> nn.Module:
        kwargs.setdefault("torch_dtype", self.torch_dtype)
        kwargs.setdefault("device_map", self.device_map)
        return from_pretrained(self.model_class, path, **kwargs)

    def forward(self, model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Tensor:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        args, kwargs = inputs
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch.no_grad():
            return first_tensor(model(*args, **kwargs)).detach().cpu()

    def linear_names(self, reference: nn.Module) -> list[str]:
        return [name for name, m in reference.named_modules() if isinstance(m, nn.Linear)]

    # --- fixtures (one quantized load per test class) ----------------------------------------------
    # Class-scoped fixtures are classmethods (pytest runs them once per class, not per instance);
    # each makes a throwaway instance to call the author's overridable methods.

    @pytest.fixture(scope="class")
    @classmethod
    def conformance_dir(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return tmp_path_factory.mktemp(cls.__name__)

    @pytest.fixture(scope="class")
    @classmethod
    def reference_model(cls) -> nn.Module:
        return cls().make_model()

    @pytest.fixture(scope="class")
    @classmethod
    def reference_checkpoint(cls, conformance_dir: Path, reference_model: nn.Module) -> Path:
        path = conformance_dir / "reference"
        save_pretrained(reference_model, path)
        return path

    @pytest.fixture(scope="class")
    @classmethod
    def inputs(cls, reference_model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return cls().make_inputs(reference_model)

    @pytest.fixture(scope="class")
    @classmethod
    def reference_output(cls, reference_model: nn.Module, inputs: Any) -> torch.Tensor:
        return cls().forward(reference_model, inputs)

    @pytest.fixture(scope="class")
    @classmethod
    def load_recorder(cls) -> HookRecorder:
        return HookRecorder()

    @pytest.fixture(scope="class")
    @classmethod
    def quantized_model(cls, reference_checkpoint: Path, load_recorder: HookRecorder) -> nn.Module:
        suite = cls()
        return suite.load(
            reference_checkpoint, quantization_config=suite.make_config(), observers=[load_recorder]
        )

    @pytest.fixture(scope="class")
    @classmethod
    def quantized_output(cls, quantized_model: nn.Module, inputs: Any) -> torch.Tensor:
        return cls().forward(quantized_model, inputs)

    @pytest.fixture(scope="class")
    @classmethod
    def quantized_checkpoint(cls, conformance_dir: Path, quantized_model: nn.Module) -> Path:
        if not cls.supports_serialization:
            pytest.skip(f"{cls.__name__}.supports_serialization is False")
        path = conformance_dir / "quantized"
        save_pretrained(quantized_model, path)
        return path


class BackendConformance(BackendSuite):
    """Subclass this in a ``test_*.py`` file, as ``class Test...``, to run qcore's checks on a backend.

    Set ``config_class`` (and ``config_kwargs``); everything else has defaults. The backend must be
    known to qcore: installed with its entry point, or registered with ``qcore.register_backend``
    before the tests run. Override the ``make_*`` / ``count_parameters`` / ``is_quantized_module``
    methods where the backend's model or storage differs from the defaults.

    Defaults: ``forward_tolerance = 0.05`` (relative L2 error of the quantized model's output against
    the unquantized one's), ``dequantize_tolerance = 0.02`` (dequantized output against quantized
    output), ``min_memory_ratio = 1.5`` (unquantized bytes / quantized bytes), ``torch_dtype =
    torch.bfloat16``, the model :class:`qcore.testing.ConformanceModel`, CPU (``device_map = None``).

    The save/load round trips reload the saved checkpoint *without* ``torch_dtype`` (the checkpoint
    alone must say everything) and demand an exact match: ``torch.equal`` of the outputs, and
    bit-identical tensors when the reloaded model is saved again. The corruption check tries each
    of :data:`qcore.testing.CORRUPTIONS` on a copy of the saved checkpoint: ``truncated_tensor``
    (the largest tensor of a quantized layer loses its last row), ``wrong_dtype`` (that tensor
    stored as float16/float32), ``missing_statistics`` (another tensor of that layer deleted, e.g.
    a scale) and ``truncated_file`` (the safetensors file cut short by a third); each must raise a
    :class:`qcore.QcoreError` naming the tensor (or the file).
    """

    # --- backend and config -----------------------------------------------------------------------

    def test_backend_resolves_by_quant_method(self) -> None:
        """qcore.get_backend(quant_method) finds this backend: its config class is ``config_class``
        and its quantizer a qcore.Quantizer."""
        backend = get_backend(self.config_class.quant_method)
        assert backend.config_class is self.config_class, (
            f"quant_method {self.config_class.quant_method!r} resolves to {backend.config_class!r}, "
            f"not {self.config_class!r}"
        )
        assert issubclass(backend.quantizer_class, Quantizer)

    def test_config_json_round_trip(self) -> None:
        """to_json_string -> from_dict gives an equal config; to_dict is JSON-able; deepcopy is
        equal; the ``use_diff`` form, laid over the defaults, gives the config back."""
        config = self.make_config()
        text = config.to_json_string()
        data = json.loads(text)
        assert data["quant_method"] == self.config_class.quant_method
        assert self.config_class.from_dict(data) == config
        assert json.loads(json.dumps(config.to_dict())) == data
        assert copy.deepcopy(config) == config
        diff = json.loads(config.to_json_string(use_diff=True))
        assert self.config_class.from_dict({**self.make_config().to_dict(), **diff}) == config

    def test_load_does_not_mutate_config(self, reference_checkpoint: Path) -> None:
        """A load leaves the user's config object as it was (``to_dict()`` unchanged), even with
        ``modules_to_not_convert`` set."""
        config = self.make_config(**{self.skip_modules_option: [self.module_to_not_convert]})
        before = config.to_dict()
        self.load(reference_checkpoint, quantization_config=config)
        assert config.to_dict() == before

    # --- the quantized load -----------------------------------------------------------------------

    def test_hooks_called_in_order(self, quantized_model: nn.Module, load_recorder: HookRecorder) -> None:
        """An observer sees the load's hooks in :data:`qcore.testing.LOAD_ORDER`; the once-per-load
        hooks run exactly once; at least one ``create_quantized_param``, each right after its
        parameter's check."""
        calls = [c for c in load_recorder.calls if c in LOAD_ORDER]
        assert calls, "the observer saw no hook call"
        rank = {name: i for i, name in enumerate(LOAD_ORDER)}
        per_param = {"check_if_quantized_param", "check_quantized_param_shape", "create_quantized_param"}
        stage = [rank[c] if c not in per_param else rank["check_if_quantized_param"] for c in calls]
        assert stage == sorted(stage), f"hooks out of order: {load_recorder.distinct()}"
        for name in (
            "validate_environment",
            "update_torch_dtype",
            "update_device_map",
            "preprocess_model",
            "group_checkpoint_keys",
            "update_missing_keys",
            "postprocess_model",
        ):
            assert load_recorder.count(name) == 1, f"{name} called {load_recorder.count(name)} times"
        assert load_recorder.count("create_quantized_param") >= 1, "no parameter was quantized"
        for i, name in enumerate(calls):
            if name == "create_quantized_param":
                assert calls[i - 1] in ("check_if_quantized_param", "check_quantized_param_shape")

    def test_parameter_count_unchanged(self, reference_model: nn.Module, quantized_model: nn.Module) -> None:
        """The quantized model has as many logical parameters (``count_parameters``) as the
        unquantized one."""
        assert self.count_parameters(quantized_model) == self.count_parameters(reference_model)

    def test_memory_footprint_smaller(self, reference_model: nn.Module, quantized_model: nn.Module) -> None:
        """Unquantized bytes / quantized bytes (parameters and buffers, tensor subclasses by their
        inner tensors) is at least ``min_memory_ratio``."""
        before, after = self.memory_footprint(reference_model), self.memory_footprint(quantized_model)
        assert before / after >= self.min_memory_ratio, (
            f"footprint {before} -> {after} bytes (ratio {before / after:.2f}, "
            f"min_memory_ratio {self.min_memory_ratio})"
        )

    def test_quantized_layers(self, reference_model: nn.Module, quantized_model: nn.Module) -> None:
        """Every ``nn.Linear`` of the model was quantized (``is_quantized_module``), and the model
        says ``is_quantized`` and its ``quantization_method``."""
        names = self.linear_names(reference_model)
        unconverted = [
            n
            for n in names
            if not self.is_quantized_module(
                quantized_model.get_submodule(n), reference_model.get_submodule(n)
            )
        ]
        assert not unconverted, f"Linear layers left unquantized: {unconverted}"
        assert getattr(quantized_model, "is_quantized", False)
        assert quantized_model.quantization_method == self.config_class.quant_method

    def test_no_nans(self, quantized_output: torch.Tensor) -> None:
        """The quantized model's output is finite."""
        assert torch.isfinite(quantized_output).all()

    def test_forward_close_to_reference(
        self, quantized_output: torch.Tensor, reference_output: torch.Tensor
    ) -> None:
        """The quantized output is within ``forward_tolerance`` (relative L2) of the unquantized
        model's, and not identical to it."""
        assert quantized_output.shape == reference_output.shape
        error = relative_error(quantized_output, reference_output)
        assert error <= self.forward_tolerance, f"relative error {error:.4f} > {self.forward_tolerance}"
        assert error > 0, "output identical to the unquantized model: nothing was quantized"

    def test_load_facts_recorded(self, quantized_model: nn.Module) -> None:
        """The model's config records the quantization_config and ``_pre_quantization_dtype``;
        ``hf_quantizer`` is the load's qcore.Quantizer, not pre-quantized."""
        config = getattr(quantized_model, "config", {})
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        assert get("quantization_config") == self.make_config()
        assert get("_pre_quantization_dtype") == self.torch_dtype
        quantizer = quantized_model.hf_quantizer
        assert isinstance(quantizer, Quantizer) and not quantizer.pre_quantized

    @pytest.mark.parametrize("cast", list(_DTYPE_CASTS))
    def test_dtype_cast_refused(
        self, quantized_model: nn.Module, quantized_output: torch.Tensor, inputs: Any, cast: str
    ) -> None:
        """Each dtype cast (``to(dtype)``, ``half()``, ``float()``, ...) raises qcore.DtypeCastError
        naming the quant_method and leaves the output unchanged."""
        with pytest.raises(DtypeCastError) as info:
            _DTYPE_CASTS[cast](quantized_model)
        assert self.config_class.quant_method in str(info.value)
        assert torch.equal(self.forward(quantized_model, inputs), quantized_output), (
            "a refused cast changed the model"
        )

    # --- saving -----------------------------------------------------------------------------------

    def test_save_load_round_trip(
        self,
        quantized_checkpoint: Path,
        quantized_output: torch.Tensor,
        quantized_model: nn.Module,
        inputs: Any,
    ) -> None:
        """Save, then reload without ``torch_dtype`` or config: same config, ``torch.equal`` output,
        same state-dict keys, no save hooks during the load; saving the reloaded model writes bit-
        identical tensors."""
        saved = json.loads((quantized_checkpoint / "config.json").read_text())
        assert saved["quantization_config"] == self.make_config().to_dict()
        recorder = HookRecorder()
        reloaded = self.load(quantized_checkpoint, observers=[recorder])
        assert reloaded.hf_quantizer.pre_quantized
        assert reloaded.hf_quantizer.quantization_config == self.make_config()
        assert torch.equal(self.forward(reloaded, inputs), quantized_output), "reloaded output differs"
        assert set(reloaded.state_dict()) == set(quantized_model.state_dict())
        assert recorder.count("create_quantized_param") >= 1
        assert [c for c in recorder.distinct() if c in SAVE_ORDER] == []

        # Saving the reloaded model writes the same checkpoint again.
        again = quantized_checkpoint.parent / "quantized-again"
        save_pretrained(reloaded, again)
        assert recorder.distinct()[-2:] == list(SAVE_ORDER)
        self._assert_same_tensors(quantized_checkpoint, again)

    def test_save_load_round_trip_sharded(
        self, quantized_model: nn.Module, quantized_output: torch.Tensor, conformance_dir: Path, inputs: Any
    ) -> None:
        """Saved in shards of a fifth of the model (a weight and its statistics may part), the
        checkpoint reloads without ``torch_dtype`` to a ``torch.equal`` output."""
        if not self.supports_serialization:
            pytest.skip(f"{type(self).__name__}.supports_serialization is False")
        path = conformance_dir / "quantized-sharded"
        # Small shards split a layer's weight from its statistics, the case diffusers cannot load.
        save_pretrained(quantized_model, path, max_shard_size=self.memory_footprint(quantized_model) // 5)
        assert len(list(path.glob("*.safetensors"))) > 1
        reloaded = self.load(path)
        assert torch.equal(self.forward(reloaded, inputs), quantized_output)

    @staticmethod
    def _assert_same_tensors(a: Path, b: Path) -> None:
        from safetensors.torch import load_file

        ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
        tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
        assert set(ta) == set(tb)
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key

    # --- dequantize -------------------------------------------------------------------------------

    def test_dequantize(
        self,
        reference_checkpoint: Path,
        reference_model: nn.Module,
        quantized_output: torch.Tensor,
        inputs: Any,
    ) -> None:
        """qcore.dequantize gives plain ``nn.Linear`` layers in ``torch_dtype`` whose output is
        within ``dequantize_tolerance`` of the quantized output, and dtype casts work again; with
        ``supports_dequantize = False`` it must raise qcore.DequantizeError."""
        model = self.load(reference_checkpoint, quantization_config=self.make_config())
        if not self.supports_dequantize:
            with pytest.raises(DequantizeError):
                dequantize(model)
            return
        dequantize(model)
        assert not getattr(model, "is_quantized", False)
        for name in self.linear_names(reference_model):
            module = model.get_submodule(name)
            assert type(module) is nn.Linear and type(module.weight.data) is torch.Tensor, name
            assert module.weight.dtype == self.torch_dtype, (name, module.weight.dtype)
        error = relative_error(self.forward(model, inputs), quantized_output)
        assert error <= self.dequantize_tolerance, f"dequantized output differs by {error:.4f}"
        model.to(torch.float32)  # a dequantized model is a plain model again

    # --- modules_to_not_convert -------------------------------------------------------------------

    def test_modules_to_not_convert(self, reference_checkpoint: Path, reference_model: nn.Module) -> None:
        """The module named in ``skip_modules_option`` stays an unquantized Linear with its exact
        weights, every other Linear is quantized, and the saved config lists it."""
        skip = self.module_to_not_convert
        config = self.make_config(**{self.skip_modules_option: [skip]})
        model = self.load(reference_checkpoint, quantization_config=config)
        for name in self.linear_names(reference_model):
            reference = reference_model.get_submodule(name)
            quantized = self.is_quantized_module(model.get_submodule(name), reference)
            skipped = module_matches(name, [skip])
            assert quantized != skipped, (
                f"{name}: quantized={quantized}, in {self.skip_modules_option}={skipped}"
            )
            if skipped:
                weight = model.get_submodule(name).weight
                assert torch.equal(weight.detach().cpu(), reference.weight.detach()), name
        saved = model.hf_quantizer.quantization_config.to_dict()[self.skip_modules_option]
        assert skip in saved

    # --- corrupted checkpoints --------------------------------------------------------------------

    @pytest.mark.parametrize("corruption", CORRUPTIONS)
    def test_corrupted_checkpoint_names_the_tensor(
        self,
        corruption: str,
        quantized_checkpoint: Path,
        quantized_model: nn.Module,
        reference_model: nn.Module,
        tmp_path: Path,
    ) -> None:
        """Each corruption of :data:`qcore.testing.CORRUPTIONS` makes the reload raise a
        qcore.QcoreError naming the tensor or file (a truncated file: qcore.CorruptCheckpointError)."""
        if corruption not in self.corruptions:
            pytest.skip(f"{corruption} is not in {type(self).__name__}.corruptions")
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = tmp_path / "corrupt"
        shutil.copytree(quantized_checkpoint, path)
        (weights,) = path.glob("*.safetensors")
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        module, main, statistics = self._corruption_target(tensors, quantized_model, reference_model)
        if corruption == "truncated_file":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) - max(16, len(data) // 3)])
            names: tuple[str, ...] = (weights.name,)
        elif corruption == "truncated_tensor":
            t = tensors[main]
            tensors[main] = t[:-1].clone() if t.dim() and t.shape[0] > 1 else t.reshape(-1)[:-1].clone()
            names = (main, f"{module}.weight")
        elif corruption == "wrong_dtype":
            t = tensors[main]
            tensors[main] = t.to(torch.float16 if t.dtype == torch.float32 else torch.float32)
            names = (main, f"{module}.weight")
        else:  # missing_statistics
            if not statistics:
                pytest.skip(f"{main} is stored without statistics tensors")
            del tensors[statistics[0]]
            names = (statistics[0], main, f"{module}.weight")
        if corruption != "truncated_file":
            save_file(tensors, str(weights), metadata=metadata)
        with pytest.raises(QcoreError) as info:
            self.load(path)
        message = str(info.value)
        assert any(name in message for name in names), f"the error does not name {names[0]!r}: {message}"
        if corruption == "truncated_file":
            assert isinstance(info.value, CorruptCheckpointError)

    def _corruption_target(
        self, tensors: Mapping[str, torch.Tensor], quantized_model: nn.Module, reference_model: nn.Module
    ) -> tuple[str, str, list[str]]:
        """A quantized module, its largest stored tensor, and its other non-bias tensors."""
        for name in self.linear_names(reference_model):
            if not self.is_quantized_module(
                quantized_model.get_submodule(name), reference_model.get_submodule(name)
            ):
                continue
            keys = [k for k in tensors if k.startswith(f"{name}.") and k != f"{name}.bias"]
            if keys:
                main = max(keys, key=lambda k: (tensors[k].numel(), k.endswith("weight")))
                statistics = [k for k in keys if k != main]
                return name, main, statistics
        raise AssertionError("the saved checkpoint holds no tensor of a quantized module")
