"""The benchmarks' own code (benchmarks/, beside the package): the shipped training step is timed as asked, and
the GPU bench runs end to end at tiny shapes on CPU (its smoke test)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_gpu import main as bench_gpu
from benchmarks.common import TINY, StepTimer, train_steps

SMALL = ["growth.stages=[]", "tokenizer.num_tokens=4", "tokenizer.mit.width=32", "tokenizer.mit.depth=1",
         "tokenizer.mit.heads=2", "tokenizer.latent_width=16", "tokenizer.experts.depth=1", "tokenizer.experts.heads=2",
         "tokenizer.decoder.width=32", "tokenizer.decoder.depth=1", "tokenizer.decoder.heads=2"]


def test_the_shipped_training_is_timed_step_by_step_after_its_warmup(fmnist_index):
    timer = train_steps(TINY, 8, StepTimer(2, 3), SMALL)
    assert timer.seen == 5 and len(timer.seconds) == 3 and all(s > 0 for s in timer.seconds)
    assert timer.loop >= sum(timer.seconds) and timer.module is not None
    assert timer.module.training  # the LightningModule that `train_tokenizer` trained


def test_the_gpu_bench_runs_every_section_at_tiny_shapes_on_cpu(tmp_path, fmnist_index):
    out = tmp_path / "bench_gpu.json"
    assert bench_gpu(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    names = [row["name"] for row in json.loads(out.read_text())["rows"]]
    for expected in ("bf16 GEMM", "step, nativetok", "step, parallel", "step, causal_mask", "NativeTok / parallel",
                     "growth step / full step", "encode, nativetok", "AR sampling", "Lightning loop"):
        assert any(expected in name for name in names), expected
    assert (tmp_path / "bench_gpu.md").read_text().startswith("| measurement |")


def test_the_gpu_bench_measures_only_the_sections_asked_for_and_refuses_unknown_ones(tmp_path, capsys):
    out = tmp_path / "bench_gpu.json"
    assert bench_gpu(["--device", "cpu", "--quick", "--sections", "sampling", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"].split(" ")[0] for r in rows] == ["bf16", "AR"]
    assert "rows with the eager tokens: 100%" in rows[1]["detail"]
    with pytest.raises(SystemExit) as refused:
        bench_gpu(["--device", "cpu", "--quick", "--sections", "sampling,warp", "--out", str(out)])
    assert refused.value.code == 2 and "unknown ['warp']" in capsys.readouterr().err
