"""The benchmark's parent side (``fine_tune.commands.bench``): what the machine is and can do
(CPU matrix units, a calibration of the matrix-product peak kept to about a second, the
options that help on it), and the summary, table and notes made from the workers' results.

The calibration is bounded in time, not in size: it starts with small products and grows
them only while the next size fits in what is left of its budget, so a CPU without bf16 matrix
units (where torch emulates bf16 products, tens of times slower than float32) is measured in
well under a second instead of sitting minutes in a 2048 x 2048 product.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

# /proc/cpuinfo flags of matrix units that run bf16 products natively
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# --best auto takes bf16 autocast where a bf16 product measured this much faster than float32
BF16_WORTH = 1.3


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_features() -> dict:
    """What the CPU offers for matrix products: torch's kernel level (``AVX2``, ``AVX512``,
    ``AVX512_BF16``/``AMX`` builds report more) and the bf16 matrix flags of /proc/cpuinfo."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover
        capability = None
    bf16 = [f for f in BF16_FLAGS if f in flags]
    return {"torch_cpu_capability": capability, "bf16_matrix_units": bf16,
            "simd": [f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags]}


def matmul_peak(dtype_name: str, budget_s: float = 0.4, max_n: int = 2048) -> dict:
    """FLOP/s of square matrix products in this dtype, the largest size that fits the time
    budget (starting at 256, doubling while the next size's products fit in what is left)."""
    import torch

    dev = _device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    started, n, best = time.perf_counter(), 256, {"flops": 0.0, "n": 0}
    while True:
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        a @ b  # warm-up
        sync()
        times, t = [], time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - t < budget_s / 8 and len(times) < 50):
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
        one = min(times)  # the fastest product: the others waited for a busy machine
        flops = 2 * n ** 3 / one
        if flops > best["flops"]:
            best = {"flops": flops, "n": n}
        spent = time.perf_counter() - started
        # the next size costs about 8x per product, 4 products at least (warm-up included)
        if n >= max_n or spent + 32 * one > budget_s:
            break
        n *= 2
    return {**best, "seconds": time.perf_counter() - started}


def calibrate() -> dict:
    """Peak FLOP/s per precision on this machine's CPU (about a second for both)."""
    return {p: matmul_peak(p) for p in ("fp32", "bf16")}


def choose_best(calibration: dict | None, on_gpu: bool) -> tuple[str, str]:
    """Mode e's options from what was measured, and why: fused AdamW (train.py's default kernel)
    always; bf16 autocast on a GPU, or on a CPU whose bf16 product measured at least
    ``BF16_WORTH`` times the float32 one."""
    if on_gpu:
        return "bf16,fused", "a GPU: bf16 autocast on its tensor cores"
    fp32, bf16 = (calibration or {}).get("fp32", {}).get("flops"), (calibration or {}).get("bf16", {}).get("flops")
    if not fp32 or not bf16:
        return "fused", "no calibration: float32"
    ratio = bf16 / fp32
    if ratio >= BF16_WORTH:
        return "bf16,fused", f"bf16 products measured {ratio:.1f}x float32"
    return "fused", f"bf16 left out: bf16 products measured {ratio:.2f}x float32"


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        import accelerate
        import transformers

        info.update(transformers=transformers.__version__, accelerate=accelerate.__version__)
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    return info


