"""Streaming checkpoint tensors onto their devices, fast.

For CUDA targets, tensors are read straight from the safetensors files with ``os.preadv`` by a pool of
threads into a small ring of pinned host buffers, and copied to the GPU asynchronously on the current
stream. Each byte is read once, nothing waits for a copy to finish (kernels that consume a tensor run
after its copy, in stream order), and at most one tensor's worth of unquantized data sits on the GPU
ahead of the consumer, so quantize-on-load keeps peak GPU memory near the final model size.

CPU targets read each tensor with ``os.preadv`` into memory of its own, not through a memory map of the
file: a mapped page that was read stays in the process's RSS until the whole file is closed, so a
quantize-on-load would peak at the unquantized checkpoint plus the quantized model. Read this way, a
weight's unquantized bytes are freed as soon as the backend has quantized it. Keys a converter maps to
rows of file tensors (a format plugin's file, e.g. GGUF) are read the same way, as consecutive byte
pieces of the file, when the format gives its tensors' offsets; ``.bin`` files and formats that do not
take the reader's own path.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ._checkpoint import CheckpointReader
from ._converters import ConvertedReader
from ._errors import CorruptCheckpointError

# The heap's free pages go back to the system after every TRIM_BYTES of CPU tensors consumed. Less
# costs time, for little memory: every 8 MiB, a torchao int8 load of a 160M Flux took 20-35% longer
# (the returned pages fault in again) and an NF4 one peaked 25 MiB lower.
TRIM_BYTES = 32 << 20
# The CUDA caching allocator serves allocations up to SMALL_POOL_BYTES from a pool of small segments and
# rounds larger ones up to ALLOCATION_GRANULE bytes; a reservation leaves RESERVE_MARGIN_BYTES free.
SMALL_POOL_BYTES = 1 << 20
ALLOCATION_GRANULE = 512
RESERVE_MARGIN_BYTES = 1 << 30


def _setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class _TensorSpan:
    path: Path
    start: int  # absolute file offset of the first byte
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[tuple[int, int], ...] = ()  # (file offset, nbytes) in order, when not one run from start
    wrap: Callable[[torch.Tensor], torch.Tensor] | None = None  # the reader's type for the bytes read

    def extents(self) -> tuple[tuple[int, int], ...]:
        return self.pieces or ((self.start, self.nbytes),)

    def finish(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.wrap is None else self.wrap(tensor)


def _converted_spans(
    reader: ConvertedReader, order: Sequence[tuple[str, torch.device]]
) -> dict[str, _TensorSpan]:
    """Spans of the keys whose rows the format lays out at known offsets (the others are read by it)."""
    spans = {}
    for key, device in order:
        info = reader.info(key)
        pieces = reader.byte_ranges(key) if device.type in ("cuda", "cpu") else None
        if pieces is None or info.torch_dtype is None:
            continue
        nbytes = sum(size for _, size in pieces)
        spans[key] = _TensorSpan(
            reader.key_file[key],
            pieces[0][0] if pieces else 0,
            nbytes,
            info.torch_dtype,
            info.shape,
            tuple(pieces),
            lambda data, key=key: reader.wrap(key, data),
        )
    return spans


def _spans(reader: CheckpointReader, keys: Sequence[str]) -> dict[str, _TensorSpan]:
    spans = {}
    for key in keys:
        info = reader.info(key)  # validated when the reader opened the file
        if info.torch_dtype is None or info.offset is None:
            raise CorruptCheckpointError(
                f"{reader.key_file[key]}: tensor {key!r} has dtype {info.dtype}, which torch cannot hold"
            )
        spans[key] = _TensorSpan(
            reader.key_file[key], info.offset, info.nbytes, info.torch_dtype, info.torch_shape
        )
    return spans


def stream_tensors(
    reader: CheckpointReader | ConvertedReader,
    order: Sequence[tuple[str, torch.device]],
    *,
    reserve_gpu_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the tensors of ``order`` ((key, target device) pairs), in order, on their devices.

    With ``reserve_gpu_memory`` (for loads that keep the tensors as read: unquantized or
    pre-quantized), the GPU memory of the large tensors is first reserved in one allocation per device.
    """
    if isinstance(reader, ConvertedReader):
        yield from _stream(reader, order, _converted_spans(reader, order), reserve_gpu_memory)
        return
    direct = [
        key
        for key, device in order
        if device.type in ("cuda", "cpu")
        and reader.key_file[key].suffix == ".safetensors"
        and reader.info(key).offset is not None  # rows of converted keys are read by the reader
    ]
    yield from _stream(reader, order, _spans(reader, direct), reserve_gpu_memory)


