"""A plain-Python raw loader: the baseline for "how fast can these bytes reach the GPU".

N threads each own a few pinned host buffers. Every safetensors file's data section is cut into
fixed-size chunks; a thread reads a chunk with os.preadv into one of its pinned buffers (the GIL is
released during the read), then copies it to the GPU with a non-blocking copy on its own CUDA stream,
so reading the next chunk overlaps the copy of the last. A pinned buffer is reused only after the
event recorded behind its copy has completed. Each file lands in one GPU allocation and its tensors
are views into it, so the GPU holds exactly the checkpoint's bytes. There is no per-tensor
synchronisation; one synchronize at the end.

On CPU (smoke tests) the chunks are read straight into the destination buffer.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, header


def load_files(
    paths: Sequence[str | os.PathLike[str]],
    device: str | torch.device = "cuda",
    threads: int = 16,
    chunk_bytes: int = 16 << 20,
    buffers_per_thread: int = 2,
) -> dict[str, torch.Tensor]:
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    plans = []  # (fd, data start, data length, destination uint8 tensor)
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        start, header = read_header(Path(path))
        header.pop("__metadata__", None)
        length = max((info["data_offsets"][1] for info in header.values()), default=0)
        dest = torch.empty(length, dtype=torch.uint8, device=device)
        fd = os.open(path, os.O_RDONLY)
        plans.append((fd, start, length, dest))
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            tensors[name] = dest[begin:end].view(dtype).view(info["shape"])
    chunks = [
        (fd, start + off, dest, off, min(chunk_bytes, length - off))
        for fd, start, length, dest in plans
        for off in range(0, length, chunk_bytes)
    ]
    # large-first would help a skewed last file; fixed order keeps reads sequential per file
    lock = threading.Lock()
    cursor = iter(range(len(chunks)))
    errors: list[BaseException] = []

    def next_chunk() -> int | None:
        with lock:
            return next(cursor, None)

    def worker() -> None:
        try:
            if not on_gpu:
                while (i := next_chunk()) is not None:
                    fd, pos, dest, off, n = chunks[i]
                    _read_exact(fd, memoryview(dest[off : off + n].numpy()), pos)
                return
            stream = torch.cuda.Stream(device)
            slots = [
                torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
                for _ in range(buffers_per_thread)
            ]
            events: list[torch.cuda.Event | None] = [None] * buffers_per_thread
            k = 0
            while (i := next_chunk()) is not None:
                fd, pos, dest, off, n = chunks[i]
                if events[k] is not None:
                    events[k].synchronize()
                _read_exact(fd, memoryview(slots[k].numpy())[:n], pos)
                with torch.cuda.stream(stream):
                    dest[off : off + n].copy_(slots[k][:n], non_blocking=True)
                    events[k] = torch.cuda.Event()
                    events[k].record(stream)
                k = (k + 1) % buffers_per_thread
            stream.synchronize()
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, threads))]
    try:
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        for fd, *_ in plans:
            os.close(fd)
    if errors:
        raise errors[0]
    if on_gpu:
        torch.cuda.synchronize(device)
    return tensors


def _read_exact(fd: int, view: memoryview, pos: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], pos + done)
        if n == 0:
            raise EOFError(f"file ended at byte {pos + done} of a read of {len(view)} bytes")
        done += n
