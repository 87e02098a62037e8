"""The CUDA kernels' performance targets, checked against a benchmark results document.

The targets are those the CUDA C++ kernels were built to (stated for an H100 in bf16): RMSNorm
and rotary as fractions of the copy bandwidth measured in the same run, attention as speedups
over PyTorch's SDPA flash backend, decode as a fraction of the copy bandwidth. Each is checked
on the rows of our CUDA providers: ``cuda`` (the default layouts) and the selectable layouts
timed beside it (``cuda_*``), so a run shows at once whether the default meets a target and
whether another layout would. Fractions are checked as called; the figure replayed from a CUDA
graph (the GPU's time alone, no host dispatch) is shown beside it.

Used by ``scripts/gpu_summary.py`` (the last lines a GPU run prints) and by
``benchmarks/report.py`` (the targets table of ``benchmarks/README.md``). The summary also
sets each op's ``cuda`` row against its ``triton`` row (``auto_order_lines``): the figures
that "auto"'s orders (``backends.AUTO_PREFERENCE_BY_OP``) follow.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional


@dataclasses.dataclass(frozen=True)
class Target:
    op: str
    shape: Dict[str, int]  # the rows it applies to: these shape entries must match
    threshold: float
    baseline: Optional[str] = None  # None: fraction of the ceiling; else speedup over this provider

    def describe(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.shape.items())
        measure = "of copy bandwidth" if self.baseline is None else f"x {self.baseline}"
        return f"{self.op}{f' [{shape}]' if shape else ''} >= {self.threshold:g} {measure}"


# RMSNorm rows at M = 16384 (N = 4096 and 8192); rotary at InternLM2-7B's shapes (the only
# rotary rows the benchmark times); attention at B = 2, S = 8192, d = 128, causal.
_ATTENTION = {"S": 8192, "D": 128, "causal": 1}
TARGETS = (
    Target("rms_norm_fwd", {"M": 16384}, 0.9),
    Target("rms_norm_fwd", {"M": 16384}, 1.25, baseline="torch_compile"),
    Target("rms_norm_fwd", {"M": 16384}, 1.0, baseline="triton"),
    Target("rms_norm_bwd", {"M": 16384}, 0.8),
    Target("fused_add_rms_norm_fwd", {"M": 16384}, 0.9),
    Target("rotary_fwd", {}, 0.85),
    Target("rotary_bwd", {}, 0.85),
    Target("attention_fwd", _ATTENTION, 0.9, baseline="sdpa_flash"),
    Target("attention_bwd", _ATTENTION, 0.8, baseline="sdpa_flash"),
    Target("attention_decode", {}, 0.8),
)


def _ours(provider: str) -> bool:
    """Our CUDA providers: the default and its selectable layouts; not ``cuda_paged`` or
    ``cuda_fp8``, which time other calls (the decode over a paged cache, over an fp8 one)."""
    return provider == "cuda" or (provider.startswith("cuda_") and provider not in ("cuda_paged", "cuda_fp8"))


def _applies(target: Target, row: dict) -> bool:
    return row["op"] == target.op and _ours(row["provider"]) and \
        all(row.get("shape", {}).get(k) == v for k, v in target.shape.items())


def graph_fraction(row: dict) -> Optional[float]:
    """A row's fraction of its ceiling replayed from a CUDA graph (the GPU's time alone), or
    None when it has no fraction or no graph time."""
    fraction = row.get("frac_of_ceiling")
    return None if fraction is None or not row.get("ms_graph") else fraction * row["ms"] / row["ms_graph"]


def _measured(target: Target, row: dict):
    """(value as called, value replayed from a graph or None), or None when the row lacks it."""
    if target.baseline is not None:
        value = row.get("speedup_vs", {}).get(target.baseline)
        return None if value is None else (value, None)
    fraction = row.get("frac_of_ceiling")
    return None if fraction is None else (fraction, graph_fraction(row))


def target_lines(document: dict, skip: Callable[[dict], bool] = lambda row: False) -> List[str]:
    """One line per (target, row of ours it applies to): the value, the threshold and a verdict
    (``met``, or ``short``, with ``met from a graph`` when only the graph replay meets it);
    rows for which ``skip`` is true are left out (rows known not to time what they name)."""
    lines = []
    for target in TARGETS:
        rows = [row for row in document.get("results", []) if _applies(target, row) and not skip(row)]
        if not rows:
            lines.append(f"{target.describe()}: not in this run")
            continue
        for row in rows:
            measured = _measured(target, row)
            shape = ",".join(f"{k}={v}" for k, v in row.get("shape", {}).items() if k not in target.shape)
            where = f"{row['provider']}{f' [{shape}]' if shape else ''}"
            if measured is None:
                lines.append(f"{target.describe()}: {where}: no {target.baseline or 'ceiling'} in this run")
                continue
            value, graph = measured
            verdict = "met" if value >= target.threshold else \
                "short, met from a graph" if graph is not None and graph >= target.threshold else "short"
            graph_text = "" if graph is None else f" (graph {graph:.2f})"
            lines.append(f"{target.describe()}: {where}: {value:.2f}{graph_text} {verdict}")
    return lines


# The name "auto" chooses each benchmark op's backend by (``backends.auto_preference``).
AUTO_KEYS = {
    "rms_norm_fwd": "rms_norm", "rms_norm_bwd": "rms_norm.backward",
    "fused_add_rms_norm_fwd": "fused_add_rms_norm", "fused_add_rms_norm_bwd": "fused_add_rms_norm.backward",
    "rotary_fwd": "apply_rotary", "rotary_bwd": "apply_rotary.backward",
    "attention_fwd": "flash_attention", "attention_bwd": "flash_attention.backward",
    "attention_decode": "flash_attention_with_kvcache",
}


def _faster(cuda_ms: float, triton_ms: float):
    """(the faster backend, or "neither" on a tie; by how many times)."""
    if cuda_ms == triton_ms:
        return "neither", 1.0
    return ("cuda", triton_ms / cuda_ms) if cuda_ms < triton_ms else ("triton", cuda_ms / triton_ms)


def auto_order_lines(document: dict, preference: Optional[Callable[[str], tuple]] = None) -> List[str]:
    """One line per benchmark case timed with both default kernel providers, ``cuda`` and
    ``triton``: their times, which ran faster as called (and replayed from a CUDA graph, when
    both have a graph time), and, given ``preference`` (``backends.auto_preference``), the
    one "auto" tries first and whether the run agrees with it."""
    cases: Dict[tuple, Dict[str, dict]] = {}
    for row in document.get("results", []):
        if row["op"] in AUTO_KEYS and row["provider"] in ("cuda", "triton"):
            key = (row["op"], row.get("dtype"), tuple(sorted(row.get("shape", {}).items())))
            cases.setdefault(key, {})[row["provider"]] = row
    lines = []
    for (op, dtype, shape), rows in cases.items():
        if len(rows) < 2:
            continue
        cuda, triton = rows["cuda"], rows["triton"]
        faster, ratio = _faster(cuda["ms"], triton["ms"])
        text = (f"{AUTO_KEYS[op]} [{','.join(f'{k}={v}' for k, v in shape)}] {dtype}: cuda {cuda['ms']:.4f} ms, "
                f"triton {triton['ms']:.4f} ms: {faster} {ratio:.2f}x")
        if cuda.get("ms_graph") and triton.get("ms_graph"):
            text += " (from a graph: {} {:.2f}x)".format(*_faster(cuda["ms_graph"], triton["ms_graph"]))
        if preference is not None:
            first = next(backend for backend in preference(AUTO_KEYS[op]) if backend in ("cuda", "triton"))
            text += f"; auto: {first}" + ("" if faster in (first, "neither") else " (the run differs)")
        lines.append(text)
    return lines