def _stream(
    reader: CheckpointReader | ConvertedReader,
    order: Sequence[tuple[str, torch.device]],
    spans: dict[str, _TensorSpan],
    reserve_gpu_memory: bool,
) -> Iterator[torch.Tensor]:
    on_gpu = {key for key, device in order if key in spans and device.type == "cuda"}
    if on_gpu and reserve_gpu_memory and _setting("QCORE_CUDA_RESERVE", 1):
        reserve_device_memory(
            reservation_sizes((spans[key].nbytes, device) for key, device in order if key in on_gpu)
        )
    files = _Files()
    try:
        if not on_gpu:
            for key, _ in order:
                yield _read_new(files, spans[key]) if key in spans else reader.read(key)
                files.release_freed(spans[key].nbytes if key in spans else 0)
            return
        with _CudaPipeline() as pipeline:
            gpu = pipeline.run([(spans[key], device) for key, device in order if key in on_gpu])
            for key, _ in order:
                if key in on_gpu:
                    yield spans[key].finish(next(gpu))
                else:
                    yield _read_new(files, spans[key]) if key in spans else reader.read(key)
                    files.release_freed(spans[key].nbytes if key in spans else 0)
    finally:
        files.close()
        files.release_freed(TRIM_BYTES)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


class _Files:
    """Open file descriptors, one per checkpoint file, closed together."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}
        self.trim = _malloc_trim()
        self.since_trim = 0

    def release_freed(self, nbytes: int) -> None:
        """Hand the heap's free pages back to the system every TRIM_BYTES of CPU tensors consumed.

        A backend quantizing on the CPU allocates temporaries of each weight's size; after the first
        large free glibc serves such sizes from its heap, where freed memory stays in the RSS, so the
        load would peak at several times the final model without this.
        """
        self.since_trim += nbytes
        if self.trim is not None and self.since_trim >= TRIM_BYTES:
            self.trim(0)
            self.since_trim = 0

    def fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def reservation_sizes(tensors: Iterable[tuple[int, torch.device]]) -> dict[torch.device, int]:
    """Bytes per CUDA device that the caching allocator will hand out from its large pool for
    ``tensors`` ((bytes, device) pairs).

    It serves allocations of at most SMALL_POOL_BYTES from 2 MiB segments of their own and rounds the
    others up to ALLOCATION_GRANULE bytes.
    """
    sizes: dict[torch.device, int] = {}
    for nbytes, device in tensors:
        if device.type == "cuda" and nbytes > SMALL_POOL_BYTES:
            rounded = -(-nbytes // ALLOCATION_GRANULE) * ALLOCATION_GRANULE
            sizes[device] = sizes.get(device, 0) + rounded
    return sizes


def reserve_device_memory(sizes: Mapping[torch.device, int]) -> None:
    """Have the CUDA caching allocator hold ``sizes`` bytes per device, each in one segment.

    Without it nearly every weight of a load is a ``cudaMalloc`` of a size not seen before; reserved
    at once, the weights are carved out of one segment. diffusers and transformers warm their
    allocator the same way before a load. Nothing is reserved where the allocator already holds enough
    unused memory, where the reservation would leave less than RESERVE_MARGIN_BYTES free, or where
    ``max_split_size_mb`` forbids splitting large blocks (the segment would stay unused).
    """
    settings = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "max_split_size_mb" in settings:
        return
    for device, nbytes in sizes.items():
        index = device.index if device.index is not None else torch.cuda.current_device()
        unused = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        free, _ = torch.cuda.mem_get_info(index)
        if nbytes <= unused or nbytes > free - RESERVE_MARGIN_BYTES:
            continue
        try:
            # freed at once: the allocator keeps the segment for the tensors that follow
            torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", index))
        except torch.OutOfMemoryError:
            continue  # a reservation is an optimisation: the load itself says whether the model fits


def _read_exactly(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done, nbytes = 0, len(view)
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CorruptCheckpointError(f"{path}: file ends inside a tensor (offset {offset + done})")
        done += got


def _read_new(files: _Files, span: _TensorSpan) -> torch.Tensor:
    """The tensor of ``span`` in a CPU allocation of its own (the same bytes as safetensors gives)."""
    if span.nbytes == 0:
        return span.finish(torch.empty(span.shape, dtype=span.dtype))
    # Private: Python's default for anonymous maps is MAP_SHARED, shmem pages that cost ~30% more to fault in.
    buffer = mmap.mmap(-1, span.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view, done = memoryview(buffer), 0
    for offset, nbytes in span.extents():
        _read_exactly(files.fd(span.path), view[done : done + nbytes], offset, span.path)
        done += nbytes
    return span.finish(torch.frombuffer(buffer, dtype=torch.uint8).view(span.dtype).view(span.shape))


class _CudaPipeline:
    """Pieces of tensors: read by threads into pinned slots, copied to the GPU in order."""

    def __enter__(self) -> _CudaPipeline:
        # Tuning knobs (bytes per read, pinned slots, reader threads); defaults measured on an H100.
        self.piece = _setting("QCORE_IO_PIECE_BYTES", 8 << 20)
        self.slot_count = _setting("QCORE_IO_SLOTS", 24)
        threads = _setting("QCORE_IO_THREADS", min(16, os.cpu_count() or 4))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="qcore-io")
        self.staging = torch.empty(self.slot_count * self.piece, dtype=torch.uint8, pin_memory=True)
        self.slots = [self.staging[i * self.piece : (i + 1) * self.piece] for i in range(self.slot_count)]
        self.views = [memoryview(slot.numpy()) for slot in self.slots]
        self.fds: dict[Path, int] = {}
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True)
        for fd in self.fds.values():
            os.close(fd)
        torch.cuda.current_stream().synchronize()  # the staging buffers must outlive their copies

    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def _read(self, slot: int, fd: int, offset: int, nbytes: int, path: Path) -> None:
        view = self.views[slot]
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:nbytes]], offset + done)
            if got <= 0:
                raise CorruptCheckpointError(f"{path}: file ends inside a tensor (offset {offset + done})")
            done += got

    def run(self, spans: list[tuple[_TensorSpan, torch.device]]) -> Iterator[torch.Tensor]:
        # (tensor index, offset in tensor, file offset, bytes) for every piece, in tensor order
        pieces = deque(self._pieces(spans))
        free = list(range(self.slot_count))
        reading: deque[tuple[int, int, int, int, Future[None]]] = deque()
        copying: deque[tuple[torch.cuda.Event, int]] = deque()
        targets: dict[int, torch.Tensor] = {}
        self.next_index = 0

        def submit() -> None:
            while free and pieces:
                index, off, at, nbytes = pieces.popleft()
                span = spans[index][0]
                slot = free.pop()
                future = self.pool.submit(self._read, slot, self._fd(span.path), at, nbytes, span.path)
                reading.append((index, off, nbytes, slot, future))

        submit()
        while reading:
            index, off, nbytes, slot, future = reading.popleft()
            future.result()
            span, device = spans[index]
            if index not in targets:
                targets[index] = torch.empty(span.shape, dtype=span.dtype, device=device)
            flat = targets[index].view(-1).view(torch.uint8) if span.nbytes else None
            if flat is not None:
                flat[off : off + nbytes].copy_(self.slots[slot][:nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            copying.append((event, slot))
            while copying and copying[0][0].query():
                free.append(copying.popleft()[1])
            if not free and pieces:
                oldest, oldest_slot = copying.popleft()
                oldest.synchronize()
                free.append(oldest_slot)
            submit()
            yield from self._ready(spans, targets, reading)
        yield from self._ready(spans, targets, reading)

    def _pieces(self, spans: list[tuple[_TensorSpan, torch.device]]) -> Iterator[tuple[int, int, int, int]]:
        for index, (span, _) in enumerate(spans):
            off = 0
            for start, size in span.extents():
                for within in range(0, size, self.piece):
                    nbytes = min(self.piece, size - within)
                    yield index, off + within, start + within, nbytes
                off += size

    def _ready(
        self,
        spans: list[tuple[_TensorSpan, torch.device]],
        targets: dict[int, torch.Tensor],
        reading: deque[tuple[int, int, int, int, Future[None]]],
    ) -> Iterator[torch.Tensor]:
        """Tensors whose last piece is queued, in order (zero-byte tensors have no pieces)."""
        while self.next_index < len(spans):
            span, device = spans[self.next_index]
            if span.nbytes == 0:
                yield torch.empty(span.shape, dtype=span.dtype, device=device)
            elif self.next_index in targets and (not reading or reading[0][0] > self.next_index):
                yield targets.pop(self.next_index)
            else:
                return
            self.next_index += 1
