"""
The MiniLLM evaluation protocol (NOTES §6, §8): sample a response to every test prompt with five seeds,
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

Two of the paper's analyses come with every run (NOTES §8), in results.json and a second table:
  * Rouge-L by reference length: examples split by the length of their (first) reference in tokens of
    the evaluated model's tokenizer into [0, 5], [6, 10], [11, +inf) (BUCKETS below);
  * Dist-4 = 100 x distinct 4-grams / all 4-grams over every response of one test set and one seed, counted on
    whitespace tokens (so the number does not depend on the model's tokenizer), averaged over seeds,
    reported with the LM loss of the gold responses (token mean per example, then mean over examples)
    and the mean response length in model tokens (EOS excluded).

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

from minillm import (autocast, check_device, collate_prompts, collate_sft, decode_response, die, forward,
                     load_config, load_model, load_records, load_tokenizer, prompt_text, resolve_dtype, sample_model,
                     set_seed, tokenize_example)

# ----------------------------------------------------------------------------------------------------
# The official test sets (NOTES §5). Hub repositories of raw files; the official evaluation reads
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
    g.add_argument("--data", nargs="+", default=["dolly"],
                   help=f"test sets: {', '.join(TEST_SETS)}, all (the five), a local .jsonl with instruction/input/output "
                        "(output: a string or a list of references) or a ready prompt, or HUB_REPO:FILE "
                        "(e.g. MiniLLM/sinst:6_10/valid.jsonl)")
    g.add_argument("--limit", type=int, default=0, help="keep the first N records of each test set (0 = all); for quick looks")
    g.add_argument("--out", default="out/eval", help="folder for results.md, results.json and the generations")

    g = p.add_argument_group("generation (NOTES §6: the paper samples at τ = 1, top-p 1, top-k 0)")
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

    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    return p


def parse_args(argv=None):
    """Bad input stops here with one line and exit status 2 (minillm.die), as minillm.py: nothing is loaded yet."""
    args = build_parser().parse_args(argv)
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
    """Dist-n = |distinct n-grams| / |n-grams|, pooled over all responses (NOTES §8).

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
    config = config.get_text_config()
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
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
    outputs = []
    for i in tqdm(range(0, len(examples), args.batch_size), desc=desc, dynamic_ncols=True, leave=False):
        prompts = [ex["prompt_ids"] for ex in examples[i:i + args.batch_size]]
        ids, attn = (x.to(args.device) for x in collate_prompts(prompts, tok.pad_token_id))
        tokens = sample(model, ids, attn, tok.eos_token_id, tok.pad_token_id, args.max_new_tokens, args.temperature,
                        args.top_p, args.top_k, args.greedy, dtype, generator)
        outputs += [decode_response(tok, row) for row in tokens.tolist()]
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
# main

def main(argv=None):
    args = parse_args(argv)
    dtype = resolve_dtype(args)
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
        model = load_model(model_name, args.device, dtype, vocab_size=len(tok)).eval()
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
