"""Accuracy gates of the quantized paths on a real model and real English text: SmolLM2-135M
(the embedded default GGUF, dequantized to fp32) against its own weights re-quantized at load,
perplexity over the first windows of strata's built-in English text (CPython's pydoc topics).
Gates from the quantization issue: int8 within 1% of fp32, int4 with groups of 128 within 8%
(not met by round to nearest, see below; met by GPTQ, ``strata quantize --calibrate``).
The whole-text figures are in docs/benchmarks.md; this runs a shorter slice so CI stays fast."""

from __future__ import annotations

import pytest

from strata import LLM
from strata.evaluation import english_eval_text, perplexity

WINDOWS, CONTEXT = 4, 256


@pytest.fixture(scope="module")
def fp32_ppl():
    return _ppl()


def _ppl(**kw) -> float:
    llm = LLM(kv_cache_memory=1 << 28, max_model_len=1024, **kw)
    return perplexity(llm, english_eval_text(), context_len=CONTEXT, max_windows=WINDOWS).ppl


# int4 with groups of 128 misses its gate on this model (+34% here, +31% with an MSE search of
# the group range): SmolLM2's "fp32" weights are its Q4_1 file's, already on a 16-level grid per
# 32 weights, and one grid per 128 of them cannot hold four such grids. Groups of 32 line up
# with Q4_1's blocks and reproduce them. Strict: the day the gate is met this says so.
@pytest.mark.parametrize("method,group,gate", [
    ("int8", None, 0.01),
    ("int4", 32, 0.08),
    pytest.param("int4", 128, 0.08, marks=pytest.mark.xfail(strict=True, reason="+34% on SmolLM2 (Q4_1 grid)")),
])
def test_quantized_perplexity_within_gate(fp32_ppl, method, group, gate):
    ppl = _ppl(quantization=method, quantization_group_size=group)
    assert ppl / fp32_ppl - 1 < gate, (method, ppl, fp32_ppl)


# GPTQ int4 groups of 128 (act-order, searched group ranges) through the checkpoint it writes,
# calibrated on 2048 tokens of stdlib docstrings (not the text scored here): +3.6% measured on
# this slice, +5.6% over the whole text (round to nearest +47%): docs/benchmarks.md. The
# calibration takes 1.5-4 minutes on 2 busy cores.
def test_gptq_int4_group_128_within_gate(fp32_ppl, tmp_path):
    from strata.loader.model_loader import default_model_path
    from strata.quant.calibrate import CalibrationConfig
    from strata.quant.export import quantize_checkpoint
    calibration = CalibrationConfig(num_tokens=2048, seq_len=512, act_order=True)
    quantize_checkpoint(default_model_path(), tmp_path / "gptq", "int4", 128, calibration=calibration)
    ppl = _ppl(model=str(tmp_path / "gptq"))
    assert ppl / fp32_ppl - 1 < 0.08, (ppl, fp32_ppl)
