"""GPTQ checkpoints (Hugging Face layout) built here from random float weights by round to
nearest: strata's converted weights equal the GPTQ dequantization exactly, and a tiny Llama's
greedy tokens from the GPTQ checkpoint equal those of the same model saved in float with the
dequantized values. 4 and 8 bits, groups and per channel, act-order on and off."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make_tiny_model
from safetensors.torch import load_file, save_file

from strata import LLM, SamplingParams
from strata.layers.linear import ColumnParallelLinear
from strata.quant import finish_loading
from strata.quant.gptq import GPTQConfig, GPTQLinearMethod


def _pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """codes (0 .. 2**bits - 1) -> int32 words along dim, first code in the lowest bits."""
    per = 32 // bits
    c = codes.long()
    c = c.reshape(-1, per, c.shape[1]) if dim == 0 else c.reshape(c.shape[0], -1, per)
    shifts = torch.arange(per) * bits
    words = (c << (shifts[None, :, None] if dim == 0 else shifts)).sum(dim=1 if dim == 0 else 2)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_quantize(w: torch.Tensor, bits: int, group: int, perm: torch.Tensor | None,
                  sym: bool = False, fmt: str = "gptq"):
    """A GPTQ-layout checkpoint of w [N, K] by round to nearest, act-order when perm is given
    (the order in which GPTQ would have visited the inputs). Returns (tensors, dequantized w)."""
    n, k = w.shape
    maxq = 2**bits - 1
    group_k = k if group == -1 else group
    order = torch.arange(k) if perm is None else perm
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_k).to(torch.int32)
    groups = -(-k // group_k)
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.long)
    q = torch.empty(k, n, dtype=torch.long)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols].t()                                   # [cols, N]
        if sym:
            s = (wg.abs().amax(0) * 2 / maxq).clamp(min=1e-8)
            z = torch.full((n,), (maxq + 1) // 2)
        else:
            lo, hi = wg.amin(0).clamp(max=0), wg.amax(0).clamp(min=0)
            s = ((hi - lo) / maxq).clamp(min=1e-8)
            # AutoGPTQ's packer stores zero - 1, so a zero point of 0 cannot be written in "gptq".
            z = torch.round(-lo / s).long().clamp(1 if fmt == "gptq" else 0, maxq)
        s = s.half().float()                                  # checkpoints store float16 scales
        scales[g], zeros[g] = s, z
        q[cols] = torch.clamp(torch.round(wg / s) + z, 0, maxq).long()
    deq = ((q - zeros[g_idx.long()]).float() * scales[g_idx.long()]).t().contiguous()   # [N, K]
    stored = zeros - (1 if fmt == "gptq" else 0)
    tensors = {"qweight": _pack_int32(q, bits, 0), "qzeros": _pack_int32(stored, bits, 1),
               "scales": scales.half(), "g_idx": g_idx}
    return tensors, deq


def _spec(bits, group, act_order, sym=False, fmt="gptq"):
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order,
            "sym": sym, "checkpoint_format": fmt}


def _gptq_layer(tensors, k, n, spec, reference):
    layer = ColumnParallelLinear(k, n, quant_method=GPTQLinearMethod(GPTQConfig.from_dict(spec), reference))
    for name, t in tensors.items():
        layer.weight_loader(getattr(layer, name), t)
    finish_loading(layer)
    return layer


CASES = [(4, 32, False, False, "gptq"), (4, 32, True, False, "gptq"), (4, 128, True, True, "gptq"),
         (4, -1, False, False, "gptq_v2"), (4, 64, True, False, "gptq_v2"), (8, 32, False, False, "gptq"),
         (8, 64, True, True, "gptq"), (8, -1, False, True, "gptq"), (8, -1, True, False, "gptq")]


@pytest.mark.parametrize("bits,group,act_order,sym,fmt", CASES)
def test_converted_weights_equal_gptq_dequantization(bits, group, act_order, sym, fmt):
    torch.manual_seed(bits + group)
    n, k = 48, 192
    w = torch.randn(n, k)
    perm = torch.randperm(k) if act_order else None
    tensors, deq = gptq_quantize(w, bits, group, perm, sym, fmt)
    spec = _spec(bits, group, act_order, sym, fmt)
    ref = _gptq_layer(tensors, k, n, spec, reference=True)
    # strata's dequantized values, exactly, its inputs in the order act-order's groups need
    order = ref.input_perm if ref.input_perm is not None else torch.arange(k)
    assert torch.equal(ref.weight, deq[:, order])
    assert torch.equal(ref(torch.eye(k)), deq.t())
    packed = _gptq_layer(tensors, k, n, spec, reference=False)
    assert (packed.input_perm is not None) == (act_order and group != -1)   # one group: no order
    # The identity's rows pick out the weight's columns: exact on the packed CPU paths too.
    assert torch.equal(packed(torch.eye(k)), deq.t())
    x = torch.randn(5, k)
    torch.testing.assert_close(packed(x), x @ deq.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group,act_order,sym", [(32, False, False), (64, True, True)])
def test_8bit_groups_on_the_triton_kernel(monkeypatch, group, act_order, sym):
    """Where Triton runs, grouped 8-bit GPTQ keeps its codes and computes with the grouped W8A16
    kernel (the interpreter here), with the zero points as per-group offsets."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("STRATA_FORCE_TRITON", "1")
    torch.manual_seed(group)
    n, k = 48, 192
    perm = torch.randperm(k) if act_order else None
    tensors, deq = gptq_quantize(torch.randn(n, k), 8, group, perm, sym, "gptq")
    with torch.device(device):
        packed = _gptq_layer({name: t.to(device) for name, t in tensors.items()}, k, n,
                             _spec(8, group, act_order, sym), reference=False)
    assert getattr(packed, "on_triton", False)
    assert packed.qweight.dtype == torch.int8 and packed.qweight.shape == (n, k)
    x = torch.randn(5, k, device=device)
    torch.testing.assert_close(packed(x), x @ deq.t().to(device), rtol=1e-5, atol=1e-4)


