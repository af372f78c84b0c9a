"""strata's own weight formats, described once (GGUF's live in ggml_formats.py).

A format stores a [N, K] weight as integer codes plus float parameters per group of ``group``
consecutive input features (``group=None``: one group per output row, i.e. per channel). The
value of a code q is ``q * scale + offset`` (``offset`` absent for symmetric formats), which
covers round-to-nearest, GPTQ and GGUF's Q4_0/Q4_1/Q4_K blocks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int
    symmetric: bool                    # codes centred on 0, no offset
    group_sizes: tuple[int, ...] | None  # allowed groups along K; None: per output channel
    default_group: int | None

    def bytes_per_group(self, group: int, param_bytes: int = 4) -> float:
        """Storage of one group: its codes plus its scale (and offset), param_bytes each."""
        params = 1 if self.symmetric else 2
        return group * self.bits / 8 + params * param_bytes

    def bits_per_weight(self, group: int, param_bytes: int = 4) -> float:
        return 8 * self.bytes_per_group(group, param_bytes) / group

    def check_group(self, group: int | None) -> int | None:
        if self.group_sizes is None:
            return None
        group = self.default_group if group is None else group
        if group not in self.group_sizes:
            raise ValueError(f"{self.name}: group size must be one of {self.group_sizes}, got {group}")
        return group


# int8: per output channel, symmetric codes -127..127 (round to nearest), scale = max|w| / 127.
INT8 = QuantFormat("int8", bits=8, symmetric=True, group_sizes=None, default_group=None)
# int4: groups along K, asymmetric codes 0..15, scale = (max - min) / 15, offset = min.
INT4 = QuantFormat("int4", bits=4, symmetric=False, group_sizes=(32, 64, 128), default_group=128)

FORMATS = {f.name: f for f in (INT8, INT4)}
