"""Reading HF safetensors checkpoints (single file or sharded with an index), tensor by tensor
through mmap, so peak memory stays near the size of the model itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open


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


def iter_safetensors(files: list[Path], progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                   desc="Loading weights", leave=False)
    try:
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from None
            with handle as f:
                for name in f.keys():
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, OSError, RuntimeError) as e:
                        raise CheckpointError(f"cannot read tensor {name!r} from {path}: {e}") from None
                    if bar is not None:
                        bar.update(tensor.numel() * tensor.element_size())
                    yield name, tensor
    finally:
        if bar is not None:
            bar.close()
