"""The foundations lowering stands on: one dtype table (codegen/dtypes.py), one Target
(codegen/target.py), typed options (codegen/options.py), the plan data in codegen/plan.py, and an
import graph without circles in which the runtime never reaches the compiler."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from nnc.codegen import dtypes, target
from nnc.codegen.errors import LoweringError
from nnc.codegen.options import CodegenOptions, LowerOptions
from nnc.codegen.target import ARCHS, Target, TargetError, for_arch, from_device, resolve_target
from nnc.ir.errors import NncError
from nnc.ir.types import DTYPES

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- dtypes


def test_every_ir_dtype_has_a_row():
    assert set(dtypes.TABLE) == set(DTYPES)
    for short, row in dtypes.TABLE.items():
        d = DTYPES[short]
        assert row.dtype is d
        assert row.device_np.itemsize == d.np.itemsize  # raw bits: same bytes an element
        if d.kind == "complex":
            assert row.ctype is None
            with pytest.raises(LoweringError, match="not supported by the CUDA backend"):
                dtypes.ctype(d)
        else:
            assert row.ctype and row.compute
            assert dtypes.ctype(d) == row.ctype and dtypes.compute_type(d) == row.compute


def test_dtype_table_matches_the_tables_it_replaced():
    # the C types lowering used (codegen/lower.py CTYPES/COMPUTE before the table)
    assert dtypes.ctype(DTYPES["f16"]) == "__half" and dtypes.compute_type(DTYPES["f16"]) == "float"
    assert dtypes.ctype(DTYPES["bf16"]) == "__nv_bfloat16" and dtypes.compute_type(DTYPES["bf16"]) == "float"
    assert dtypes.ctype(DTYPES["i64"]) == "int64_t" and dtypes.ctype(DTYPES["bool"]) == "bool"
    assert dtypes.ctype(DTYPES["f8e4m3"]) == "nnc_f8e4m3" and dtypes.compute_type(DTYPES["f8e4m3"]) == "float"
    assert dtypes.ctype(DTYPES["i4"]) == "nnc_i4" and dtypes.compute_type(DTYPES["u2"]) == "int32_t"
    narrow = {s for s, r in dtypes.TABLE.items() if r.narrow}
    assert narrow == {"f8e4m3", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz", "f8e8m0", "f4e2m1", "i4", "u4", "i2", "u2"}
    # the GEMM/conv families (codegen/kernels/common.py CTYPES)
    assert dtypes.KERNEL_FAMILY_TYPES == {"float16": ("__half", 2, "__half2"),
                                          "bfloat16": ("__nv_bfloat16", 2, "__nv_bfloat162"),
                                          "float32": ("float", 4, "float2")}
    # the device storage (compiler/runtime.py _RAW): raw bits exactly for ml_dtypes types
    raw = {n: r.device_np for n, r in dtypes.BY_NP_NAME.items() if r.raw_on_device}
    assert raw["bfloat16"] == np.uint16 and raw["float8_e4m3fn"] == np.uint8 and raw["int4"] == np.uint8
    assert set(raw) == {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                        "float8_e8m0fnu", "float4_e2m1fn", "int4", "uint4", "int2", "uint2"}
    assert dtypes.device_np("float32") == np.float32 and dtypes.info("f16") is dtypes.TABLE["f16"]


def test_no_other_copy_of_the_c_type_table():
    """The C spelling of bf16 appears only in the table (and templates), not as another dict."""
    hits = []
    for folder in ("codegen", "compiler", "tools"):
        for p in (ROOT / folder).rglob("*.py"):
            if p.name == "dtypes.py":
                continue
            if '"__nv_bfloat16"' in p.read_text():
                hits.append(str(p.relative_to(ROOT)))
    assert hits == []

# --------------------------------------------------------------------------- Target


def test_target_from_arch_table():
    t = for_arch("sm_90")
    assert (t.arch, t.source, t.sm_count, t.smem_per_block, t.smem_per_block_optin) == ("sm_90", "table", 132,
                                                                                         49152, 232448)
    assert (t.regs_per_sm, t.regs_per_thread, t.max_threads_per_block, t.warp_size) == (65536, 255, 1024, 32)
    assert not t.has_wgmma and t.cc == 90
    a = for_arch("90a")
    assert a.arch == "sm_90a" and a.has_wgmma and a.sm_count == 132 and a.cc == 90
    assert for_arch("compute_80").sm_count == 108
    for arch, t in ARCHS.items():
        assert t.arch == arch and t.smem_per_block <= t.smem_per_block_optin <= t.smem_per_sm
        assert Target.from_json(json.loads(json.dumps(t.to_json()))) == t


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(TargetError, match=r"unknown arch sm_75: nnc knows sm_80, sm_86, sm_89, sm_90, sm_90a"):
        for_arch("sm_75")
    with pytest.raises(NncError, match="bad arch 'hopper'"):
        for_arch("hopper")


FAKE_H200 = {"ComputeCapabilityMajor": 9, "ComputeCapabilityMinor": 0, "MultiProcessorCount": 132,
             "MaxSharedMemoryPerBlock": 49152, "MaxSharedMemoryPerBlockOptin": 232448,
             "MaxSharedMemoryPerMultiprocessor": 233472, "MaxRegistersPerMultiprocessor": 65536,
             "MaxThreadsPerBlock": 1024, "MaxThreadsPerMultiProcessor": 2048, "L2CacheSize": 62914560,
             "WarpSize": 32}


def test_target_from_a_fake_device():
    t = from_device(FAKE_H200, "NVIDIA H200")
    # the GPU present compiles for its arch-specific target: Hopper gets sm_90a (wgmma)
    assert (t.arch, t.source, t.name, t.l2_bytes, t.sm_count) == ("sm_90a", "device", "NVIDIA H200", 62914560, 132)
    assert t.has_wgmma and t.tensor_cores == "wgmma"
    small = dict(FAKE_H200, ComputeCapabilityMajor=8, ComputeCapabilityMinor=7, MultiProcessorCount=16)
    t2 = resolve_target(None, device=lambda: (small, "Orin"))  # an arch the table lacks: the device says
    assert (t2.arch, t2.sm_count, t2.source) == ("sm_87", 16, "device")
    # no GPU: the sm_90 table; an explicit arch never asks the device
    assert resolve_target(None, device=lambda: None) == ARCHS["sm_90"]
    assert resolve_target("sm_80", device=lambda: pytest.fail("asked the device")) == ARCHS["sm_80"]
    assert target.default_arch(lambda: (FAKE_H200, "")) == "sm_90a"
    with pytest.raises(TargetError, match="lack"):
        from_device({"WarpSize": 32})


def test_cupy_shaped_attributes_still_give_the_arch_specific_target():
    """cupy's Device.attributes has no ComputeCapabilityMajor/Minor (cupy keeps the capability in
    Device.compute_capability and the properties' major/minor): the lookup adds them, so an H200 is
    an sm_90a (wgmma) target and not, silently, the sm_90 table (a real bug until 2026-12-02)."""
    cupy_like = {k: v for k, v in FAKE_H200.items() if not k.startswith("ComputeCapability")}
    attrs = target.device_attributes(cupy_like, {"major": 9, "minor": 0, "name": b"NVIDIA H200"})
    t = resolve_target(None, device=lambda: (attrs, "NVIDIA H200"))
    assert (t.arch, t.source, t.has_wgmma) == ("sm_90a", "device", True)
    # attributes the device lookup cannot read: the table's entry, with a warning saying so
    with pytest.warns(UserWarning, match="could not read the GPU's limits"):
        t2 = resolve_target(None, device=lambda: (cupy_like, "NVIDIA H200"))
    assert t2.source == "table"


@pytest.mark.gpu
def test_the_gpu_present_reads_as_its_arch_specific_target():
    import cupy
    cc = cupy.cuda.Device(0).compute_capability
    t = resolve_target(None)
    assert t.source == "device", t
    assert t.arch in (f"sm_{cc}", f"sm_{cc}a")
    if cc == "90":
        assert t.arch == "sm_90a" and t.has_wgmma


def test_kernel_heuristics_read_the_target():
    """Tile choice follows the Target: a smaller opt-in limit removes the big-smem tiles, fewer
    SMs change the wave count the heuristic scores."""
    from dataclasses import replace
    from nnc.codegen.kernels import gemm
    pr = gemm.GemmProblem(4096, 4096, 4096, dtype="float16")
    big = gemm.candidates(pr, for_arch("sm_90"))
    small_t = replace(for_arch("sm_90"), smem_per_block_optin=48 * 1024)
    small = gemm.candidates(pr, small_t)
    assert small and len(small) < len(big)
    assert all(gemm._tc_smem(p, 2, True, True) <= 48 * 1024 for p in small)
    assert gemm.candidates(pr) == big  # the default is the sm_90 table
    pr2 = gemm.GemmProblem(1024, 1024, 64, dtype="float16")
    few = replace(for_arch("sm_90"), sm_count=8)
    assert gemm.default_params(pr2, few) != gemm.default_params(pr2, for_arch("sm_90"))

# --------------------------------------------------------------------------- options


def test_lower_options_typed_and_frozen(monkeypatch):
    o = LowerOptions(for_arch("sm_90"), "fp16", tf32=1)
    assert o.arch == "sm_90" and o.tf32 is True and o.precision == "fp16"
    with pytest.raises(Exception):
        o.tf32 = False  # frozen
    with pytest.raises(NncError, match="precision must be one of"):
        LowerOptions(for_arch("sm_90"), "fp8")
    with pytest.raises(NncError, match=r"unknown lowering options \['shhh'\]"):
        LowerOptions.from_dict({"arch": "sm_90", "shhh": 1})
    assert LowerOptions.from_dict({"arch": "sm_80"}).target == ARCHS["sm_80"]
    monkeypatch.setenv("NNC_RNN_STEPWISE", "1")
    assert LowerOptions(for_arch("sm_90")).rnn_stepwise is True  # the env var is a default only
    assert LowerOptions(for_arch("sm_90"), rnn_stepwise=False).rnn_stepwise is False
    monkeypatch.setenv("NNC_RNN_STEPWISE", "0")
    assert LowerOptions(for_arch("sm_90")).rnn_stepwise is False
    with pytest.raises(NncError, match="CUDA compiler must be one of"):
        CodegenOptions(o, backend="clang")


def test_compile_options_flow_to_lowering():
    from nnc.api import CompileOptions
    co = CompileOptions(arch="sm_80", precision="fp16", tf32=True, cuda_compiler="nvcc", cache=False, jobs=2)
    cg = co.codegen_options()
    assert cg.target == ARCHS["sm_80"] and cg.lower.precision == "fp16" and cg.lower.tf32
    assert (cg.backend, cg.cache, cg.jobs) == ("nvcc", False, 2)


def test_plan_json_records_the_target(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from nnc.driver import compile_model
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    pj = compile_model(str(p), tmp_path / "out", arch="sm_90")
    on_disk = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert on_disk["target"] == pj["target"] == ARCHS["sm_90"].to_json()
    assert on_disk["arch"] == "sm_90"
    ref = compile_model(str(p), tmp_path / "ref", arch="sm_80", codegen=False)  # no CUDA: the plan says it too
    assert json.loads((tmp_path / "ref" / "plan.json").read_text())["target"]["arch"] == "sm_80" == ref["arch"]
    with pytest.raises(TargetError, match="unknown arch sm_75"):
        compile_model(str(p), tmp_path / "bad", arch="sm_75")
    assert not (tmp_path / "bad").exists()

# --------------------------------------------------------------------------- plan data and imports


def test_plan_data_lives_in_plan_py():
    from nnc.codegen import plan
    for name in ("Buffer", "Kernel", "Scalar", "Launch", "Plan", "contiguous_strides"):
        assert getattr(plan, name).__module__ == "nnc.codegen.plan"
    # no module imports the plan data through lower.py any more (it is not a re-export hub)
    import pathlib, re
    root = pathlib.Path(__file__).resolve().parents[2]
    for f in list((root / "codegen").rglob("*.py")) + list((root / "tests").rglob("*.py")):
        for m in re.finditer(r"^from (?:\.\.lower|\.lower|nnc\.codegen\.lower) import (.+)$", f.read_text(), re.M):
            names = {n.strip() for n in m.group(1).split(",")}
            assert not names & {"Buffer", "Kernel", "Scalar", "Launch", "Plan", "contiguous_strides"}, f
    assert plan.contiguous_strides((2, 3, 4)) == [12, 4, 1]


_PACKAGES = {"compiler": "nnc", "compiler/passes": "nnc.passes", "compiler/onnx_import": "nnc.onnx_import",
             "ir": "nnc.ir", "ir/ops": "nnc.ir.ops", "codegen": "nnc.codegen",
             "codegen/kernels": "nnc.codegen.kernels", "templates": "nnc.templates"}


def _module_graph() -> dict[str, set[str]]:
    """nnc module -> the nnc modules it imports at module level (not inside functions)."""
    mods: dict[str, Path] = {}
    for folder, pkg in _PACKAGES.items():
        for p in (ROOT / folder).glob("*.py"):
            mods[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    graph = {}
    for name, path in mods.items():
        is_pkg = path.stem == "__init__"
        base = name if is_pkg else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    anchor = ".".join(parts[:len(parts) - node.level + 1])
                    target_mod = f"{anchor}.{node.module}" if node.module else anchor
                else:
                    target_mod = node.module or ""
                cands = [target_mod] + [f"{target_mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            # a package's own __init__ runs before its submodules: an edge to an ancestor is no cycle
            deps |= {c for c in cands if c in mods and c != name and not name.startswith(c + ".")}
        graph[name] = deps
    return graph


def test_import_graph_has_no_cycles():
    graph = _module_graph()
    assert "nnc.runtime" in graph and "nnc.codegen.lower" in graph
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_runtime_does_not_reach_the_compiler():
    """The runtime loads and runs: nothing it imports (at module level, transitively) compiles."""
    graph = _module_graph()
    seen, todo = set(), ["nnc.runtime"]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(graph[n])
    assert not seen & {"nnc.codegen.emit", "nnc.codegen.cuda", "nnc.codegen.lower", "nnc.driver"}
    # nor inside a function
    inner = set()
    for node in ast.walk(ast.parse((ROOT / "compiler" / "runtime.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            inner.add(node.module or "")
            inner |= {f"{node.module}.{a.name}" for a in node.names}
    assert not {m for m in inner if m.startswith(("codegen.emit", "codegen.cuda", "codegen.lower", "driver"))}
