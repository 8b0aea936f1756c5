"""The benchmarks' own code: the GPU bench runs end to end at tiny shapes on CPU (its smoke test)."""

from __future__ import annotations

import json

from nativetok.bench_gpu import main as bench_gpu


def test_the_gpu_bench_runs_every_section_at_tiny_shapes_on_cpu(tmp_path, fmnist_index):
    out = tmp_path / "bench_gpu.json"
    assert bench_gpu(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    names = [row["name"] for row in json.loads(out.read_text())["rows"]]
    for expected in ("bf16 GEMM", "step, nativetok", "step, parallel", "step, causal_mask", "NativeTok / parallel",
                     "growth step / full step", "encode, nativetok", "AR sampling", "Lightning loop"):
        assert any(expected in name for name in names), expected
    assert (tmp_path / "bench_gpu.md").read_text().startswith("| measurement |")
