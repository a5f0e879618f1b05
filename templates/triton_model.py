"""Triton Python-backend model for an nnc-compiled directory (written by `nnc export-triton`).

Copied verbatim into REPO/NAME/1/model.py: it holds no string from the model. Everything it needs
comes from Triton's model config (config.pbtxt): the input and output names and dtypes, and the
parameters nnc_backend ("cuda" | "reference"), nnc_out (the compiled directory beside this file)
and nnc_compiled_batch (C: 0 = Triton does no batching and every request carries the compiled
shapes; C > 0 = the requests of one execute() are concatenated, zero-padded to a multiple of C
rows, run C rows at a time, and every request gets its own rows back).

It runs inside Triton's Python-backend stub, whose interpreter must see nnc's environment (nnc and
numpy 2): `nnc serve` starts tritonserver so that it does. On the "cuda" backend tensors move
between Triton and nnc through DLPack (cupy), without a host round trip; on "reference" they are
numpy arrays.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _np_dtype(name):
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and the narrow types: numpy knows them only through ml_dtypes
        return None


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.backend = params.get("nnc_backend", "cuda")
        self.batch = int(params.get("nnc_compiled_batch", "0"))
        self.max_batch = int(cfg.get("max_batch_size", 0))
        self.input_names = [i["name"] for i in cfg["input"]]
        self.output_names = [o["name"] for o in cfg["output"]]
        out = os.path.join(args["model_repository"], args["model_version"], params.get("nnc_out", "nnc_out"))
        try:
            import nnc
            if self.backend == "cuda" and args.get("model_instance_kind") == "GPU":
                import cupy  # the GPU Triton placed this instance on (instance_group gpus / one per device)
                cupy.cuda.Device(int(args.get("model_instance_device_id", 0))).use()
            self.model = nnc.load(out, backend=self.backend)
        except Exception as e:  # Triton logs this and marks the model UNAVAILABLE; other models stay up
            raise pb_utils.TritonModelException(
                f"nnc could not load {out} (backend {self.backend}): {type(e).__name__}: {e}") from None
        if self.backend == "cuda":
            import cupy
            self.xp = cupy
        else:
            self.xp = np
        self.compiled = {t.name: tuple(t.shape) for t in self.model.inputs}
        self.dtypes = {t.name: _np_dtype(t.dtype) for t in self.model.inputs}

    # ------------------------------------------------------------------ tensors in and out
    def _array(self, request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            raise ValueError(f"input {name!r} is missing (the model's inputs: {', '.join(self.input_names)})")
        # zero-copy through DLPack (not as_numpy(): the stub's numpy bindings predate numpy 2 and read a
        # numpy 2 interpreter's arrays wrongly). On "cuda", a tensor Triton holds in host memory is copied
        # to the device once; one in device memory (FORCE_CPU_ONLY_INPUT_TENSORS "no") is used in place.
        if self.xp is not np and t.is_cpu():
            return self.xp.asarray(np.from_dlpack(t))
        return self.xp.from_dlpack(t)

    def _tensor(self, name, array):
        # DLPack for numpy too: the stub's numpy bindings predate numpy 2 and, given a numpy 2 array,
        # build a tensor whose byte size Triton rejects ("output tensor shape does not match size")
        return pb_utils.Tensor.from_dlpack(name, self.xp.ascontiguousarray(array))

    def _run(self, feed):
        return self.model.run(feed, outputs=self.output_names,
                              output="cupy" if self.xp is not np else "numpy")

    # ------------------------------------------------------------------ execute
    def execute(self, requests):
        responses = [self._execute_one(r) for r in requests] if self.batch == 0 else self._execute_padded(requests)
        if self.xp is not np:  # nnc ran on cupy's current stream; Triton reads the outputs on its own
            self.xp.cuda.get_current_stream().synchronize()
        return responses

    def _error(self, e):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"nnc: {type(e).__name__}: {e}"))

    def _execute_one(self, request):
        try:
            got = self._run({n: self._array(request, n) for n in self.input_names})
            return pb_utils.InferenceResponse(output_tensors=[self._tensor(n, got[n]) for n in self.output_names])
        except Exception as e:  # an error for this request only; the model keeps serving
            return self._error(e)

    def _execute_padded(self, requests):
        """Concatenate the requests' rows, pad to a multiple of the compiled batch, run chunk by chunk."""
        xp, C = self.xp, self.batch
        responses = [None] * len(requests)
        feeds, rows, live = {n: [] for n in self.input_names}, [], []
        for i, r in enumerate(requests):
            try:
                arrays = {n: self._array(r, n) for n in self.input_names}
                counts = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
                if len(counts) != 1 or -1 in counts:
                    raise ValueError("every input must carry the same batch (leading) dim; given "
                                     + ", ".join(f"{n}: {tuple(a.shape)}" for n, a in arrays.items()))
                for n, a in arrays.items():
                    if tuple(a.shape[1:]) != self.compiled[n][1:]:
                        raise ValueError(f"input {n!r}: expected [batch, {', '.join(map(str, self.compiled[n][1:]))}],"
                                         f" given {list(a.shape)}")
                for n, a in arrays.items():
                    feeds[n].append(a)
                rows.append(counts.pop())
                live.append(i)
            except Exception as e:
                responses[i] = self._error(e)
        if live:
            try:
                total = sum(rows)
                padded = -(-total // C) * C
                big = {}
                for n, parts in feeds.items():
                    a = xp.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
                    if padded != total:
                        pad = xp.zeros((padded - total,) + tuple(a.shape[1:]), dtype=a.dtype)
                        a = xp.concatenate([a, pad], axis=0)
                    if self.dtypes[n] is not None:  # Triton checked the dtype; this only normalises
                        a = a.astype(self.dtypes[n], copy=False)
                    big[n] = xp.ascontiguousarray(a)
                outs = {n: [] for n in self.output_names}
                for s in range(0, padded, C):
                    got = self._run({n: a[s:s + C] for n, a in big.items()})
                    for n in self.output_names:
                        outs[n].append(xp.array(got[n], copy=True))  # the next run may reuse its buffers
                outs = {n: xp.concatenate(v, axis=0) if len(v) > 1 else v[0] for n, v in outs.items()}
                start = 0
                for i, k in zip(live, rows):
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        self._tensor(n, xp.ascontiguousarray(outs[n][start:start + k])) for n in self.output_names])
                    start += k
            except Exception as e:  # one failed run fails the requests batched with it, nothing else
                for i in live:
                    if responses[i] is None:
                        responses[i] = self._error(e)
        return responses

    def finalize(self):
        close = getattr(getattr(self, "model", None), "close", None)
        if close is not None:
            close()
