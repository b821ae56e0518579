"""
MiniLLM: knowledge distillation of language models with the *reverse* KL, in one file.

Paper: Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024
(arXiv 2306.08543). The student q_θ is trained on its own samples to minimise KL(q_θ || p) against
the teacher p, by policy gradient with three stabilisers: the single-step decomposition, teacher-mixed
sampling, and length normalisation; a language-modelling loss L_PT keeps it fluent.

    python minillm.py --teacher gpt2-xl --student gpt2          # the paper's GPT-2 recipe, end to end
    python minillm.py --recipe lmops ...                         # what the official code computes instead

Stages, each a Hugging Face checkpoint + log.jsonl under --out, skipped when already done:
    OUT/teacher-sft/   SFT of the teacher on the instruction data (--skip-teacher-sft if already tuned)
    OUT/student-sft/   SFT of the student, the checkpoint with the lowest validation loss is kept
    OUT/minillm/       MiniLLM distillation starting from OUT/student-sft/

Reading order: arguments -> the math (pure functions of tensors) -> data -> models -> teacher-mixed
sampling -> SFT -> the distillation loop -> main.

Deliberate simplifications, stated up front:
  * One process, one device (CUDA bf16 or CPU fp32). No DeepSpeed, no value network, no KL-to-reference:
    the official code has none of the last two either.
  * The teacher runs exactly once per rollout token: the logits it produces while sampling are kept and
    reused for the rewards and the single-step term (the official code re-runs the teacher 3+ times).
  * Advantages (and their whitening, lmops recipe only) are computed once per collection of rollouts,
    over response tokens only; the official code whitens per minibatch and includes padding.
"""

import argparse
import inspect
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Arguments. Defaults are the paper's (NOTES §1, §3); --recipe lmops switches to the official code's.

RECIPES = {
    # flag:             (paper,  lmops)   what it means
    "gamma":            (1.0,    0.95),   # discount of the long-term return
    "include_current":  (False,  True),   # official return G_t includes r_t (counted twice with single-step)
    "whiten":           (False,  True),   # whiten advantages
    "reward_scale":     (1.0,    0.5),    # r_t <- r_t / scale
    "reward_clip":      (0.0,    100.0),  # r_t <- clip(r_t, -c, c); 0 = off
    "pt_kd_ratio":      (0.0,    0.5),    # L_PT = (1-k)·LM + k·forward-KD against the teacher
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models and data")
    g.add_argument("--teacher", default="gpt2-xl", help="teacher p: hub name or local folder")
    g.add_argument("--student", default="gpt2", help="student q_θ: hub name or local folder")
    g.add_argument("--data", default="MiniLLM/dolly", help="instruction data: hub dataset or local .jsonl with instruction/input/output")
    g.add_argument("--val-size", type=int, default=1000, help="the first N records are the validation set (official: 1000)")
    g.add_argument("--pt-data", default="Skylion007/openwebtext", help="pre-training corpus for L_PT: hub dataset (streamed), local .txt/.jsonl, or 'none'")
    g.add_argument("--out", default="out", help="run folder; one subfolder per stage")
    g.add_argument("--skip-teacher-sft", action="store_true", help="the teacher is already instruction-tuned (e.g. MiniLLM/teacher-gpt2-1.5B)")
    g.add_argument("--skip-student-sft", action="store_true", help="distil straight from --student (e.g. MiniLLM/init-gpt2-120M)")
    g.add_argument("--method", choices=["minillm", "sft", "kd", "seqkd"], default="minillm",
                   help="minillm, or a baseline of the paper: sft (no KD), kd (word-level), seqkd (on teacher samples)")
    g.add_argument("--kd-ratio", type=float, default=0.5, help="kd: λ in (1-λ)·CE + λ·KL(p||q_θ) (paper: 0.5)")
    g.add_argument("--seqkd-kd-ratio", type=float, default=0.0, help="seqkd: extra word-level KD share (official scripts: 0.5; paper: 0)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off: safer)")

    g = p.add_argument_group("lengths (NOTES §5)")
    g.add_argument("--max-prompt-len", type=int, default=256, help="longer prompts are dropped, as the official code")
    g.add_argument("--max-len", type=int, default=512, help="prompt + response tokens for SFT")
    g.add_argument("--max-new-tokens", type=int, default=256, help="response tokens sampled per rollout")

    g = p.add_argument_group("SFT (teacher and student initialisation)")
    g.add_argument("--teacher-lr", type=float, default=5e-5)
    g.add_argument("--teacher-epochs", type=int, default=10)
    g.add_argument("--student-lr", type=float, default=5e-4)
    g.add_argument("--student-epochs", type=int, default=20, help="official script: 20 (paper: 3); the lowest-val-loss epoch is kept")
    g.add_argument("--sft-batch-size", type=int, default=32)
    g.add_argument("--sft-micro-batch-size", type=int, default=8, help="gradient accumulation; the update is the same for any value")
    g.add_argument("--sft-max-steps", type=int, default=0, help="stop each SFT after this many steps (0 = all epochs); for tests")
    g.add_argument("--sft-weight-decay", type=float, default=0.01)
    g.add_argument("--min-lr", type=float, default=1e-7, help="cosine schedule floor (no warmup)")

    g = p.add_argument_group("MiniLLM distillation (NOTES §1-3)")
    g.add_argument("--recipe", choices=["paper", "lmops"], default="paper", help="defaults for the flags below: the paper's or the official code's")
    g.add_argument("--steps", type=int, default=5000, help="optimizer steps")
    g.add_argument("--lr", type=float, default=5e-6, help="constant after warmup")
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=1e-6)
    g.add_argument("--batch-size", type=int, default=64, help="rollouts per optimizer step (paper: 64)")
    g.add_argument("--micro-batch-size", type=int, default=16, help="gradient accumulation; the update is the same for any value")
    g.add_argument("--rollouts", type=int, default=256, help="rollouts per collection, reused for --ppo-epochs")
    g.add_argument("--gen-batch-size", type=int, default=64, help="prompts sampled at once")
    g.add_argument("--ppo-epochs", type=int, default=4, help="inner epochs over each collection")
    g.add_argument("--alpha", type=float, default=0.2, help="teacher-mixed sampling p~ = α·p + (1-α)·q_θ; 0 = pure student")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip of the ratio ρ_t = w_t·q_θ/q_old; 0 = no clipping")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--no-length-norm", dest="length_norm", action="store_false", help="use the raw sum R_{t+1} instead of its mean over the remaining tokens")
    g.add_argument("--no-single-step", dest="single_step", action="store_false", help="drop the full-vocabulary KL term; r_t then goes back into the sampled return")
    g.add_argument("--normalize", choices=["token", "sequence"], default="token", help="loss = Σ/(response tokens) as the official code, or Σ/(sequences)")
    g.add_argument("--pt-coef", type=float, default=1.0, help="weight of L_PT; 0 = off")
    g.add_argument("--pt-batch-size", type=int, default=8, help="pre-training chunks per optimizer step")
    g.add_argument("--pt-seq-len", type=int, default=512)
    for name, (paper, lmops) in RECIPES.items():
        g.add_argument("--" + name.replace("_", "-"), type=type(paper), default=None, help=f"paper: {paper}, lmops: {lmops}")
    g.add_argument("--teacher-logits-offload", action="store_true", help="keep the rollout buffer's teacher logits in CPU memory")

    g = p.add_argument_group("demo (offline, CPU, minutes): synthetic tasks, tiny models, every method")
    g.add_argument("--demo", action="store_true", help="run the whole story on generated data with tiny models; other flags apply on top")
    g.add_argument("--quick", action="store_true", help="with --demo: a shortened run (well under a minute), for CI")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    return p


