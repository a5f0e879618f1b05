"""A model file is untrusted: names that try to become source (line breaks, comment ends, line
splices, preprocessor lines, NUL, U+2028, invalid UTF-8, 10 kB) compile, show up escaped in the
generated files, and change none of their structure (codegen/escape.py)."""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nnc.codegen.escape import Code, UnescapedText, c_string, comment_text
from nnc.codegen.render import env
from nnc.driver import compile_model

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)

HOSTILE = {
    "lf": "t\n#define NNC_HOOK_PROBE 1\n//",
    "cr": "t\r#define NNC_HOOK_PROBE 1\r//",
    "crlf_system": "t\r\n#include <cstdlib>\r\nstatic int x = std::system(\"touch /tmp/nnc_pwned\");\r\n//",
    "comment_end": "a*/ int injected; /*b",
    "hash_include": "#include \"/etc/passwd\"",
    "backslash_newline": "splice\\\n#define NNC_HOOK_PROBE 1",
    "trailing_backslash": "ends with a backslash\\",
    "trigraph": "tri??/\n#define NNC_HOOK_PROBE 1",
    "nul": "nul\x00byte",
    "u2028": "line\u2028sep\u2029end\u0085",
    "non_ascii": "caf\u00e9_\u6f22\u5b57_\U0001f600",
    "long": "n" * 10240,
}

BENIGN = "t"
DIRECTIVE = re.compile(r"^\s*#")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _model(mid: str, x: str = "x", y: str = "y", node: str = "") -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", [x], [mid], name=node + "relu" if node else ""),
             helper.make_node("Sigmoid", [mid], [y], name=node + "sigmoid" if node else "")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _hostile_model(name: str) -> onnx.ModelProto:
    """The name on every string a generated file can show: the intermediate, the input, the
    output (C API names) and the node names."""
    return _model(name, x=name + "_in", y=name + "_out", node=name)


def _compile(tmp_path: Path, model, tag: str):
    src = tmp_path / f"{tag}.onnx"
    if isinstance(model, bytes):
        src.write_bytes(model)
    else:
        onnx.save(model, src)
    out = tmp_path / f"out_{tag}"
    plan = compile_model(str(src), out, arch="sm_90")  # NVRTC compiles model.cu: the kernels are valid
    return out, plan


GENERATED = ("model.cu", "nnc_model.h", "CMakeLists.txt", "nnc_run_example.cpp")


def _assert_clean(out: Path, benign: Path):
    for f in GENERATED:
        raw = (out / f).read_bytes()
        bad = sorted({b for b in raw if not (0x20 <= b < 0x7F or b == 0x0A)})
        assert not bad, f"{f}: bytes {bad} outside printable ASCII + LF"
        lines, ref = raw.decode().split("\n"), (benign / f).read_text().split("\n")
        # escaping never adds a line or a preprocessor directive: same directives, same line count
        assert len(lines) == len(ref), f
        assert [l for l in lines if DIRECTIVE.match(l)] == [l for l in ref if DIRECTIVE.match(l)], f
        assert not any(l.lstrip().startswith("#define NNC_HOOK_PROBE") for l in lines)
        code = [_STRING.sub('""', l).split("//")[0] for l in lines]  # outside literals and comments
        assert not any("injected" in c or "std::system" in c for c in code), f


@pytest.fixture(scope="module")
def benign_out(tmp_path_factory):
    out, _ = _compile(tmp_path_factory.mktemp("benign"), _hostile_model(BENIGN), "benign")
    return out


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_name_compiles_escaped(tmp_path, benign_out, case):
    name = HOSTILE[case]
    out, plan = _compile(tmp_path, _hostile_model(name), "benign")  # same file stem: same C API name
    _assert_clean(out, benign_out)
    src = (out / "model.cu").read_text()
    esc = comment_text(name)
    # the kernel header and launch comments show it escaped (fuse-elementwise puts Relu and Sigmoid
    # in one group: the header names the body's copy of the value, the name plus a "_<n>" suffix)
    assert re.search(re.escape(f"%{esc}") + r"(_\d+)?: f32\[4\] = Relu\(", src)
    host = src[src.index("kInputNames"):]
    assert c_string(name + "_in") in host and c_string(name + "_out") in host  # C API names: literals
    assert plan["inputs"][0]["name"] == name + "_in" and plan["outputs"][0]["name"] == name + "_out"
    # identifiers are nnc's own: kernel names come from a fixed alphabet
    for k in plan["kernels"]:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k["name"]), k["name"]


def test_ordinary_names_stay_verbatim(benign_out):
    src = (benign_out / "model.cu").read_text()
    # Relu's result is inside a fused group: the header names the body's copy (a "_<n>" suffix)
    assert re.search(r"//   %t(_\d+)?: f32\[4\] = Relu\(%t_in: f32\[4\]\)", src)
    assert '"t_in"' in src and '"t_out"' in src


def _invalid_utf8_model() -> bytes:
    """ONNX names are protobuf strings; onnx refuses to make invalid UTF-8, so the placeholder
    QQ (same length) is patched in the serialized bytes."""
    b = _model("QQ").SerializeToString()
    assert b.count(b"QQ") == 2
    return b.replace(b"QQ", b"\xff\xfe")


def test_invalid_utf8_name(tmp_path, benign_out):
    out, plan = _compile(tmp_path, _invalid_utf8_model(), "benign")
    src = (out / "model.cu").read_text()
    assert comment_text("\\xff\\xfe") in src  # decoded as text by the importer, escaped by codegen
    for f in GENERATED:
        assert all(0x20 <= b < 0x7F or b == 0x0A for b in (out / f).read_bytes()), f


