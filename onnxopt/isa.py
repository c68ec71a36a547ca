"""CPU int8 capability detection and the quantization scheme that is accurate on it.

ONNX Runtime's CPU integer GEMM/conv kernels (MLAS) multiply uint8 activations by int8
weights. How they accumulate depends on the instruction set:

* x86 with AVX2 or AVX-512BW but **no VNNI**: ``vpmaddubsw`` multiplies u8 x s8 pairs and adds
  each pair into a *saturating int16*. With full-range operands 255*127*2 = 64770 > 32767, so
  sums clip and results go wrong (silently, and only on such CPUs). Depthwise convolutions use
  a different MLAS kernel that accumulates in int32 and does not saturate.
* x86 with VNNI (``avx_vnni`` / ``avx512_vnni``): ``vpdpbusd`` accumulates u8 x s8 in int32:
  no saturation, full range is safe and fastest.
* ARM64: ``udot``/``sdot`` (``asimddp``), ``usmmla``/``smmla`` (``i8mm``) or plain NEON
  widening multiplies all accumulate in 32 bits: no saturation.

Schemes (activation type x weight type, and the weight range):

* ``u8s8``    uint8 activations x int8 weights, full range (ORT's default).
* ``u8s8-rr`` uint8 x int8 with weights on 7 bits ([-63, 63]) for every op that runs through
  the saturating GEMM kernel (255*63*2 = 32130 fits int16); depthwise convs keep 8 bits.
* ``u8u8``    uint8 x uint8 weights (zero point 128): MLAS's u8u8 kernel widens to 16 bits
  and uses ``vpmaddwd`` (no saturation, full precision, slower).
* ``s8s8``    int8 x int8; on x86 ORT rewrites int8 activations to uint8 (+128), so this
  saturates like ``u8s8`` there.

``choose_scheme`` picks the ``auto`` scheme; the choice for AVX2-without-VNNI was measured
on EfficientNet-Lite0 (see ``AVX2_MEASUREMENT``).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Scheme = Literal["u8s8", "u8s8-rr", "u8u8", "s8s8"]
SCHEMES: tuple[str, ...] = ("u8s8", "u8s8-rr", "u8u8", "s8s8")
Arch = Literal["x86_64", "arm64", "other"]

X86_INT8_FLAGS = ("avx2", "avx512bw", "avx_vnni", "avx512_vnni", "amx_int8")
ARM_INT8_FLAGS = ("asimd", "asimddp", "i8mm")


@dataclass(frozen=True)
class SchemeSpec:
    """What a scheme means for the QDQ pass."""

    name: str
    activation_type: str
    weight_type: str
    # 7-bit weights on ops whose integer kernel accumulates pairs in int16
    reduce_range: bool
    summary: str


SCHEME_SPECS: dict[str, SchemeSpec] = {
    "u8s8": SchemeSpec("u8s8", "uint8", "int8", False, "uint8 activations x int8 weights, full range"),
    "u8s8-rr": SchemeSpec("u8s8-rr", "uint8", "int8", True,
                          "uint8 activations x int8 weights on 7 bits (depthwise convs 8 bits)"),
    "u8u8": SchemeSpec("u8u8", "uint8", "uint8", False, "uint8 activations x uint8 weights (zero point 128)"),
    "s8s8": SchemeSpec("s8s8", "int8", "int8", False, "int8 activations x int8 weights, full range"),
}

# Measured with the int8 preset (cleanup -> calibrate (mse) -> quantize-qdq with bias correction) on
# EfficientNet-Lite0: 100 calibration images, 650 ImageNet val images (fp32 top-1 80.62 %), onnxruntime
# 1.32, AMD EPYC with AVX2 and no VNNI. "KL" is the mean KL divergence of the softmax outputs from fp32
# (the steadier number: one image is 0.15 pt); latency batch 1, one thread, ORT_ENABLE_ALL, relative to fp32.
AVX2_MEASUREMENT = {
    "u8u8": "top-1 80.77 %, agreement with fp32 97.7 %, KL 0.0031, 0.92x fp32 latency",
    "u8s8-rr": "top-1 80.92 %, agreement 97.5 %, KL 0.0082, 0.66x fp32 latency",
    "u8s8": "top-1 79.23 %, agreement 89.8 %, KL 0.126 - saturates",
    "s8s8": "top-1 79.85 %, agreement 89.5 %, KL 0.122 - saturates (ORT turns int8 activations into uint8) "
            "and ORT leaves the convs next to int8 Adds in float",
}


@dataclass(frozen=True)
class CpuInt8Caps:
    """Int8 dot-product capabilities of a CPU, from its feature flags."""

    arch: Arch
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def vnni(self) -> bool:
        return self.arch == "x86_64" and bool(self.flags & {"avx_vnni", "avx512_vnni", "amx_int8"})

    @property
    def avx2(self) -> bool:
        return self.arch == "x86_64" and "avx2" in self.flags

    @property
    def avx512bw(self) -> bool:
        return self.arch == "x86_64" and "avx512bw" in self.flags

    @property
    def arm_dotprod(self) -> bool:
        return self.arch == "arm64" and "asimddp" in self.flags

    @property
    def arm_i8mm(self) -> bool:
        return self.arch == "arm64" and "i8mm" in self.flags

    @property
    def u8s8_saturates(self) -> bool:
        """True where ORT's u8 x s8 GEMM kernel uses ``vpmaddubsw`` (int16 pair sums)."""
        return self.arch == "x86_64" and (self.avx2 or self.avx512bw) and not self.vnni

    def describe(self) -> str:
        if self.arch == "x86_64":
            found = [f for f in X86_INT8_FLAGS if f in self.flags]
        elif self.arch == "arm64":
            found = [f for f in ARM_INT8_FLAGS if f in self.flags]
        else:
            found = []
        return f"{self.arch} ({', '.join(found) if found else 'no int8 dot-product flags'})"


