"""
The MiniLLM evaluation protocol (docs/paper.md §6, §8): sample a response to every test prompt with five seeds,
score it with Rouge-L against the references, and report the mean ± std over seeds.

    python eval.py --model MiniLLM/MiniLLM-gpt2-120M --data dolly                 # one model, DollyEval
    python eval.py --model out/student-sft out/minillm --data all --out out/eval    # a table of models x test sets
    python eval.py --model out/minillm --data my_test.jsonl --seeds 10 --limit 50   # a quick look

The protocol, as the paper and the official code (LMOps/minillm/evaluate_main.py) run it:
  * prompt = the Alpaca-style template of training (minillm.build_prompt), or the record's ready `prompt`;
    prompts longer than --max-prompt-len (256) tokens are dropped, exactly as in training;
  * sampling at temperature 1, top-p 1, top-k 0 (pure ancestral sampling), at most 256 new tokens,
    seeds 10, 20, 30, 40, 50; decode with special tokens skipped, cut at the first EOS, strip;
  * Rouge-L = rouge_score's RougeScorer(['rougeL'], use_stemmer=True) F-measure, the max over the
    references of an example, x100, mean over examples; then mean (± std) over seeds.

Two of the paper's analyses come with every run (docs/paper.md §8), in results.json and a second table:
  * Rouge-L by reference length: examples split by the length of their (first) reference in tokens of
    the evaluated model's tokenizer into [0, 5], [6, 10], [11, +inf) (BUCKETS below);
  * Dist-4 = 100 x distinct 4-grams / all 4-grams over every response of one test set and one seed, counted on
    whitespace tokens (so the number does not depend on the model's tokenizer), averaged over seeds,
    reported with the LM loss of the gold responses (token mean per example, then mean over examples)
    and the mean response length in model tokens (EOS excluded).

The paper's other analyses are one command each (--analysis; docs/paper.md §8; docs/evaluation.md):
    python eval.py --analysis exposure --teacher out/teacher-sft --model out/student-sft out/minillm  # ExAccErr(l)
    python eval.py --analysis ece --model out/student-sft out/minillm --data sst2                    # calibration (ECE)
    python eval.py --analysis judge --judge-url http://127.0.0.1:8000/v1 --model out/minillm          # judge score

Deliberate simplifications, stated up front:
  * Our own sampling loop (minillm.sample_model: KV cache, left padding, position ids) instead of `model.generate`: a
    checkpoint's generation_config.json (repetition penalty, min length, ...) can never slip in, and each
    seed drives its own torch.Generator, so the same seed + model + batch size gives the same outputs.
  * With --greedy every seed would give the same answers, so only the first seed is run.
  * The official evaluation pads every prompt to 256 tokens and allows 512 - 256 = 256 new tokens; we pad to
    the longest prompt of the batch and allow --max-new-tokens (256): the same budget.

Outputs under --out: results.md (both tables), results.json (every number, per seed too), and
generations/<model>/<test set>/seed<S>.jsonl with one line per example (prompt, references, response,
its length and Rouge-L).
"""

import argparse
import functools
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm import (DECODE_MODES, autocast, bind_device, check_decode, check_device, collate_prompts, collate_sft,
                     decode_response, die, end_ids, forward, load_config, load_frozen, max_positions, load_records,
                     load_tokenizer, model_configs, prompt_text, resolve_dtype, sample_model, sample_prompts, set_seed,
                     text_start, tokenize_example)

# ----------------------------------------------------------------------------------------------------
# The official test sets (docs/paper.md §5). Hub repositories of raw files; the official evaluation reads
# `valid.jsonl` of each (LMOps/minillm/scripts/gpt2/eval/eval_main_*.sh):
#   name:       (hub dataset repo,    file in the repo,    keep the first N records)

TEST_SETS = {
    "dolly":     ("MiniLLM/dolly",     "valid.jsonl",      None),    # DollyEval, 500 held-out Dolly examples
    "self-inst": ("MiniLLM/self-inst", "valid.jsonl",      None),    # SelfInst, 242 (the paper says 252)
    "vicuna":    ("MiniLLM/Vicuna",    "valid.jsonl",      None),    # VicunaEval, 80
    "sinst":     ("MiniLLM/sinst",     "11_/valid.jsonl",  None),    # S-NI, references of >= 11 tokens
    "uinst":     ("MiniLLM/uinst",     "11_/valid.jsonl",  10_000),  # UnNI, first 10,000 of the >= 11 subset
}

# Reference-length buckets of the paper's length analysis, in tokens, both ends included.
BUCKETS = [("[0,5]", 0, 5), ("[6,10]", 6, 10), ("[11,inf)", 11, math.inf)]