# --demo changes these defaults; flags given on the command line still win. "demo" = generated in OUT/demo.
DEMO = dict(teacher="demo", student="demo", data="demo", pt_data="demo", out="out-demo", device="cpu", val_size=200,
            max_prompt_len=64, max_len=96, max_new_tokens=16, teacher_lr=2e-3, teacher_epochs=12, student_lr=2e-3,
            student_epochs=8, sft_batch_size=32, sft_micro_batch_size=32, min_lr=1e-4, steps=120, lr=2e-4,
            warmup_steps=10, batch_size=32, micro_batch_size=32, rollouts=128, gen_batch_size=128, pt_batch_size=8,
            pt_seq_len=64, log_interval=10)
QUICK = dict(teacher_epochs=2, student_epochs=1, steps=8, rollouts=64, gen_batch_size=64, log_interval=4)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if "--demo" in argv:
        parser.set_defaults(**{**DEMO, **(QUICK if "--quick" in argv else {})})
    args = parser.parse_args(argv)
    for name, (paper, lmops) in RECIPES.items():  # a flag given explicitly wins over the recipe
        if getattr(args, name) is None:
            setattr(args, name, paper if args.recipe == "paper" else lmops)
    if not 0.0 <= args.alpha <= 1.0:
        raise SystemExit(f"error: --alpha must be in [0, 1], got {args.alpha}")
    return args


# ----------------------------------------------------------------------------------------------------
# The math. Pure functions of tensors; B = batch, N = response length, V = vocabulary.
# logp_* are log-probabilities of the sampled tokens y_t, (B, N); mask is 1 on response tokens
# (the first EOS included) and 0 after it and on padding.

def upcast(x):
    """bf16/fp16 -> fp32 for softmax and losses; fp32 and fp64 are kept as they are."""
    return x.float() if x.element_size() < 4 else x


