"""Where a batch-1 decode step goes at each tensor-parallel size (diagnostic, GPUs only).

    cd bench && python gpu_tp_profile.py --tp 1 2          # Llama-3.1-8B's shape, bf16 dummy weights

For each size, one engine (CUDA graphs, async scheduling, the defaults) decodes one prompt of 128
tokens; ``LLM.start_profile()`` / ``stop_profile()`` record ``--steps`` decode steps and rank
0's table of kernels is printed (divide a kernel's CUDA total by the steps for its time per step).
"""

from __future__ import annotations

import argparse
import gc

import torch

from gpu_llama8b import model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    args = parser.parse_args()
    from strata import LLM, SamplingParams
    path = model_dir(False)
    for tp in args.tp:
        llm = LLM(str(path), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=4096,
                  tensor_parallel_size=tp, use_tqdm_on_load=False)
        prompt = {"prompt_token_ids": list(range(1000, 1128))}
        llm.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
        llm.start_profile()
        llm.generate([prompt], SamplingParams(max_tokens=args.steps + 1, temperature=0.0, ignore_eos=True),
                     use_tqdm=False)
        table = llm.stop_profile()[0]
        print(f"\n=== TP={tp}: rank 0, {args.steps} decode steps (+ one prefill) ===")
        print(table)
        llm.llm_engine.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
