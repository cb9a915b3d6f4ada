"""A checkpoint reader whose keys are renamed to the model's, for checkpoints a library renames on load."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class RenamedReader:
    """Presents an entered reader's tensors under the model's names: ``file_keys`` maps each model key to
    the checkpoint key holding it. Reads and file lookups go to the wrapped reader under the file's name."""

    def __init__(self, reader: Any, file_keys: Mapping[str, str]) -> None:
        self._reader = reader
        self._file_keys = dict(file_keys)
        self.files = reader.files
        self.metadata = reader.metadata
        self.keys = list(self._file_keys)
        self.key_file = {key: reader.key_file[stored] for key, stored in self._file_keys.items()}

    def info(self, key: str) -> Any:
        return self._reader.info(self._file_keys[key])

    def read(self, key: str) -> torch.Tensor:
        return self._reader.read(self._file_keys[key])

    def dtype_and_numel(self, key: str) -> tuple[torch.dtype | None, int]:
        return self._reader.dtype_and_numel(self._file_keys[key])

    def file_of(self, key: str) -> str:
        return self._reader.file_of(self._file_keys[key])

    def __getattr__(self, name: str) -> Any:  # anything else the loader asks of a reader
        return getattr(self._reader, name)
