"""
The MiniLLM demo: the whole story on a laptop CPU, offline, in minutes.

    python demo.py            # every method and one held-out table: 2 min 7 s wall on an idle 2-core CPU machine
    python demo.py --quick    # a shortened run, for CI: under a minute on the same machine

(Times measured with `time python demo.py` on the project's 2-core CPU machine with nothing else running.)

A synthetic instruction task in Dolly's format (six families; three have many correct answers: any color, any two
animals, any of four sentences), a word-level tokenizer, and tiny GPT-2s built from configs: a teacher of 0.47 M
parameters and a student of 0.11 M, both pre-trained on plain sentences of the same world. Then, through exactly the
code of `minillm.py`: teacher SFT, student SFT, MiniLLM, the KD and SeqKD baselines, and a table of held-out
Rouge-L and reverse KL(q||p) per token. Every flag of minillm.py applies on top (`python demo.py --alpha 0`).
"""

import json
import os
import random
import sys
import time
from itertools import islice
from pathlib import Path

import torch

import minillm as M
from eval import rouge_l

# The demo's defaults; flags given on the command line still win. "demo" = generated under OUT/demo.
DEMO = dict(teacher="demo", student="demo", data="demo", pt_data="demo", out="out-demo", device="cpu", val_size=200,
            max_prompt_len=64, max_len=96, max_new_tokens=16, teacher_lr=2e-3, teacher_epochs=12, student_lr=2e-3,
            student_epochs=6, sft_batch_size=32, sft_micro_batch_size=32, min_lr=1e-4, steps=240, lr=5e-4,
            warmup_steps=10, batch_size=32, micro_batch_size=32, rollouts=64, gen_batch_size=64, pt_batch_size=8,
            pt_seq_len=64, pt_coef=0.1, log_interval=10)
QUICK = dict(teacher_epochs=3, student_epochs=3, steps=32, rollouts=64, gen_batch_size=64, log_interval=4)


# ----------------------------------------------------------------------------------------------------
# The demo world. Several task families; three of them have many correct answers (any color, any two animals,
# any of four sentences), which is where forward KL (SFT, KD) spreads mass between modes and reverse KL picks modes.

COLORS = "red blue green yellow purple".split()
ANIMALS = "cat dog cow fox owl".split()
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "old": "new", "day": "night"}
SENTENCES = ["the {} is big", "the {} can run fast", "the {} likes the park", "a {} sat on the mat"]


def demo_example(rng):
    """One {instruction, input, output, refs} record; `refs` lists every correct answer."""
    family = rng.choice(["color", "animals", "sentence", "count", "reverse", "opposite"])
    if family == "color":
        out = rng.choice(COLORS)
        return dict(instruction="Name a color.", input="", output=out, refs=COLORS)
    if family == "animals":
        a, b = rng.sample(ANIMALS, 2)
        return dict(instruction="Name two animals.", input="", output=f"{a} and {b}",
                    refs=[f"{x} and {y}" for x in ANIMALS for y in ANIMALS if x != y])
    if family == "sentence":
        a = rng.choice(ANIMALS)
        return dict(instruction=f"Write a short sentence about the {a}.", input="", output=rng.choice(SENTENCES).format(a),
                    refs=[t.format(a) for t in SENTENCES])
    if family == "count":
        lo = rng.randint(0, 5)
        out = " ".join(str(i) for i in range(lo, lo + rng.randint(3, 5)))
        return dict(instruction=f"Count from {out[0]} to {out[-1]}.", input="", output=out, refs=[out])
    if family == "reverse":
        words = rng.sample(COLORS + ANIMALS, 3)
        out = " ".join(reversed(words))
        return dict(instruction="Reverse the words.", input=" ".join(words), output=out, refs=[out])
    word = rng.choice(list(OPPOSITES) + list(OPPOSITES.values()))
    out = OPPOSITES.get(word) or next(k for k, v in OPPOSITES.items() if v == word)
    return dict(instruction=f"What is the opposite of {word}?", input="", output=out, refs=[out])


