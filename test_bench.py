"""bench.py runs end to end on the CPU in seconds (smoke shapes), offline, and reports what it promises."""

import json

import bench
from test_decode import cpu_graphs  # noqa: F401  (a fixture)
from transformers import GPT2LMHeadModel


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



def test_the_step_and_hf_generate_start_with_no_decoder_kept_by_the_sampling_jobs(cpu_graphs, monkeypatch, capsys):
    """On CUDA (graph mode, emulated here on the CPU by test_decode's model of CUDA graphs) the sampling jobs keep
    their decoders warm from one round to the next. A step must not find them: their caches would count in its peak,
    and their graphs would spare its collection the captures that every collection of a run makes. HF generate's
    peak must not count them either. bench frees them before those jobs (untimed) and makes them again before the
    warm sampling jobs."""
    M = bench.M
    mode = M.decode_mode
    monkeypatch.setattr(M, "decode_mode", lambda requested, device: "graph" if requested == "auto" else mode(requested, device))
    seen, timed = [], []

    class Timed(bench.PeakMemory):  # measure() times a job inside PeakMemory, after its untimed setup
        def __enter__(self):
            timed.append(True)
            return super().__enter__()

        def __exit__(self, *exc):
            timed.pop()
            return super().__exit__(*exc)
    monkeypatch.setattr(bench, "PeakMemory", Timed)

    inside = []  # a step or a collection running: its own sampling is not a sampling job's

    def spy(name, f):
        def call(*a, **kw):
            if not (name == "sample" and (inside or kw.get("decode", "eager") != "graph")):
                seen.append((name, len(M._decoders), bool(timed)))
            inside.append(name)
            try:
                return f(*a, **kw)
            finally:
                inside.pop()
        return call
    for name, owner, attr in [("step", M, "distill"), ("collection", M, "collect_rollouts"),
                              ("generate", GPT2LMHeadModel, "generate"), ("sample", M, "sample_rollouts")]:
        monkeypatch.setattr(owner, attr, spy(name, getattr(owner, attr)))
    bench.main(["--device", "cpu", "--shapes", "smoke", "--repeats", "1", "--no-trl", "--json"])
    capsys.readouterr()
    assert {name for name, _, _ in seen} >= {"step", "collection", "generate", "sample"} and cpu_graphs  # graph mode
    assert all(n == 0 for name, n, _ in seen if name in ("step", "collection", "generate")), seen
    # the timed graph-mode sampling jobs find their decoders (sample_ours's made again by its untimed setup after
    # generate and the step freed them; sample_coarse is static on the CPU)
    assert all(n > 0 for name, n, t in seen if name == "sample" and t), seen
    assert sum(1 for name, n, t in seen if name == "sample" and not t and n == 0) == 2, seen  # a setup in each round
