"""``fgvlm cost``: GPU-hours from data sizes and throughput, checked against the paper config."""

from __future__ import annotations

import json

import pytest

from fgvlm.cli import main
from fgvlm.training.cost import Job, bill, throughput_from_bench


def test_bill_arithmetic_per_job_family_and_total() -> None:
    jobs = [Job("pretrain", "a", 360_000, 1.0, 16), Job("finetune", "b", 180_000, 2.0, 8)]
    result = bill(jobs, {"pretrain": 1000.0, "finetune": 500.0}, {"pretrain": 10, "finetune": 5})
    # 360k x 10 / 1000 / 3600 = 1 GPU-hour; 180k x 2 x 5 / 500 / 3600 = 1 GPU-hour
    assert [r["gpu_hours"] for r in result["jobs"]] == pytest.approx([1.0, 1.0])
    assert result["jobs"][1]["wall_hours"] == pytest.approx(1 / 8)
    assert result["families"]["pretrain"] == {"jobs": 1, "gpu_hours": pytest.approx(1.0)}
    assert result["total_gpu_hours"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no positive throughput for finetune"):
        bill(jobs, {"pretrain": 1000.0})


def test_throughput_from_the_gpu_benchmark_scales_to_32_layers() -> None:
    result = {
        "training": {
            "llm_shapes": {"num_hidden_layers": 8},
            "rows": [{"tokens_per_s": 4000.0}, {"tokens_per_s": 2000.0}, {"error": "oom"}],
        }
    }
    assert throughput_from_bench(result) == {"pretrain": 1000.0, "finetune": 1000.0}


def test_cost_of_the_paper_config(capsys, tmp_path) -> None:
    args = ["cost", "--config", "config/config.yaml"]
    assert main([*args, "--pretrain-tokens-per-s", "3100", "--finetune-tokens-per-s", "3200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-4].startswith("pretrain: 13 jobs,") and out[-3].startswith("finetune: 22 jobs,")
    # one LLaVA-Pretrain job: 558,128 x 620 positions / 3100 per s = 31 GPU-hours
    llava = next(line for line in out if line.startswith("pretrain ") and "558128" in line)
    assert llava.split()[-2] == "31.0"
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps({"training": {"llm_shapes": {}, "rows": [{"tokens_per_s": 3100.0}]}})
    )
    assert main([*args, "--bench", str(bench)]) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith("at LM positions/s per GPU: pretrain 3,100")
    )
    assert main(args) == 2  # no throughput at all: an error, not a guess