def test_cli_probe_never_becomes_code(tmp_path):
    """The exact check of shared/hooks/before-stop, through the command line."""
    from nnc.cli import main
    onnx.save(_model(HOSTILE["lf"]), tmp_path / "probe.onnx")
    assert main(["compile", str(tmp_path / "probe.onnx"), "-o", str(tmp_path / "out"), "--arch", "sm_90"]) == 0
    text = (tmp_path / "out" / "model.cu").read_text()
    assert not re.search(r"^[ \t]*#define NNC_HOOK_PROBE", text, re.M)
    assert "%t\\x0a#define NNC_HOOK_PROBE 1\\x0a//" in text


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_nvcc_builds_hostile_host_code(tmp_path):
    """Every hostile name in one model (one per tensor of a Relu chain, plus input and output):
    nvcc compiles model.cu (kernels + C API) and the example runner."""
    names = list(HOSTILE.values())
    nodes = [helper.make_node("Relu", [names[i] + "_in" if i == 0 else names[i - 1]], [names[i]],
                              name=names[i]) for i in range(len(names))]
    nodes.append(helper.make_node("Sigmoid", [names[-1]], [names[0] + "_out"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(names[0] + "_in", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info(names[0] + "_out", TensorProto.FLOAT, [4])])
    out, _ = _compile(tmp_path, helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), "all")
    for lf in ("\n#define", "\r#define"):
        assert not any(l.lstrip().startswith("#define NNC_HOOK") for l in (out / "model.cu").read_text().split(lf[0]))
    for src in ("model.cu", "nnc_run_example.cpp"):
        r = subprocess.run([NVCC, "-c", "-std=c++17", "-arch=sm_90", "-I", str(out), str(out / src),
                            "-o", str(tmp_path / (src + ".o"))], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert not Path("/tmp/nnc_pwned").exists()


@pytest.mark.gpu
def test_hostile_names_run_on_gpu(tmp_path):
    import nnc
    name = HOSTILE["crlf_system"]
    out, plan = _compile(tmp_path, _hostile_model(name), "gpu")
    m = nnc.load(out)
    x = np.linspace(-2, 2, 4, dtype=np.float32)
    y = m.run({name + "_in": x}, output="numpy")[name + "_out"]
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-np.maximum(x, 0))), rtol=1e-6)


# ---------------------------------------------------------------- the escaping functions

def test_comment_text_escapes():
    assert comment_text("conv1/weight:0 [a, b] (x) = y") == "conv1/weight:0 [a, b] (x) = y"
    assert comment_text("a\nb") == "a\\x0ab"
    assert comment_text("a\rb") == "a\\x0db"
    assert comment_text("a\\") == "a\\x5c"
    assert comment_text("*/") == "\\x2a/"
    assert comment_text("??/") == "\\x3f?/"
    assert comment_text("\x00") == "\\x00"
    assert comment_text("\u2028\u2029") == "\\u2028\\u2029"
    assert comment_text("\U0001f600") == "\\U0001f600"
    assert comment_text(b"\xff") == "\\xff"  # raw bytes: shown byte by byte
    for ch in map(chr, list(range(0x800)) + [0x2028, 0x2029, 0xFEFF, 0xFFFF, 0x10FFFF, 0xDCFF]):
        t = comment_text("a" + ch + "b")
        assert all(0x20 <= ord(c) < 0x7F for c in t) and "*/" not in t and "??" not in t, repr(ch)
        assert "\\" not in t.replace("\\x", "").replace("\\u", "").replace("\\U", "")


def _c_unescape(lit: str) -> bytes:
    assert lit[0] == lit[-1] == '"'
    body, out, i = lit[1:-1], bytearray(), 0
    while i < len(body):
        if body[i] == "\\":
            assert re.fullmatch(r"[0-7]{3}", body[i + 1:i + 4]), body[i:i + 4]
            out.append(int(body[i + 1:i + 4], 8))
            i += 4
        else:
            assert body[i] not in '"?' and 0x20 <= ord(body[i]) < 0x7F
            out.append(ord(body[i]))
            i += 1
    return bytes(out)


@pytest.mark.parametrize("s", list(HOSTILE.values()) + ["", "plain", '"q"', "a?b??c"])
def test_c_string_round_trips(s):
    assert _c_unescape(c_string(s)) == s.encode()


def test_finalize_stops_unescaped_model_text():
    t = env().from_string("// {{ x }}\n")
    assert t.render(x="conv1") == "// conv1\n"
    for bad in ("a\nb", "a\rb", "a\\", "caf\u00e9", "x??/", "\u2028"):
        with pytest.raises(UnescapedText):
            t.render(x=bad)
    assert env().from_string("// {{ x | comment }}").render(x="a\nb") == "// a\\x0ab"
    assert env().from_string("{{ x }}").render(x=Code("int a;\nint b;")) == "int a;\nint b;"
    # a macro's text is template output, already guarded inside; a Python callable's is not
    macro = env().from_string("{% macro m(v) %}int a;\n// {{ v }}{% endmacro %}{{ m(x) }}")
    assert macro.render(x="ok") == "int a;\n// ok"
    with pytest.raises(UnescapedText):
        macro.render(x="a\nb")
    with pytest.raises(UnescapedText):
        env().from_string("{{ f() }}").render(f=lambda: "a\nb")


def test_terminal_text_keeps_escape_sequences_off_the_screen():
    from nnc.codegen.escape import terminal_text
    assert terminal_text("probs") == "probs" and terminal_text("é") == "é"
    shown = terminal_text("y\x1b[2J\nrm -rf\r\u2028")
    assert shown.isprintable() and "\\x1b" in shown and "\\n" in shown
