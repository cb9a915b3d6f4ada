"""One pluggy PluginManager per load: defaults, the backend's quantizer, and observers."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from . import _hookspecs
from ._defaults import DefaultHooks
from ._errors import BackendValidationError
from ._hookspecs import PROJECT_NAME
from ._quantizer import Quantizer

_HOOK_NAMES = frozenset(
    name for name in dir(_hookspecs) if hasattr(getattr(_hookspecs, name), f"{PROJECT_NAME}_spec")
)


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(_hookspecs)
    return pm


def _describe(quant_method: str, distribution: str | None) -> str:
    return f"backend {quant_method!r}" + (f" (distribution {distribution!r})" if distribution else "")


def validate_quantizer_class(
    quantizer_class: type, quant_method: str, distribution: str | None = None
) -> None:
    """Reject a quantizer class whose hooks do not match the spec, naming backend, hook and argument."""
    who = _describe(quant_method, distribution)
    if not (isinstance(quantizer_class, type) and issubclass(quantizer_class, Quantizer)):
        raise BackendValidationError(f"{who}: {quantizer_class!r} is not a qcore.Quantizer subclass")
    marked = set()
    for name in dir(quantizer_class):
        attr = getattr(quantizer_class, name, None)
        if getattr(attr, f"{PROJECT_NAME}_impl", None) is not None:
            marked.add(name)
        elif name in _HOOK_NAMES and callable(attr):
            raise BackendValidationError(
                f"{who}: method {name!r} of {quantizer_class.__qualname__} is named like a hook but "
                "is not marked @qcore.hookimpl, so it would never be called"
            )
    unknown = sorted(marked - _HOOK_NAMES)
    if unknown:
        raise BackendValidationError(
            f"{who}: {quantizer_class.__qualname__} implements unknown hook(s) {', '.join(unknown)}; "
            f"the hooks are: {', '.join(sorted(_HOOK_NAMES))}"
        )
    if "check_if_quantized_param" in marked and "create_quantized_param" not in marked:
        raise BackendValidationError(
            f"{who}: {quantizer_class.__qualname__} implements check_if_quantized_param but not "
            "create_quantized_param"
        )
    # Only the marked functions are registered: instantiating the class (or reading its properties)
    # could fail without a config, and pluggy checks the signatures all the same.
    hooks_only = types.SimpleNamespace(**{name: getattr(quantizer_class, name) for name in marked})
    pm = _new_manager()
    try:
        pm.register(hooks_only, name=quant_method)
    except pluggy.PluginValidationError as exc:
        raise BackendValidationError(f"{who}: {str(exc).replace(chr(10), '; ')}") from exc


def make_plugin_manager(quantizer: Quantizer, observers: Iterable[object] = ()) -> pluggy.PluginManager:
    """The load's plugin manager: defaults (``trylast``), the quantizer, then each observer."""
    pm = _new_manager()
    pm.register(DefaultHooks(), name="qcore.defaults")
    pm.register(quantizer, name=f"backend:{quantizer.quant_method}")
    for observer in observers:
        try:
            pm.register(observer)
        except pluggy.PluginValidationError as exc:
            raise BackendValidationError(f"observer {observer!r}: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise BackendValidationError(str(exc)) from exc
    return pm


def resolve_hook(hook: pluggy.HookCaller) -> Callable[..., Any]:
    """A caller equivalent to ``hook(**kwargs)`` without pluggy's per-call overhead.

    Used for the per-parameter hooks. When any wrapper observes the hook, pluggy itself is called so
    the wrapper sees every call.
    """
    impls = hook.get_hookimpls()
    if any(impl.hookwrapper or impl.wrapper for impl in impls):
        return lambda **kwargs: hook(**kwargs)
    ordered = [(impl.function, impl.argnames) for impl in reversed(impls)]
    if hook.spec is not None and hook.spec.opts.get("firstresult"):

        def first_result(**kwargs: Any) -> Any:
            for function, argnames in ordered:
                result = function(*[kwargs[name] for name in argnames])
                if result is not None:
                    return result
            return None

        return first_result

    def all_results(**kwargs: Any) -> list[Any]:
        results = []
        for function, argnames in ordered:
            result = function(*[kwargs[name] for name in argnames])
            if result is not None:
                results.append(result)
        return results

    return all_results
