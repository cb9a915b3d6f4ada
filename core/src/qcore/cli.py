"""The ``qcore`` command: list backends, inspect checkpoints, quantize checkpoints offline.

Exit codes (stable; scripts may rely on them):

- 0: success.
- 1: qcore error: a backend is missing or failed to load, a checkpoint is missing or corrupt, a
  config option is invalid, ``inspect`` found a checkpoint no installed backend can load,
  ``backends --check`` found a backend that failed.
- 2: usage error: unknown command or option, malformed ``--set`` / ``--model`` / ``--torch-dtype``.
- 3: unexpected error inside qcore or a backend (a bug: rerun with ``--debug`` and report it).
- 130: interrupted (Ctrl-C).

Errors are printed to stderr as one line starting with ``qcore: error:``; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._checkpoint import CONFIG_NAME, CheckpointFiles, locate_checkpoint, read_json
from ._cli_inspect import survey
from ._converters import open_checkpoint
from ._errors import ConfigError, QcoreError
from ._helpers import reroute_log_messages
from ._loading import from_pretrained, summarize_checkpoint
from ._model import family_of
from ._registry import available_backends, get_backend
from ._saving import save_pretrained

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

logger = logging.getLogger("qcore")


class UsageError(Exception):
    """Bad command-line input that argparse cannot see (exit 2)."""


class _Failure(Exception):
    """A reported failure with a ready message (exit 1)."""


# --- parser -------------------------------------------------------------------------------------

_DESCRIPTION = """\
Quantization backends and checkpoints from the command line.

commands:
  backends   list the installed quantization backends and whether each loads
  inspect    describe a checkpoint and say whether an installed backend can load it
  quantize   quantize an unquantized checkpoint into a pre-quantized one

exit codes: 0 ok, 1 qcore error (missing backend, bad checkpoint or config), 2 usage error,
3 unexpected internal error, 130 interrupted. Errors go to stderr as 'qcore: error: ...'.
"""

_QUANTIZE_EPILOG = """\
examples:
  qcore quantize ./flux-bf16 ./flux-int8 --method torchao --set quant_type=int8wo
  qcore quantize black-forest-labs/FLUX.1-dev ./flux-nf4 --subfolder transformer \\
      --method bitsandbytes --set load_in_4bit=true --set bnb_4bit_quant_type=nf4
  qcore quantize ./tiny ./tiny-q --method int8 --model mypkg.models:TinyModel

