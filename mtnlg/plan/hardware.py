"""Hardware profiles for ``mtnlg plan``: what one accelerator (or one CPU rank) can do, and the links between them.

    hw = hardware("A100-80GB", {"inter_node_gbps": 12.5})        # a profile with an override
    hw = hardware("cpu", calibration="calibration.json")          # figures measured by `mtnlg bench --calibrate`

GPU figures are the vendors' nominal ones (datasheets of the A100 SXM4, H100 SXM5 and H200 SXM; DGX A100 with one
200 Gb/s HDR port per GPU, DGX H100/H200 with one 400 Gb/s NDR port per GPU) times the efficiencies below.
Bandwidths are in GB/s (bytes, not bits) per device and per direction. Memory is in GiB (2**30 bytes), as the
device reports it.

The efficiencies of the GPU profiles are the planner's assumptions, not measurements: ``gemm_efficiency`` (the
fraction of the dense 16-bit peak that a transformer's GEMMs reach) is the one figure fitted to published runs
(docs/planner.md); ``link_efficiency`` (0.8: the bus bandwidth NCCL's rings reach on NVLink/InfiniBand at
tens of MB) and ``memory_efficiency`` are round numbers. The ``cpu`` profile is measured on one machine of the kind
mtnlg's tests run on (2 cores, one rank per core); run `mtnlg bench --calibrate` on yours and pass the JSON it
writes with ``--calibration``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtnlg.errors import UserError


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float  # per device
    peak_bf16_tflops: float  # dense 16-bit (bf16 and fp16) matmul peak per device
    peak_fp32_tflops: float  # fp32 matmul peak (no TF32)
    memory_gbps: float  # bandwidth of memory-bound (elementwise) kernels, GB/s, nominal
    intra_node_gbps: float  # device-to-device inside a node (NVLink; shared memory on a CPU), per direction
    inter_node_gbps: float  # each device's share of its node's network, per direction
    gemm_efficiency: float = 0.64  # fraction of the peak a transformer's GEMMs reach (fitted: docs/planner.md)
    link_efficiency: float = 0.8  # fraction of the link bandwidths collectives reach (bus bandwidth)
    memory_efficiency: float = 0.8  # fraction of ``memory_gbps`` elementwise kernels reach
    gather_scatter_slowdown: float = 1.0  # all-gather / reduce-scatter time per byte over all-reduce's (gloo: > 1)
    latency_us: float = 3.0  # per step of a ring collective, or per point-to-point message
    reserved_gib: float = 4.0  # memory the model cannot use: runtime context, communication buffers, fragmentation
    reference_tflops: float | None = None  # cpu: the 1024^3 fp32 GEMM rate the calibration's figures go with
    source: str = ""  # where the figures come from

    def peak_tflops(self, precision: str) -> float:
        return self.peak_fp32_tflops if precision == "fp32" else self.peak_bf16_tflops

    def gemm_flops_per_s(self, precision: str) -> float:
        return self.peak_tflops(precision) * 1e12 * self.gemm_efficiency

    def link_bytes_per_s(self, inter_node: bool) -> float:
        return (self.inter_node_gbps if inter_node else self.intra_node_gbps) * 1e9 * self.link_efficiency

    @property
    def memory_bytes_per_s(self) -> float:
        return self.memory_gbps * 1e9 * self.memory_efficiency

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gib - self.reserved_gib) * 2**30


_NOMINAL = "nominal datasheet figures; efficiencies assumed (mtnlg/plan/hardware.py)"

PROFILES: dict[str, Hardware] = {
    "A100-40GB": Hardware("A100-40GB", 40, 312, 19.5, 1555, 300, 25, source=_NOMINAL),
    "A100-80GB": Hardware("A100-80GB", 80, 312, 19.5, 2039, 300, 25, source=_NOMINAL),
    "H100-80GB": Hardware("H100-80GB", 80, 989, 67, 3350, 450, 50, source=_NOMINAL),
    "H200": Hardware("H200", 140, 989, 67, 4800, 450, 50, source=_NOMINAL),
}

# The cpu profile: one rank of one thread on a 2-core AMD EPYC machine (the kind the tests run on; 24 GiB shared by
# its 2 ranks), measured by `mtnlg bench --calibrate` (here: the calibration step of benchmarks/plan_check.py,
# 2026-11-30; benchmarks/results/plan_check/calibration.json). ``gemm_efficiency``: GEMMs shaped like a ~100M model's
# ((1024, 768) @ (768, 2304), ...) over the best square GEMM; collectives: gloo between 2 ranks on one host (one
# node: intra and inter alike); ``reference_tflops``: the 1024^3 fp32 GEMM rate these figures go with. Machines of
# this kind differ and are shared: the same machine, busier, measured gemm_efficiency 0.35-0.68 and memory_gbps
# 0.57-0.84 at reference rates of 0.046-0.095 TFLOP/s, and gloo latency 613 us; calibrate when it is quiet (these
# figures are from a quiet stretch).
CPU_CALIBRATION: dict[str, float] = {
    "peak_fp32_tflops": 0.152, "peak_bf16_tflops": 1.01, "gemm_efficiency": 0.979, "memory_gbps": 2.64,
    "intra_node_gbps": 1.10, "inter_node_gbps": 1.10, "gather_scatter_slowdown": 2.96, "latency_us": 18.3,
    "reserved_gib": 0.246, "memory_gib": 11.77, "reference_tflops": 0.150,
}


def cpu_profile(measured: dict[str, Any] | None = None) -> Hardware:
    """The ``cpu`` profile from calibration figures (default: ``CPU_CALIBRATION``). Measured figures are what
    was reached, so its efficiencies other than the GEMMs' are 1."""
    figures = {**CPU_CALIBRATION, **(measured or {})}
    fields = {f.name for f in dataclasses.fields(Hardware)}
    return Hardware(name="cpu", memory_gib=float(figures.get("memory_gib", CPU_CALIBRATION["memory_gib"])),
                    link_efficiency=1.0,
                    memory_efficiency=1.0, source=str(figures.get("source", "CPU_CALIBRATION")),
                    **{k: float(v) for k, v in figures.items() if k in fields and k not in ("memory_gib", "source")})


