"""The ``.gguf`` checkpoint format: tensors as GGML blocks, read lazily from a memory map."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qcore

from ._dequant import FLOAT_TYPES, GGML_TYPES, TYPE_NAMES, logical_shape
from ._tensor import GGUFWeight

logger = logging.getLogger("qcore.gguf")

MAGIC = b"GGUF"
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."


class GGUFFormat(qcore.CheckpointFormat):
    """Reads a GGUF file (llama.cpp's format, as city96's diffusion model files use it).

    Quantized tensors come back as :class:`GGUFWeight` (uint8 blocks + type), F32/F16 tensors as plain
    tensors. ``comfy.gguf.orig_shape.<name>`` entries give the logical shape of tensors stored flattened.
    Every file implies ``quant_method="gguf"``.
    """

    suffixes = (".gguf",)
    implied_quant_method = "gguf"

    @classmethod
    def detect(cls, path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                return f.read(4) == MAGIC
        except OSError:
            return False

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import gguf

        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as exc:  # gguf raises ValueError, KeyError, IndexError... on damaged files
            raise qcore.CorruptCheckpointError(
                f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc})"
            ) from exc
        self._metadata = self._read_metadata()
        self._tensors: dict[str, Any] = {}
        self._infos: dict[str, qcore.TensorInfo] = {}
        size = self.path.stat().st_size
        for tensor in self._reader.tensors:
            type_name = TYPE_NAMES.get(int(tensor.tensor_type))
            if type_name is None:
                raise qcore.CorruptCheckpointError(
                    f"{self.path}: tensor {tensor.name!r} has GGML type {tensor.tensor_type!r}, which "
                    f"qcore-gguf does not read (it reads {', '.join(GGML_TYPES)})"
                )
            if tensor.data_offset + int(tensor.n_bytes) > size or tensor.data.nbytes != int(tensor.n_bytes):
                raise qcore.CorruptCheckpointError(
                    f"{self.path}: tensor {tensor.name!r} runs past the end of the file (truncated download?)"
                )
            stored = tuple(int(d) for d in tensor.data.shape)
            shape = stored if type_name in FLOAT_TYPES else logical_shape(type_name, stored)
            orig = self._metadata_shape(tensor.name)
            if orig is not None:
                if int(np.prod(orig)) != int(np.prod(shape)):
                    raise qcore.CorruptCheckpointError(
                        f"{self.path}: {ORIG_SHAPE_PREFIX}{tensor.name} is {orig}, but the tensor holds "
                        f"{int(np.prod(shape))} elements"
                    )
                block = GGML_TYPES[type_name][1]
                if type_name not in FLOAT_TYPES and (not orig or orig[-1] % block):
                    raise qcore.CorruptCheckpointError(
                        f"{self.path}: {ORIG_SHAPE_PREFIX}{tensor.name} is {orig}, whose rows are not whole "
                        f"{type_name} blocks of {block}"
                    )
                shape = orig
            self._tensors[tensor.name] = tensor
            # Stored row after row from data_offset, so qcore reads row ranges itself (see wrap).
            offset = int(tensor.data_offset)
            if type_name in FLOAT_TYPES:
                info = qcore.TensorInfo(
                    shape, FLOAT_TYPES[type_name], None, int(tensor.n_bytes), None, offset
                )
            else:
                rows = shape[:-1]
                stored_shape = (*rows, int(tensor.n_bytes) // max(1, int(np.prod(rows))))
                info = qcore.TensorInfo(
                    shape, torch.uint8, type_name, int(tensor.n_bytes), stored_shape, offset
                )
            self._infos[tensor.name] = info
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()

    def _read_metadata(self) -> dict[str, str]:
        out = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                value = field.contents()
            except Exception:  # a field type this gguf version cannot render
                continue
            out[key] = value if isinstance(value, str) else repr(value)
        return out

    def _metadata_shape(self, name: str) -> tuple[int, ...] | None:
        field = self._reader.fields.get(ORIG_SHAPE_PREFIX + name)
        if field is None:
            return None
        return tuple(int(d) for d in field.contents())

    def tensors(self) -> Mapping[str, qcore.TensorInfo]:
        return self._infos

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        info = self._infos[key]
        shape = info.stored_shape
        count = shape[0] if shape else 1
        start, stop = rows if rows is not None else (0, count)
        row_bytes = info.nbytes // max(count, 1)
        # Plain reads into a fresh tensor: only these rows' bytes, and no file page stays mapped in the
        # process (the page cache holds them, not the RSS), unlike slicing gguf's memory map.
        data = self._pread(
            self._tensors[key].data_offset + start * row_bytes, (stop - start) * row_bytes, key
        )
        if info.quant_type is None:
            value = data.view(info.dtype)
            return value.reshape((stop - start, *shape[1:]) if rows is not None else info.shape)
        return GGUFWeight(data.reshape(stop - start, *shape[1:]), info.quant_type)

    def wrap(self, key: str, data: torch.Tensor) -> torch.Tensor:
        quant_type = self._infos[key].quant_type
        return data if quant_type is None else GGUFWeight(data, quant_type)

    def _pread(self, offset: int, nbytes: int, key: str) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        self._file.seek(offset)
        while done < nbytes:
            got = self._file.readinto(view[done:])
            if not got:
                raise qcore.CorruptCheckpointError(
                    f"{self.path}: tensor {key!r} ends at byte {offset + done}, inside its data (truncated?)"
                )
            done += got
        return buffer

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def quantization_config(self) -> dict[str, Any] | None:
        return {"quant_method": "gguf"}

    def close(self) -> None:
        self._file.close()
        self._tensors.clear()
        # The memory map closes when the reader is collected.
        self._reader = None  # type: ignore[assignment]
