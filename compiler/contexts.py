"""CUDA execution contexts: one loaded model (nnc.runtime.Module: weights, cubins, persistent
init values), many contexts, as TensorRT's IExecutionContext.

A CudaContext owns what a run writes: its activation arena, three non-blocking streams (H2D
copies, compute, D2H copies) and `slots` request buffers. Each slot has device input and output
buffers, pinned host staging buffers for both, a pinned extent slot for readbacks, its own CUDA
graph (captured over that slot's buffers and the context's arena) and three events.

run_async(inputs) takes a free slot (blocking while all are in flight), stages numpy inputs into
the slot's pinned buffers and queues:
    copy stream:    H2D pinned -> slot inputs            ; record h2d_done
    compute stream: wait h2d_done; graph replay (or the eager launches) ; record compute_done
    D2H stream:     wait compute_done; slot outputs -> pinned (or a device copy for output="cupy")
                    ; record d2h_done
so with two or more slots the H2D of request i+1 runs during the compute of request i and the
D2H of request i-1. Compute of every request of a context stays ordered on its one compute stream
(they share the arena). A completion thread per context waits on each request's d2h_done in
order, copies the outputs out of the pinned buffers, frees the slot and completes the
concurrent.futures.Future. run() is run_async(...).result().

Not yet measured: this runs only where a GPU is present; the GPU-marked tests in
tests/test_contexts.py check results and the copy/compute overlap.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np

from . import api
from .ir.errors import NncError


class _Slot:
    """One request's buffers and events (see the module docstring)."""

    def __init__(self, m, cp):
        from .runtime import _dev_dtype
        from .bench import _pinned
        p = m.plan
        self.in_bufs = [cp.empty(t["shape"], _dev_dtype(t["dtype"])) for t in p["inputs"]]
        self.out_bufs = [cp.empty(t.get("max_shape", t["shape"]), _dev_dtype(t["dtype"])) for t in p["outputs"]]
        self.host_in = [_pinned(cp, b.shape, b.dtype) for b in self.in_bufs]
        self.host_out = [_pinned(cp, b.shape, b.dtype) for b in self.out_bufs]
        self.extent_host = _pinned(cp, (len(p["outputs"]) + 1,), np.int64)
        self.h2d_done, self.compute_done, self.d2h_done = (cp.cuda.Event() for _ in range(3))
        self.graph = None


