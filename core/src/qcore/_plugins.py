"""One pluggy PluginManager per load: defaults, the backend's quantizer (if any), and observers."""

from __future__ import annotations

import types
from collections.abc import Iterable

import pluggy

from . import _hookspecs
from ._defaults import DefaultHooks
from ._errors import BackendValidationError
from ._hookspecs import PROJECT_NAME
from ._quantizer import Quantizer


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(_hookspecs)
    return pm


def _hook_names() -> frozenset[str]:
    pm = _new_manager()
    return frozenset(name for name in dir(_hookspecs) if pm.parse_hookspec_opts(_hookspecs, name) is not None)


HOOK_NAMES = _hook_names()


def _describe(quant_method: str, distribution: str | None) -> str:
    return f"backend {quant_method!r}" + (f" (distribution {distribution!r})" if distribution else "")


def validate_quantizer_class(
    quantizer_class: type, quant_method: str, distribution: str | None = None
) -> None:
    """Reject a quantizer class whose hooks do not match the spec, naming backend, hook and argument."""
    who = _describe(quant_method, distribution)
    if not (isinstance(quantizer_class, type) and issubclass(quantizer_class, Quantizer)):
        raise BackendValidationError(f"{who}: {quantizer_class!r} is not a qcore.Quantizer subclass")
    pm = _new_manager()
    marked = set()
    for name in dir(quantizer_class):
        if pm.parse_hookimpl_opts(quantizer_class, name) is not None:
            marked.add(name)
        elif name in HOOK_NAMES and callable(getattr(quantizer_class, name, None)):
            raise BackendValidationError(
                f"{who}: method {name!r} of {quantizer_class.__qualname__} is named like a hook but "
                "is not marked @qcore.hookimpl, so it would never be called"
            )
    unknown = sorted(marked - HOOK_NAMES)
    if unknown:
        raise BackendValidationError(
            f"{who}: {quantizer_class.__qualname__} implements unknown hook(s) {', '.join(unknown)}; "
            f"the hooks are: {', '.join(sorted(HOOK_NAMES))}"
        )
    if "check_if_quantized_param" in marked and "create_quantized_param" not in marked:
        raise BackendValidationError(
            f"{who}: {quantizer_class.__qualname__} implements check_if_quantized_param but not "
            "create_quantized_param"
        )
    # Only the marked functions are registered: instantiating the class (or reading its properties)
    # could fail without a config, and pluggy checks the signatures all the same.
    hooks_only = types.SimpleNamespace(**{name: getattr(quantizer_class, name) for name in marked})
    try:
        pm.register(hooks_only, name=quant_method)
    except pluggy.PluginValidationError as exc:
        raise BackendValidationError(f"{who}: {str(exc).replace(chr(10), '; ')}") from exc


def make_plugin_manager(
    quantizer: Quantizer | None, observers: Iterable[object] = ()
) -> pluggy.PluginManager:
    """The load's plugin manager: defaults (``trylast``), the quantizer if any, then each observer.

    Without a quantizer (an unquantized load) the defaults answer every hook.
    """
    pm = _new_manager()
    pm.register(DefaultHooks(), name="qcore.defaults")
    if quantizer is not None:
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
