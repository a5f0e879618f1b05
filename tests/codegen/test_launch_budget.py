"""Launch budgets: regression guards on the number of CUDA launches per run (tools/count_launches.py:
import, `nnc compile`'s pass pipeline fused and --no-fuse, lowering for sm_90 at batch 1, no NVRTC).
A budget is the count measured when it was set (issue 7); a change that needs more launches fails
here and must say why (or lower the budget when it removes some). Also the tool's table and JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools import count_launches as cl  # noqa: E402

# (model, precision) -> (fused, unfused) launches per run, at most. Unfused = --no-fuse, which since
# 2026-12-03 also leaves out fold-batchnorm and fuse-horizontal (pipeline.FOLDING_FUSIONS): each BN
# is its own kernel (two at fp16 NHWC, a Mul and an Add) and parallel branches their own GEMMs
BUDGETS = {
    ("light_bvlc_alexnet", "fp16"): (17, 25),  # assign-layout: LRN NHWC, the stem's layout kernels go
    ("light_bvlc_alexnet", "fp32"): (21, 21),
    ("light_inception_v1", "fp16"): (91, 140),
    ("light_inception_v1", "fp32"): (90, 130),
    ("light_inception_v2", "fp16"): (153, 408),  # assign-layout: Concat/BN NHWC
    ("light_inception_v2", "fp32"): (145, 333),
    ("light_resnet50", "fp16"): (59, 231),  # issue 7 target: <= 60 (NHWC + init-weight convs)
    ("light_resnet50", "fp32"): (74, 176),
    ("light_shufflenet", "fp16"): (78, 171),
    ("light_shufflenet", "fp32"): (77, 169),
    ("light_squeezenet", "fp16"): (42, 68),
    ("light_squeezenet", "fp32"): (41, 59),
    ("light_vgg19", "fp16"): (28, 47),
    ("light_vgg19", "fp32"): (43, 51),
    ("light_zfnet512", "fp16"): (17, 25),  # as alexnet
    ("light_zfnet512", "fp32"): (21, 22),
}
SLOW_BUDGETS = {  # over ~10 s on the CPU machine (big graphs: import and lowering)
    # assign-layout: NHWC Concats (one launch each: not zero-copy there) and BN -> Mul+Add, which
    # fuse-elementwise merges with the ReLU (fused 370 -> 309); without fusion each BN is two
    # elementwise kernels instead of one batchnorm kernel (unfused 612 -> 675)
    ("light_densenet121", "fp16"): (309, 793),
    ("light_densenet121", "fp32"): (310, 611),
    ("resnet50", "fp16"): (57, 124),  # fuse-pooling: GAP + Flatten + fc as one kernel (58 before)
    ("mobilenet_v2", "fp16"): (50, 102),  # fuse-cross-layer: 5 dw+pw pairs as one kernel each, fuse-pooling: the head (56 before)
}


def _check(model, precision, budget):
    m = cl.load_model(model)
    cl.batch1(m)
    fused, unfused = cl.count(m, precision, True), cl.count(m, precision, False)
    assert fused.launches <= budget[0], f"{model} {precision} fused: {fused.launches} launches > budget " \
        f"{budget[0]} ({fused.by_kernel})"
    assert unfused.launches <= budget[1], f"{model} {precision} unfused: {unfused.launches} > {budget[1]}"
    assert fused.launches <= unfused.launches
    assert sum(fused.by_kernel.values()) == fused.launches
    return fused


@pytest.mark.parametrize("model,precision", sorted(BUDGETS))
def test_launch_budget(model, precision):
    _check(model, precision, BUDGETS[(model, precision)])


@pytest.mark.slow
@pytest.mark.parametrize("model,precision", sorted(SLOW_BUDGETS))
def test_launch_budget_big(model, precision):
    _check(model, precision, SLOW_BUDGETS[(model, precision)])


def test_light_resnet50_fp16_runs_no_direct_fallback_conv():
    """Its ConstantOfShape weights are init values; its convs still take the fast kernels."""
    m = cl.load_model("light_resnet50")
    f = cl.count(m, "fp16", True)
    assert "direct_conv" not in f.by_kernel and f.by_kernel.get("conv_igemm", 0) >= 16, f.by_kernel
    assert f.init_launches > 0


def test_every_light_model_has_a_budget():
    assert {m for m, _ in BUDGETS} | {m for m, _ in SLOW_BUDGETS} >= set(cl.light_models())


def test_table_and_json(capsys):
    assert cl.main(["light_squeezenet", "--precision", "fp16", "--by-kernel", "--no-graphs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model | prec | ONNX nodes | launches fused | unfused |")
    assert len(lines) == 3 and lines[2].startswith("| light_squeezenet | fp16 | ")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert int(cells[3]) <= int(cells[4]) and "gemm_tc" in cells[-1]
    assert cl.main(["light_squeezenet", "--precision", "fp32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["onnx_nodes"] > 0
    r = rows[0]
    assert r["fused"]["launches"] == sum(r["fused"]["by_kernel"].values())
    assert r["fused"]["arena_bytes"] >= r["fused"]["peak_live_bytes"] > 0


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model"):
        cl.load_model("no_such_model")
