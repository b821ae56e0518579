"""bench.py runs end to end on the CPU in seconds (smoke shapes), offline, and reports what it promises."""

import json

import bench


def test_bench_smoke(capsys):
    res = bench.main(["--device", "cpu", "--shapes", "smoke", "--repeats", "1", "--no-trl", "--json"])
    out = json.loads(capsys.readouterr().out)  # --json: one JSON object on stdout, nothing else
    for key in ["mixed_vs_generate", "teacher_evals_per_token", "step_vs_parts", "step_vs_trl", "timings_s",
                "peak_memory_bytes", "tokens_per_s", "teacher_logits_one_collection_bytes"]:
        assert key in out
    assert out["teacher_evals_per_token"] == 1.0  # the teacher runs once per rollout token, never again
    assert out["teacher_evals"]["teacher_prompt_positions_per_prompt_token"] == 1.0  # and the prompt once
    assert out["mixed_vs_generate"] > 0 and out["step_vs_parts"] > 0
    assert out["step_vs_trl"] is None and "skipped" in out["notes"]["trl"]  # trl is optional
    assert out["teacher_logits_one_collection_bytes"] == 256 * 256 * 50257 * 2
    assert res["config"]["B"] == 2 and all(v > 0 for k, v in res["timings_s"].items() if v is not None)
