"""Taking the weights of a transformers model already in memory, without a second copy where the
layouts agree (what DeepSpeed's ``init_inference`` does for a model it is handed).

The names are mapped by the model's own ``load_weights`` (its rename function and fused-weight
table): we only swap each parameter's ``weight_loader`` for one that adopts instead of copying.

- A parameter with the checkpoint tensor's exact shape, dtype and device (embeddings, norms,
  o_proj, down_proj, lm_head, ...) takes over the HF tensor's storage: both models read one copy.
- A fused parameter (qkv_proj, gate_up_proj) cannot alias three separate tensors, so the shard is
  copied in and the HF module's q/k/v (gate/up) weight is re-pointed at its rows of the fused
  tensor. The HF model keeps working and its old storage is freed layer by layer.

Peak memory is then about one model plus one layer, on top of whatever the strata model holds
before its weights arrive (on the CPU its untouched ``torch.empty`` pages cost nothing; on a GPU
they are real, so building the strata model on the meta device would be the next step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import torch
from torch import nn


@dataclass
class AdoptionReport:
    shared: list[str] = field(default_factory=list)      # HF names whose storage strata now uses
    repointed: list[str] = field(default_factory=list)   # HF names now viewing strata's fused rows
    copied: list[str] = field(default_factory=list)      # HF names copied and left as they were


def adopt_hf_weights(model: nn.Module, hf_model: nn.Module, on_loaded=None) -> AdoptionReport:
    adopter = _Adopter(hf_model)
    with _weight_loaders_replaced(model, adopter.load):
        model.load_weights(adopter.weights(), on_loaded)
    return adopter.report


class _Adopter:
    def __init__(self, hf_model: nn.Module):
        self.hf_model = hf_model
        self.report = AdoptionReport()
        # A loader sees only a tensor; this finds the HF parameter it is (a model that reshapes
        # or converts a tensor on the way hands over a new one, which then is simply not found).
        self.by_storage = {_storage_key(p): (n, p) for n, p in hf_model.named_parameters()}

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Lazily, one tensor at a time: nothing here may keep a replaced HF tensor alive.
        for name, hf_param in self.hf_model.named_parameters(remove_duplicate=False):
            yield name, hf_param.detach()

    def load(self, original: Callable | None, param: nn.Parameter, loaded: torch.Tensor,
             shard_id=None) -> None:
        hf_name, hf_param = self.by_storage.get(_storage_key(loaded), ("<converted tensor>", None))
        if shard_id is None and _same_layout(param, loaded):
            param.data = loaded
            self.report.shared.append(hf_name)
            return
        if original is None:   # what load_named_weights does for a parameter without a loader
            if param.shape != loaded.shape:
                raise ValueError(f"HF tensor {hf_name!r} has shape {tuple(loaded.shape)}, "
                                 f"expected {tuple(param.shape)}")
            param.data.copy_(loaded)
        elif shard_id is None:
            original(param, loaded)
        else:
            original(param, loaded, shard_id)
        rows = None
        if shard_id is not None and original is not None:
            rows = rows_of_shard(original, param, loaded, shard_id)
        if hf_param is not None and rows is not None and _same_layout(param[rows], hf_param):
            hf_param.data = param.data[rows]
            self.report.repointed.append(hf_name)
        else:
            self.report.copied.append(hf_name)


def _storage_key(t: torch.Tensor) -> tuple:
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def _same_layout(param: torch.Tensor, tensor: torch.Tensor) -> bool:
    return (param.shape == tensor.shape and param.dtype == tensor.dtype
            and param.device == tensor.device)


def rows_of_shard(loader: Callable, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> slice | None:
    """Where the fused loader put the whole of ``loaded`` along dim 0, or None if it took only a
    slice (tensor parallelism) or scattered it.

    Asks the layer's own loader, on one column of row numbers, instead of knowing its layout.
    """
    trail = (1,) * (param.dim() - 1)
    probe = nn.Parameter(torch.full((param.shape[0], *trail), -1.0, dtype=torch.float64), requires_grad=False)
    row_ids = torch.arange(loaded.shape[0], dtype=torch.float64).view(-1, *trail)
    try:
        loader(probe, row_ids, shard_id)
    except (ValueError, RuntimeError, IndexError):   # a layout the probe cannot stand in for
        return None
    landed = (probe.view(-1) >= 0).nonzero().view(-1)
    if landed.numel() != loaded.shape[0]:
        return None
    start = int(landed[0])
    if not torch.equal(probe.view(-1)[start: start + loaded.shape[0]], row_ids.view(-1)):
        return None
    return slice(start, start + loaded.shape[0])


@contextlib.contextmanager
def _weight_loaders_replaced(model: nn.Module, load: Callable):
    """Route every parameter's loading through ``load(original_loader, param, tensor, shard_id)``."""
    saved = []
    for param in model.parameters():   # unique objects: a tied head is its embedding
        original = getattr(param, "weight_loader", None)
        saved.append((param, original))
        param.weight_loader = (lambda p, t, sid=None, _orig=original: load(_orig, p, t, sid))
    try:
        yield
    finally:
        for param, original in saved:
            if original is None:
                del param.weight_loader
            else:
                param.weight_loader = original
