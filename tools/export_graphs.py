"""Exports the issue's reference models with torch.onnx on the GPU machine (where torch,
torchvision and transformers are installed) and writes them *graph-only*: every float initializer of
more than KEEP_ELEMENTS elements loses its data, and its mean and standard deviation go into the
model's metadata instead. `tools/graph_models.py` turns such a file back into a runnable model with
seeded random weights of the same statistics, so the CPU machine (no torch) can compile, count
launches and run the passes on the real graph structure of ResNet-50, MobileNetV2, ViT-B/16,
FCN-ResNet50, BERT-base and GPT-2.

    python tools/export_graphs.py --out DIR [--models resnet50,bert_base,...]

Small tensors (biases, LayerNorm gains, shape constants) and every integer or bool tensor (masks,
index tables) are kept exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KEEP_ELEMENTS = 4096
STATS_KEY = "nnc.stripped_weights"  # metadata: {initializer name: [mean, std]}


def realistic_bn(model):
    """Random weights with BatchNorm's default running stats (mean 0, var 1) let activations shrink
    or grow layer by layer (MobileNetV2's logits end near 1e-9, below fp16's range). Estimating the
    stats from a few random batches, as training would, keeps them near unit scale like a trained
    model's."""
    import torch
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 224, 224))
    return model


def torch_model(name: str, batch: int = 1):
    """(module, example inputs, input names) for one model; seeded, random weights. Turns torch's
    fused MHA fast path off (ViT's has no ONNX export)."""
    import torch
    torch.backends.mha.set_fastpath_enabled(False)
    torch.manual_seed(0)
    if name in ("resnet50", "mobilenet_v2", "vit_b_16"):
        import torchvision
        m = getattr(torchvision.models, name)(weights=None)
        if name == "vit_b_16":  # torchvision zero-initialises the head: every output would be 0
            torch.nn.init.normal_(m.heads.head.weight, std=0.02)
        return realistic_bn(m).eval(), (torch.randn(batch, 3, 224, 224),), ["input"]
    if name == "fcn_resnet50":
        import torchvision

        class Seg(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None,
                                                                      aux_loss=False)

            def forward(self, x):
                return self.m(x)["out"]

        return realistic_bn(Seg()).eval(), (torch.randn(batch, 3, 224, 224),), ["input"]
    if name == "bert_base":
        from transformers import BertConfig, BertModel
        cfg = BertConfig(attn_implementation="eager")  # bert-base-uncased's sizes: 12 x 768, 12 heads

        class Enc(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = BertModel(cfg)

            def forward(self, ids, mask):
                return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

        ids = torch.randint(0, cfg.vocab_size, (batch, 128))
        return Enc().eval(), (ids, torch.ones(batch, 128, dtype=torch.int64)), ["input_ids", "attention_mask"]
    if name == "gpt2":
        from transformers import GPT2Config, GPT2Model
        cfg = GPT2Config(attn_implementation="eager", use_cache=False)

        class Dec(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gpt = GPT2Model(cfg)

            def forward(self, ids):
                # an explicit all-ones mask: without one, transformers looks for packed sequences
                # with torch.diff, which has no ONNX export
                return self.gpt(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state

        return Dec().eval(), (torch.randint(0, cfg.vocab_size, (batch, 128)),), ["input_ids"]
    if name == "lstm_2x512":  # issue 9's recurrent row: nn.LSTM(512, 512, num_layers=2), seq 128
        class Lstm(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = torch.nn.LSTM(512, 512, num_layers=2)

            def forward(self, x):
                return self.rnn(x)[0]

        return Lstm().eval(), (torch.randn(128, batch, 512),), ["input"]
    raise KeyError(name)


MODELS = ["resnet50", "mobilenet_v2", "vit_b_16", "fcn_resnet50", "bert_base", "gpt2"]


ORT_MAX_IR_VERSION = 10  # onnxruntime 1.30 on the GPU machine reads IR <= 10


def clamp_ir_version(m):
    """m (an onnx.ModelProto), its ir_version lowered to what onnxruntime on the GPU machine reads."""
    m.ir_version = min(m.ir_version, ORT_MAX_IR_VERSION)
    return m


def torch_export(mod, inputs, path, input_names, output_names=("output",), opset: int = 17) -> None:
    """The one torch.onnx export of the GPU tools: the TorchScript exporter (dynamo=False) at
    `opset`, under no_grad, then the file's IR version clamped (clamp_ir_version). output_names=None
    keeps torch's own names."""
    import onnx
    import torch
    names = list(output_names) if output_names is not None else None
    with torch.no_grad():
        torch.onnx.export(mod, inputs, str(path), input_names=list(input_names), output_names=names,
                          opset_version=opset, dynamo=False)
    onnx.save(clamp_ir_version(onnx.load(str(path))), str(path))


def export(name: str, path: Path, batch: int = 1) -> None:
    mod, inputs, input_names = torch_model(name, batch)
    torch_export(mod, inputs, path, input_names)


def strip(path: Path, dst: Path) -> dict:
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    stats = {}
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind != "f" or a.size <= KEEP_ELEMENTS:
            continue
        stats[t.name] = [float(a.astype(np.float64).mean()), float(a.astype(np.float64).std())]
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.ClearField("double_data")
        t.ClearField("int32_data")
    m.metadata_props.add(key=STATS_KEY, value=json.dumps(stats, sort_keys=True))
    onnx.save(m, str(dst))
    return stats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        full = Path("/tmp") / f"{name}.full.onnx"
        try:
            export(name, full)
            stats = strip(full, out / f"{name}.graph.onnx")
            print(f"EXPORT {name}: ok, {len(stats)} stripped, {(out / f'{name}.graph.onnx').stat().st_size} B",
                  flush=True)
        except Exception as e:  # one model failing must not lose the others
            print(f"EXPORT {name}: FAIL {type(e).__name__}: {str(e)[:400]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