# ----------------------------------------------------------------------------------------------------
# Arguments.

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", nargs="+", required=True, help="one or more models: hub names or local folders (with their tokenizer)")
    g.add_argument("--data", nargs="+", default=None,
                   help=f"test sets (default dolly; sst2 with --analysis ece): {', '.join(TEST_SETS)}, all (the five), a local .jsonl with instruction/input/output "
                        "(output: a string or a list of references) or a ready prompt, or HUB_REPO:FILE "
                        "(e.g. MiniLLM/sinst:6_10/valid.jsonl)")
    g.add_argument("--limit", type=int, default=0, help="keep the first N records of each test set (0 = all); for quick looks")
    g.add_argument("--out", default="out/eval", help="folder for results.md, results.json and the generations")

    g = p.add_argument_group("generation (docs/paper.md §6: the paper samples at τ = 1, top-p 1, top-k 0)")
    g.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50], help="one sampling run per seed; scores are averaged")
    g.add_argument("--max-new-tokens", type=int, default=256, help="response tokens at most (official: 512 - 256 prompt tokens)")
    g.add_argument("--max-prompt-len", type=int, default=256, help="longer prompts are dropped, as in training")
    g.add_argument("--template", choices=["alpaca", "chat"], default="alpaca",
                   help="prompt format, as in training (minillm.py --template): Alpaca-style, or the tokenizer's chat template")
    g.add_argument("--batch-size", type=int, default=32, help="prompts decoded at once; part of what fixes the samples of a seed")
    g.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling (not the paper's protocol); runs the first seed only")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")

    g = p.add_argument_group("the paper's other analyses (docs/paper.md §8; docs/evaluation.md)")
    g.add_argument("--analysis", choices=["exposure", "ece", "judge"],
                   help="exposure: ExAccErr(l) of each --model against --teacher; ece: calibration of zero-shot classification "
                        "(--data sst2, boolq or a .jsonl); judge: a judge model's score relative to the reference answers")
    g.add_argument("--teacher", help="exposure: the teacher p, the oracle of ExAccErr")
    g.add_argument("--samples", type=int, default=10, help="exposure: responses sampled per prompt (paper: 10), with the first seed")
    g.add_argument("--judge", help="judge: a local Hugging Face (instruct) model as the judge")
    g.add_argument("--judge-url", help="judge: an OpenAI-compatible endpoint instead, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp)")
    g.add_argument("--judge-model", default="default", help="judge: the `model` field sent to --judge-url")
    g.add_argument("--judge-temperature", type=float, default=0.7, help="judge: sampling temperature (paper: GPT-4 at 0.7)")
    g.add_argument("--judge-max-tokens", type=int, default=128, help="judge: tokens the judge may write (the scores come first)")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU that computes it natively (compute capability 8.0+), else fp32")
    g.add_argument("--decode", choices=DECODE_MODES, default="auto",
                   help="how the models' forwards run, the same samples each way (minillm.py --decode): eager, static, "
                        "graph (CUDA graphs); auto: graph on CUDA, eager on the CPU")
    return p


def parse_args(argv=None):
    """Bad input stops here with one line and exit status 2 (minillm.die), as minillm.py: nothing is loaded yet."""
    args = build_parser().parse_args(argv)
    args.data = args.data or (["sst2"] if args.analysis == "ece" else ["dolly"])
    if not args.temperature > 0:
        die(f"--temperature must be > 0 (use --greedy for argmax decoding), got {args.temperature}")
    for name in ["max_new_tokens", "max_prompt_len", "batch_size"]:
        if not getattr(args, name) > 0:
            die(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ["limit", "top_k"]:
        if not getattr(args, name) >= 0:
            die(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.top_p <= 1.0:
        die(f"--top-p must be in (0, 1], got {args.top_p}")
    bad_seeds = [s for s in args.seeds if not 0 <= s < 2 ** 63]
    if bad_seeds:
        die(f"--seeds must be in [0, 2^63), got {bad_seeds[0]}")
    if len(set(args.seeds)) < len(args.seeds):  # the same seed twice would overwrite its own generations
        die(f"--seeds lists a seed twice: {' '.join(map(str, args.seeds))}")
    check_device(args.device)
    check_decode(args.decode, args.device)
    check_writable(args.out)
    if args.greedy and len(args.seeds) > 1:
        print(f"--greedy: decoding is deterministic, running seed {args.seeds[0]} only")
        args.seeds = args.seeds[:1]
    return args


# ----------------------------------------------------------------------------------------------------
# Metrics. Pure functions of strings.

@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    """One scorer for the whole run: building it (Porter stemmer, tokenizer) per example is slow."""
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def as_references(output):
    """A record's `output` (a string or a list of strings) -> list of reference strings."""
    return [output] if isinstance(output, str) else list(output)


def rouge_l_scores(predictions, references):
    """Per-example Rouge-L x100: F-measure of the longest common subsequence (stemmed, lower-cased words),
    the best over the example's references, as Super-NaturalInstructions and the official code score it."""
    assert len(predictions) == len(references), "one reference set per prediction"
    scorer = _rouge_scorer()
    return [100.0 * max(scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure for ref in as_references(refs))
            for pred, refs in zip(predictions, references)]


def rouge_l(predictions, references):
    """Mean Rouge-L x100 over examples. references[i] is a string or a list of strings (max is taken)."""
    scores = rouge_l_scores(predictions, references)
    assert scores, "Rouge-L of an empty test set is undefined"
    return sum(scores) / len(scores)


def distinct_n(responses, n=4):
    """Dist-n = |distinct n-grams| / |n-grams|, pooled over all responses (docs/paper.md §8).

    n-grams never cross two responses; words are whitespace tokens, so the value is comparable across
    tokenizers. A response shorter than n words has no n-grams; with none at all, Dist-n is 0."""
    grams = [tuple(words[i:i + n]) for words in (r.split() for r in responses) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def length_bucket(n_tokens):
    """The BUCKETS label of a reference of n_tokens tokens: [0,5], [6,10] or [11,inf)."""
    for label, lo, hi in BUCKETS:
        if lo <= n_tokens <= hi:
            return label
    raise ValueError(f"no bucket for length {n_tokens}")


def mean_std(xs):
    """Mean and sample std (n-1) over seeds; the std of a single seed is 0."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------------
# Test sets.

def safe_name(s):
    """A file-system-safe tag for a model or test set name: 'MiniLLM/dolly' -> 'MiniLLM_dolly'."""
    return re.sub(r"[^\w.-]+", "_", s).strip("_.") or "x"


def load_test_set(spec, limit=0):
    """A test set spec -> (display name, records).

    spec is a name of TEST_SETS, a local .jsonl, or HUB_REPO:FILE. Hub files are fetched with
    huggingface_hub.hf_hub_download (the hub repos are folders of raw .jsonl files, not `datasets` builds).
    The download itself was NOT exercised here (no network): the tests replace hf_hub_download with a fake
    and check which repo and file it is asked for.
    """
    if spec in TEST_SETS:
        repo, filename, keep = TEST_SETS[spec]
        name = spec
    elif os.path.exists(spec):
        repo, filename, keep, name = None, spec, None, Path(spec).stem
    elif spec.endswith((".jsonl", ".json")) and ":" not in spec:
        die(f"test file {spec} not found")
    elif ":" in spec:
        (repo, filename), keep, name = spec.split(":", 1), None, spec
    else:
        die(f"unknown test set {spec!r}; use one of {', '.join(TEST_SETS)}, all, a .jsonl file or HUB_REPO:FILE")
    if repo is not None:
        import huggingface_hub  # lazily: only the hub path needs it
        try:
            filename = huggingface_hub.hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset")
        except Exception as e:  # offline, no such repo or file: one line that says which file
            reason = (str(e).splitlines() or [""])[0]
            die(f"could not fetch {filename} of the hub dataset {repo}: {type(e).__name__}: {reason}")
    # a malformed line, a record without `instruction` (or `prompt`) or `output`, a field of the wrong type:
    # one line with file:line (minillm.check_record)
    records = load_records(filename, required=("instruction", "output"))[:keep]
    records = records[:limit] if limit > 0 else records
    if not records:
        die(f"test set {spec} has no records")
    for i, r in enumerate(records):
        if "prompt" in r:  # the official .txt-derived prompts write newlines as <n> (LMOps prompt_datasets.py)
            records[i] = {**r, "prompt": r["prompt"].replace("<n>", "\n")}
    return name, records


def expand_data(specs):
    """'all' -> the five official test sets, in the paper's column order."""
    out = []
    for s in specs:
        out += list(TEST_SETS) if s == "all" else [s]
    return list(dict.fromkeys(out))


def prepare(tok, records, max_prompt_len, max_new_tokens, name="test", template="alpaca"):
    """Tokenise with the training rule (minillm.tokenize_example) -> list of kept examples, each a dict with
    idx, prompt, prompt_ids, gold_ids (the first reference + EOS, for the LM loss), references and ref_len
    (tokens of the first reference: the length the buckets use)."""
    kept = []
    for i, r in enumerate(records):
        ex = tokenize_example(tok, r, max_prompt_len, max_prompt_len + max_new_tokens, template)
        if ex is None:
            continue
        refs = as_references(r["output"])
        prompt = prompt_text(tok, r, template)
        kept.append({"idx": i, "prompt": prompt, "prompt_ids": ex[0], "gold_ids": ex[1], "references": refs,
                     "ref_len": len(tok(refs[0], add_special_tokens=False)["input_ids"])})
    print(f"{name}: {len(kept)} examples, {len(records) - len(kept)} dropped (prompt > {max_prompt_len} tokens)")
    return kept


# ----------------------------------------------------------------------------------------------------
# Generation. Left-padded batches, one KV cache, the next token drawn from the filtered softmax.

sample = sample_model  # minillm's single-model sampler: KV cache, left padding, exact inverse-CDF draw


def check_context(config, examples, max_new_tokens, name="the model"):
    """GPT-2 has 1024 positions; a prompt + response that does not fit fails deep inside the model."""
    limit = max_positions(config)
    longest = max(len(ex["prompt_ids"]) for ex in examples) + max_new_tokens
    if limit and longest > limit:
        die(f"prompt + --max-new-tokens = {longest} tokens exceeds the {limit} positions of {name}; lower --max-new-tokens "
            "or --max-prompt-len")


def check_writable(out):
    """--out must be a folder we can create or write in, checked before hours of sampling (nothing is created yet)."""
    p = Path(out).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        die(f"--out {out}: {p} is a file, not a folder; give another --out")
    if not os.access(p, os.W_OK | os.X_OK):
        die(f"--out {out}: cannot write in {p} (permission denied); give another --out")


def generate(model, tok, examples, seed, args, dtype, desc=""):
    """One sampling run over a test set -> list of (text, n_tokens), in the order of `examples`.

    The seed drives a fresh torch.Generator and batches go in a fixed order, so a run is reproducible."""
    from tqdm import tqdm
    set_seed(seed)
    generator = torch.Generator(device=args.device).manual_seed(seed)
    outputs, eos_ids = [], end_ids(tok, *model_configs(model))  # every id that ends this model's responses
    progress = lambda starts: tqdm(starts, desc=desc, dynamic_ncols=True, leave=False)  # noqa: E731
    for _, _, tokens in sample_prompts(model, [ex["prompt_ids"] for ex in examples], args.batch_size, tok.pad_token_id,
                                       eos_ids, args.max_new_tokens, args.device, args.decode, progress,
                                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                       greedy=args.greedy, dtype=dtype, generator=generator):
        outputs += [decode_response(tok, row, eos_ids) for row in tokens.tolist()]
    return outputs


@torch.no_grad()
def gold_lm_loss(model, tok, examples, args, dtype):
    """-log q(y|x) of the gold responses (first reference + EOS): token mean per example, then mean over
    examples, as the official evaluate_main.py reports it next to Dist-4."""
    per_example = []
    for i in range(0, len(examples), args.batch_size):
        batch = [(ex["prompt_ids"], ex["gold_ids"]) for ex in examples[i:i + args.batch_size]]
        ids, attn, labels = (x.to(args.device) for x in collate_sft(batch, tok.pad_token_id))
        with autocast(args.device, dtype):
            logits = forward(model, ids, attn)[:, :-1]  # (B, L-1, V): position t predicts token t+1
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
        mask = (labels[:, 1:] != -100).float()
        per_example += ((nll * mask).sum(1) / mask.sum(1)).tolist()  # token mean per example
    return statistics.fmean(per_example)


# ----------------------------------------------------------------------------------------------------
# One (model, test set, seed) run: generate, score, write the generations.

def score_run(examples, outputs):
    """Per-example rows and the run's metrics: Rouge-L, Rouge-L per reference-length bucket, Dist-4,
    mean response length."""
    texts = [t for t, _ in outputs]
    scores = rouge_l_scores(texts, [ex["references"] for ex in examples])
    rows = [{"idx": ex["idx"], "prompt": ex["prompt"], "references": ex["references"], "response": t, "response_tokens": n,
             "rouge_l": s, "ref_tokens": ex["ref_len"], "bucket": length_bucket(ex["ref_len"])}
            for ex, (t, n), s in zip(examples, outputs, scores)]
    buckets = {}
    for label, _, _ in BUCKETS:
        b = [r["rouge_l"] for r in rows if r["bucket"] == label]
        buckets[label] = {"n": len(b), "rouge_l": statistics.fmean(b) if b else None}
    metrics = {"rouge_l": statistics.fmean(scores), "dist4": 100.0 * distinct_n(texts, 4),
               "resp_len": statistics.fmean(n for _, n in outputs), "buckets": buckets}
    return rows, metrics


def write_jsonl(path, rows):
    os.makedirs(Path(path).parent, exist_ok=True)
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)  # written whole or not at all


def summarise(per_seed, lm_loss, n_examples, n_dropped):
    """Per-seed metrics -> mean ± std over seeds for every number of the two tables."""
    out = {"n_examples": n_examples, "n_dropped": n_dropped, "lm_loss": lm_loss, "seeds": sorted(per_seed)}
    for key in ["rouge_l", "dist4", "resp_len"]:
        xs = [per_seed[s][key] for s in sorted(per_seed)]
        m, sd = mean_std(xs)
        out[key] = {"mean": m, "std": sd, "per_seed": xs}
    out["buckets"] = {}
    for label, _, _ in BUCKETS:
        xs = [per_seed[s]["buckets"][label]["rouge_l"] for s in sorted(per_seed)]
        m, sd = mean_std(xs)
        n = per_seed[min(per_seed)]["buckets"][label]["n"]  # the same for every seed: buckets follow the references
        out["buckets"][label] = {"n": n, "mean": m, "std": sd, "per_seed": xs}
    return out


# ----------------------------------------------------------------------------------------------------
# Reporting.

def fmt(mean, std=None, digits=2):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def results_tables(results, models, data_names):
    """Two Markdown tables: Rouge-L (models x test sets) and the analyses (one row per model and test set)."""
    main = markdown_table(["model"] + data_names,
                          [[m] + [fmt(results[m][d]["rouge_l"]["mean"], results[m][d]["rouge_l"]["std"]) for d in data_names]
                           for m in models])
    header = ["model", "test set", "Dist-4", "resp. len", "gold LM loss"] + [f"Rouge-L {b} (n)" for b, _, _ in BUCKETS]
    rows = []
    for m in models:
        for d in data_names:
            r = results[m][d]
            rows.append([m, d, fmt(r["dist4"]["mean"], r["dist4"]["std"]), fmt(r["resp_len"]["mean"], r["resp_len"]["std"], 1),
                         fmt(r["lm_loss"], digits=3)]
                        + [f'{fmt(r["buckets"][b]["mean"], r["buckets"][b]["std"])} ({r["buckets"][b]["n"]})' for b, _, _ in BUCKETS])
    return main, markdown_table(header, rows)


# ----------------------------------------------------------------------------------------------------
# The paper's other analyses (docs/paper.md §8), one command each: --analysis exposure | ece | judge.

def response_mask(tokens, eos_ids):
    """(B, N) 1 up to and including the first end id (any of eos_ids): the positions a sampled response really has."""
    end = torch.isin(tokens, torch.tensor(list(eos_ids), device=tokens.device)).long()
    before = torch.cumsum(end, 1) - end  # end ids strictly before t
    return (before == 0).float()


@torch.no_grad()
def kl_teacher_student(teacher, student, prompt_ids, prompt_mask, tokens, mask, dtype):
    """KL(p(·|y<t,x) ‖ q_θ(·|y<t,x)) over the full vocabulary at every response position, (B, N), 0 on padding."""
    from minillm import forward_kl, student_response_logits
    mb = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "tokens": tokens, "mask": mask}
    zq, zp = student_response_logits(student, mb, dtype), student_response_logits(teacher, mb, dtype)
    return forward_kl(zq, zp) * mask  # forward_kl(student, teacher) = Σ_v p(v)[log p(v) - log q(v)]


def exposure_curves(kl_student, mask_student, kl_teacher, mask_teacher, w_student=None, w_teacher=None):
    """ExAccErr(l) for l = 1..N (docs/paper.md §8), from KL(p‖q_θ) at each position of sampled responses: (B, N) on the
    student's own samples, (B', N) on the teacher's. E over prefixes at step t = the mean over the samples still
    running at t, as the official script (0 when none is); weights w (B,) make it an exact expectation when every
    response is enumerated with its probability.
        R(l) = Σ_{t≤l} E_{y<t~q_θ} KL_t,   ε(l) = (1/l) Σ_{t≤l} E_{y<t~p} KL_t,   ExAccErr(l) = 100·(R(l) - l·ε(l)) / (l·ε(l))
    Returns R, ε, ExAccErr as (N,) float64 tensors (ExAccErr is NaN where ε = 0: no error to accumulate)."""
    def per_position(kl, mask, w):
        w = torch.ones(kl.shape[0], dtype=torch.float64) if w is None else w.double()
        live = (mask.double() * w[:, None]).sum(0)  # (N,) probability mass (or count) still running
        return (kl.double() * mask.double() * w[:, None]).sum(0) / live.clamp_min(1e-300)
    l = torch.arange(1, kl_student.shape[1] + 1, dtype=torch.float64)
    R = per_position(kl_student, mask_student, w_student).cumsum(0)
    eps = per_position(kl_teacher, mask_teacher, w_teacher).cumsum(0) / l
    err = torch.where(eps > 0, 100 * (R - l * eps) / (l * eps), torch.full_like(eps, float("nan")))
    return R, eps, err


@torch.no_grad()
def sample_batches(sampler, examples, n_samples, seed, args, dtype, tok, pad_id):
    """n_samples responses per prompt from `sampler`, batch by batch -> [(prompt_ids, prompt_mask, tokens, mask)].
    Each response ends at any of the sampler's end ids (end_ids of tok and its configs)."""
    generator = torch.Generator(device=args.device).manual_seed(seed)
    eos_ids = end_ids(tok, *model_configs(sampler))
    prompts = [ex["prompt_ids"] for ex in examples for _ in range(n_samples)]
    return [(ids, attn, tokens, response_mask(tokens, eos_ids)) for ids, attn, tokens in sample_prompts(
        sampler, prompts, args.batch_size, pad_id, eos_ids, args.max_new_tokens, args.device, args.decode, dtype=dtype,
        generator=generator)]


@torch.no_grad()
def score_kl(teacher, student, batches, args, dtype):
    """KL(p‖q_θ) at every position of sampled batches -> (KL (B, N), mask (B, N)), N = --max-new-tokens."""
    kls, masks = [], []
    for ids, attn, tokens, mask in batches:
        kl = kl_teacher_student(teacher, student, ids, attn, tokens, mask, dtype)
        pad = args.max_new_tokens - tokens.shape[1]  # sampling stops when every row has ended
        kls.append(F.pad(kl.cpu(), (0, pad)))
        masks.append(F.pad(mask.cpu(), (0, pad)))
    return torch.cat(kls), torch.cat(masks)


MIN_RUNNING = 0.01  # the figure stops where fewer than 1% of the samples still run (the CSV has every l, and the counts)


def run_exposure(args, dtype):
    """eval.py --analysis exposure: ExAccErr(l) of each --model against --teacher -> exposure.csv, exposure_bias.png."""
    if not args.teacher:
        die("--analysis exposure needs --teacher (the oracle p)")
    tok = load_tokenizer(args.teacher, template=args.template)
    teacher = load_frozen(args.teacher, args.device, dtype, vocab_size=len(tok))
    data_name, records = load_test_set(expand_data(args.data)[0], args.limit)
    examples = prepare(tok, records, args.max_prompt_len, args.max_new_tokens, name=data_name, template=args.template)
    check_context(teacher.config, examples, args.max_new_tokens, args.teacher)
    curves = {}
    sample = functools.partial(sample_batches, examples=examples, n_samples=args.samples, seed=args.seeds[0], args=args,
                               dtype=dtype, tok=tok, pad_id=tok.pad_token_id)
    teacher_batches = sample(teacher)  # the teacher's prefixes: sampled once, scored against every student
    for name in args.model:
        student = load_frozen(name, args.device, dtype, vocab_size=len(tok))
        kl_s, m_s = score_kl(teacher, student, sample(student), args, dtype)
        kl_t, m_t = score_kl(teacher, student, teacher_batches, args, dtype)
        # The samples still running at each position: past the typical length the means rest on a few samples.
        curves[name] = (*exposure_curves(kl_s, m_s, kl_t, m_t), m_s.sum(0), m_t.sum(0))
        R, eps, err, n_s, n_t = curves[name]
        n_min = MIN_RUNNING * len(m_s)
        ok = int(((n_s >= n_min) & (n_t >= n_min)).sum())  # masks are prefixes: the first `ok` positions
        print(f"{name}: ExAccErr({args.max_new_tokens}) = {err[-1]:.1f}%  R = {R[-1]:.3f}  l·ε = {args.max_new_tokens * eps[-1]:.3f}"
              f"  | ExAccErr({ok}) = {err[ok - 1] if ok else float('nan'):.1f}% (the last l where >= {MIN_RUNNING:.0%} of the samples run)"
              f"  | mean length {m_s.sum(1).mean():.1f} (student), {m_t.sum(1).mean():.1f} (teacher)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    short = [Path(n).name for n in args.model]
    tags = short if len(set(short)) == len(short) else [safe_name(n) for n in args.model]  # column names
    keys = ("R", "eps", "exaccerr", "running_student", "running_teacher")
    header = ["l"] + [f"{t}_{k}" for t in tags for k in keys]
    lines = [",".join(header)] + [",".join([str(l + 1)] + [f"{curves[n][k][l].item():.6g}" for n in args.model for k in range(5)])
                                  for l in range(args.max_new_tokens)]
    (out / "exposure.csv").write_text("\n".join(lines) + "\n")
    n_min = MIN_RUNNING * len(examples) * args.samples
    plot_exposure(out / "exposure_bias.png", {t: curves[n] for t, n in zip(tags, args.model)}, n_min,
                  f"Exposure bias, {Path(args.teacher).name} as the oracle (drawn while >= {MIN_RUNNING:.0%} of the samples run)")
    print(f"wrote {out / 'exposure.csv'} and {out / 'exposure_bias.png'}")
    return curves


def plot_exposure(png, curves, n_min, title):
    """Left: ExAccErr(l), the paper's figure. Right: what it compares, R(l) (solid) against l·ε(l) (dashed).
    Positions where fewer than n_min samples still run are not drawn (matplotlib optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (R, eps, err, n_s, n_t) in curves.items():
        keep = (torch.minimum(n_s, n_t) >= n_min).tolist()
        ls = [l + 1 for l, k in enumerate(keep) if k]
        line, = a.plot(ls, [err[l - 1].item() for l in ls], label=name)
        b.plot(ls, [R[l - 1].item() for l in ls], color=line.get_color(), label=f"{name}: R(l)")
        b.plot(ls, [l * eps[l - 1].item() for l in ls], color=line.get_color(), ls="--", label=f"{name}: l·ε(l)")
    a.set(xlabel="generation length l", ylabel="ExAccErr(l) (%)")
    b.set(xlabel="generation length l", ylabel="accumulated KL(p‖q_θ)")
    a.legend(fontsize=8)
    b.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# Calibration (docs/paper.md §8): zero-shot classification with the paper's two prompts; the input goes in the Input field.
SST2_PROMPT = "Determine the sentiment of the input sentence. Please respond as positive or negative."
BOOLQ_PROMPT = 'Read the input passage and answer the question: {question}? Your answer should be "Yes" or "No".'
ECE_SETS = {"sst2": ("stanfordnlp/sst2", "validation"), "boolq": ("google/boolq", "validation")}  # hub, split
ECE_BINS = 10  # equal-width confidence bins on [0, 1]: our choice, the paper gives none


def ece(confidence, correct, n_bins=ECE_BINS):
    """Expected calibration error = Σ_b |B_b|/n · |accuracy(B_b) - mean confidence(B_b)|, B_b = the predictions
    whose confidence lies in [b/n_bins, (b+1)/n_bins) (the last bin includes 1). Also returns the bins for a plot."""
    bins = [[] for _ in range(n_bins)]
    for c, ok in zip(confidence, correct):
        bins[min(int(c * n_bins), n_bins - 1)].append((c, float(ok)))
    n = len(confidence)
    rows = [(len(b), statistics.fmean(c for c, _ in b), statistics.fmean(o for _, o in b)) if b else (0, None, None)
            for b in bins]
    return sum(k / n * abs(acc - conf) for k, conf, acc in rows if k), rows


def classification_record(r, where):
    """A record -> (instruction, input, [word for label 0, word for label 1, ...], label). Accepted: SST-2's
    sentence|text + label; BoolQ's passage + question + answer; or instruction (+ input) + choices + label."""
    if "choices" in r and "instruction" in r:
        return r["instruction"], r.get("input", ""), list(r["choices"]), int(r["label"])
    if "passage" in r and "question" in r:
        ans = r["answer"] if isinstance(r["answer"], bool) else str(r["answer"]).lower() in ("yes", "true", "1")
        return BOOLQ_PROMPT.format(question=r["question"].rstrip("?")), r["passage"], ["No", "Yes"], int(ans)
    text = r.get("sentence", r.get("text"))
    if text is None or "label" not in r:
        die(f"{where}: a record needs text/sentence + label, passage + question + answer, or instruction + choices + label")
    return SST2_PROMPT, text, ["negative", "positive"], int(r["label"])


def load_classification(spec, limit=0):
    """sst2 | boolq (hub datasets, their validation split) | a local .jsonl -> list of classification records."""
    if spec in ECE_SETS:
        repo, split = ECE_SETS[spec]
        try:
            import datasets
            rows = list(datasets.load_dataset(repo, split=split))
        except Exception as e:  # offline, no such repo
            die(f"could not load the hub dataset {repo} ({split}): {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                "; pass a local .jsonl instead")
    elif os.path.exists(spec):
        rows = load_records(spec)
    else:
        die(f"unknown classification set {spec!r}: use sst2, boolq or a local .jsonl")
    rows = rows[:limit] if limit > 0 else rows
    return [classification_record(r, f"{spec} record {i}") for i, r in enumerate(rows)]


@torch.no_grad()
def label_probabilities(model, tok, records, args, dtype):
    """p(first token of each label word | prompt) at the first response position -> list of (B, C) rows."""
    out = []
    for i in range(0, len(records), args.batch_size):
        batch = records[i:i + args.batch_size]
        words = [[tok(w, add_special_tokens=False)["input_ids"][0] for w in choices] for _, _, choices, _ in batch]
        for (_, _, choices, _), ids in zip(batch, words):
            if len(set(ids)) < len(ids):
                die(f"the label words {choices} start with the same token for this tokenizer; give other choices")
        start = [] if args.template == "chat" else text_start(tok)  # as training starts a text (BOS)
        prompts = [start + tok(prompt_text(tok, dict(instruction=ins, input=inp), args.template),
                               add_special_tokens=False)["input_ids"][-args.max_prompt_len:] for ins, inp, _, _ in batch]
        ids, attn = (x.to(args.device) for x in collate_prompts(prompts, tok.pad_token_id))
        with autocast(args.device, dtype):
            probs = torch.softmax(forward(model, ids, attn, logits_to_keep=1)[:, -1].float(), -1)  # (B, V)
        out += [probs[b, w].tolist() for b, w in enumerate(words)]
    return out


def run_ece(args, dtype):
    """eval.py --analysis ece: ECE of zero-shot classification per model -> ece.json, calibration.png."""
    name = expand_data(args.data)[0]
    records = load_classification(name, args.limit)
    results = {}
    for model_name in args.model:
        tok = load_tokenizer(model_name, template=args.template)
        model = load_frozen(model_name, args.device, dtype, vocab_size=len(tok))
        probs = label_probabilities(model, tok, records, args, dtype)
        conf = [max(p) / sum(p) for p in probs]  # normalised over the label words
        pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
        correct = [int(y == r[3]) for y, r in zip(pred, records)]
        e, bins = ece(conf, correct)
        results[model_name] = {"ece": e, "accuracy": statistics.fmean(correct), "confidence": statistics.fmean(conf),
                               "label_mass": statistics.fmean(sum(p) for p in probs), "n": len(records), "bins": bins}
    table = markdown_table(["model", f"ECE ({ECE_BINS} bins)", "accuracy", "mean confidence", "p(label words)"],
                           [[m, f"{r['ece']:.3f}", f"{r['accuracy']:.3f}", f"{r['confidence']:.3f}", f"{r['label_mass']:.3f}"]
                            for m, r in results.items()])
    print(f"\n## Calibration on {name} ({len(records)} examples)\n\n{table}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ece.json").write_text(json.dumps({"data": name, "bins": ECE_BINS, "results": results}, indent=1) + "\n")
    plot_reliability(out / "calibration.png", results, Path(name).name)
    print(f"wrote {out / 'ece.json'} and {out / 'calibration.png'}")
    return results


def plot_reliability(png, results, data_name):
    """Reliability diagram: accuracy per confidence bin against the diagonal, one panel per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.3), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        edges = [b / ECE_BINS for b in range(ECE_BINS)]
        ax.bar(edges, [acc or 0 for _, _, acc in r["bins"]], width=1 / ECE_BINS, align="edge", edgecolor="k", alpha=0.7)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(f"{Path(name).name}: ECE {r['ece']:.3f}", fontsize=9)
    fig.suptitle(f"Calibration on {data_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# The judge (docs/paper.md §8, in place of GPT-4): the FastChat pairwise prompt; Assistant 1 = the reference answer,
# Assistant 2 = the model's; score = 100·Σ s_model / Σ s_reference over the ratings that parse.
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_TEMPLATE = ("[Question]\n{question}\n\n[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]"
                  "\n\n[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n[System]\n"
                  "We would like to request your feedback on the performance of two AI assistants in response to the user "
                  "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
                  "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
                  "better overall performance.\nPlease first output a single line containing only two values indicating the "
                  "scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent "
                  "line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
                  "ensuring that the order in which the responses were presented does not affect your judgment.\n\n")


def judge_question(record):
    """The user's question as the judge sees it: the instruction and its input, without the training template."""
    q = record.get("instruction", record.get("prompt", ""))
    return f"{q}\n\n{record['input']}" if record.get("input") else q


def judge_messages(question, reference, answer):
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(question=question, answer_1=reference, answer_2=answer)}]


def parse_scores(text):
    """The judge's first non-empty line -> (reference score, model score), both in [0, 10]; None if it does not parse."""
    line = next((s for s in text.strip().splitlines() if s.strip()), "")
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*[ ,/]\s*(\d+(?:\.\d+)?)\s*$", line)
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None


def judge_score(ratings):
    """[(s_reference, s_model) or None] -> (100·Σ s_model / Σ s_reference, number parsed, number failed)."""
    ok = [r for r in ratings if r is not None]
    ref = sum(a for a, _ in ok)
    return (100.0 * sum(b for _, b in ok) / ref if ref > 0 else None), len(ok), len(ratings) - len(ok)


def url_judge(url, model, temperature, max_tokens, timeout=120):
    """A judge behind any OpenAI-compatible chat endpoint (vLLM, llama.cpp, ...); standard library only.
    The key, if the server needs one, comes from $JUDGE_API_KEY."""
    import urllib.error
    import urllib.request
    endpoint = url.rstrip("/") if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get("JUDGE_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['JUDGE_API_KEY']}"

    def ask(messages_list):
        texts = []
        for messages in messages_list:
            body = json.dumps({"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens})
            req = urllib.request.Request(endpoint, data=body.encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    reply = json.loads(resp.read())
                texts.append(reply["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                die(f"judge endpoint {endpoint}: HTTP {e.code} {e.reason}")
            except urllib.error.URLError as e:
                die(f"judge endpoint {endpoint} unreachable: {e.reason}")
            except (ValueError, KeyError, IndexError, TypeError):  # not the OpenAI reply shape: a failed rating
                texts.append("")
        return texts
    return ask


def local_judge(name, args, dtype, temperature, max_tokens, seed):
    """A local Hugging Face model as judge; its chat template when it has one. Prompts longer than its context keep
    their end (the rating request); returns ask(list of messages) -> list of texts."""
    tok = load_tokenizer(name)
    model = load_frozen(name, args.device, dtype, vocab_size=len(tok))
    limit = max_positions(model.config) or 10**9
    generator = torch.Generator(device=args.device).manual_seed(seed)
    eos_ids = end_ids(tok, *model_configs(model))

    def ask(messages_list):
        if getattr(tok, "chat_template", None):
            texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages_list]
        else:
            texts = ["\n\n".join(x["content"] for x in m) + "\n\n" for m in messages_list]
        keep = limit - max_tokens
        if keep < 1:
            die(f"--judge-max-tokens {max_tokens} leaves no room for the prompt in the judge's {limit} positions")
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if any(len(x) > keep for x in prompts):
            print(f"judge: {sum(len(x) > keep for x in prompts)} of {len(prompts)} prompts cut to their last {keep} tokens "
                  "(the judge's context)")
        prompts = [x[-keep:] for x in prompts]
        return [decode_response(tok, row, eos_ids)[0] for _, _, tokens in sample_prompts(
            model, prompts, args.batch_size, tok.pad_token_id, eos_ids, max_tokens, args.device, args.decode,
            temperature=temperature, dtype=dtype, generator=generator) for row in tokens.tolist()]
    return ask


def run_judge(args, dtype):
    """eval.py --analysis judge: the judge's relative score of each model's sampled answers -> judge.json."""
    if bool(args.judge) == bool(args.judge_url):
        die("--analysis judge needs exactly one of --judge MODEL and --judge-url URL")
    ask = (url_judge(args.judge_url, args.judge_model, args.judge_temperature, args.judge_max_tokens) if args.judge_url
           else local_judge(args.judge, args, dtype, args.judge_temperature, args.judge_max_tokens, args.seeds[0]))
    test_sets = [load_test_set(s, args.limit) for s in expand_data(args.data)]
    results, out = {}, Path(args.out)
    for model_name in args.model:
        tok = load_tokenizer(model_name, template=args.template)
        model = load_frozen(model_name, args.device, dtype, vocab_size=len(tok))
        results[model_name] = {}
        for data_name, records in test_sets:
            examples = prepare(tok, records, args.max_prompt_len, args.max_new_tokens, name=data_name, template=args.template)
            per_seed = {}
            for seed in args.seeds:
                outputs = generate(model, tok, examples, seed, args, dtype, desc=f"{data_name} seed {seed}")
                questions = [judge_question(records[ex["idx"]]) for ex in examples]
                replies = ask([judge_messages(q, ex["references"][0], text)
                               for q, ex, (text, _) in zip(questions, examples, outputs)])
                ratings = [parse_scores(t) for t in replies]
                score, n_ok, n_failed = judge_score(ratings)
                per_seed[seed] = {"score": score, "parsed": n_ok, "failed": n_failed}
                write_jsonl(out / "judge" / safe_name(model_name) / safe_name(data_name) / f"seed{seed}.jsonl",
                            [{"idx": ex["idx"], "response": t, "judge": j, "rating": r}
                             for ex, (t, _), j, r in zip(examples, outputs, replies, ratings)])
                print(f"{model_name} | {data_name} | seed {seed} | judge score {fmt(score)} | "
                      f"{n_ok} ratings parsed, {n_failed} failed to parse")
            m, sd = mean_std([s["score"] for s in per_seed.values()])
            results[model_name][data_name] = {"score": m, "std": sd, "per_seed": per_seed,
                                              "failed": sum(s["failed"] for s in per_seed.values()),
                                              "rated": sum(s["parsed"] + s["failed"] for s in per_seed.values())}
    table = markdown_table(["model", "test set", "judge score (100 = the reference)", "unparsed ratings"],
                           [[m, d, fmt(r["score"], r["std"], 1), f"{r['failed']} / {r['rated']}"]
                            for m, rs in results.items() for d, r in rs.items()])
    print(f"\n## Judge score ({args.judge or args.judge_url})\n\n{table}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge.json").write_text(json.dumps({"judge": args.judge or args.judge_url, "results": results}, indent=1) + "\n")
    return results


ANALYSES = {"exposure": run_exposure, "ece": run_ece, "judge": run_judge}


# ----------------------------------------------------------------------------------------------------
# main

def main(argv=None):
    args = parse_args(argv)
    bind_device(args)  # cuda:1 alone: its memory, not GPU 0's, holds the context
    dtype = resolve_dtype(args)
    if args.analysis:
        return ANALYSES[args.analysis](args, dtype)
    test_sets = [load_test_set(s, args.limit) for s in expand_data(args.data)]  # fail fast, before any model loads
    # Every model resolves (tokenizer, config) and every test set fits it before the first model is evaluated
    prepared = {}
    for model_name in args.model:
        tok, config = load_tokenizer(model_name, template=args.template), load_config(model_name)
        prepared[model_name] = tok, {}
        for data_name, records in test_sets:
            examples = prepare(tok, records, args.max_prompt_len, args.max_new_tokens, name=data_name, template=args.template)
            if not examples:
                die(f"{data_name}: every prompt is longer than --max-prompt-len {args.max_prompt_len}")
            check_context(config, examples, args.max_new_tokens, model_name)
            prepared[model_name][1][data_name] = examples
    out = Path(args.out)
    results = {}
    for model_name in args.model:
        tok, examples_of = prepared[model_name]
        model = load_frozen(model_name, args.device, dtype, vocab_size=len(tok))
        results[model_name] = {}
        for data_name, records in test_sets:
            examples = examples_of[data_name]
            lm_loss = gold_lm_loss(model, tok, examples, args, dtype)
            per_seed = {}
            for seed in args.seeds:
                t0 = time.time()
                outputs = generate(model, tok, examples, seed, args, dtype, desc=f"{data_name} seed {seed}")
                rows, per_seed[seed] = score_run(examples, outputs)
                write_jsonl(out / "generations" / safe_name(model_name) / safe_name(data_name) / f"seed{seed}.jsonl", rows)
                print(f"{model_name} | {data_name} | seed {seed} | rouge-L {per_seed[seed]['rouge_l']:.2f} | "
                      f"dist-4 {per_seed[seed]['dist4']:.2f} | len {per_seed[seed]['resp_len']:.1f} | {time.time() - t0:.0f} s")
            results[model_name][data_name] = summarise(per_seed, lm_loss, len(examples), len(records) - len(examples))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    data_names = [d for d, _ in test_sets]
    main_table, analysis_table = results_tables(results, args.model, data_names)
    report = (f"## Rouge-L (mean ± std over seeds {', '.join(map(str, args.seeds))})\n\n{main_table}\n\n"
              f"## Analyses: Dist-4 (x100, whitespace 4-grams), response length (tokens), gold LM loss, "
              f"Rouge-L by reference length (tokens)\n\n{analysis_table}\n")
    print("\n" + report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'generations'}/")
    return results


if __name__ == "__main__":
    main()
