"""generated/ must match what the current code generates (regenerate with
`python tools/regen_generated.py`), so every codegen change shows up as a diff of real CUDA."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("regen_generated", ROOT / "tools" / "regen_generated.py")
regen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(regen)


@pytest.mark.parametrize("name", list(regen.MODELS))
def test_generated_is_fresh(name, capsys):
    rc = regen.main(["--check", name])
    out = capsys.readouterr().out
    assert rc == 0, out


@pytest.mark.parametrize("name", list(regen.MODELS))
def test_generated_kernels_open_with_their_ops(name):
    import re
    text = (ROOT / "generated" / name / "model.cu").read_text()
    kernels = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(', text)
    assert kernels
    for k in kernels:
        i = text.find(f"// kernel {k}\n")
        assert i >= 0, f"kernel {k} has no header comment"
        block = text[i:text.find("// ====", i)]
        assert "// template: " in block and "// params: " in block and "// implements:" in block, k
        assert " = " in block.split("// implements:")[1], k  # "%res: type = Op(%operands...)"