@dataclass(frozen=True)
class SchemeChoice:
    scheme: str
    reason: str
    cpu: str

    @property
    def spec(self) -> SchemeSpec:
        return SCHEME_SPECS[self.scheme]

    def to_dict(self) -> dict[str, str]:
        return {"scheme": self.scheme, "reason": self.reason, "cpu": self.cpu}


def _normalize_arch(machine: str) -> Arch:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64", "i686", "i386", "x86"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8", "armv8l") or m.startswith("arm64"):
        return "arm64"
    return "other"


def parse_cpuinfo(text: str) -> tuple[Arch | None, frozenset[str]]:
    """Flags of the first CPU in a /proc/cpuinfo text (x86 ``flags``, ARM ``Features``)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "flags":
            return "x86_64", frozenset(value.split())
        if key == "features":
            return "arm64", frozenset(value.split())
    return None, frozenset()


def detect_cpu(flags: Iterable[str] | None = None, arch: str | None = None,
               cpuinfo_path: str | Path = "/proc/cpuinfo") -> CpuInt8Caps:
    """Capabilities of this CPU, or of the one described by ``flags``/``arch`` (tests, other targets).

    With ``flags`` but no ``arch``, the architecture is inferred from the flags (x86 and ARM
    flag names do not overlap) and otherwise from this machine.
    """
    if flags is not None:
        fl = frozenset(f.lower() for f in flags)
        if arch is None:
            if fl & {"avx2", "avx512bw", "avx_vnni", "avx512_vnni", "sse2", "sse4_1"}:
                arch = "x86_64"
            elif fl & {"asimd", "asimddp", "i8mm", "neon"}:
                arch = "arm64"
            else:
                arch = platform.machine()
        return CpuInt8Caps(_normalize_arch(arch), fl)
    parsed_arch: str | None = None
    fl = frozenset()
    try:
        parsed_arch, fl = parse_cpuinfo(Path(cpuinfo_path).read_text())
    except OSError:
        pass
    return CpuInt8Caps(_normalize_arch(arch or parsed_arch or platform.machine()), fl)


def choose_scheme(caps: CpuInt8Caps | None = None) -> SchemeChoice:
    """The ``auto`` scheme for ``caps`` (default: this CPU), with the reason."""
    caps = caps if caps is not None else detect_cpu()
    cpu = caps.describe()
    if caps.arch == "x86_64":
        if caps.vnni:
            return SchemeChoice("u8s8", "VNNI (vpdpbusd) accumulates u8 x s8 products in int32: full range "
                                "does not saturate and is the fastest int8 path", cpu)
        if caps.u8s8_saturates:
            return SchemeChoice(
                "u8u8",
                "AVX2/AVX-512BW without VNNI: ORT's u8 x s8 kernel (vpmaddubsw) saturates int16 pair sums with "
                "full-range weights; of the non-saturating schemes u8u8 (8-bit weights, 16-bit multiplies) "
                "measured most accurate on EfficientNet-Lite0; 7-bit weights (u8s8-rr) run faster but gave 2.6x the "
                f"output KL divergence (u8u8: {AVX2_MEASUREMENT['u8u8']}; u8s8-rr: {AVX2_MEASUREMENT['u8s8-rr']}; "
                f"u8s8: {AVX2_MEASUREMENT['u8s8']}); set scheme: u8s8-rr for speed",
                cpu)
        return SchemeChoice("u8u8", "x86 without AVX2/AVX-512BW/VNNI flags (or flags unknown): u8u8 cannot "
                            "saturate on any MLAS kernel", cpu)
    if caps.arch == "arm64":
        what = ("i8mm (usmmla/smmla)" if caps.arm_i8mm else "dot-product (udot/sdot)" if caps.arm_dotprod
                else "NEON widening multiplies")
        return SchemeChoice("u8s8", f"ARM64 {what} accumulate in 32 bits: full range does not saturate", cpu)
    return SchemeChoice("u8u8", "unknown CPU architecture: u8u8 cannot saturate on any kernel", cpu)
