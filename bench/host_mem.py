"""Host memory of a child process, watched from its parent: the child's peak resident set
(VmHWM of /proc/<pid>/status, read while it runs, and getrusage of the reaped children) and how
far the machine's MemAvailable fell meanwhile (memory the kernel does not charge to the child's
RSS, such as driver-allocated pinned pages, shows there). Used by bench/gpu_offload.in_child so
that an offloaded run prints its plan's host bytes beside what the process really held, and a
run killed for memory still says how far it got."""

from __future__ import annotations

import resource
import subprocess
import threading
import time

GIB = 2**30


def _field(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_watched(argv: list[str], interval_s: float = 0.25) -> tuple[int, dict]:
    """Run argv to completion; (exit code, dict of peak_rss_gib, rusage_maxrss_gib and
    mem_available_drop_gib: MemAvailable at start minus its lowest value while the child ran)."""
    start_avail = _field("/proc/meminfo", "MemAvailable")
    proc = subprocess.Popen(argv)
    seen = {"hwm": 0, "min_avail": start_avail}
    done = threading.Event()

    def watch():
        while not done.is_set():
            hwm = _field(f"/proc/{proc.pid}/status", "VmHWM")
            avail = _field("/proc/meminfo", "MemAvailable")
            if hwm is not None:
                seen["hwm"] = max(seen["hwm"], hwm)
            if avail is not None and seen["min_avail"] is not None:
                seen["min_avail"] = min(seen["min_avail"], avail)
            done.wait(interval_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    code = proc.wait()
    done.set()
    thread.join()
    # ru_maxrss (KiB on Linux): the largest child reaped so far, this one if it was the largest
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    drop = (start_avail - seen["min_avail"]) if start_avail is not None and seen["min_avail"] is not None else None
    return code, dict(peak_rss_gib=seen["hwm"] / GIB, rusage_maxrss_gib=maxrss / GIB,
                      mem_available_drop_gib=None if drop is None else drop / GIB)


def describe(mem: dict, plan_host_gib: float | None = None) -> str:
    text = f"host peak RSS {mem['peak_rss_gib']:.2f} GiB"
    if plan_host_gib is not None:
        text += f" (plan: {plan_host_gib:.2f} GiB)"
    if mem.get("mem_available_drop_gib") is not None:
        text += f", MemAvailable fell by {mem['mem_available_drop_gib']:.2f} GiB"
    return text


if __name__ == "__main__":   # a quick look: python bench/host_mem.py CMD...
    import sys
    t0 = time.perf_counter()
    rc, figures = run_watched(sys.argv[1:])
    print(rc, figures, f"{time.perf_counter() - t0:.1f} s")
