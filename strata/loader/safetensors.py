"""Reading HF safetensors checkpoints (single file or sharded with an index).

Each file is memory-mapped and every tensor handed out is a view of the mapping, so the only
copy is the one into the model's own parameter. Once the consumer has taken a tensor, its pages
are dropped from the mapping (MADV_DONTNEED): peak memory stays near the model's size instead of
model + checkpoint.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Iterator

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    pass


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def read_header(path: Path, file_size: int, head: bytes) -> tuple[dict, int]:
    """Parse the JSON header; returns (tensor entries, start of the data section)."""
    if file_size < 8:
        raise CheckpointError(f"{path} is truncated: {file_size} bytes, not even a header length")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > min(_MAX_HEADER, file_size - 8):
        raise CheckpointError(f"{path} is corrupt or truncated: header of {header_len} bytes "
                              f"in a file of {file_size} bytes")
    try:
        header = json.loads(head[8: 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt header: {e}") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path} has unsupported dtype {entry['dtype']}; "
                                  f"supported: {', '.join(_DTYPES)}")
        if data_start + end > file_size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"the file has {file_size}")
    return header, data_start


def iter_safetensors(files: list[Path], progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                   desc="Loading weights", leave=False)
    try:
        for path in files:
            yield from _iter_file(path, bar)
    finally:
        if bar is not None:
            bar.close()


def _iter_file(path: Path, bar) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"cannot open {path}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CheckpointError(f"{path} is empty")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        # Only the length and the header itself: a slice of the mapping is a copy, and the
        # _MAX_HEADER bound once copied (and paged in) the first 100 MiB of every shard.
        length = struct.unpack("<Q", mm[:8])[0] if size >= 8 else 0
        header, data_start = read_header(path, size, mm[: min(size, 8 + min(length, _MAX_HEADER + 1))])
        # In file order, so pages are read sequentially.
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = (data_start + o for o in entry["data_offsets"])
            dtype = _DTYPES[entry["dtype"]]
            count = (end - begin) // torch.empty((), dtype=dtype).element_size()
            with warnings.catch_warnings():   # read-only mapping: consumers only copy from it
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=begin) if count else torch.empty(0, dtype=dtype)
            yield name, flat.view(entry["shape"])
            del flat
            if bar is not None:
                bar.update(end - begin)
            _drop_pages(mm, begin, end)
    finally:
        try:
            mm.close()
        except BufferError:
            pass   # a consumer kept a view; the mapping closes when that view goes


# The kernel maps pages around a faulting one (fault-around, 64 KiB windows by default), so the
# first read of a tensor also maps the end of the one before, already dropped: dropping from a
# little before each tensor releases those too (they had kept ~15% of a checkpoint resident).
_FAULT_AROUND = 1 << 20


def _drop_pages(mm: mmap.mmap, begin: int, end: int) -> None:
    """The tensor has been copied into the model: release its resident pages."""
    begin = max(0, begin - _FAULT_AROUND)
    start = begin - begin % mmap.PAGESIZE
    if end > start and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