--set values are parsed as JSON when they parse (true, 3, 0.5, null, ["a","b"], {"k": 1}),
otherwise taken as strings. The output directory is written atomically: it appears complete or
not at all.
"""


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log what qcore does (INFO level) to stderr",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log everything (DEBUG level) and print the traceback of an error",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="qcore",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"qcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "backends",
        parents=[common],
        help="list the installed quantization backends",
        description="List every quantization backend qcore can see: quant_method, distribution, "
        "version, config class and status (ok, failed with the reason, or disabled by "
        "QCORE_PLUGINS). Each backend is imported to find its status. "
        "QCORE_DISABLE_PLUGIN_AUTOLOAD=1 hides installed backends; QCORE_PLUGINS=a,b allows only "
        "the named ones.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 when any backend failed to load (for CI and install scripts)",
    )
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="describe a checkpoint and whether it can be loaded",
        description="Describe a checkpoint from its config.json and the weight files' headers (no "
        "tensor data is read): model class, quant_method and quantization_config, shards, "
        "parameter count, bytes by dtype, and whether an installed backend can load it. Exits "
        "with status 1, printing the install hint, when no installed backend can.",
    )
    p.add_argument(
        "path", metavar="PATH_OR_HUB_ID", help="a local checkpoint directory or a hub repository id"
    )
    p.add_argument("--subfolder", help="the model's folder inside a pipeline repository (e.g. transformer)")
    p.add_argument(
        "--variant", help="weight file variant, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors"
    )
    p.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a checkpoint offline into a pre-quantized one",
        description="Load SRC quantizing on load with the backend named by --method, then save the "
        "pre-quantized model to DST in diffusers' layout (config.json with quantization_config, "
        "safetensors shards). Loading DST later needs no quantization_config.",
        epilog=_QUANTIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="unquantized checkpoint: local directory or hub id")
    p.add_argument("dst", metavar="DST", help="output directory for the pre-quantized checkpoint")
    p.add_argument(
        "--method",
        required=True,
        metavar="NAME",
        help="quant_method of an installed backend (see 'qcore backends')",
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a quantization config option, repeatable (see the backend's config class for the options)",
    )
    p.add_argument(
        "--model",
        metavar="MODULE:CLASS",
        help="model class to build, e.g. diffusers:FluxTransformer2DModel or mypkg.models:Net "
        "(default: config.json's _class_name looked up in diffusers); the current directory is "
        "importable",
    )
    p.add_argument("--subfolder", help="the model's folder inside SRC (e.g. transformer)")
    p.add_argument("--variant", help="weight file variant of SRC to read (e.g. fp16)")
    p.add_argument("--revision", help="hub branch, tag or commit of SRC (default: main)")
    p.add_argument(
        "--torch-dtype",
        metavar="DTYPE",
        help="dtype of the parameters that stay unquantized, e.g. bfloat16 (default: SRC's dtype, the "
        "floating dtype most of its elements are stored in)",
    )
    p.add_argument(
        "--device-map",
        metavar="MAP",
        help="where to quantize: cpu, cuda, cuda:1 or auto (default: cpu); some backends need a GPU",
    )
    p.add_argument(
        "--max-shard-size",
        default="10GB",
        metavar="SIZE",
        help="largest safetensors shard written, e.g. 5GB or 500MB (default: 10GB)",
    )
    p.add_argument("--output-variant", metavar="VARIANT", help="variant name for the written weight files")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a checkpoint already in DST (other files there are kept)",
    )
    p.set_defaults(func=cmd_quantize)
    return parser


# --- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qcore`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 for --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    debug = getattr(args, "debug", False)
    previous_level = logger.level
    handler = _setup_logging(debug, getattr(args, "verbose", False))
    _quiet_import_noise()
    try:
        return int(args.func(args))
    except UsageError as exc:
        return _report(f"{exc} (see qcore {args.command} --help)", EXIT_USAGE, debug)
    except _Failure as exc:
        return _report(str(exc), EXIT_ERROR, debug)
    except KeyboardInterrupt:
        return _report("interrupted", EXIT_INTERRUPTED, debug)
    except Exception as exc:
        if isinstance(exc, QcoreError):
            return _report(str(exc), EXIT_ERROR, debug)
        if isinstance(exc, OSError):  # the environment (permissions, a full disk), not a bug
            where = f"{exc.filename}: " if exc.filename else ""
            return _report(f"{where}{exc.strerror or exc}", EXIT_ERROR, debug)
        hint = "" if debug else " (rerun with --debug for the traceback)"
        return _report(f"unexpected {type(exc).__name__}: {exc}{hint}", EXIT_INTERNAL, debug)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def _setup_logging(debug: bool, verbose: bool) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapingFormatter("qcore: %(levelname)s: %(message)s"))
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler.setLevel(level)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return handler


# Warnings that libraries log while they import, about optional parts that qcore does not use: torchao's
# C++ kernels that do not load here and torch's deprecation of how torchao registers its enums,
# bitsandbytes' missing `kernels` package, diffusers' torchao tensor types for torch.load pickles (qcore
# reads safetensors) that this torchao does not have.
# Importing diffusers (to build SRC's model class) imports torchao and bitsandbytes whenever they are
# installed, whatever --method is and before any backend could quiet them, so the command quiets them
# itself: shown only with -v, under qcore's logger.
_IMPORT_NOISE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torchao", (r"^Failed to load .*_C\w*\.\S*so\b", r"^Skipping import of cpp extensions")),
    ("torch.utils._pytree", (r"is an Enum subclass and is now natively supported by torch\.compile",)),
    ("bitsandbytes.backends.cpu.ops", (r"from kernels-community",)),
    ("diffusers.quantizers.torchao.torchao_quantizer", (r"^Unable to import `torchao` Tensor objects",)),
)


def _quiet_import_noise() -> None:
    # A logger of its own: a backend's reroute of the same library to its logger still installs (one
    # per source and target), with whatever patterns it has beyond these.
    target = logging.getLogger("qcore.cli")
    for source, patterns in _IMPORT_NOISE:
        reroute_log_messages(source, patterns, target, logging.INFO)


class _EscapingFormatter(logging.Formatter):
    """Log lines with checkpoint strings escaped (see :func:`escaped`); line breaks are kept."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(escaped(line) for line in super().format(record).split("\n"))