def token_logprobs(logits, tokens):
    """log softmax(logits)[y_t]: (B, N, V), (B, N) -> (B, N), in at least fp32."""
    return torch.log_softmax(upcast(logits), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def mixture_logprobs(logp_student, logp_teacher, alpha):
    """log p~(y_t) = log( α·p(y_t) + (1-α)·q(y_t) ), computed in log space so α = 0 and α = 1 are exact."""
    if alpha == 0.0:
        return logp_student
    if alpha == 1.0:
        return logp_teacher
    return torch.logaddexp(logp_teacher + math.log(alpha), logp_student + math.log1p(-alpha))


def importance_weights(logp_student, logp_mix):
    """w_t = q_θ(y_t) / p~(y_t): corrects for sampling from the mixture (per token, as the paper)."""
    return torch.exp(logp_student - logp_mix)


def rewards(logp_teacher, logp_student_old, mask, scale=1.0, clip=0.0):
    """r_t = log p(y_t) - log q_old(y_t), detached. lmops recipe: r_t / 0.5, clipped to ±100."""
    r = (logp_teacher - logp_student_old).detach() / scale
    if clip > 0:
        r = r.clamp(-clip, clip)
    return r * mask


def long_term_returns(r, mask, gamma=1.0, include_current=False, length_norm=True):
    """The return that multiplies ∇log q_θ(y_t).

    paper:  R^Norm_{t+1} = 1/(T-t-1) · Σ_{t'=t+1..T} r_t'      (future rewards only, their mean)
    lmops:  G_t / (T-t),  G_t = Σ_{k=t..T} γ^{k-t} r_k          (r_t included, discounted)
    The divisor is the number of rewards summed; with none left (the last token) the return is 0.
    """
    B, N = r.shape
    r, mask = r * mask, mask.to(r.dtype)
    G = torch.zeros_like(r)  # G[:, t] = Σ_{k>=t} γ^{k-t} r_k
    count = torch.zeros_like(r)  # number of response tokens at positions >= t
    running, running_n = r.new_zeros(B), r.new_zeros(B)
    for t in reversed(range(N)):
        running = r[:, t] + gamma * running
        running_n = mask[:, t] + running_n
        G[:, t], count[:, t] = running, running_n
    if not include_current:  # R_{t+1}: the same sums, one position later
        G = torch.cat([G[:, 1:], G.new_zeros(B, 1)], dim=1)
        count = torch.cat([count[:, 1:], count.new_zeros(B, 1)], dim=1)
    if length_norm:
        G = G / count.clamp(min=1)  # mean over the remaining rewards
    return G * mask


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the response tokens (lmops recipe)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = ((x - mean) ** 2 * mask).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def single_step_kl(logits_student, logits_teacher):
    """KL(q_θ(·|y_<t) || p(·|y_<t)) = Σ_v q_θ(v) [log q_θ(v) - log p(v)] at every position, (B, N).

    This is -E_{y_t~q_θ}[r_t] taken over the whole vocabulary instead of by sampling: (∇L)_Single.
    The teacher is a constant: the gradient flows through the student only.
    """
    logq = torch.log_softmax(upcast(logits_student), dim=-1)
    logp = torch.log_softmax(upcast(logits_teacher.detach()), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def forward_kl(logits_student, logits_teacher):
    """KL(p || q_θ) = Σ_v p(v) [log p(v) - log q_θ(v)] at every position, (B, N): word-level KD."""
    logq = torch.log_softmax(upcast(logits_student), dim=-1)
    logp = torch.log_softmax(upcast(logits_teacher.detach()), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def long_term_loss(logp_student, logp_student_old, w, advantages, clip_eps=0.2):
    """PPO-style surrogate of (∇L)_Long = -E Σ_t A_t ∇log q_θ(y_t), per token, (B, N).

    ρ_t = w_t · q_θ(y_t)/q_old(y_t);  loss_t = max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)).
    On the first inner epoch q_θ = q_old, so ρ_t = w_t and the clip is the importance-weight clip.
    Returns (loss, clipped) where clipped marks tokens whose gradient the clip removed.
    """
    ratio = torch.exp(logp_student - logp_student_old.detach()) * w.detach()
    loss = -advantages * ratio
    if clip_eps <= 0:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    loss_clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(loss, loss_clipped), loss_clipped > loss


def masked_sum(x, mask):
    return (x * mask).sum()


# ----------------------------------------------------------------------------------------------------
# Data. The Alpaca-style template and tokenisation of the official code (NOTES §5).

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def build_prompt(instruction, input=""):
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


def load_records(spec, split="train"):
    """A local .jsonl (one object per line) or a hub dataset name -> list of dicts."""
    if os.path.exists(spec):
        with open(spec) as f:
            return [json.loads(line) for line in f if line.strip()]
    import datasets  # imported lazily: only the hub path needs it
    return list(datasets.load_dataset(spec, split=split))


def tokenize_example(tok, rec, max_prompt_len, max_len):
    """-> (prompt_ids, response_ids) or None if the prompt is too long.

    response = tokens(prompt + output) minus the first len(tokens(prompt)), then EOS, as the official code.
    """
    prompt = rec["prompt"] if "prompt" in rec else build_prompt(rec["instruction"], rec.get("input", ""))
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > max_prompt_len:
        return None
    output = rec.get("output", "")
    output = output[0] if isinstance(output, list) else output
    full = tok(prompt + output, add_special_tokens=False)["input_ids"]
    response_ids = full[len(prompt_ids):][: max_len - len(prompt_ids) - 1] + [tok.eos_token_id]
    return prompt_ids, response_ids


def tokenize_dataset(tok, records, max_prompt_len, max_len, name="data"):
    out = [tokenize_example(tok, r, max_prompt_len, max_len) for r in records]
    kept = [x for x in out if x is not None]
    print(f"{name}: {len(kept)} examples, {len(out) - len(kept)} dropped (prompt > {max_prompt_len} tokens)")
    return kept


def collate_sft(examples, pad_id):
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on the prompt and padding,
    so only response tokens and the EOS are targets."""
    L = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), L), dtype=torch.long)
    labels = torch.full((len(examples), L), -100, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
    return ids, attn, labels


def collate_prompts(prompts, pad_id):
    """Left-padded prompts, so every sequence's next token is generated at the same column."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    return ids, attn


def pt_chunks(spec, tok, seq_len, seed=0):
    """Endless stream of seq_len-token chunks of the pre-training corpus (documents joined by EOS).
    Hub datasets are streamed, so OpenWebText is never downloaded whole."""
    if os.path.exists(spec):
        if spec.endswith(".jsonl"):
            texts = [r["text"] for r in load_records(spec)]
        else:
            texts = [t for t in Path(spec).read_text().split("\n\n") if t.strip()]
        source = lambda: iter(texts)  # noqa: E731
    else:
        import datasets
        source = lambda: (r["text"] for r in datasets.load_dataset(spec, split="train", streaming=True).shuffle(seed=seed))  # noqa: E731
    buf = []
    while True:
        n_docs = 0
        for text in source():
            n_docs += 1
            buf += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            while len(buf) >= seq_len:
                yield torch.tensor(buf[:seq_len])
                buf = buf[seq_len:]
        if n_docs == 0:
            raise SystemExit(f"error: pre-training corpus {spec} is empty")


# ----------------------------------------------------------------------------------------------------
# Models.

def resolve_dtype(args):
    if args.dtype == "auto":
        return torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise SystemExit(f"error: the tokenizer of {name} has no EOS token; MiniLLM needs one to end responses")
    if tok.pad_token_id is None:  # padding is always masked by attention_mask, never by comparing ids
        tok.pad_token = tok.eos_token
    return tok


def load_model(name, device, dtype=torch.float32, trust_remote_code=False):
    """Weights in `dtype`. Trained models stay fp32 (master weights) and run under bf16 autocast:
    pure-bf16 weights would lose AdamW updates at lr 5e-6."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device)


def autocast(device, dtype):
    if dtype == torch.bfloat16:
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def check_same_vocab(tok_t, tok_s, teacher, student):
    """MiniLLM compares p and q_θ token by token: both must index the same vocabulary."""
    vt, vs = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    same_ids = all(tok_t.convert_ids_to_tokens(i) == tok_s.convert_ids_to_tokens(i) for i in range(0, len(tok_s), max(1, len(tok_s) // 97)))
    if vt != vs or len(tok_t) != len(tok_s) or not same_ids:
        raise SystemExit(f"error: teacher and student vocabularies differ ({vt} vs {vs} logits, {len(tok_t)} vs {len(tok_s)} tokens); "
                         "MiniLLM needs a shared tokenizer")


def position_ids_from(attention_mask):
    """With left padding, positions count real tokens only: pads get 0, the first real token 0, ..."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids, attention_mask, cache=None):
    """One causal-LM forward with explicit position ids (left padding) and an optional KV cache.
    transformers renamed `past_key_values` to `cache` in 5.2x; we pass whichever the model takes."""
    kw = {}
    if cache is not None:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        kw = {name: cache, "use_cache": True}
    pos = position_ids_from(attention_mask)[:, -input_ids.shape[1]:]
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, **kw).logits


# ----------------------------------------------------------------------------------------------------
# Teacher-mixed sampling. Both models decode token by token with their own KV cache; the token is drawn
# from p~ = α·p + (1-α)·q_θ. Every log-probability the loss needs is recorded on the way, and the
# teacher's logits are kept, so the teacher never runs again on these rollouts.

def filter_probs(probs, top_k=0, top_p=1.0):
    """Top-k / nucleus filtering of a (B, V) distribution, renormalised."""
    if top_k > 0:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = probs * (probs >= kth)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # keep tokens until the mass before them reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
    return probs / probs.sum(-1, keepdim=True)


@torch.no_grad()
def sample_rollouts(student, teacher, prompt_ids, prompt_mask, eos_id, pad_id, max_new_tokens, alpha=0.2,
                    temperature=1.0, top_p=1.0, top_k=0, dtype=torch.float32, keep_teacher_logits=True,
                    logits_device=None, generator=None):
    """Sample responses from p~ = α·p + (1-α)·q_θ. Returns a dict of (B, N) tensors:

    tokens, mask (first EOS included), logp_student / logp_teacher (at τ = 1: the distributions being
    distilled), logp_mix (the actual sampling distribution, after τ and top-k/p), w = q_θ/p~,
    kl (full-vocabulary KL(q_θ||p) at each position), and teacher_logits (B, N, V) in `dtype`.
    """
    from transformers import DynamicCache
    assert not student.training and not teacher.training, "sampling runs both models in eval mode (no dropout)"
    B, device = prompt_ids.shape[0], prompt_ids.device
    cache_s, cache_t = DynamicCache(), DynamicCache()
    with autocast(device, dtype):
        zs = forward(student, prompt_ids, prompt_mask, cache_s)[:, -1].float()  # (B, V)
    zt = forward(teacher, prompt_ids, prompt_mask, cache_t)[:, -1].float()
    attn = prompt_mask
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rec = {k: [] for k in ["tokens", "mask", "logp_student", "logp_teacher", "logp_mix", "kl", "teacher_logits"]}
    for t in range(max_new_tokens):
        logq, logp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)  # (B, V) at τ = 1
        q_tau, p_tau = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
        mix = filter_probs(alpha * p_tau + (1 - alpha) * q_tau, top_k, top_p)
        y = torch.multinomial(mix, 1, generator=generator).squeeze(-1)  # (B,)
        live = ~done
        rec["tokens"].append(torch.where(live, y, torch.full_like(y, pad_id)))
        rec["mask"].append(live.float())
        lq_y, lp_y = logq.gather(-1, y[:, None]).squeeze(-1), logp.gather(-1, y[:, None]).squeeze(-1)
        plain = temperature == 1.0 and top_k == 0 and top_p == 1.0  # then p~ is exactly the mixture of q and p
        rec["logp_student"].append(lq_y)
        rec["logp_teacher"].append(lp_y)
        rec["logp_mix"].append(mixture_logprobs(lq_y, lp_y, alpha) if plain else mix.gather(-1, y[:, None]).squeeze(-1).log())
        rec["kl"].append((logq.exp() * (logq - logp)).sum(-1))
        if keep_teacher_logits:
            rec["teacher_logits"].append(zt.to(dtype=dtype, device=logits_device or device))
        done = done | (y == eos_id)
        if done.all() or t == max_new_tokens - 1:
            break  # the last token needs no forward: nobody conditions on it
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        with autocast(device, dtype):
            zs = forward(student, y[:, None], attn, cache_s)[:, -1].float()
        zt = forward(teacher, y[:, None], attn, cache_t)[:, -1].float()
    out = {k: torch.stack(v, dim=1) for k, v in rec.items() if v}
    m = out["mask"]
    for k in ["logp_student", "logp_teacher", "logp_mix", "kl"]:
        out[k] = out[k] * m
    out["w"] = importance_weights(out["logp_student"], out["logp_mix"]) * m
    return out


# ----------------------------------------------------------------------------------------------------
# Rollout buffer: a collection of rollouts padded to common shapes, with rewards and advantages.

def pad_to(x, length, dim, value=0, left=False):
    n = length - x.shape[dim]
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    pad = x.new_full(shape, value)
    return torch.cat([pad, x] if left else [x, pad], dim=dim)


def concat_rollouts(chunks, pad_id):
    """Concatenate per-chunk rollouts: prompts left-padded to the longest, responses right-padded."""
    P = max(c["prompt_ids"].shape[1] for c in chunks)
    N = max(c["tokens"].shape[1] for c in chunks)
    out = {}
    for k in chunks[0]:
        if k in ("prompt_ids", "prompt_mask"):
            out[k] = torch.cat([pad_to(c[k], P, 1, pad_id if k == "prompt_ids" else 0, left=True) for c in chunks])
        else:
            out[k] = torch.cat([pad_to(c[k], N, 1, pad_id if k == "tokens" else 0) for c in chunks])
    return out


def trim(mb):
    """Drop columns that are padding in every row of a minibatch (saves compute, changes nothing)."""
    P = int(mb["prompt_mask"].sum(1).max())
    N = int(mb["mask"].sum(1).max())
    out = {k: v[:, -P:] if k.startswith("prompt") else v[:, :N] for k, v in mb.items()}
    return out


def student_response_logits(student, mb, dtype):
    """Logits of the student at the response positions, (B, N, V): positions P-1 .. P+N-2 predict y_1..y_N."""
    P = mb["prompt_ids"].shape[1]
    ids = torch.cat([mb["prompt_ids"], mb["tokens"]], dim=1)
    attn = torch.cat([mb["prompt_mask"], mb["mask"].long()], dim=1)
    with autocast(ids.device, dtype):
        logits = forward(student, ids, attn)
    return logits[:, P - 1:-1]


def minillm_loss(student, mb, args, n_norm, dtype=torch.float32):
    """The MiniLLM objective on a minibatch of rollouts, as a SUM divided by n_norm (the token or
    sequence count of the whole optimizer batch, so gradient accumulation does not change it).

    L = L_long (PPO-clipped, with w_t) + L_single (full-vocabulary reverse KL), both through q_θ only.
    """
    mb = trim(mb)
    device = mb["prompt_ids"].device
    logits = student_response_logits(student, mb, dtype)  # (B, N, V)
    mask = mb["mask"]
    logp = token_logprobs(logits, mb["tokens"])
    loss_long, clipped = long_term_loss(logp, mb["logp_student"], mb["w"], mb["adv"], args.clip_eps)
    loss = masked_sum(loss_long, mask)
    stats = {"loss_long": masked_sum(loss_long, mask).item() / n_norm, "clipped": masked_sum(clipped.float(), mask).item()}
    if args.single_step:
        kl = single_step_kl(logits, mb["teacher_logits"].to(device))
        loss = loss + masked_sum(kl, mask)
        stats["loss_single"] = masked_sum(kl, mask).item() / n_norm
    return loss / n_norm, stats


def normaliser(mask, how):
    """token: Σ/(response tokens) as the official code; sequence: Σ over tokens, mean over sequences."""
    return mask.sum().item() if how == "token" else mask.shape[0]


def pt_loss(student, teacher, chunk, kd_ratio, dtype):
    """L_PT = (1-k)·LM + k·KL(p||q_θ) on pre-training text (lmops: k = 0.5, the paper: plain LM, k = 0)."""
    attn = torch.ones_like(chunk)
    with autocast(chunk.device, dtype):
        logits = forward(student, chunk, attn)[:, :-1]
    lm = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())  # token mean
    if kd_ratio == 0:
        return lm
    with torch.no_grad():
        zt = forward(teacher, chunk, attn)[:, :-1]
    return (1 - kd_ratio) * lm + kd_ratio * forward_kl(logits, zt).mean()


