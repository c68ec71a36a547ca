"""CPU int8 capability detection and the scheme chosen for it (flags injected, never this machine's)."""

from __future__ import annotations

import pytest

from onnxopt.isa import (
    SCHEME_SPECS,
    SCHEMES,
    CpuInt8Caps,
    choose_scheme,
    detect_cpu,
    parse_cpuinfo,
)

X86_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""
X86_VNNI = X86_AVX2.replace("bmi2", "bmi2 avx512f avx512bw avx512_vnni")
ARM_DOT = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_x86_and_arm():
    arch, flags = parse_cpuinfo(X86_AVX2)
    assert arch == "x86_64" and "avx2" in flags and "avx512_vnni" not in flags
    arch, flags = parse_cpuinfo(ARM_DOT)
    assert arch == "arm64" and "asimddp" in flags
    assert parse_cpuinfo("nothing here") == (None, frozenset())


def test_detect_cpu_from_file_and_injected_flags(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text(X86_VNNI)
    caps = detect_cpu(cpuinfo_path=p)
    assert caps.arch == "x86_64" and caps.vnni and caps.avx512bw and not caps.u8s8_saturates
    caps = detect_cpu(["AVX2", "fma"])  # case-insensitive, arch inferred from the flags
    assert caps == CpuInt8Caps("x86_64", frozenset({"avx2", "fma"}))
    assert detect_cpu(["asimd", "asimddp", "i8mm"]).arch == "arm64"
    assert detect_cpu([], arch="aarch64").arch == "arm64"
    assert detect_cpu(cpuinfo_path=tmp_path / "missing").flags == frozenset()


@pytest.mark.parametrize("flags", [["avx2", "fma"], ["avx2", "avx512f", "avx512bw"]])
def test_avx2_or_avx512bw_without_vnni_gets_a_non_saturating_scheme(flags):
    caps = detect_cpu(flags)
    assert caps.u8s8_saturates
    choice = choose_scheme(caps)
    spec = choice.spec
    # non-saturating: either no u8 x s8 product at all, or 7-bit weights (255 * 63 * 2 < 32768)
    assert spec.weight_type == "uint8" or spec.reduce_range
    assert choice.scheme == "u8u8"  # measured most accurate on EfficientNet-Lite0 (see onnxopt.isa)
    assert "vpmaddubsw" in choice.reason and "avx2" in choice.cpu


@pytest.mark.parametrize("flag", ["avx512_vnni", "avx_vnni"])
def test_vnni_gets_full_range(flag):
    choice = choose_scheme(detect_cpu(["avx2", flag]))
    assert choice.scheme == "u8s8" and not choice.spec.reduce_range and "VNNI" in choice.reason


def test_arm_dotprod_and_plain_neon_full_range():
    dot = choose_scheme(detect_cpu(["asimd", "asimddp"]))
    assert dot.scheme == "u8s8" and "dot-product" in dot.reason
    assert "i8mm" in choose_scheme(detect_cpu(["asimd", "asimddp", "i8mm"])).reason
    neon = choose_scheme(detect_cpu(["asimd"]))
    assert neon.scheme == "u8s8" and "NEON" in neon.reason


def test_unknown_cpu_is_safe():
    for caps in (CpuInt8Caps("other"), detect_cpu(["sse2", "sse4_1"])):
        spec = choose_scheme(caps).spec
        assert spec.weight_type == "uint8" or spec.reduce_range


def test_scheme_table_consistent():
    assert set(SCHEMES) == set(SCHEME_SPECS)
    assert SCHEME_SPECS["u8s8-rr"].reduce_range and not SCHEME_SPECS["u8s8"].reduce_range
    assert SCHEME_SPECS["s8s8"].activation_type == "int8"
    assert choose_scheme(detect_cpu(["avx2"])).to_dict()["scheme"] == "u8u8"


def test_pass_records_choice_and_recipe_overrides_it():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxopt.passes.quantize_qdq import QuantizeQDQ, QuantizeQDQConfig

    from onnxopt.pass_infra import PassContext
    from onnxopt.ranges import CalibrationResult, TensorRange

    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ranges = {"x": TensorRange(-1, 1, -1, 1), "y": TensorRange(-3, 3, -3, 3)}

    def run(**cfg):
        ctx = PassContext(results=[CalibrationResult(model, False, ranges=ranges)])
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return QuantizeQDQ(QuantizeQDQConfig(check_kernels=False, **cfg), ctx)(m).details

    d = run(cpu_flags=["avx2"])
    assert d["scheme"] == "u8u8" and d["weight_type"] == "uint8" and "vpmaddubsw" in d["scheme_reason"]
    d = run(cpu_flags=["avx2", "avx512_vnni"])
    assert d["scheme"] == "u8s8" and d["weight_type"] == "int8" and not d["reduce_range"]
    d = run(cpu_flags=["avx2"], scheme="u8s8-rr")
    assert d["scheme"] == "u8s8-rr" and d["scheme_reason"] == "set in the recipe" and d["reduce_range"]
    d = run(cpu_flags=["avx2"], weight_type="int8", reduce_range=True)  # fields override the auto scheme
    assert d["scheme"] == "u8u8" and d["weight_type"] == "int8" and d["reduce_range"]


def test_pass_warns_about_a_saturating_explicit_scheme():
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxopt.passes.quantize_qdq import QuantizeQDQ, QuantizeQDQConfig

    from onnxopt.pass_infra import PassContext
    from onnxopt.ranges import CalibrationResult, TensorRange

    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ranges = {"x": TensorRange(-1, 1, -1, 1), "y": TensorRange(-3, 3, -3, 3)}
    for flags, scheme, warned in ((["avx2"], "u8s8", True), (["avx2"], "s8s8", True), (["avx2"], "u8s8-rr", False),
                                  (["avx2", "avx_vnni"], "u8s8", False), (["asimd", "asimddp"], "u8s8", False)):
        ctx = PassContext(results=[CalibrationResult(model, False, ranges=ranges)])
        m = onnx.ModelProto()
        m.CopyFrom(model)
        d = QuantizeQDQ(QuantizeQDQConfig(check_kernels=False, cpu_flags=flags, scheme=scheme), ctx)(m).details
        assert ("warning" in d) == warned, (flags, scheme)
