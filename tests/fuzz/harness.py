"""The fuzzing property, shared by the ONNX, IR and out-dir fuzzers: a mutated input goes
import -> verify -> default passes -> reference interpreter (small random inputs) and must end
in a clean NncError or a result; any other exception, or running past the per-case time bound,
is a finding. Findings are grouped into classes by exception type and the nnc frame raising it."""
from __future__ import annotations

import signal
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from nnc.ir.errors import NncError

CASE_SECONDS = 5.0  # per-case bound: a hang is a finding too
MAX_RUN_ELEMENTS = 1 << 16  # interpret only models whose inputs and outputs are this small


class CaseTimeout(Exception):
    pass


@contextmanager
def time_bound(seconds: float):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"no result within {seconds}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Tally:
    tried: int = 0
    clean_errors: int = 0
    results: int = 0
    findings: dict = field(default_factory=dict)  # class -> (count, example description, traceback)

    def record(self, what: str, fn) -> None:
        """Runs fn() under the time bound and classifies how it ended."""
        self.tried += 1
        try:
            with time_bound(CASE_SECONDS):
                fn()
            self.results += 1
        except NncError:
            self.clean_errors += 1
        except Exception as e:  # noqa: BLE001 - anything else is what the fuzzer looks for
            tb = traceback.extract_tb(e.__traceback__)
            frame = next((f for f in reversed(tb) if "/work/" in f.filename and "/tests/" not in f.filename
                          and ".venv" not in f.filename), tb[-1] if tb else None)
            key = f"{type(e).__name__} at {frame.filename.rsplit('/', 2)[-2:] if frame else '?'}:" \
                  f"{frame.lineno if frame else '?'}"
            n, ex, t = self.findings.get(key, (0, what, "".join(traceback.format_exception(e))[-3000:]))
            self.findings[key] = (n + 1, ex, t)

    def report(self) -> str:
        lines = [f"{self.tried} cases: {self.results} results, {self.clean_errors} clean errors, "
                 f"{sum(n for n, _, _ in self.findings.values())} findings in {len(self.findings)} classes"]
        for k, (n, ex, t) in self.findings.items():
            lines.append(f"--- {k} (x{n}), e.g. {ex}\n{t}")
        return "\n".join(lines)


def random_inputs(func, rng) -> dict | None:
    """Small random inputs for a function's arguments, or None when a shape is not static and small."""
    feed = {}
    for a in func.args:
        t = a.type
        if not t.is_static or int(np.prod(t.shape, dtype=np.int64)) > MAX_RUN_ELEMENTS:
            return None
        dt = t.dtype
        if dt.is_float:
            x = rng.standard_normal(t.shape).astype(dt.np)
        elif dt.kind == "bool":
            x = rng.random(t.shape) < 0.5
        elif dt.kind == "complex":
            x = rng.standard_normal(t.shape).astype(dt.np)
        else:
            x = rng.integers(0, 3, t.shape).astype(dt.np)
        feed[a.name] = x
    return feed


def check_module(module, rng) -> None:
    """verify -> default passes (verifying after each) -> interpret when small."""
    from nnc.ir.interp import Interpreter
    from nnc.ir.verify import verify
    from nnc.pipeline import run_passes
    verify(module)
    run_passes(module, verify_each=True)
    feed = random_inputs(module.main, rng)
    if feed is None:
        return
    if any(r.type.is_static and int(np.prod(r.type.shape, dtype=np.int64)) > MAX_RUN_ELEMENTS * 16
           for op in module.main.walk() for r in op.results):
        return  # a mutant asking for a huge intermediate is legal but too slow to interpret here
    Interpreter(module).run(feed)
