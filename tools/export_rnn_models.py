"""The recurrent models of issue 8, exported from torch with random weights (run where torch is,
the GPU machine): opset 17, ir_version <= 10 (onnxruntime 1.30 there).

    python tools/export_rnn_models.py --out /tmp/rnn_models [--models lstm2x512,gru5x800bi]

Each model's ONNX input is x [seq, batch, features] (batch_first=False, torch's default) and its
output y: the last layer's output sequence (the states are left out: what an encoder passes on).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_graphs import torch_export  # noqa: E402


@dataclass(frozen=True)
class RnnModel:
    name: str
    cell: str          # torch.nn class: LSTM | GRU | RNN
    input_size: int
    hidden: int
    layers: int
    bidirectional: bool
    seq: int
    batches: tuple

    def torch_module(self, seed: int = 0):
        import torch
        torch.manual_seed(seed)  # random weights: torch's own uniform(-1/sqrt(H), 1/sqrt(H)) init
        kw = dict(num_layers=self.layers, bidirectional=self.bidirectional)
        if self.cell == "RNN":
            kw["nonlinearity"] = "tanh"
        rnn = getattr(torch.nn, self.cell)(self.input_size, self.hidden, **kw)

        class OutputOnly(torch.nn.Module):
            def __init__(self, r):
                super().__init__()
                self.rnn = r

            def forward(self, x):
                return self.rnn(x)[0]

        return OutputOnly(rnn).eval()

    def input_shape(self, batch: int) -> tuple:
        return (self.seq, batch, self.input_size)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


MODELS = {m.name: m for m in (
    RnnModel("lstm2x512", "LSTM", 512, 512, 2, False, 128, (1, 32)),          # the anchor
    RnnModel("gru5x800bi", "GRU", 80, 800, 5, True, 200, (1, 16)),            # speech-style acoustic model
    RnnModel("lstm1x1024", "LSTM", 1024, 1024, 1, False, 512, (1,)),
    RnnModel("rnn2x256", "RNN", 256, 256, 2, False, 256, (1, 16)),
)}


def export(model: RnnModel, batch: int, out_dir: Path) -> Path:
    """model at batch -> out_dir/<name>_b<batch>.onnx (kept when it exists)."""
    import torch
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / f"{model.name}_b{batch}.onnx"
    if p.exists():
        return p
    mod = model.torch_module()
    x = torch.randn(*model.input_shape(batch))
    torch_export(mod, (x,), p, ["x"], ["y"])
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/rnn_models"))
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    a = ap.parse_args(argv)
    for name in a.models.split(","):
        if name not in MODELS:
            ap.error(f"unknown model {name!r} (known: {', '.join(MODELS)})")
        for b in MODELS[name].batches:
            print(export(MODELS[name], b, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
