"""Loading a safetensors checkpoint copies each tensor once, straight from the mapped file into
the model: the process's peak memory grows by about the model's size, not twice it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

CHILD = textwrap.dedent("""
    import sys
    from strata import LLM
    def status_mib(key):   # VmHWM, unlike ru_maxrss, starts afresh at exec (not at the forking parent's size)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key))
    base = status_mib("VmHWM")
    LLM(sys.argv[1], skip_tokenizer_init=True, kv_cache_memory="16MiB", use_tqdm_on_load=False)
    print(status_mib("VmHWM") - base)
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("mem")
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048,
                                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path, sum(p.numel() * 4 for p in model.parameters()) / 2**20


def test_peak_memory_near_model_size(checkpoint):
    path, model_mib = checkpoint
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = float(out.stdout.strip().splitlines()[-1])
    # The model plus its largest tensor (the 62 MiB embedding) and some slack for the allocator.
    assert growth < model_mib * 1.15 + 70, f"peak grew {growth:.0f} MiB for a {model_mib:.0f} MiB model"


def test_truncated_and_corrupt_files_are_named(tmp_path, checkpoint):
    from strata.loader.safetensors import CheckpointError, iter_safetensors
    src = next(checkpoint[0].glob("*.safetensors")).read_bytes()
    cases = {"cut.safetensors": src[: len(src) // 2], "tiny.safetensors": src[:5],
             "garbage.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!}xxx"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            list(iter_safetensors([tmp_path / name]))


def test_tensors_equal_reference_reader(checkpoint):
    from safetensors.torch import load_file
    from strata.loader.safetensors import iter_safetensors
    (file,) = checkpoint[0].glob("*.safetensors")
    ref = load_file(str(file))
    seen = 0
    for name, tensor in iter_safetensors([file]):
        assert torch.equal(tensor, ref[name]), name
        seen += 1
    assert seen == len(ref)
