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
    t, cfg = out["timings_s"], out["config"]
    assert set(out["timings_all_s"]) == {k for k, v in t.items() if v is not None}
    for name, times in out["timings_all_s"].items():  # --repeats 1: one timed round after the warm-up
        assert len(times) == 1 and t[name] == times[0], name
    assert out["mixed_vs_generate"] == t["sample_ours"] / (t["generate_student"] + t["generate_teacher"])
    parts = t["part_sampling"] + t["part_loss_backward"] + t["part_pt"] + t["part_optimizer"]
    assert out["step_vs_parts"] == t["step"] / parts
    assert out["tokens_per_s"]["train_step"] == cfg["B"] * cfg["N"] / t["step"]
    assert out["step_vs_trl"] is None and "skipped" in out["notes"]["trl"]  # trl is optional
    assert out["teacher_logits_one_collection_bytes"] == 256 * 256 * 50257 * 2
    head = out["lm_head"]  # the fp32 head's FLOP share and the log-prob error of each precision (issue 20 §2)
    assert 0.1 < head["flop_share"]["gpt2 (124M)"]["head_share"] < 0.4
    for err in head["logprob_error_nats"].values():
        assert err["fp32"]["sampled_mean_abs"] < err["bf16 in, fp32 out"]["sampled_mean_abs"] < err["bf16 out"]["sampled_mean_abs"]
    assert 0 < out["teacher_calls_per_token"] <= 1.0 and out["mixed_vs_generate_baseline"] is None
    assert set(out["depth"]["collection_s"]) == {"coins_alpha_0.2", "coins_alpha_0", "teacher_every_position"}
    o = out["offload"]  # the offload's copies: contiguous DMAs, no pageable temporaries, no power-of-two rounding
    assert o["per_token_after"]["host_alloc_bytes"] == 0 < o["per_token_before"]["host_alloc_bytes"]
    assert o["per_token_after"]["bus_bytes"] == o["per_token_before"]["bus_bytes"] == 64 * (151665 // 64) * 64 * 2
    assert o["per_micro_batch_read_after"]["host_alloc_bytes"] == 0 and o["pinned_bytes_after"] == o["store_bytes"]
    d = out["decode"]  # the collection under each --decode mode the CPU has (graph needs CUDA)
    assert {"sample_ours", "sample_eager", "sample_static", "sample_coarse", "sample_lockstep"} == set(d) and all(v["tokens_per_s"] > 0 for v in d.values())
    plan = out["memory_plan_bytes"]["gpt2-xl -> gpt2 (paper)"]  # the static caches and the catch-up's log-probs planned
    assert plan["sampling"] == sum(plan[k] for k in ("kv_cache", "pending_logprobs", "catch_up_logits", "graph_outputs"))
    assert res["config"]["B"] == 2 and all(v > 0 for k, v in res["timings_s"].items() if v is not None)
