"""Programmatic dependent launch (strata.kernels.pdl): when it is used, and what each kernel's
Hopper build does before its wait.

Whether the outputs stay the same with it is the GPU's to show: the kernel-path and quantization
tests capture their decode steps in CUDA graphs, where PDL is on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sm90 import V4_LOADS_BUILD, run_without_interpreter  # noqa: E402

from strata.kernels import pdl  # noqa: E402

CUDA = torch.cuda.is_available()


def test_plain_launch_outside_a_graph_capture(monkeypatch):
    assert pdl.launch_options(torch.zeros(1)) == {}            # CPU tensors: never
    if CUDA:
        assert pdl.launch_options(torch.zeros(1, device="cuda")) == {}   # eager: never
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.enabled(torch.zeros(1))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA graph capture")
def test_graph_capture_on_hopper_launches_with_pdl():
    x = torch.zeros(1, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        options = pdl.launch_options(x)
        x += 1
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert options == (dict(USE_PDL=True, launch_pdl=True) if hopper and pdl.ENABLED else {})


# For each kernel of a decode step, built for sm_90 with USE_PDL: the PTX's global loads before
# griddepcontrol.wait, the trigger, and that a USE_PDL=False build has neither instruction.
_PDL_SCRIPT = r"""
import re
from strata.kernels import activation as act, int4_gemv as g, norm, paged_attention as pa, rotary
from strata.kernels import quant_matmul as qm
from strata.kernels import all_reduce_norm as arn
from strata.kernels import skinny_matmul as sk

def order(fn, meta, types):
    ptx = build(fn, dict(meta, USE_PDL=True), types, ptx=True)
    plain = build(fn, dict(meta, USE_PDL=False), types, ptx=True)
    body = ptx[ptx.index("griddepcontrol.wait"):] if "griddepcontrol.wait" in ptx else ""
    before = ptx[:len(ptx) - len(body)]
    return dict(waits=ptx.count("griddepcontrol.wait"),
                triggers=ptx.count("griddepcontrol.launch_dependents"),
                loads_before=len(re.findall(r"\bld\.global", before)),
                stores_before=len(re.findall(r"\b(st|red|atom)\.global", before)),
                prefetches_before=before.count("prefetch.global.L2"),
                trigger_after_stores=ptx.rfind("st.global") < ptx.find("griddepcontrol.launch_dependents"),
                plain=plain.count("griddepcontrol"))