def load_calibration(path: str | Path) -> dict[str, Any]:
    """The ``profile`` section of a calibration JSON written by ``mtnlg bench --calibrate``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--calibration {p}: no such file; write one with `mtnlg bench --calibrate --output DIR`")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--calibration {p}:{e.lineno}: malformed JSON ({e.msg})") from None
    profile = data.get("profile") if isinstance(data, dict) else None
    if not isinstance(profile, dict):
        raise UserError(f"--calibration {p}: no 'profile' object; write it with `mtnlg bench --calibrate`")
    return {**profile, "source": str(p)}


def hardware(name: str, overrides: dict[str, float] | None = None, calibration: str | Path | None = None) -> Hardware:
    """The profile ``name`` (case-insensitive) with ``overrides`` (field -> value) applied."""
    key = {k.lower(): k for k in [*PROFILES, "cpu"]}.get(name.lower())
    if key is None:
        raise UserError(f"--gpu {name}: unknown; use one of {', '.join([*PROFILES, 'cpu'])} "
                        "(and override fields with --gpu-memory-gb, --inter-node-gbps, ...)")
    if calibration is not None and key != "cpu":
        raise UserError("--calibration applies to --gpu cpu (figures measured on this machine)")
    hw = cpu_profile(load_calibration(calibration) if calibration else None) if key == "cpu" else PROFILES[key]
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    for k, v in changes.items():
        if v <= 0 or (k.endswith("efficiency") and v > 1):
            raise UserError(f"{k.replace('_', '-')} = {v}: must be positive" + (" and at most 1" if "eff" in k else ""))
    return dataclasses.replace(hw, **changes)