# ----------------------------------------------------------------------------------------------------
# Logging helpers.

class Logger:
    """One JSON object per line in log.jsonl, every metric."""

    def __init__(self, path):
        self.f = open(path, "a")

    def log(self, **kv):
        self.f.write(json.dumps(kv) + "\n")
        self.f.flush()


def plot_curve(log_path, key, png_path, title):
    """A PNG of one metric against the step, with a moving average (matplotlib is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(log_path)]
    xs = [r["step"] for r in rows if key in r]
    ys = [r[key] for r in rows if key in r]
    if not ys:
        return
    k = max(1, len(ys) // 20)
    smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys, alpha=0.35, label=key)
    ax.plot(xs, smooth, label=f"moving average ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def save_checkpoint(model, tok, path):
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def mark_done(path, **info):
    (Path(path) / "done.json").write_text(json.dumps(info, indent=1))


def is_done(path):
    return (Path(path) / "done.json").exists()


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# SFT: cross-entropy on the gold responses (and, with a teacher, word-level KD). Phase 1 of MiniLLM.

def cosine_lr(step, total, lr, min_lr, warmup=0):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def sft_loss(model, ids, attn, labels, dtype, teacher=None, kd_ratio=0.0):
    """Token-mean CE on the response (labels != -100); with a teacher, (1-λ)·CE + λ·KL(p||q_θ)."""
    with autocast(ids.device, dtype):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    targets, mask = labels[:, 1:], (labels[:, 1:] != -100).float()
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    loss_sum = masked_sum(ce.view_as(mask), mask)
    if teacher is not None and kd_ratio > 0:
        with torch.no_grad():
            zt = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss_sum = (1 - kd_ratio) * loss_sum + kd_ratio * masked_sum(forward_kl(logits, zt), mask)
    return loss_sum, mask.sum()


@torch.no_grad()
def eval_loss(model, data, pad_id, batch_size, dtype, device):
    model.eval()
    total, n = 0.0, 0.0
    for i in range(0, len(data), batch_size):
        ids, attn, labels = (x.to(device) for x in collate_sft(data[i:i + batch_size], pad_id))
        s, c = sft_loss(model, ids, attn, labels, dtype)
        total, n = total + s.item(), n + c.item()
    model.train()
    return total / max(n, 1)


def sft(model, tok, train, val, out_dir, args, lr, epochs, dtype, teacher=None, kd_ratio=0.0):
    """Fine-tune `model` on (prompt, response) pairs; save the epoch with the lowest validation loss."""
    device = args.device
    os.makedirs(out_dir, exist_ok=True)
    logger = Logger(Path(out_dir) / "log.jsonl")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.sft_weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.sft_batch_size)
    total = epochs * steps_per_epoch if not args.sft_max_steps else min(args.sft_max_steps, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
    best, step = float("inf"), 0
    model.train()  # dropout on during SFT, as the official code
    bar = __import__("tqdm").tqdm(total=total, desc=f"sft {Path(out_dir).name}", dynamic_ncols=True)
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=g).tolist()
        for b in range(steps_per_epoch):
            if step >= total:
                break
            batch = [train[i] for i in order[b * args.sft_batch_size:(b + 1) * args.sft_batch_size]]
            n_tokens = sum(len(r) for _, r in batch)  # the whole batch's targets: a SUM, then one division
            for g_lr in opt.param_groups:
                g_lr["lr"] = cosine_lr(step, total, lr, args.min_lr)
            t0 = time.time()
            for i in range(0, len(batch), args.sft_micro_batch_size):
                ids, attn, labels = (x.to(device) for x in collate_sft(batch[i:i + args.sft_micro_batch_size], tok.pad_token_id))
                loss_sum, _ = sft_loss(model, ids, attn, labels, dtype, teacher, kd_ratio)
                (loss_sum / n_tokens).backward()  # token mean over the whole batch, whatever the micro-batch
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            logger.log(step=step, epoch=epoch, loss=loss_sum.item() / n_tokens, lr=opt.param_groups[0]["lr"],
                       grad_norm=gnorm.item(), ms=1000 * (time.time() - t0))
            bar.update(1)
        val_loss = eval_loss(model, val, tok.pad_token_id, args.sft_micro_batch_size, dtype, device)
        logger.log(step=step, epoch=epoch, val_loss=val_loss)
        bar.write(f"{Path(out_dir).name} epoch {epoch} | step {step} | val loss {val_loss:.4f}" + (" (best, saved)" if val_loss < best else ""))
        if val_loss < best:
            best = val_loss
            save_checkpoint(model, tok, out_dir)
        if step >= total:
            break
    bar.close()
    mark_done(out_dir, best_val_loss=best, steps=step)
    return best


# ----------------------------------------------------------------------------------------------------
# MiniLLM distillation: collect rollouts from p~, then PPO-style epochs over them.

@torch.no_grad()
def collect_rollouts(student, teacher, prompts, args, eos_id, pad_id, dtype, generator=None):
    """Sample len(prompts) rollouts in chunks of --gen-batch-size; add rewards r_t and advantages."""
    student.eval()
    chunks = []
    for i in range(0, len(prompts), args.gen_batch_size):
        ids, attn = (x.to(args.device) for x in collate_prompts(prompts[i:i + args.gen_batch_size], pad_id))
        roll = sample_rollouts(student, teacher, ids, attn, eos_id, pad_id, args.max_new_tokens, args.alpha,
                               args.temperature, args.top_p, args.top_k, dtype, keep_teacher_logits=args.single_step,
                               logits_device="cpu" if args.teacher_logits_offload else None, generator=generator)
        roll["prompt_ids"], roll["prompt_mask"] = ids, attn
        chunks.append(roll)
    buf = concat_rollouts(chunks, pad_id)
    mask = buf["mask"]
    r = rewards(buf["logp_teacher"], buf["logp_student"], mask, args.reward_scale, args.reward_clip)
    # Without the single-step term, r_t must be sampled inside the return again (paper's ablation).
    include_current = args.include_current or not args.single_step
    adv = long_term_returns(r, mask, args.gamma, include_current, args.length_norm)
    buf["adv"] = whiten(adv, mask) if args.whiten else adv
    buf["rewards"] = r
    return buf


def distill(student, teacher, tok, prompts, out_dir, args, dtype, pt_stream=None):
    """The MiniLLM loop. One optimizer step = one minibatch of --batch-size rollouts (+ a PT batch)."""
    device = args.device
    os.makedirs(out_dir, exist_ok=True)
    log_path = Path(out_dir) / "log.jsonl"
    logger = Logger(log_path)
    assert not any(p.requires_grad for p in teacher.parameters()), "the teacher is frozen"
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    order_rng = random.Random(args.seed)
    queue = []  # minibatch index lists still to train on for the current collection
    buf, step = None, 0
    for step in range(1, args.steps + 1):
        t0 = time.time()
        # ---- collect: --rollouts samples from p~, reused for --ppo-epochs epochs ----
        if not queue:
            t_s = time.time()
            batch_prompts = [prompts[i] for i in order_rng.sample(range(len(prompts)), min(args.rollouts, len(prompts)))]
            buf = collect_rollouts(student, teacher, batch_prompts, args, tok.eos_token_id, tok.pad_token_id, dtype, gen)
            sample_s = time.time() - t_s
            n = buf["tokens"].shape[0]
            for _ in range(args.ppo_epochs):
                perm = order_rng.sample(range(n), n)
                queue += [perm[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
            roll_stats = {"rkl": (buf["kl"].sum() / buf["mask"].sum()).item(),
                          "w_mean": (buf["w"].sum() / buf["mask"].sum()).item(), "w_max": buf["w"].max().item(),
                          "len": buf["mask"].sum(1).mean().item(), "reward": (buf["rewards"].sum() / buf["mask"].sum()).item(),
                          "sample_tok_s": buf["mask"].sum().item() / sample_s}
        # ---- one optimizer step on a minibatch ----
        student.eval()  # no dropout during distillation, as the official code
        idx = torch.tensor(queue.pop(0))
        mb = {k: v[idx.to(v.device)] for k, v in buf.items()}
        n_norm = normaliser(mb["mask"], args.normalize)
        stats = {"loss_long": 0.0, "loss_single": 0.0, "clipped": 0.0}
        for i in range(0, len(idx), args.micro_batch_size):
            micro = {k: v[i:i + args.micro_batch_size] for k, v in mb.items()}
            loss, s = minillm_loss(student, micro, args, n_norm, dtype)
            loss.backward()
            for k, v in s.items():
                stats[k] += v
        stats["clip_frac"] = stats.pop("clipped") / mb["mask"].sum().item()
        if pt_stream is not None and args.pt_coef > 0:
            chunk = torch.stack([next(pt_stream) for _ in range(args.pt_batch_size)]).to(device)
            lpt = pt_loss(student, teacher, chunk, args.pt_kd_ratio, dtype)
            (args.pt_coef * lpt).backward()
            stats["loss_pt"] = lpt.item()
        lr = args.lr * min(1.0, step / max(1, args.warmup_steps))  # linear warmup, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms = 1000 * (time.time() - t0)
        row = dict(step=step, **roll_stats, **stats, lr=lr, grad_norm=gnorm.item(), ms=ms,
                   tok_s=mb["mask"].sum().item() / (ms / 1000))
        logger.log(**row)
        if step % args.log_interval == 0 or step == args.steps:
            print(f"step {step:5d}/{args.steps} | rkl {row['rkl']:.4f} | w {row['w_mean']:.3f}/{row['w_max']:.2f} "
                  f"| clip {row['clip_frac']:.3f} | len {row['len']:.1f} | long {row['loss_long']:+.4f} "
                  f"| single {row['loss_single']:.4f} | pt {row.get('loss_pt', 0.0):.4f} | lr {lr:.2e} "
                  f"| {ms:.0f} ms | {row['tok_s']:.0f} tok/s | sample {row['sample_tok_s']:.0f} tok/s", flush=True)
    save_checkpoint(student, tok, out_dir)
    plot_curve(log_path, "rkl", Path(out_dir) / "reverse_kl.png", "MiniLLM: reverse KL(q_θ||p) per token on the rollouts")
    mark_done(out_dir, steps=step)


# ----------------------------------------------------------------------------------------------------
# Baselines (NOTES §4): SeqKD needs the teacher's own answers to the training prompts.

@torch.no_grad()
def teacher_responses(model, tok, prompts, args, dtype, desc="seqkd: teacher samples"):
    """One sampled response per prompt (τ = --temperature, top-p/top-k as flags), batched with the KV cache."""
    model.eval()
    texts = []
    for i in __import__("tqdm").trange(0, len(prompts), args.gen_batch_size, desc=desc, dynamic_ncols=True):
        ids, attn = (x.to(args.device) for x in collate_prompts(prompts[i:i + args.gen_batch_size], tok.pad_token_id))
        with autocast(args.device, dtype):
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in out[:, ids.shape[1]:].tolist():
            row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row  # cut at the first EOS
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


def seqkd_data(teacher_path, tok, train_rec, path, args, dtype):
    """The teacher's answers to the training prompts, written once to `path` (JSONL) and reused."""
    if os.path.exists(path):
        print(f"seqkd: reusing teacher data {path}")
        return load_records(path)
    teacher = load_model(teacher_path, args.device, dtype, args.trust_remote_code)
    prompts, kept = [], []
    for r in train_rec:
        ex = tokenize_example(tok, r, args.max_prompt_len, args.max_len)
        if ex is not None:
            prompts.append(ex[0])
            kept.append(r)
    texts = teacher_responses(teacher, tok, prompts, args, dtype)
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": t} for r, t in zip(kept, texts)]
    os.makedirs(Path(path).parent, exist_ok=True)
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)  # written whole or not at all
    return rows