cfg = g.gemv_config(4096, 4096)
gemv_meta = dict(GROUP_SIZE=128, HAS_BIAS=False, EVEN_N=True, EVEN_K=True, SPLIT=True, X_KIND=0,
                 EVICT="evict_first", BLOCK_N=cfg["BLOCK_N"], KW=cfg["KW"],
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
gemv_types = dict(x_ptr="*i32", q_ptr="*i32", s_ptr="*fp32", mn_ptr="*fp32", bias_ptr="*bf16",
                  out_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
bf = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", res_out_ptr="*bf16", eps="fp32")
hidden = torch.empty(1, 4096, dtype=torch.bfloat16)
rot_types = dict(pos_ptr="*i64", q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", cos_ptr="*fp32",
                 sin_ptr="*fp32", cache_ptr="*bf16", slot_ptr="*i64", scale_ptr="*fp32")
att_types = dict(q_ptr="*bf16", kv_ptr="*bf16", out_ptr="*bf16", bt_ptr="*i32", seq_lens_ptr="*i32",
                 ws_acc_ptr="*fp32", ws_m_ptr="*fp32", ws_l_ptr="*fp32", s_ptr="*fp32", count_ptr="*i32",
                 qk_scale="fp32")
w8_meta = dict(qm.default_config(1, 4096, 4096, 8, torch.bfloat16), HAS_BIAS=False, EVEN_N=True,
               EVEN_K=True, DOT_PRECISION="tf32", EVICT="evict_first")
w8_types = dict(x_ptr="*bf16", q_ptr="*i8", s_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16")
red_types = dict(ws_acc_ptr="*fp32", ws_m_ptr="*fp32", ws_l_ptr="*fp32", out_ptr="*bf16")
skinny_meta = {n: dict(sk.default_config(1, n, 4096), HAS_BIAS=False, EVEN_N=True, EVEN_K=True,
                      DOT_PRECISION="tf32", LINE=64,
                      PREFETCH_K=sk.prefetch_k(n, 4096, 2, sk.default_config(1, n, 4096)))
               for n in (3072, 14336)}
skinny_types = dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16", bases_ptr="*i64",
                    uses_ptr="*i32")
# o_proj's share at TP=2, sent to the peer as it is computed (all_reduce_norm.push_share).
push_meta = dict(sk.default_config(1, 4096, 2048), HAS_BIAS=False, EVEN_N=True, EVEN_K=True,
                 DOT_PRECISION="tf32", LINE=64, PREFETCH_K=sk.prefetch_k(4096, 2048, 2, sk.default_config(1, 4096, 2048)),
                 PUSH=True, RANK=0, WORLD=2, SLOT=4096, EMPTY=-2**15, WIDE=False)
arn_meta = dict(RANK=0, WORLD=2, HAS_RES=True, BLOCK=4096, EMPTY=-2**15, WIDE=False, num_warps=16)
arn_types = dict(bf, bases_ptr="*i64", uses_ptr="*i32")
print(json.dumps({
    "gemv": order(g._w4_gemv_kernel, gemv_meta, gemv_types),
    "w8": order(qm._w8_kernel, w8_meta, w8_types),
    "skinny_fma": order(sk._skinny_kernel, skinny_meta[3072], skinny_types),
    "skinny_dot": order(sk._skinny_kernel, skinny_meta[14336], skinny_types),
    "skinny_push": order(sk._skinny_kernel, push_meta, skinny_types),
    "rms_norm": order(norm._rms_norm_kernel,
                      dict(norm._launch_args(hidden, hidden, hidden, hidden)[-1], HAS_RES=True), bf),
    "rotary": order(rotary._rotary_kv_kernel, rotary._rotary_meta(32, 8, 128, 128, True)[1], rot_types),
    "silu_and_mul": order(act._act_kernel, dict(ACT=act._SILU_AND_MUL, BLOCK=act._BLOCK,
                                                num_warps=act._NUM_WARPS), dict(x_ptr="*bf16", out_ptr="*bf16")),
    "decode": order(pa._decode_kernel, dict(pa._decode_meta(32, 8, 128, 16, torch.bfloat16, 4), MERGE=True,
                                            BLOCK_S=4), att_types),
    "all_reduce_norm": order(arn._all_reduce_rms_norm_kernel, arn_meta, arn_types),
    "all_reduce_norm_pushed": order(arn._all_reduce_rms_norm_kernel, dict(arn_meta, PUSHED=True), arn_types),
    "reduce": order(pa._decode_reduce_kernel, pa._reduce_meta(32, 128, 4), red_types),
}))
"""


@pytest.mark.skipif(CUDA, reason="the GPU tests compile the kernels for real")
def test_hopper_builds_wait_before_reading_what_a_kernel_wrote():
    found = run_without_interpreter(V4_LOADS_BUILD + _PDL_SCRIPT)
    for name, k in found.items():
        assert k["waits"] >= 1 and k["triggers"] >= 1, (name, k)
        assert k["stores_before"] == 0, (name, k)      # nothing written before the wait
        assert k["plain"] == 0, (name, k)               # USE_PDL=False compiles it away
    # The GEMVs load their first step's weights (int4: and scales and mins) before the wait
    # (they depend on nothing the step computes); the others load nothing before it.
    assert found["gemv"]["loads_before"] >= 3, found["gemv"]
    assert found["w8"]["loads_before"] >= 1, found["w8"]
    # The bf16 GEMVs ask L2 for their first weights instead (both inner products' builds), and
    # let the next kernel launch only once they have stored their results.
    for name in ("skinny_fma", "skinny_dot", "skinny_push"):
        assert found[name]["prefetches_before"] >= 1, (name, found[name])
    # (skinny_push: its stores into the peer's buffer too, so the sum after it may start.)
    for name in ("skinny_fma", "skinny_dot", "skinny_push", "gemv"):
        assert found[name]["trigger_after_stores"], (name, found[name])
    for name in ("rms_norm", "rotary", "silu_and_mul", "decode", "reduce", "all_reduce_norm",
                 "all_reduce_norm_pushed", "skinny_fma", "skinny_dot", "skinny_push"):
        assert found[name]["loads_before"] == 0, (name, found[name])
