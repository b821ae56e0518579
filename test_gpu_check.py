"""gpu_check.py, the one script for a GPU, cannot rot: its CPU form (tiny shapes) runs every step here."""

import json
import subprocess

import gpu_check as G


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """--device cpu --tiny: bench at smoke shapes, the bf16 pipeline with the ratio check (clip fraction 0 at every
    step), the one-process --fsdp smoke; one JSON with every figure. (The CUDA-tests step is the next test: run for
    real it would import the suite again, and on the CPU those tests only skip.)"""
    G.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--steps", "bench,pipeline_bf16,fsdp_smoke"])
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"card", "torch", "transformers", "tokenizer"} <= r.keys()
    assert list(r["steps"]) == ["bench", "pipeline_bf16", "fsdp_smoke"]
    for name, step in r["steps"].items():
        assert step["ok"] is True, (name, step.get("error"), step.get("traceback"))
    b = r["steps"]["bench"]
    assert b["sampling_tokens_per_s"] > 0 and b["step_s"] > 0 and b["teacher_evals_per_token"] == 1.0
    p = r["steps"]["pipeline_bf16"]
    assert p["clip_frac_per_step"] == [0.0] * 4 and p["ratio_check"] == "pass"
    f = r["steps"]["fsdp_smoke"]
    assert f["finite"] and f["checkpoints_saved"] and len(f["minillm_log"]) == 2


def test_gpu_check_runs_the_cuda_tests_and_reads_their_summary(monkeypatch):
    """The CUDA-tests step runs `pytest -k cuda` on the files that define a test named *cuda* and reads pytest's
    summary line; a failed test makes the step fail (in the JSON, not by crashing)."""
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="F.\n=== 1 failed, 1 passed, 33 deselected in 2.0s ===\n", stderr="")
    monkeypatch.setattr(G.subprocess, "run", fake_run)
    res = G.cuda_tests(None, {})
    assert calls[0][-len(res["files"]):] == res["files"] and "test_minillm.py" in res["files"] and "-k" in calls[0]
    assert res["counts"] == {"failed": 1, "passed": 1, "deselected": 33} and res["ok"] is False
