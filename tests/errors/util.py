"""Helpers for error tests: small ONNX models and the CLI run in-process."""
import numpy as np
import onnx
from onnx import TensorProto as T, helper as h, numpy_helper as nh


def model(nodes, inputs, outputs, inits=(), opset=17):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def vi(name, dt=T.FLOAT, shape=None):
    return h.make_tensor_value_info(name, dt, shape)


def init(name, a):
    return nh.from_array(np.asarray(a), name)


def cli(capsys, *argv):
    """(exit status, stdout, stderr) of `nnc argv...` run in-process."""
    from nnc.cli import main
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(capsys, *argv) -> str:
    """Runs the CLI, asserts it failed cleanly (exit 1, one 'error:' line, no traceback) and
    returns that line."""
    rc, out, err = cli(capsys, *argv)
    assert rc == 1, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) >= 1 and "error:" in lines[0] and "Traceback" not in err, err
    return err.strip()