def _range(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


SUMMARY_KEYS = ("samples_per_second", "tokens_per_second", "padding_share", "step_ms", "data_ms", "forward_ms",
                "backward_ms", "optimizer_ms", "other_ms", "peak_rss_mb", "peak_gpu_mb", "eval_accuracy", "mfu",
                "loop_reported_samples_per_second")


def summarize(runs: dict, modes: list[str]) -> dict:
    out = {}
    for mode in modes:
        ok = [r for r in runs[mode] if "error" not in r]
        out[mode] = {"runs": len(ok), "failed": len(runs[mode]) - len(ok)}
        for key in SUMMARY_KEYS:
            if any(key in r for r in ok):
                out[mode][key] = _range([r.get(key) for r in ok])
    return out


def paired_overhead(runs: dict, ours: str, base: str):
    """Step-time overhead of `ours` over `base`, in percent, from runs of the same repeat."""
    a = {r["repeat"]: r["step_ms"] for r in runs.get(ours, []) if "error" not in r}
    b = {r["repeat"]: r["step_ms"] for r in runs.get(base, []) if "error" not in r}
    pairs = [100.0 * (a[k] / b[k] - 1.0) for k in sorted(a) if k in b]
    return _range(pairs) if pairs else None


def _fmt(stat: dict | None, digits: int = 1, scale: float = 1.0, spread: bool = False) -> str:
    if not stat or stat.get("median") is None:
        return "–"
    med = f"{stat['median'] * scale:.{digits}f}"
    if spread and stat["max"] != stat["min"]:
        return f"{med} ({stat['min'] * scale:.{digits}f}–{stat['max'] * scale:.{digits}f})"
    return med


def markdown_table(summary: dict, labels: dict) -> str:
    from fine_tune.core.tables import format_table

    headers = ["mode", "samples/s", "tokens/s", "padding", "step ms", "data", "forward", "backward", "optimizer",
               "other", "peak RSS MB", "eval acc", "MFU"]
    rows = []
    for mode, s in summary.items():
        if not s["runs"]:
            rows.append([f"{mode}: {labels[mode]}", "failed"] + [""] * (len(headers) - 2))
            continue
        mem = s.get("peak_gpu_mb") if s.get("peak_gpu_mb", {}).get("median") else s.get("peak_rss_mb")
        rows.append([
            f"{mode}: {labels[mode]}", _fmt(s.get("samples_per_second"), 1, spread=True),
            _fmt(s.get("tokens_per_second"), 0, spread=True), _fmt(s.get("padding_share"), 0, 100) + "%",
            _fmt(s.get("step_ms"), 0), _fmt(s.get("data_ms"), 1), _fmt(s.get("forward_ms"), 0),
            _fmt(s.get("backward_ms"), 0), _fmt(s.get("optimizer_ms"), 0), _fmt(s.get("other_ms"), 1),
            _fmt(mem, 0), _fmt(s.get("eval_accuracy"), 3), _fmt(s.get("mfu"), 1, 100) + "%"])
    return format_table(headers, rows, "markdown", numeric=[False] + [True] * (len(headers) - 1)).rstrip("\n")


def comparisons_and_notes(summary: dict, runs: dict, info: dict, started: float) -> tuple[dict, list[str]]:
    """Paired step-time overheads and ratios against the Trainer, and the notes printed under the table."""
    comparisons = {}
    for ours, base in (("d", "c"), ("e", "c"), ("d", "b"), ("e", "b")):
        if ours in runs and base in runs:
            comparisons[f"{ours}_vs_{base}_step_time_pct"] = paired_overhead(runs, ours, base)
    notes = []
    if comparisons.get("d_vs_c_step_time_pct"):
        o = comparisons["d_vs_c_step_time_pct"]
        notes.append(f"train.py (d) over the bare loop (c) on identical batches: {o['median']:+.1f}% step time "
                     f"(paired repeats, range {o['min']:+.1f}% to {o['max']:+.1f}%)")
        own = {m: summary.get(m, {}) for m in ("c", "d")}
        if all(own[m].get("other_ms", {}).get("median") is not None for m in own):
            # the loop's own work: what it does outside the library calls both loops share
            extra_ms = sum(own["d"][k]["median"] - own["c"][k]["median"] for k in ("data_ms", "other_ms"))
            comparisons["d_vs_c_own_work_ms"] = extra_ms
            notes.append(f"train.py's own work per step (data + other, d minus c): {extra_ms:+.1f} ms, "
                         f"{100 * extra_ms / own['c']['step_ms']['median']:+.1f}% of the bare loop's step")
    for ours in ("d", "e"):
        if ours in summary and "b" in summary and summary[ours]["runs"] and summary["b"]["runs"]:
            ratio = summary[ours]["samples_per_second"]["median"] / summary["b"]["samples_per_second"]["median"]
            tokens = summary[ours]["tokens_per_second"]["median"] / summary["b"]["tokens_per_second"]["median"]
            comparisons[f"{ours}_vs_b_samples_ratio"], comparisons[f"{ours}_vs_b_tokens_ratio"] = ratio, tokens
            notes.append(f"{ours} vs the Trainer's best (b): {ratio:.2f}x samples/s, {tokens:.2f}x tokens/s")
    if any((s.get("mfu") or {}).get("max") and s["mfu"]["max"] > 1 for s in summary.values()):
        notes.append("MFU over 100%: the calibration ran in a slow patch of this host; rerun, or give --peak_flops")
    notes.append(f"{info['cpu']}, {info['torch_threads']} torch threads, torch {info['torch']}; "
                 f"load average {info.get('load_average', ['?'])[0]:.2f} at start, "
                 f"{(info.get('load_average_end') or ['?'])[0]:.2f} at end; {time.perf_counter() - started:.0f} s")
    return comparisons, notes


def headline(summary: dict, labels: dict) -> list[str]:
    """The long-input workload's headline, one line per mode: tokens/s and MFU."""
    lines = []
    for mode, s in summary.items():
        if s["runs"]:
            lines.append(f"{mode}: {_fmt(s.get('tokens_per_second'), 0)} tokens/s, MFU "
                         f"{_fmt(s.get('mfu'), 1, 100)}% ({labels[mode]})")
    return lines
