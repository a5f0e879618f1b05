"""NVRTC compiles, in-process or as a worker process of codegen/cuda.py's parallel compile.

codegen/cuda.py starts this file by its path (`python nvrtc_worker.py`), so a worker imports
neither nnc (whose import costs most of a second: numpy, ml_dtypes) nor the user's __main__ module
(which multiprocessing's spawn and forkserver start methods re-import in every worker: a script
that calls nnc.compile at top level would run again there). NVRTC itself holds a lock, so threads
do not compile in parallel; processes do.

Protocol (binary, on the worker's stdin/stdout, one request at a time):
    request  u32 header length, header JSON {"name": str, "options": [str]}, u32 source length, source (UTF-8)
             (header {"identity": true}: the reply is nvrtc_identity(), the source is empty)
    reply    u8 status (0: cubin, 1: error text), u64 payload length, payload
End of input ends the worker.
"""
from __future__ import annotations

import json
import os
import struct
import sys


def compile_source(source: str, name: str, options: list) -> tuple[bool, bytes]:
    """(True, cubin) or (False, NVRTC's error and log as UTF-8). Never raises for a compile error."""
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except Exception as e:  # NVRTCError: the log says why
            log = ""
            try:
                log = nvrtc.getProgramLog(prog)
            except Exception:
                pass
            return False, f"{e}\n{log}".encode("utf-8", "replace")
        return True, bytes(nvrtc.getCUBIN(prog))
    finally:
        try:
            nvrtc.destroyProgram(prog)
        except Exception:
            pass


def nvrtc_identity() -> str:
    """"nvrtc MAJOR.MINOR PATH SIZE MTIME_NS": NVRTC's getVersion() and the library file it was
    loaded from (loading NVRTC costs about half a second). Raises if NVRTC is unavailable."""
    from cupy_backends.cuda.libs import nvrtc
    ident = "nvrtc %d.%d" % tuple(nvrtc.getVersion())
    try:
        import cuda.pathfinder
        path = cuda.pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path  # already loaded: a lookup
        if path:
            st = os.stat(path)
            ident += f" {path} {st.st_size} {st.st_mtime_ns}"
    except Exception:
        pass
    return ident


def _read_exact(f, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def main() -> int:
    # the protocol owns the original stdout; anything else printed goes to stderr
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    while True:
        try:
            (hlen,) = struct.unpack("<I", _read_exact(inp, 4))
            header = json.loads(_read_exact(inp, hlen))
            (slen,) = struct.unpack("<I", _read_exact(inp, 4))
            source = _read_exact(inp, slen).decode("utf-8")
        except EOFError:
            return 0
        try:
            if header.get("identity"):
                ok, payload = True, nvrtc_identity().encode()
            else:
                ok, payload = compile_source(source, header["name"], header["options"])
        except Exception as e:  # NVRTC missing or broken: reported as a compile error
            ok, payload = False, f"NVRTC unavailable in the worker: {type(e).__name__}: {e}".encode()
        proto.write(struct.pack("<BQ", 0 if ok else 1, len(payload)) + payload)
        proto.flush()


if __name__ == "__main__":
    # run by path, Python put this file's directory first on sys.path: its cuda.py would shadow
    # the `cuda` package cupy_backends imports
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.exit(main())