class CudaContext(api.ExecutionContext):
    """An execution context of a CUDA Module (nnc.runtime.Module.context())."""

    def __init__(self, module, slots: int = 2):
        super().__init__(module)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise NncError(f"slots must be an int >= 1, not {slots!r}")
        cp = self._cp = module._cp
        p = module.plan
        self.arena = cp.empty(max(int(p["memory"]["arena_bytes"]), 1), cp.uint8)
        self.stream = cp.cuda.Stream(non_blocking=True)     # compute
        self.h2d_stream = cp.cuda.Stream(non_blocking=True)
        self.d2h_stream = cp.cuda.Stream(non_blocking=True)
        self.slots = [_Slot(module, cp) for _ in range(slots)]
        self.graph_fallback = module.graph_fallback
        if module.uses_cuda_graph:
            for s in self.slots:
                self._capture(s)
                if s.graph is None:
                    break
            if any(s.graph is None for s in self.slots):
                for s in self.slots:
                    s.graph = None
        self._free = threading.Semaphore(slots)
        self._next = 0
        self._submit = threading.Lock()   # one submitting thread at a time (a context per thread)
        self._done = queue.Queue()
        self._worker = None

    @property
    def uses_cuda_graph(self) -> bool:
        return all(s.graph is not None for s in self.slots)

    def _capture(self, s: _Slot) -> None:
        from .runtime import capture_graph
        st, m = self.stream, self.module
        graph, why = capture_graph(self._cp, st, lambda: m._execute(s.in_bufs, s.out_bufs, st, capture=True,
                                                                    arena=self.arena, extent_host=s.extent_host))
        if graph is None:
            self.graph_fallback = why
            return
        s.graph = graph

    # ------------------------------------------------------------ running
    def _run(self, inputs, outputs, output) -> dict:
        return self.run_async(inputs, outputs, output=output).result()

    def run_async(self, inputs, outputs=None, *, output=None) -> Future:
        if not self._submit.acquire(blocking=False):
            raise api.ContextBusyError("this execution context is submitting on another thread; "
                                       "use one context per thread (Module.context())")
        try:
            return self._enqueue(inputs, outputs, output)
        finally:
            self._submit.release()

    def _enqueue(self, inputs, outputs, output) -> Future:
        m = self.module
        output = output or "cupy"
        if output not in ("cupy", "numpy"):
            raise NncError(f"output must be 'cupy' or 'numpy', not {output!r}")
        if not isinstance(inputs, dict):
            raise api.InputError(f"run(inputs): expected a dict {{input name: array}}, given {type(inputs).__name__}")
        sel = m._selected(outputs)
        arrays = m._feed((inputs,), {}, upload=False)  # checked dtypes and shapes, not yet copied
        self._start_worker()
        self._free.acquire()  # a slot whose previous request is entirely done
        s = self.slots[self._next % len(self.slots)]
        self._next += 1
        try:
            return self._queue(s, arrays, sel, output)
        except BaseException:
            self._free.release()
            raise

    def _queue(self, s: _Slot, arrays, sel, output) -> Future:
        cp, m = self._cp, self.module
        rt = cp.cuda.runtime
        keep = []  # device sources that must live until the copy ran
        for arr, host, dev in zip(arrays, s.host_in, s.in_bufs):
            if not dev.nbytes:
                continue
            if isinstance(arr, np.ndarray):
                np.copyto(host, arr.reshape(host.shape))
                rt.memcpyAsync(dev.data.ptr, host.ctypes.data, dev.nbytes, 1, self.h2d_stream.ptr)
            else:
                src = arr if arr.flags.c_contiguous else cp.ascontiguousarray(arr)
                keep.append(src)
                rt.memcpyAsync(dev.data.ptr, src.data.ptr, dev.nbytes, 3, self.h2d_stream.ptr)
        s.h2d_done.record(self.h2d_stream)
        st = self.stream
        st.wait_event(s.h2d_done)
        if s.graph is not None:
            s.graph.launch(st)
        else:
            with st:
                m._execute(s.in_bufs, s.out_bufs, st, arena=self.arena, extent_host=s.extent_host)
        s.compute_done.record(st)
        ds = self.d2h_stream
        ds.wait_event(s.compute_done)
        index = {t["name"]: i for i, t in enumerate(m.plan["outputs"])}
        dev_out = {}
        for n in sel:
            i = index[n]
            buf = s.out_bufs[i]
            if output == "numpy":
                if buf.nbytes:
                    rt.memcpyAsync(s.host_out[i].ctypes.data, buf.data.ptr, buf.nbytes, 2, ds.ptr)
            else:
                o = dev_out[n] = cp.empty(buf.shape, buf.dtype)
                if buf.nbytes:
                    rt.memcpyAsync(o.data.ptr, buf.data.ptr, buf.nbytes, 3, ds.ptr)
        s.d2h_done.record(ds)
        fut = Future()
        fut.set_running_or_notify_cancel()
        self._done.put((fut, s, sel, output, dev_out, keep))
        return fut

    def _start_worker(self):
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._complete, name="nnc-context-done", daemon=True)
            self._worker.start()

    def _complete(self):
        """The completion thread: each request in order, once its D2H is done."""
        from .runtime import _RAW, _np_dtype
        m = self.module
        while True:
            item = self._done.get()
            if item is None:
                return
            fut, s, sel, output, dev_out, _keep = item
            try:
                s.d2h_done.synchronize()
                res = {}
                for n in sel:
                    i = next(k for k, t in enumerate(m.plan["outputs"]) if t["name"] == n)
                    t = m.plan["outputs"][i]
                    a = np.array(s.host_out[i]) if output == "numpy" else dev_out[n]
                    if t.get("shape_known_after_run"):  # the extent this request read back
                        shape = list(t["max_shape"])
                        shape[t["dynamic_axis"]] = int(s.extent_host[i])
                        a = a.reshape(-1)[: int(np.prod(shape))].reshape(shape)
                    if output == "numpy" and t["dtype"] in _RAW:
                        a = a.view(_np_dtype(t["dtype"]))
                    res[n] = a
            except BaseException as e:  # the future carries it to the caller
                self._free.release()
                fut.set_exception(e)
                continue
            self._free.release()  # the outputs are copied out: the slot is free before the caller hears
            fut.set_result(res)

    def close(self) -> None:
        """Waits for the requests in flight and stops the completion thread."""
        if self._worker is not None and self._worker.is_alive():
            self._done.put(None)
            self._worker.join()
        self._worker = None
