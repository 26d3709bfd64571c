"""Shared helpers for the side-by-side benchmarks: machine description, JSON results."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that decide the kernels: AVX2/AVX-512, native bf16 (AVX512-BF16, AMX), NEON."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "asimd")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def cpu_kind(flags) -> str:
    """A short name for the CPU's kernel family, from its flags (results are kept per kind)."""
    for flag, kind in (("amx_bf16", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512f", "avx512"),
                       ("avx2", "avx2"), ("asimd", "neon")):
        if flag in flags:
            return kind
    return platform.machine().lower() or "cpu"


def kind_tag() -> str:
    """cpu_kind of this machine, as "avx2_on_avx512_bf16" when torch's kernels are capped below the CPU
    (ATEN_CPU_CAPABILITY=avx2: the AVX2-kind stand-in); for results file names."""
    kind = cpu_kind(cpu_flags())
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"{cap.lower()}_on_{kind}" if cap and not kind.startswith(cap.lower()) else kind


def machine_info() -> dict:
    """What a reader needs to judge the numbers: CPU, threads, library versions, load."""
    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "fp32_gemm": _fp32_gemm(),
        "fp16_gemv": _fp16_gemv(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():          # only on CUDA machines: CPU results keep their keys
        try:
            info["cuda"] = cuda_info()
        except Exception as e:             # a broken driver must not cost the run its results
            info["cuda"] = {"error": f"{type(e).__name__}: {e}"}
    return info


def _fp32_gemm() -> str:
    """Which kernels minigpt's fp32 linear layers use on this CPU (minigpt.model.linear)."""
    from minigpt.model.linear import onednn_linear_wins

    return "onednn" if onednn_linear_wins() else "mkl (torch default)"


def _fp16_gemv() -> str:
    """Which kernel fp16 decoding weights use on this CPU (minigpt.inference.decode_weights.fp16_kernel)."""
    from minigpt.inference.decode_weights import fp16_kernel

    return fp16_kernel()


def cuda_info() -> dict:
    """The CUDA device (the current one) and the versions torch was built with / runs on."""
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    info = {
        "device_name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_gib": round(props.total_memory / 2 ** 30, 1),
        "multiprocessors": props.multi_processor_count,
        "device_count": torch.cuda.device_count(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__,
    }
    import subprocess
    try:                                   # driver version: only nvidia-smi knows it
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            first = out.stdout.strip().splitlines()[0]          # the first GPU nvidia-smi lists
            driver, sm_clock, power = [x.strip() for x in first.split(",")[:3]]
            info.update(driver=driver, max_sm_clock=sm_clock, power_limit=power)
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return info


def llama_system(llama_cpp, path: Path, prompt: list[int], threads: int):
    """run(n) -> n greedy token ids from llama.cpp (llama-cpp-python) on the GGUF file at `path`."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False, seed=0)

    def run(n: int) -> list[int]:
        llm.reset()
        out = []
        for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return out
    return run


def read_bandwidth_gb_s(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth as decoding sees it: the best of `repeats` sums over an fp32 buffer of
    `mb` MB (larger than any cache), with `threads` threads. tok/s ceiling = this / bytes per token."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    buf = torch.ones(mb * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(before)
    return round(buf.numel() * 4 / best / 1e9, 1)


def decoding_parser(doc: str):
    """The flags both decoding benchmarks share (decode.py, gguf.py)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds (< 1 minute)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="default 5 (2 with --quick)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def bench_parser(doc: str, quick: str):
    """A benchmark's parser: its docstring as the description, --quick (help `quick`) and --threads
    (torch threads, default 2); the script adds its own flags."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# --- helpers for benchmarks that measure in subprocesses (train_step.py) ------------------------
# Peak memory is the peak resident set size (RSS) of a process. To measure it over a stretch of
# work, reset the kernel's high-water mark (write "5" to /proc/self/clear_refs, Linux >= 4.0), read
# VmRSS as the baseline, do the work, then read VmHWM. Where that is unavailable, ru_maxrss (the
# process-lifetime peak) is the fallback, which can only overstate the baseline's peak.

def _status_kb(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Collect garbage and hand freed malloc memory back to the OS, so RSS is what is live."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float:
    """Current resident set size in MiB (VmRSS; ru_maxrss when /proc is unavailable)."""
    kb = _status_kb("VmRSS")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_peak_rss() -> str:
    """Start a new peak-RSS window; returns the method peak_rss_mb() will use."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        if _status_kb("VmHWM") is not None:
            return "VmHWM after clear_refs=5"
    except OSError:
        pass
    return "ru_maxrss"


def peak_rss_mb(method: str) -> float:
    """Peak RSS in MiB since reset_peak_rss() (or since process start for ru_maxrss)."""
    if method.startswith("VmHWM"):
        return _status_kb("VmHWM") / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, spec: dict, timeout: float = 3600) -> dict:
    """Run `python script _worker '<json spec>'` in a fresh process; it must print one line
    `RESULT <json>` (the last such line is returned). Its stderr is shown when it fails."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, script, "_worker", json.dumps(spec)], capture_output=True,
                       text=True, timeout=timeout)
    result = worker_result(p.stdout)
    if p.returncode or result is None:
        raise RuntimeError(f"worker {spec.get('role', '')} failed (exit {p.returncode}):\n"
                           f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return result


def serve_as_worker(argv, tag: str, worker) -> bool:
    """When argv (default sys.argv[1:]) is [tag, '<json spec>'], this process is a worker (see
    run_worker): print worker(spec) as its `RESULT <json>` line and return True; else False."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if not (argv and argv[0] == tag):
        return False
    print("RESULT " + json.dumps(worker(json.loads(argv[1]))), flush=True)
    return True


def worker_result(stdout: str):
    """The JSON of the last `RESULT <json>` line a worker printed, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None