def _report(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc(file=sys.stderr)
    # One line: scripts grep it, and a multi-line message would be cut by `head -1`.
    print(f"qcore: error: {escaped(' '.join(message.split()))}", file=sys.stderr)
    return code


def escaped(text: str) -> str:
    """``text`` with every control or invisible character written as an escape (``\\x1b``).

    Checkpoint strings are untrusted: raw escape codes could rewrite the terminal.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _say(line: str) -> None:
    print(escaped(line))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


# --- qcore backends -----------------------------------------------------------------------------


def cmd_backends(args: argparse.Namespace) -> int:
    rows = []
    for info in available_backends():
        row = asdict(info)
        if info.status == "ok":
            cls = get_backend(info.quant_method).config_class
            row["config_class"] = f"{cls.__module__}.{cls.__qualname__}"
        rows.append(row)
    if args.json:
        _print_json(rows)
    elif not rows:
        print(
            "No quantization backend is installed. Install one (pip install qcore-bnb, pip install "
            "qcore-torchao) or see docs/backend-authors.md to write one."
        )
    else:
        table = [
            [
                r["quant_method"],
                r["distribution"] or "(in-process)",
                r["version"] or "-",
                r["config_class"] or "-",
                r["status"] if r["status"] == "ok" else f"{r['status']}: {' '.join(str(r['error']).split())}",
            ]
            for r in rows
        ]
        _print_table(["QUANT_METHOD", "DISTRIBUTION", "VERSION", "CONFIG CLASS", "STATUS"], table)
    if args.check and any(r["status"] == "failed" for r in rows):
        failed = ", ".join(r["quant_method"] for r in rows if r["status"] == "failed")
        raise _Failure(f"backend(s) failed to load: {failed}")
    return EXIT_OK


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    # The last column (status and reason) is not padded: it may be long.
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)] + [str(row[-1])]
        _say("  ".join(cells))


# --- qcore inspect ------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    result = survey(args.path, subfolder=args.subfolder, variant=args.variant, revision=args.revision)
    if args.json:
        _print_json(result.to_json())
    else:
        _print_survey(result)
    if not result.load.loadable:
        hint = f" Install it: {result.load.install_hint}" if result.load.install_hint else ""
        if result.load.install_hint and result.load.install_hint in (result.load.problem or ""):
            hint = ""
        raise _Failure(f"{result.location} cannot be loaded here: {result.load.problem}{hint}")
    return EXIT_OK


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _print_survey(s: Any) -> None:
    _say(f"checkpoint    {s.location}")
    if s.class_name:
        _say(
            f"class         {s.class_name}"
            + (f" (saved with version {s.library_version})" if s.library_version else "")
        )
    if s.quant_method is None:
        _say("quantization  none (an unquantized checkpoint: quantize on load or with 'qcore quantize')")
    else:
        _say(f"quantization  {s.quant_method}")
        for key, value in sorted((s.quantization_config or {}).items()):
            if key != "quant_method":
                _say(f"  {key} = {json.dumps(value)}")
        if s.pre_quantization_dtype:
            _say(f"  (quantized from {s.pre_quantization_dtype})")
        load = s.load
        if load.loadable:
            source = (
                f"{load.distribution} {load.version}" if load.distribution else "an in-process registration"
            )
            _say(f"backend       ok: {source}, config class {load.config_class}")
        else:
            _say(f"backend       NOT LOADABLE: {load.problem}")
            if load.install_hint:
                _say(f"  install: {load.install_hint}")
    total = sum(sh.size or 0 for sh in s.shards)
    index = f", index {s.index}" if s.index else ""
    _say(f"files         {len(s.shards)} weight file(s), {_size(total)}{index}")
    for sh in s.shards:
        _say(f"  {sh.name}  {sh.tensors} tensors, {_size(sh.size)}")
    _say(f"parameters    {s.parameters:,} elements in {s.tensors} tensors")
    _say("by dtype")
    width = max((len(name) for name in s.dtypes), default=0)
    for name, total_ in s.dtypes.items():
        _say(
            f"  {name.ljust(width)}  {_size(total_.bytes):>9}  {total_.elements:,} elements in "
            f"{total_.tensors} tensors"
        )


# --- qcore quantize -----------------------------------------------------------------------------


def parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``: JSON where it parses, else the string."""
    parsed: dict[str, Any] = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set compute_dtype=bfloat16")
        try:
            parsed[key] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key] = raw
    return parsed


