"""bench/flexgen_peer.py on the CPU: the offline tokenizer gives what FlexGen's benchmark reads
(left-padded ids of the prompt length), the FlexGen policy fits the GPU budget, and the command
line it prints carries the same lengths and batch as strata's run. FlexGen itself runs on the GPU
machine only."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("flexgen_peer", ROOT / "bench" / "flexgen_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_tokenizer_pads_like_flexgen_expects(peer):
    tok = peer.OfflineTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
    ids = tok(["Paris is the capital city of"], padding="max_length", max_length=512).input_ids
    assert len(ids) == 1 and len(ids[0]) == 512
    assert ids[0][-len(tok.ids):] == tok.ids and set(ids[0][: 512 - len(tok.ids)]) == {tok.pad_token_id}
    assert tok(["x"], padding="max_length", max_length=4).input_ids[0] == tok.ids[-4:]


@pytest.mark.parametrize("budget, gpu_batch", [(4 * GIB, 4), (8 * GIB, 8), (16 * GIB, 16)])
def test_flexgen_policy_fits_budget(peer, budget, gpu_batch):
    policy = peer.flexgen_policy(budget, 100, 512, gpu_batch)
    w_gpu, w_cpu = policy["percent"][:2]
    assert 0 <= w_gpu < 100 and w_gpu + w_cpu == 100 and policy["percent"][2:] == [0, 100, 100, 0]
    model_bytes = 48 * 2 * (4 * 7168**2 + 2 * 7168 * 28672)
    assert w_gpu / 100 * model_bytes + 2 * 2 * 2 * 7168 * 28672 <= 0.9 * budget
    assert policy["gpu_batch_size"] * policy["num_gpu_batches"] == pytest.approx(100, abs=gpu_batch / 2)


def test_budget_too_small_is_a_clear_error(peer):
    with pytest.raises(ValueError, match="MLP sub-layers"):
        peer.flexgen_policy(1 * GIB, 64, 512, 8)


def test_printed_command_line(peer):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "flexgen_peer.py"), "--print-flexgen-args",
                          "--batch", "96", "--prompt-len", "256", "--gen-len", "16"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    line = out.strip().splitlines()[-1]
    assert "--model facebook/opt-30b --path _DUMMY_" in line and "--cpu-cache-compute" in line
    assert "--prompt-len 256 --gen-len 16 --gpu-batch-size 8 --num-gpu-batches 12" in line


def test_flexgen_log_parsed(peer):
    text = ("model size: 55.803 GB\tcache size: 12.0 GB\thidden size (p): 0.2 GB\n"
            "peak gpu mem: 3.912 GB\tprojected: False\n"
            "prefill latency: 40.1 s\tprefill throughput: 600.0 token/s\n"
            "decode latency: 80.5 s\tdecode throughput: 30.2 token/s\n"
            "total latency: 120.6 s\ttotal throughput: 25.470 token/s")
    assert peer.parse_flexgen_log(text) == dict(peak_gpu_gb=3.912, prefill_s=40.1, decode_s=80.5, total_s=120.6,
                                                tok_s=25.47)


def test_flexgen_batch_capped_by_host_ram(peer):
    """FlexGen has no host budget: its micro-batches are cut until its weights' CPU share and the
    batch's KV cache fit 80% of the RAM available (it was killed for host memory once)."""
    policy = peer.flexgen_policy(8 * GIB, 64, 512, 8)
    need = peer.flexgen_host_bytes(policy, 544)
    peer.host_cap(policy, 544, available=None)
    assert policy["num_gpu_batches"] == 8 and "capped_for_host_ram" not in policy
    peer.host_cap(policy, 544, available=int(need / 0.8) + 1)
    assert policy["num_gpu_batches"] == 8
    peer.host_cap(policy, 544, available=100 * GIB)
    assert policy["num_gpu_batches"] < 8 and policy["capped_for_host_ram"]
    assert peer.flexgen_host_bytes(policy, 544) <= 0.8 * 100 * GIB