def demo_classification(rng, n):
    """Two-choice questions of the demo world for `eval.py --analysis ece`: the right first word of the answer against
    a wrong one, in random order (label = the index of the right one). Easy families (a color, an animal, where to
    start counting) and a hard one (opposites, which the tiny demo models barely learn): a range of confidences."""
    pairs = {**OPPOSITES, **{v: k for k, v in OPPOSITES.items()}}
    rows = []
    for _ in range(n):
        family = rng.choice(["color", "animals", "count", "opposite"])
        if family == "color":
            instruction, right, wrong = "Name a color.", rng.choice(COLORS), rng.choice(ANIMALS)
        elif family == "animals":
            instruction, right, wrong = "Name two animals.", rng.choice(ANIMALS), rng.choice(COLORS)
        elif family == "count":
            lo, hi = rng.randint(0, 5), rng.randint(3, 5)
            instruction, right, wrong = f"Count from {lo} to {lo + hi - 1}.", str(lo), str(lo + 1)
        else:
            word = rng.choice(sorted(pairs))
            instruction, right = f"What is the opposite of {word}?", pairs[word]
            wrong = rng.choice([w for w in sorted(pairs) if w not in (word, right)])
        choices = rng.sample([right, wrong], 2)
        rows.append(dict(instruction=instruction, input="", choices=choices, label=choices.index(right)))
    return rows


