"""gpu_check.py, the one script for a GPU, cannot rot: its CPU form (tiny shapes) runs every step here."""

import json

import gpu_check as G


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """--device cpu --tiny: the CUDA tests (skipped on the CPU), bench at smoke shapes, the bf16 pipeline with the
    ratio check (clip fraction 0 at every step), the one-process --fsdp smoke; one JSON with every figure."""
    G.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"card", "torch", "transformers", "tokenizer"} <= r.keys() and list(r["steps"]) == list(G.STEPS)
    for name, step in r["steps"].items():
        assert step["ok"] is not False, (name, step.get("error"), step.get("traceback"))
    tests = r["steps"]["cuda_tests"]
    assert tests.get("skipped") or tests["counts"].get("skipped", 0) >= 1  # on the CPU: the CUDA tests skip
    b = r["steps"]["bench"]
    assert b["sampling_tokens_per_s"] > 0 and b["step_s"] > 0 and b["teacher_evals_per_token"] == 1.0
    p = r["steps"]["pipeline_bf16"]
    assert p["clip_frac_per_step"] == [0.0] * 4 and p["ratio_check"] == "pass"
    f = r["steps"]["fsdp_smoke"]
    assert f["finite"] and f["checkpoints_saved"] and len(f["minillm_log"]) == 2