def test_fused_parts_must_share_the_act_order_permutation():
    from strata.layers.linear import MergedColumnParallelLinear
    spec = _spec(4, 32, True)
    layer = MergedColumnParallelLinear(64, [32, 32], quant_method=GPTQLinearMethod(GPTQConfig.from_dict(spec)))
    gate, _ = gptq_quantize(torch.randn(32, 64), 4, 32, torch.randperm(64))
    up, _ = gptq_quantize(torch.randn(32, 64), 4, 32, torch.randperm(64))
    layer.weight_loader(layer.g_idx, gate["g_idx"], 0)
    with pytest.raises(ValueError, match="different"):
        layer.weight_loader(layer.g_idx, up["g_idx"], 1)


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _write_gptq_checkpoint(src, gptq_dir, float_dir, spec, quantize_config_file=False):
    """src's linears as GPTQ tensors in gptq_dir, and their dequantized values in float in
    float_dir. q/k/v (and gate/up) see the same input, so act-order gives them one permutation."""
    state = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    gptq_state, float_state = {}, dict(state)
    perms: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        proj = name.split(".")[-2]
        if proj not in LINEARS or not name.endswith(".weight"):
            gptq_state[name] = state[name]
            continue
        w = state[name]
        shared = name.rsplit(".", 2)[0] + {"k_proj": ".q_proj", "v_proj": ".q_proj",
                                           "up_proj": ".gate_proj"}.get(proj, "." + proj)
        perm = perms.setdefault(shared, torch.randperm(w.shape[1])) if spec["desc_act"] else None
        tensors, deq = gptq_quantize(w, spec["bits"], spec["group_size"], perm, spec["sym"],
                                     spec["checkpoint_format"])
        for suffix, t in tensors.items():
            gptq_state[name.removesuffix("weight") + suffix] = t
        float_state[name] = deq
    for out, st in ((gptq_dir, gptq_state), (float_dir, float_state)):
        out.mkdir()
        save_file(st, str(out / "model.safetensors"))
    (float_dir / "config.json").write_text(json.dumps(cfg))
    if quantize_config_file:   # AutoGPTQ's older layout: a file of its own, no quant_method
        (gptq_dir / "quantize_config.json").write_text(
            json.dumps({k: v for k, v in spec.items() if k not in ("quant_method", "checkpoint_format")}))
    else:
        cfg["quantization_config"] = spec
    (gptq_dir / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", path)
    return path


PROMPTS = [[5, 17, 33, 101, 7], list(range(3, 40)), [300, 301, 302], [9] * 13 + [44, 45]]


def _greedy(path):
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory=1 << 26)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("bits,group,act_order,sym", [(4, 32, False, False), (4, 32, True, True),
                                                      (8, 32, True, False), (8, -1, False, True)])
def test_gptq_checkpoint_greedy_equals_its_float_dequantization(tiny, tmp_path, bits, group, act_order, sym):
    torch.manual_seed(1)
    spec = _spec(bits, group, act_order, sym)
    _write_gptq_checkpoint(tiny, tmp_path / "gptq", tmp_path / "float", spec,
                           quantize_config_file=(bits == 8 and group == -1))
    gptq_tokens, llm = _greedy(tmp_path / "gptq")
    assert f"gptq {bits}-bit" in llm.llm_engine.describe()
    float_tokens, _ = _greedy(tmp_path / "float")
    assert gptq_tokens == float_tokens


@pytest.mark.parametrize("field,value,supported", [
    ("bits", 3, "supported: 4, 8"), ("group_size", 48, "multiple of 32"),
    ("checkpoint_format", "marlin", "supported: gptq, gptq_v2"), ("quant_method", "awq", "supported: gptq")])
def test_bad_configs_name_the_field_and_the_supported_values(tiny, tmp_path, field, value, supported):
    spec = {**_spec(4, 32, False), field: value}
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["quantization_config"] = spec
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(tiny / "model.safetensors")
    with pytest.raises(ValueError, match=f"quantization_config.{field} = .*{value}.*{supported}"):
        LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory=1 << 26)


def test_quantizing_a_gptq_checkpoint_again_is_refused(tiny, tmp_path):
    _write_gptq_checkpoint(tiny, tmp_path / "gptq", tmp_path / "float", _spec(4, 32, False))
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(tmp_path / "gptq"), skip_tokenizer_init=True, quantization="int8")