def demo_tokenizer(texts):
    """A word-level tokenizer over the demo's words (offline, tiny vocabulary, exact round trips)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def prepare_demo(args):
    """Write the demo's data, tokenizer and initial models under OUT/demo and point the flags at them."""
    from transformers import GPT2Config, GPT2LMHeadModel
    root = Path(args.out) / "demo"
    rng = random.Random(args.seed)
    sets = {"val": 200, "train": 600 if args.quick else 2000, "test": 100 if args.quick else 300}
    recs = {k: [demo_example(rng) for _ in range(n)] for k, n in sets.items()}
    root.mkdir(parents=True, exist_ok=True)
    write = lambda path, rows: Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write(root / "data.jsonl", recs["val"] + recs["train"])  # the first --val-size records are validation
    write(root / "test.jsonl", [dict(r, output=r["refs"]) for r in recs["test"]])  # every correct answer is a reference
    write(root / "classify.jsonl", demo_classification(random.Random(args.seed + 1), 200))  # for eval.py --analysis ece
    # The demo's pre-training corpus: plain sentences of the same world, without the template. As GPT-2 was
    # pre-trained on WebText before SFT, both demo models are pre-trained on it (packed chunks, the same stream
    # L_PT reads) before their SFT; L_PT then keeps the student close to text it already knows, as in the paper.
    docs = [f"{r['instruction']} {r['input']} {r['output']}.".replace("  ", " ") for r in
            (demo_example(rng) for _ in range(4000 if args.quick else 20000))]
    write(root / "pt.jsonl", [{"text": d} for d in docs])
    tok = demo_tokenizer(docs + [M.build_prompt(r["instruction"], r["input"]) + r["output"] for rs in recs.values() for r in rs])
    shapes = {"teacher": dict(n_layer=4, n_embd=96, n_head=4), "student": dict(n_layer=2, n_embd=64, n_head=2)}  # 4x the parameters
    for name, shape in shapes.items():
        if getattr(args, name) != "demo":
            continue
        path = root / f"{name}-init"
        if not (path / "config.json").exists():
            torch.manual_seed(args.seed + len(name))
            cfg = GPT2Config(vocab_size=len(tok), n_positions=128, bos_token_id=tok.eos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
            M.save_checkpoint(GPT2LMHeadModel(cfg), tok, path)
        n_chunks = sum(len(d.split()) for d in docs) // args.pt_seq_len  # fewer than one pass over the corpus
        chunks = [([], c.tolist()) for c in islice(M.pt_chunks(str(root / "pt.jsonl"), tok, args.pt_seq_len), n_chunks)]
        lr = args.teacher_lr if name == "teacher" else args.student_lr  # no prompt: every token is a target
        pre = M.sft_stage(str(root / f"{name}-pretrain"), str(path), tok, chunks[n_chunks // 20:], chunks[:n_chunks // 20],
                          args, lr, 1, M.resolve_dtype(args))
        setattr(args, name, pre)
    if args.data == "demo":
        args.data = str(root / "data.jsonl")
    if args.pt_data == "demo":
        args.pt_data = str(root / "pt.jsonl")
    return root / "test.jsonl"


@torch.no_grad()
def demo_eval(paths, teacher_path, test_file, args, dtype, seeds=(10, 20, 30)):
    """Held-out table: Rouge-L of sampled answers (τ = 1, max over the correct answers, mean over seeds),
    and the reverse KL(q||p) per token measured on each model's own samples (α = 0)."""
    tok = M.load_tokenizer(teacher_path)
    recs = M.load_records(test_file)
    prompts = [M.tokenize_example(tok, r, args.max_prompt_len, args.max_len)[0] for r in recs]
    teacher = M.load_frozen(teacher_path, args.device, dtype, vocab_size=len(tok))
    rows = {}
    for name, path in paths.items():
        model = M.load_frozen(path, args.device, dtype, vocab_size=len(tok))
        scores, kls, lens = [], [], []
        eos_ids = M.end_ids(tok, *M.model_configs(model), *M.model_configs(teacher))
        for seed in seeds:
            gen = torch.Generator(device=args.device).manual_seed(seed)
            ids, attn = (x.to(args.device) for x in M.collate_prompts(prompts, tok.pad_token_id))
            roll = M.sample_rollouts(model, teacher, ids, attn, eos_ids, tok.pad_token_id,
                                     args.max_new_tokens, alpha=0.0, dtype=dtype, keep_teacher_logits=False, generator=gen)
            texts = [M.decode_response(tok, row, eos_ids)[0] for row in roll["tokens"].tolist()]
            scores.append(rouge_l(texts, [r["output"] for r in recs]))
            kls.append((roll["kl"].sum() / roll["mask"].sum()).item())
            lens.append(roll["mask"].sum(1).mean().item())
        rows[name] = dict(rouge_l=sum(scores) / len(scores), rouge_l_std=float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0,
                          reverse_kl=sum(kls) / len(kls), length=sum(lens) / len(lens), example=texts[:3])
    return rows


def run_demo(args):
    """Every method on the demo task, then one table on the held-out prompts."""
    t0 = time.time()
    test_file = prepare_demo(args)
    for method in ["minillm", "sft", "kd", "seqkd"]:
        args.method = method
        M.run(args)
    out = Path(args.out)
    paths = {"teacher": out / "teacher-sft", "SFT": out / "student-sft", "KD": out / "kd", "SeqKD": out / "seqkd",
             "MiniLLM": out / "minillm"}
    rows = demo_eval(paths, str(out / "teacher-sft"), test_file, args, M.resolve_dtype(args))
    lines = ["| model | Rouge-L (held out) | reverse KL(q‖p) per token | mean length |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['rouge_l']:.1f} ± {r['rouge_l_std']:.1f} | {r['reverse_kl']:.3f} | {r['length']:.1f} |" for k, r in rows.items()]
    table = "\n".join(lines)
    print("\n" + table + f"\n\ndemo finished in {time.time() - t0:.0f} s; reverse-KL curve: {out / 'minillm' / 'reverse_kl.png'}")
    (out / "demo_results.md").write_text(table + "\n")
    (out / "demo_results.json").write_text(json.dumps(rows, indent=1))
    return rows


def parse_args(argv=None):
    """minillm.py's flags with the demo's defaults, plus --quick."""
    parser = M.build_parser()
    parser.description = __doc__.strip().splitlines()[0]
    parser.add_argument("--quick", action="store_true", help="a shortened run (well under a minute), for CI")
    argv = sys.argv[1:] if argv is None else list(argv)
    return M.parse_args(argv, defaults={**DEMO, **(QUICK if "--quick" in argv else {})}, parser=parser)


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        M.die("the demo runs in one process; under torchrun use minillm.py with --teacher, --student and --data")
    return run_demo(args)


if __name__ == "__main__":
    main()