# ----------------------------------------------------------------------------------------------------
# The demo: a synthetic instruction-following task, tiny GPT-2s built from configs, every method, one table.
# Several task families; three of them have many correct answers (any color, any two animals, any of four
# sentences), which is where forward KL (SFT, KD) spreads mass between modes and reverse KL picks modes.

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
    sets = {"val": 200, "train": 3000, "test": 300}
    recs = {k: [demo_example(rng) for _ in range(n)] for k, n in sets.items()}
    root.mkdir(parents=True, exist_ok=True)
    write = lambda path, rows: Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write(root / "data.jsonl", recs["val"] + recs["train"])  # the first --val-size records are validation
    write(root / "test.jsonl", [dict(r, output=r["refs"]) for r in recs["test"]])  # every correct answer is a reference
    pt_text = "\n\n".join(f"{r['instruction']} {r['input']} {r['output']}." for r in recs["train"])
    (root / "pt.txt").write_text(pt_text)  # the "pre-training corpus": plain text of the same world
    texts = [build_prompt(r["instruction"], r["input"]) + r["output"] for rs in recs.values() for r in rs]
    tok = demo_tokenizer(texts + [PROMPT])
    shapes = {"teacher": dict(n_layer=4, n_embd=128, n_head=4), "student": dict(n_layer=2, n_embd=64, n_head=2)}
    for name, shape in shapes.items():
        if getattr(args, name) != "demo":
            continue
        path = root / f"{name}-init"
        if not (path / "config.json").exists():
            torch.manual_seed(args.seed + len(name))
            cfg = GPT2Config(vocab_size=len(tok), n_positions=128, bos_token_id=tok.eos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
            save_checkpoint(GPT2LMHeadModel(cfg), tok, path)
        setattr(args, name, str(path))
    if args.data == "demo":
        args.data = str(root / "data.jsonl")
    if args.pt_data == "demo":
        args.pt_data = str(root / "pt.txt")
    return root / "test.jsonl"


@torch.no_grad()
def demo_eval(paths, teacher_path, test_file, args, dtype, seeds=(10, 20, 30)):
    """Held-out table: Rouge-L of sampled answers (τ = 1, max over the correct answers, mean over seeds),
    and the reverse KL(q||p) per token measured on each model's own samples (α = 0)."""
    from eval import rouge_l
    tok = load_tokenizer(teacher_path)
    recs = load_records(test_file)
    prompts = [tokenize_example(tok, r, args.max_prompt_len, args.max_len)[0] for r in recs]
    teacher = load_model(teacher_path, args.device, dtype).eval()
    rows = {}
    for name, path in paths.items():
        model = load_model(path, args.device, dtype).eval()
        scores, kls, lens = [], [], []
        for seed in seeds:
            gen = torch.Generator(device=args.device).manual_seed(seed)
            ids, attn = (x.to(args.device) for x in collate_prompts(prompts, tok.pad_token_id))
            roll = sample_rollouts(model, teacher, ids, attn, tok.eos_token_id, tok.pad_token_id, args.max_new_tokens,
                                   alpha=0.0, dtype=dtype, keep_teacher_logits=False, generator=gen)
            texts = [tok.decode([t for t, m in zip(row, mrow) if m and t != tok.eos_token_id], skip_special_tokens=True)
                     for row, mrow in zip(roll["tokens"].tolist(), roll["mask"].tolist())]
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
        run(args)
    out = Path(args.out)
    paths = {"teacher": out / "teacher-sft", "SFT": out / "student-sft", "KD": out / "kd", "SeqKD": out / "seqkd",
             "MiniLLM": out / "minillm"}
    rows = demo_eval(paths, str(out / "teacher-sft"), test_file, args, resolve_dtype(args))
    lines = ["| model | Rouge-L (held out) | reverse KL(q‖p) per token | mean length |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['rouge_l']:.1f} ± {r['rouge_l_std']:.1f} | {r['reverse_kl']:.3f} | {r['length']:.1f} |" for k, r in rows.items()]
    table = "\n".join(lines)
    print("\n" + table + f"\n\ndemo finished in {time.time() - t0:.0f} s; reverse-KL curve: {out / 'minillm' / 'reverse_kl.png'}")
    (out / "demo_results.md").write_text(table + "\n")
    (out / "demo_results.json").write_text(json.dumps(rows, indent=1))
    return rows


# ----------------------------------------------------------------------------------------------------
# main: the stages. minillm: teacher SFT -> student SFT -> MiniLLM. Baselines share the same stages:
# sft = the student SFT itself; kd and seqkd fine-tune the pre-trained student with the student-SFT
# hyperparameters (the paper's baselines), against the SFT'd teacher.

def sft_stage(path, init, tok, train, val, args, lr, epochs, dtype, teacher_path=None, kd_ratio=0.0):
    """Run one SFT stage into `path` unless it is already done there."""
    if is_done(path):
        print(f"{Path(path).name}: done, skipping ({path})")
        return path
    model = load_model(init, args.device, torch.float32, args.trust_remote_code)
    teacher = None
    if kd_ratio > 0:
        teacher = load_model(teacher_path, args.device, dtype, args.trust_remote_code).eval().requires_grad_(False)
        check_same_vocab(load_tokenizer(teacher_path, args.trust_remote_code), tok, teacher, model)
    sft(model, tok, train, val, path, args, lr, epochs, dtype, teacher, kd_ratio)
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.demo:
        return run_demo(args)
    return run(args)


def run(args):
    """The stages of one --method."""
    set_seed(args.seed)
    dtype = resolve_dtype(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    print(f"method {args.method} | device {args.device} | dtype {dtype} | recipe {args.recipe} | out {out}")

    tok = load_tokenizer(args.student, args.trust_remote_code)
    records = load_records(args.data)
    val_rec, train_rec = records[:args.val_size], records[args.val_size:]
    train = tokenize_dataset(tok, train_rec, args.max_prompt_len, args.max_len, "train")
    val = tokenize_dataset(tok, val_rec, args.max_prompt_len, args.max_len, "val")

    # (a) teacher SFT (every method but plain SFT needs the teacher)
    teacher_path = args.teacher
    if args.method != "sft" and not args.skip_teacher_sft:
        teacher_path = sft_stage(str(out / "teacher-sft"), args.teacher, tok, train, val, args, args.teacher_lr, args.teacher_epochs, dtype)
    if args.method == "kd":  # (1-λ)·CE + λ·KL(p||q_θ) on the gold responses
        path = sft_stage(str(out / "kd"), args.student, tok, train, val, args, args.student_lr, args.student_epochs, dtype,
                         teacher_path, args.kd_ratio)
        print(f"done: {path}")
        return
    if args.method == "seqkd":  # SFT on the teacher's own samples
        rows = seqkd_data(teacher_path, tok, train_rec, out / "seqkd" / "teacher_data.jsonl", args, dtype)
        seq_train = tokenize_dataset(tok, rows, args.max_prompt_len, args.max_len, "seqkd train")
        path = sft_stage(str(out / "seqkd"), args.student, tok, seq_train, val, args, args.student_lr, args.student_epochs,
                         dtype, teacher_path, args.seqkd_kd_ratio)
        print(f"done: {path}")
        return
    # (b) student SFT, keeping the lowest validation loss: the SFT baseline and MiniLLM's starting point
    student_path = args.student
    if not args.skip_student_sft:
        student_path = sft_stage(str(out / "student-sft"), args.student, tok, train, val, args, args.student_lr, args.student_epochs, dtype)
    if args.method == "sft":
        link = out / "sft"
        if not link.exists():
            link.symlink_to("student-sft", target_is_directory=True)  # the same checkpoint, not trained twice
        print(f"done: {link} (= {student_path})")
        return
    # (c) MiniLLM
    minillm_path = str(out / "minillm")
    if is_done(minillm_path):
        print(f"minillm: done, skipping ({minillm_path})")
        return
    set_seed(args.seed)
    teacher = load_model(teacher_path, args.device, dtype, args.trust_remote_code).eval().requires_grad_(False)
    student = load_model(student_path, args.device, torch.float32, args.trust_remote_code)
    check_same_vocab(load_tokenizer(teacher_path, args.trust_remote_code), tok, teacher, student)
    pt_stream = None
    if args.pt_data != "none" and args.pt_coef > 0:
        pt_stream = pt_chunks(args.pt_data, tok, args.pt_seq_len, args.seed)
    prompts = [p for p, _ in train]
    distill(student, teacher, tok, prompts, minillm_path, args, dtype, pt_stream)
    print(f"done: {minillm_path}")


if __name__ == "__main__":
    main()
