"""gpu_check.py, the one script for a GPU, cannot rot and cannot pass by mistake: its CPU form (tiny shapes) runs every
step here, and a failed step makes the process exit non-zero with the step named on its last line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check as G

HERE = Path(__file__).resolve().parent


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """--device cpu --tiny: the README's command on the CLI (2 collections, first and warm apart), --teacher-logits
    keep/offload/recompute on one seed (identical tokens, equal losses), --decode eager vs static where minillm has the
    flag, the bf16 pipeline with the ratio check (clip fraction 0 at every step), bench at smoke shapes, the one-process
    --fsdp smoke; one JSON with every figure. (The CUDA-tests step is the last test: run for real it would import the
    suite again, and on the CPU those tests only skip.)"""
    steps = ["cli", "modes", "decode", "pipeline_bf16", "bench", "fsdp_smoke"]
    report = G.main(["--device", "cpu", "--tiny", "--no-trl", "--out", str(tmp_path), "--steps", ",".join(steps)])
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"card", "torch", "transformers", "tokenizer", "setup"} <= r.keys() and list(r["steps"]) == steps
    for name, step in r["steps"].items():
        assert step["ok"] is not False, (name, step.get("error"), step.get("stderr_tail"), step.get("traceback"))
    assert r["failed"] == report["failed"] == []

    c = r["steps"]["cli"]  # the user's command: no --device, --dtype or --decode (minillm's defaults), 2 collections
    assert c["command"].startswith("python minillm.py --teacher ") and c["exit_code"] == 0
    assert not {"--device", "--dtype", "--decode", "--teacher-logits"} & set(c["command"].split())
    assert [x["step"] for x in c["collections"]] == [1, 2] and c["first_collection_s"] > 0 and c["warm_collection_s"] > 0
    assert c["warm_collection_tok_s"] > 0 and c["process_peak_rss_bytes"] > 0 and c["peak_allocated_bytes"] is None

    m = r["steps"]["modes"]
    for mode in ("offload", "recompute"):
        v = m["vs_keep"][mode]
        assert v["tokens"] == {"identical": True, "rows_identical": 1.0, "common_prefix": 1.0}
        assert {"loss_long", "loss_single"} <= v["losses"].keys() and all(x["close"] for x in v["losses"].values())

    d = r["steps"]["decode"]
    if G.decode_choices() is None:  # before the static-cache sampler: skipped, not failed
        assert d["ok"] is None and d["skipped"] == "minillm has no --decode"
    else:
        assert d["ok"] and d["runs_compared"] == ["eager", "static"] and d["agree"]
        assert all(len(d["modes"][k]["collection_s"]) == 2 for k in d["runs_compared"])

    p = r["steps"]["pipeline_bf16"]
    assert p["clip_frac_per_step"] == [0.0] * 4 and p["ratio_check"] == "pass"
    b = r["steps"]["bench"]
    assert b["sampling_tokens_per_s"] > 0 and b["step_s"] > 0 and b["teacher_evals_per_token"] == 1.0
    assert b["trl_ran"] is False and "--no-trl" in b["trl"]
    assert set(b["collection_s"]) == {"sample_ours", "sample_eager", "sample_static", "sample_coarse", "sample_lockstep"}
    f = r["steps"]["fsdp_smoke"]
    assert f["finite"] and f["checkpoints_saved"] and len(f["minillm_log"]) == 2


def test_a_failed_step_makes_the_process_exit_non_zero_and_is_named_last(tmp_path):
    """A step that raises: the other steps still run, the JSON keeps the traceback's last lines, the last line printed
    names the step, and the exit status is 1 (the process's own, through run_cli as `python gpu_check.py` does)."""
    code = ("import sys, gpu_check as G\n"
            "G.STEPS['boom'] = lambda a, ctx: 1 // 0\n"
            "G.STEPS['fine'] = lambda a, ctx: {'ok': True}\n"
            "sys.exit(G.run_cli(sys.argv[1:]))\n")
    res = subprocess.run([sys.executable, "-c", code, "--device", "cpu", "--tiny", "--out", str(tmp_path), "--steps",
                          "boom,fine"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "gpu_check: FAILED: boom"
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["failed"] == ["boom"] and r["steps"]["fine"]["ok"] is True
    assert r["steps"]["boom"]["ok"] is False and "ZeroDivisionError" in r["steps"]["boom"]["traceback"]


def test_a_failed_minillm_run_keeps_what_it_printed(tmp_path):
    """A subprocess step whose minillm fails (here: a teacher folder that does not exist) is a failed step whose JSON
    holds the exit status and the last lines of the process's stderr: what a GPU printed is not lost."""
    a = G.parse_args(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    missing = str(tmp_path / "no-such-teacher")
    res = G.cli(a, {"teacher": missing, "student": missing, "data": missing, "pt": "none"})
    assert res["ok"] is False and res["exit_code"] == 1 and "error:" in res["stderr_tail"]
    assert G.status_line(res).startswith("FAILED")


def test_unknown_steps_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit) as e:
        G.parse_args(["--out", str(tmp_path), "--steps", "cli,bogus"])
    assert e.value.code == 2 and not (tmp_path / "gpu_check.json").exists()


def test_collection_seconds_and_token_agreement_are_read_right(tmp_path):
    """A collection's seconds come from minillm's log (len · rollouts / sample_tok_s, on the rows that opened a
    collection); token agreement counts identical rows and the positions before the first difference, the padding
    after a response's end ignored."""
    rows = [{"step": 1, "collection_step": 1, "len": 200.0, "sample_tok_s": 400.0, "ms": 6000.0},
            {"step": 2, "collection_step": 1, "len": 200.0, "sample_tok_s": 400.0, "ms": 900.0},
            {"step": 3, "collection_step": 3, "len": 250.0, "sample_tok_s": 2000.0, "ms": 3000.0}]
    assert G.collections(rows, 4) == [{"step": 1, "seconds": 2.0, "sample_tok_s": 400.0, "step_s": 6.0},
                                      {"step": 3, "seconds": 0.5, "sample_tok_s": 2000.0, "step_s": 3.0}]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    a = {"tokens": torch.tensor([[5, 6, 7, 8], [5, 6, 9, 9]]), "mask": mask}
    b = {"tokens": torch.tensor([[5, 6, 3, 8], [5, 6, 1, 2]]), "mask": mask}  # row 1 differs past its end only
    torch.save([a], tmp_path / "a.pt")
    torch.save([b], tmp_path / "b.pt")
    assert G.token_agreement(tmp_path / "a.pt", tmp_path / "a.pt")["identical"] is True
    assert G.token_agreement(tmp_path / "a.pt", tmp_path / "b.pt") == {"identical": False, "rows_identical": 0.5,
                                                                        "common_prefix": (0.5 + 1.0) / 2}


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


def test_a_decode_fall_back_fails_the_graph_steps_on_a_gpu(tmp_path):
    """minillm's line saying a model decodes without graphs (or eagerly) is collected from the worker's stderr, each
    once, and on a GPU fails the steps that time the graph path; on the CPU, where nothing asks for graphs, it is no
    check at all."""
    (tmp_path / "stderr.log").write_text(
        "gpu_check worker: run cli\n"
        "--decode graph: GPT2LMHeadModel decodes statically, without graphs: its forward could not be captured (x)\n"
        "--decode graph: GPT2LMHeadModel decodes statically, without graphs: its forward could not be captured (x)\n"
        "Traceback: decodes nothing\n")
    found = G.decode_fallbacks(tmp_path / "stderr.log")
    assert found == ["--decode graph: GPT2LMHeadModel decodes statically, without graphs: its forward could not be "
                     "captured (x)"]
    gpu, cpu = (G.parse_args(["--out", str(tmp_path), "--device", d]) for d in ("cuda", "cpu"))
    assert G.graph_held(gpu, {"decode_fallbacks": found}) == {
        "every model decoded from CUDA graphs (no --decode fall-back line)": False}
    assert list(G.graph_held(gpu, {"decode_fallbacks": []}).values()) == [True]
    assert G.graph_held(cpu, {"decode_fallbacks": found}) == {}
    assert G.decode_fallbacks(tmp_path / "missing.log") == []