def _torch_dtype(name: str | None) -> Any:
    if name is None:
        return None
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise UsageError(f"--torch-dtype {name!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
    return value


def _device_map(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _import_model_class(spec: str) -> type:
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise UsageError(f"--model {spec!r}: expected MODULE:CLASS, e.g. diffusers:FluxTransformer2DModel")
    # Like `python -m`, let a model defined next to the user's scripts be found.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _Failure(f"--model {spec!r}: cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in class_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise _Failure(f"--model {spec!r}: {module_name!r} has no attribute {class_name!r}")
    if not isinstance(obj, type):
        raise _Failure(f"--model {spec!r} is not a class")
    return obj


def _detect_model_class(config: dict[str, Any], where: str) -> type:
    class_name = config.get("_class_name")
    if not class_name:
        raise _Failure(
            f"{where}: config.json has no _class_name; pass the model class with --model MODULE:CLASS"
        )
    try:
        diffusers = importlib.import_module("diffusers")
    except ImportError:
        raise _Failure(
            f"{where}: config.json names the class {class_name!r}, a diffusers model, but diffusers is "
            "not installed: pip install diffusers, or pass the model class with --model MODULE:CLASS"
        ) from None
    cls = getattr(diffusers, str(class_name), None)
    if not isinstance(cls, type):
        raise _Failure(
            f"{where}: config.json names the class {class_name!r}, which diffusers does not have; pass the "
            "model class with --model MODULE:CLASS"
        )
    return cls


def _source_dtype(model_cls: type, files: CheckpointFiles) -> torch.dtype | None:
    """The dtype an unquantized load of SRC has: the model library's choice (transformers: config.json's
    dtype), else the floating dtype most of SRC's elements are stored in, read from the headers."""
    config, reader = open_checkpoint(model_cls, files)
    with reader:
        stored = summarize_checkpoint(reader).dtype
    return family_of(model_cls).default_dtype(config, stored) or stored


def cmd_quantize(args: argparse.Namespace) -> int:
    settings = parse_settings(args.settings)
    torch_dtype = _torch_dtype(args.torch_dtype)
    model_cls = _import_model_class(args.model) if args.model else None

    dst = Path(args.dst)
    if (dst / CONFIG_NAME).exists() and not args.overwrite:
        raise _Failure(
            f"{dst} already holds a checkpoint; pass --overwrite to replace it, or choose another DST"
        )
    if dst.exists() and not dst.is_dir():
        raise _Failure(f"{dst} exists and is not a directory")

    backend = get_backend(args.method)
    if "quant_method" in settings and settings["quant_method"] != args.method:
        raise ConfigError(
            f"--set quant_method={settings['quant_method']!r} contradicts --method {args.method!r}",
            option="quant_method",
        )
    config = backend.config_class.from_user_dict({**settings, "quant_method": args.method})

    files = locate_checkpoint(
        args.src, subfolder=args.subfolder, variant=args.variant, revision=args.revision
    )
    src_config = read_json(files.config_path) if files.config_path is not None else {}
    existing = src_config.get("quantization_config")
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else existing
        raise _Failure(
            f"{files.location} is already quantized (quant_method {method!r}); quantize needs an "
            "unquantized checkpoint"
        )
    if model_cls is None:
        model_cls = _detect_model_class(src_config, files.location)
    if torch_dtype is None:
        # from_pretrained given no torch_dtype lets the backend choose, and backends choose as diffusers
        # does (bitsandbytes float16, torchao bfloat16): the written checkpoint's unquantized parameters
        # would silently change dtype.
        torch_dtype = _source_dtype(model_cls, files)
        if torch_dtype is not None:
            logger.info("--torch-dtype not given: SRC's %s", str(torch_dtype).removeprefix("torch."))

    print(
        escaped(f"quantizing {files.location} ({model_cls.__name__}) with {args.method!r} -> {dst}"),
        file=sys.stderr,
    )
    model = from_pretrained(
        model_cls,
        args.src,
        quantization_config=config,
        torch_dtype=torch_dtype,
        device_map=_device_map(args.device_map),
        subfolder=args.subfolder,
        variant=args.variant,
        revision=args.revision,
    )
    save_pretrained(model, dst, max_shard_size=args.max_shard_size, variant=args.output_variant)
    src_bytes = sum(path.stat().st_size for path in files.weight_files)
    out_bytes = sum(path.stat().st_size for path in dst.iterdir() if path.suffix in (".safetensors", ".bin"))
    _say(f"saved {dst}: {_size(out_bytes)} of weights (from {_size(src_bytes)})")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
