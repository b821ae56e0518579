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
Rerunning the same command resumes the unfinished stage from OUT/stage/ckpt/ (--save-interval);
`torchrun --nproc_per_node=K minillm.py ...` runs every stage data-parallel (DDP, teacher replicated);
add --fsdp when the student's training state does not fit one device (FSDP2: weights, gradients and AdamW
state sharded per transformer block; --fsdp-teacher shards the teacher too).

Reading order: arguments -> THE METHOD (the math as pure functions of tensors -> data and prompts -> forward
passes -> teacher-mixed sampling -> the loss -> SFT -> the distillation loop) -> the baselines -> main ->
PLUMBING (helpers of the method, loading, logging, checkpoints and resume, DDP and FSDP2), which a first
reader can skip. The demo lives in demo.py, the evaluation in eval.py; neither is imported here.

Deliberate simplifications, stated up front:
  * One device per process (CUDA bf16 or CPU fp32), plain DDP across processes (every rank holds the
    whole teacher and student) or PyTorch's own FSDP2 (--fsdp). No DeepSpeed, no tensor parallelism, no
    value network, no KL-to-reference: the official code has none of the last two either.
  * The teacher runs exactly once per rollout token: the logits it produces while sampling are kept and
    reused for the rewards and the single-step term (the official code re-runs the teacher 3+ times). It is
    not stepped token by token: a coin per position says which model draws the token (the same p~), and the
    teacher catches up over the tokens it has not seen in one forward where a coin picks it (sample_rollouts).
  * Advantages (and their whitening, lmops recipe only) are computed once per collection of rollouts,
    over response tokens only; the official code whitens per minibatch and includes padding.
  * bf16 must not change the algorithm: LM heads return fp32 logits, and log q_old is recomputed once per
    collection by the loss's own forward on the loss's own micro-batches, so the PPO ratio starts at exactly w_t
    (the official code uses fp16 and recomputes log q_old too). The minibatches are therefore cut once per
    collection; each PPO epoch visits them in a new order.
"""

import argparse
import datetime
import errno
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from itertools import islice, zip_longest
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# ----------------------------------------------------------------------------------------------------
# Arguments. Defaults are the paper's (docs/paper.md §1, §3); --recipe lmops switches to the official code's.

RECIPES = {
    # flag:             (paper,  lmops)   what it means
    "gamma":            (1.0,    0.95),   # discount of the long-term return
    "include_current":  (False,  True),   # official return G_t includes r_t (counted twice with single-step)
    "whiten":           (False,  True),   # whiten advantages
    "reward_scale":     (1.0,    0.5),    # r_t <- r_t / scale
    "reward_clip":      (0.0,    100.0),  # r_t <- clip(r_t, -c, c); 0 = off
    "pt_kd_ratio":      (0.0,    0.5),    # L_PT = (1-k)·LM + k·forward-KD against the teacher
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and ends every flag's line with its default (unless None: the
    RECIPES flags say theirs); a switch (--fsdp, --no-length-norm) is off unless given."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and "%(default)" not in help:
            help += " (default: off)" if action.nargs == 0 else " (default: %(default)s)"
        return help


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=HelpFormatter)
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
    g.add_argument("--template", choices=["alpaca", "chat"], default="alpaca",
                   help="prompt format: the paper's Alpaca-style template, or the tokenizer's chat template (for instruct "
                        "models trained on theirs; responses then end with the token that closes the assistant's turn)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off: safer)")

    g = p.add_argument_group("lengths (docs/paper.md §5)")
    g.add_argument("--max-prompt-len", type=int, default=256, help="longer prompts are dropped, as the official code")
    g.add_argument("--max-len", type=int, default=512, help="prompt + response tokens for SFT")
    g.add_argument("--max-new-tokens", type=int, default=256, help="response tokens sampled per rollout")

    g = p.add_argument_group("SFT (teacher and student initialisation)")
    g.add_argument("--teacher-lr", type=float, default=5e-5, help="teacher SFT learning rate")
    g.add_argument("--teacher-epochs", type=int, default=10, help="teacher SFT epochs; the lowest-val-loss epoch is kept")
    g.add_argument("--student-lr", type=float, default=5e-4, help="student SFT learning rate (also kd and seqkd)")
    g.add_argument("--student-epochs", type=int, default=20, help="official script: 20 (paper: 3); the lowest-val-loss epoch is kept")
    g.add_argument("--sft-batch-size", type=int, default=32, help="examples per SFT optimizer step")
    g.add_argument("--sft-micro-batch-size", type=int, default=8, help="gradient accumulation; the update is the same for any value")
    g.add_argument("--sft-max-steps", type=int, default=0, help="stop each SFT after this many steps (0 = all epochs); for tests")
    g.add_argument("--sft-weight-decay", type=float, default=0.01, help="AdamW weight decay in SFT")
    g.add_argument("--min-lr", type=float, default=1e-7, help="cosine schedule floor (no warmup)")

    g = p.add_argument_group("MiniLLM distillation (docs/paper.md §1-3)")
    g.add_argument("--recipe", choices=["paper", "lmops"], default="paper", help="defaults for the flags below: the paper's or the official code's")
    g.add_argument("--steps", type=int, default=5000, help="optimizer steps")
    g.add_argument("--lr", type=float, default=5e-6, help="constant after warmup")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warmup of the distillation learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW weight decay in distillation")
    g.add_argument("--batch-size", type=int, default=64, help="rollouts per optimizer step (paper: 64)")
    g.add_argument("--micro-batch-size", type=int, default=16, help="gradient accumulation; the update is the same for any value")
    g.add_argument("--rollouts", type=int, default=256, help="rollouts per collection, reused for --ppo-epochs")
    g.add_argument("--gen-batch-size", type=int, default=64, help="prompts sampled at once")
    g.add_argument("--ppo-epochs", type=int, default=4, help="inner epochs over each collection")
    g.add_argument("--alpha", type=float, default=0.2, help="teacher-mixed sampling p~ = α·p + (1-α)·q_θ; 0 = pure student")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip of the ratio ρ_t = w_t·q_θ/q_old; 0 = no clipping")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature τ of the rollouts (log-probs stay at τ = 1)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of the rollouts; 1 = off")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--no-length-norm", dest="length_norm", action="store_false", help="use the raw sum R_{t+1} instead of its mean over the remaining tokens")
    g.add_argument("--no-single-step", dest="single_step", action="store_false", help="drop the full-vocabulary KL term; r_t then goes back into the sampled return")
    g.add_argument("--normalize", choices=["token", "sequence"], default="token", help="loss = Σ/(response tokens) as the official code, or Σ/(sequences)")
    g.add_argument("--pt-coef", type=float, default=1.0, help="weight of L_PT; 0 = off")
    g.add_argument("--pt-batch-size", type=int, default=8, help="pre-training chunks per optimizer step")
    g.add_argument("--pt-seq-len", type=int, default=512, help="tokens per pre-training chunk of L_PT")
    for name, (paper, lmops) in RECIPES.items():  # default None: filled from --recipe unless given
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(paper, bool) else {"type": type(paper)}
        g.add_argument("--" + name.replace("_", "-"), default=None, help=f"paper: {paper}, lmops: {lmops}", **kind)
    g.add_argument("--teacher-logits", choices=["keep", "offload", "recompute"], default="keep",
                   help="the teacher's log-probs at every rollout position, for the single-step term: keep them in the rollout "
                        "buffer (GPU memory: rollouts × new tokens × vocabulary × 2 bytes), offload them to pinned CPU memory, "
                        "or recompute them with a teacher forward on every micro-batch (the official code; no buffer)")

    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on a GPU that computes it natively (compute capability 8.0+: A100, H100, RTX 30xx), "
                        "else fp32 (T4 and V100 only emulate bf16, slower than fp32); the first log line says which")
    g.add_argument("--decode", choices=DECODE_MODES, default="auto",
                   help="how rollouts run both models' forwards, the same numbers each way: eager (a growing KV cache), "
                        "static (preallocated caches, fixed shapes), graph (static, replayed from CUDA graphs); "
                        "auto: graph on CUDA, eager on the CPU (docs/sampling.md)")
    g.add_argument("--seed", type=int, default=42, help="sets every RNG (offset by rank)")
    g.add_argument("--log-interval", type=int, default=1, help="print a step line every N steps (log.jsonl has every step)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    g.add_argument("--dist-timeout", type=float, default=60.0,
                   help="minutes a process waits in a collective (torchrun) before the job is killed; rank 0 writing a large "
                        "checkpoint keeps the others waiting (NCCL's default, 10, kills a 13B run's save)")
    g.add_argument("--report-to", nargs="+", default=["none"], metavar="{none,tensorboard,wandb}",
                   help="also send every logged number (and the warnings, as text) to TensorBoard (OUT/tb/<stage>) and/or "
                        "Weights & Biases (a run per stage, named after --out); several allowed, spaces or commas")

    g = p.add_argument_group("long runs: rerun the same command to resume (docs/scaling.md)")
    g.add_argument("--save-interval", type=int, default=500,
                   help="resumable checkpoint (weights, optimizer, RNG states, data position) every N steps, 0 = only at "
                        "the end of a stage. Distillation saves at the first rollout-collection boundary after N steps, "
                        "where there is no rollout buffer to save. SIGTERM/SIGUSR1 save the step reached (buffer included) "
                        "and exit with status 75")
    g.add_argument("--stop-after", type=int, default=0, help="exit (status 3) after K steps of the current stage, as if killed; for resume tests")
    g.add_argument("--overwrite", action="store_true", help="--out holds a run with other arguments: delete its stages and start again")
    g.add_argument("--fsdp", action="store_true",
                   help="shard every trained model per transformer block (weights, gradients, AdamW state) across the torchrun "
                        "processes with PyTorch FSDP2: bf16 compute, fp32 master weights. For pairs whose training state does "
                        "not fit one device (the paper's LLaMA-13B -> 7B); without it every rank holds everything (DDP)")
    g.add_argument("--fsdp-teacher", action="store_true",
                   help="with --fsdp: shard the frozen teacher too (default: a whole bf16 copy on every rank, which samples faster)")
    g.add_argument("--fsdp-sample-sharded", action="store_true",
                   help="with --fsdp: sample with the student sharded, all-gathering every block at every token (default: "
                        "all-gather it once per rollout collection and keep it whole in bf16 while sampling)")
    return p


def die(msg):
    """Bad input: one line on stderr and exit status 2 (as argparse), no traceback. Every input is checked
    before the run folder is touched, so a typo never damages a run."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


POSITIVE = ["val_size", "max_prompt_len", "max_len", "max_new_tokens", "teacher_lr", "teacher_epochs", "student_lr",
            "student_epochs", "sft_batch_size", "sft_micro_batch_size", "steps", "lr", "batch_size", "micro_batch_size",
            "rollouts", "gen_batch_size", "ppo_epochs", "temperature", "pt_batch_size", "pt_seq_len", "reward_scale",
            "log_interval", "grad_clip", "dist_timeout"]
NON_NEGATIVE = ["sft_max_steps", "sft_weight_decay", "min_lr", "warmup_steps", "weight_decay", "clip_eps", "top_k",
                "pt_coef", "reward_clip", "save_interval", "stop_after"]
UNIT_INTERVAL = ["alpha", "kd_ratio", "seqkd_kd_ratio", "pt_kd_ratio", "gamma"]  # mixing weights and the discount


def check_args(args):
    """Sizes, counts and rates that make no sense stop here, not hours later (written so that NaN fails too)."""
    for name in POSITIVE:
        if not getattr(args, name) > 0:
            die(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in NON_NEGATIVE:
        if not getattr(args, name) >= 0:
            die(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in UNIT_INTERVAL:
        if not 0.0 <= getattr(args, name) <= 1.0:
            die(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 0.0 < args.top_p <= 1.0:
        die(f"--top-p must be in (0, 1], got {args.top_p}")
    check_device(args.device)
    check_decode(args.decode, args.device)
    args.report_to = check_report_to(args.report_to)
    if (args.fsdp_teacher or args.fsdp_sample_sharded) and not args.fsdp:
        die("--fsdp-teacher and --fsdp-sample-sharded need --fsdp")


REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name: the package it needs


def check_report_to(names):
    """--report-to's names (spaces or commas) -> the list of reporters, 'none' dropped. A missing library is
    reported now, not at the first logged step."""
    import importlib.util
    names = list(dict.fromkeys(n for v in names for n in v.split(",") if n))
    for n in names:
        if n != "none" and n not in REPORTERS:
            die(f"--report-to {n}: unknown; use none, tensorboard or wandb")
        if n != "none" and importlib.util.find_spec(REPORTERS[n]) is None:
            die(f"--report-to {n} needs the {REPORTERS[n]} package: pip install {REPORTERS[n]}")
    return [n for n in names if n != "none"]


def check_device(device):
    """A device this machine does not have would fail at the first tensor moved there: say so now."""
    try:
        d = torch.device(device)
    except RuntimeError:
        die(f"--device {device} is not a device name; use cpu, cuda or cuda:N")
    if d.type == "cuda" and not torch.cuda.is_available():
        die(f"--device {device}: this machine has no CUDA GPU visible to torch {torch.__version__} (a CPU-only build, or no "
            "driver); use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        die(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if d.type == "mps" and not torch.backends.mps.is_available():
        die(f"--device {device}: MPS is not available here; use --device cpu")


def check_decode(decode, device):
    if decode == "graph" and torch.device(device).type != "cuda":
        die(f"--decode graph replays CUDA graphs and needs a CUDA device, not {device}; use --decode static")


def parse_args(argv=None, defaults=None, parser=None):
    """defaults: other defaults for some flags (demo.py's); flags given on the command line still win."""
    parser = parser or build_parser()
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    for name, (paper, lmops) in RECIPES.items():  # a flag given explicitly wins over the recipe
        if getattr(args, name) is None:
            setattr(args, name, paper if args.recipe == "paper" else lmops)
    check_args(args)
    return args


# =============================================== THE METHOD ===============================================
# From the first equation to the distillation loop: everything MiniLLM is, in reading order.

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


def reverse_kl(logq, logp):
    """KL(q_θ(·|y_<t) || p(·|y_<t)) = Σ_v q_θ(v) [log q_θ(v) - log p(v)] at every position, from the log-probabilities
    log q_θ and log p over the vocabulary, (B, N, V) -> (B, N).

    The single-step term: -E_{y_t~q_θ}[r_t] taken over the whole vocabulary instead of by sampling, (∇L)_Single.
    The teacher is a constant: the gradient flows through the student only. The one definition of the divergence:
    the loss, the logged `rkl` (sample_rollouts) and the tests call it, so a fork that swaps it edits this function.
    """
    return (logq.exp() * (logq - logp.detach())).sum(-1)


def forward_kl(logits_student, logits_teacher):
    """KL(p || q_θ) = Σ_v p(v) [log p(v) - log q_θ(v)] at every position, (B, N): word-level KD."""
    logq = torch.log_softmax(upcast(logits_student), dim=-1)
    logp = torch.log_softmax(upcast(logits_teacher.detach()), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def long_term_loss(logp_student, logp_student_old, w, advantages, clip_eps=0.2):
    """PPO-style surrogate of (∇L)_Long = -E Σ_t A_t ∇log q_θ(y_t), per token, (B, N).

    ρ_t = w_t · q_θ(y_t)/q_old(y_t);  loss_t = max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)).
    On the first inner epoch q_θ = q_old, so ρ_t = w_t and the clip is the importance-weight clip.
    ρ_t is computed in log space (one exp of a sum) so that no factor can overflow on its own.
    Returns (loss, clipped) where clipped marks tokens whose gradient the clip removed.
    """
    ratio = torch.exp(logp_student - logp_student_old.detach() + torch.log(w.detach()))  # w = 0 on padding: ρ = 0
    loss = -advantages * ratio
    if clip_eps <= 0:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    loss_clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return torch.maximum(loss, loss_clipped), loss_clipped > loss


def masked_sum(x, mask):
    return (x * mask).sum()


# ----------------------------------------------------------------------------------------------------
# Data. The Alpaca-style template and tokenisation of the official code (docs/paper.md §5).

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def build_prompt(instruction, input=""):
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


def prompt_text(tok, rec, template="alpaca"):
    """The prompt as text: the record's ready `prompt` if it has one (some test sets), else the Alpaca-style
    template (the paper's, for models tuned on it), or with template="chat" the tokenizer's own chat template
    (modern instruct teachers were trained on theirs: a user turn, then the opening of the assistant's turn)."""
    if "prompt" in rec:
        return rec["prompt"]
    if template == "chat":
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return build_prompt(rec["instruction"], rec.get("input", ""))


def tokenize_example(tok, rec, max_prompt_len, max_len, template="alpaca"):
    """-> (prompt_ids, response_ids) or None if the prompt is too long.

    response = tokens(prompt + output) minus the first len(tokens(prompt)), then EOS, as the official code;
    both start the way the tokenizer starts a text (text_start; a chat template writes its own BOS).
    """
    prompt = prompt_text(tok, rec, template)
    start = [] if template == "chat" and "prompt" not in rec else text_start(tok)
    prompt_ids = start + tok(prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > max_prompt_len:
        return None
    output = rec.get("output", "")
    output = output[0] if isinstance(output, list) else output
    full = start + tok(prompt + output, add_special_tokens=False)["input_ids"]
    response_ids = full[len(prompt_ids):][: max_len - len(prompt_ids) - 1] + [tok.eos_token_id]
    return prompt_ids, response_ids


# ----------------------------------------------------------------------------------------------------
# Forward passes: position ids that respect left padding, an optional KV cache. The LM head returns fp32 logits
# over the tokens teacher and student share (fp32_head, FP32Head; with autocast and the caches, in the plumbing).

def position_ids_from(attention_mask):
    """With left padding, positions count real tokens only: pads get 0, the first real token 0, ..."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids, attention_mask, cache=None, logits_to_keep=0):
    """One causal-LM forward with explicit position ids (left padding) and an optional KV cache.
    transformers renamed `past_key_values` to `cache` in 5.2x; we pass whichever the model takes. Without a cache,
    use_cache=False: otherwise every training forward builds a KV cache it throws away (1.3 GB for gpt2-xl on
    8 × 512 tokens). logits_to_keep = k > 0: logits of the last k positions only, (B, k, V); the LM head is skipped
    elsewhere (with V = 50k it costs more than a small model's blocks, and its (B, L, V) output is the largest tensor)."""
    kw = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    if cache is not None:
        kw.update({cache_argument(model): cache, "use_cache": True})
    else:
        kw["use_cache"] = False
    pos = position_ids_from(attention_mask)[:, -input_ids.shape[1]:]
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, **kw).logits


# ----------------------------------------------------------------------------------------------------
# Teacher-mixed sampling. The token y_t is drawn from p~ = α·p + (1-α)·q_θ; every log-probability the loss
# needs is recorded on the way, and the teacher's log-probabilities are kept, so the teacher never runs again
# on these rollouts. The student decodes token by token; the teacher runs only where a token is drawn from it.

@torch.no_grad()
def sample_rollouts(student, teacher, prompt_ids, prompt_mask, eos_ids, pad_id, max_new_tokens, alpha=0.2,
                    temperature=1.0, top_p=1.0, top_k=0, dtype=torch.float32, keep_teacher_logits=True,
                    logits_device=None, generator=None, teacher_out=None, coins=None, max_chunk=None, decode="eager",
                    width=None):
    """Sample responses from p~ = α·p + (1-α)·q_θ. Returns a dict of (B, N) tensors: tokens, mask (first end token
    included), logp_student / logp_teacher (at τ = 1: the distributions being distilled), logp_mix (the actual
    sampling distribution, after τ and top-k/p), w = q_θ/p~, kl (full-vocabulary KL(q_θ||p) at each position), top1
    (1 where both models' argmax agree: a diagnostic), and teacher_logits (B, N, V): log p(·|y_<t) in
    store_dtype(dtype), written in place into `teacher_out` (a (B, max_new_tokens, V) slice of the buffer) if given.

    The coin argument (τ = 1, no top-k/p). Drawing y_t from p~ is the same as flipping a coin c_t ~ Bernoulli(α)
    and drawing y_t from p if c_t = 1, from q_θ if not. The coins need not look at the text, so `coins` (N,) are
    drawn before decoding, one per position, shared by the batch (and by every rank: under FSDP each teacher
    forward is a collective). Proof that nothing changes: c_t is independent of y_<t, so in every row
        P(y_t | y_<t) = α·p(y_t | y_<t) + (1-α)·q_θ(y_t | y_<t) = p~(y_t | y_<t),
    hence w_t = q_θ/p~ and the estimator are those of per-token mixing. What this buys: the student decodes alone
    until a position whose coin says "teacher"; there the teacher catches up over the tokens it has not seen in
    one forward (teacher_chunk), which gives its log-probabilities at every position of the chunk (for w_t, the
    rewards, the stored log p and the KL), and y_t is drawn from p. About α·N + 1 teacher calls instead of N; at
    α = 0, one pass over the finished responses, the prompt included. max_chunk bounds the positions whose
    student log-probabilities wait for the teacher ((B, max_chunk, V) fp32; by default 1 GiB's worth): a catch-up
    without a coin is pure computation and changes no draw.
    Tempered or filtered mixtures (τ ≠ 1, top-k, top-p) filter α·p + (1-α)·q_θ as a whole, which is no coin
    flip: there the teacher runs at every position, as a per-token sampler (`coins` is ignored).
    decode: how both models run their forwards (eager, static or graph: the same numbers; decoder, in the plumbing)."""
    assert not student.training and not teacher.training, "sampling runs both models in eval mode (no dropout)"
    B, N, device = prompt_ids.shape[0], max_new_tokens, prompt_ids.device
    eos_ids = torch.as_tensor(eos_ids, device=device).reshape(-1)  # every end id (1-D)
    plain = temperature == 1.0 and top_k == 0 and top_p == 1.0  # then p~ is exactly the mixture of q and p
    if not plain:
        coins = [True] * N  # the filtered mixture needs both distributions at every position
    elif coins is None:
        coins = torch.rand(N, generator=generator, device=generator.device if generator else device) < alpha
    coins = torch.as_tensor(coins, dtype=torch.bool).tolist()  # on the host, in one read
    # every draw's uniform, now: a batch uses N·B of the stream, however late decoding stops (CHECK_EVERY)
    u = torch.rand(N, B, 1, dtype=torch.float64, generator=generator, device=generator.device if generator else device).to(device)
    dec_s, dec_t = (decoder(m, prompt_ids, prompt_mask, N, decode, width, role) for m, role in  # caches, forwards
                    [(student, "student"), (teacher, "teacher")])
    check = 1 if dec_s.mode == dec_t.mode == "eager" else CHECK_EVERY  # tokens between two checks for the end
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rec = {k: [] for k in ["tokens", "mask", "logp_student", "logp_teacher", "logp_mix", "kl", "top1"]}
    ys, pending, argmax_s, start = [], [], [], 0  # pending: log q_θ (B, V) at positions start.. the teacher has not reached

    def settle(logp):  # the teacher's log p (B, L, V) at positions start..start+L-1, whose tokens are all drawn
        L = logp.shape[1]
        assert logp.shape[-1] == V, "p and q_θ are compared token by token: one vocabulary (fp32_head slices both)"
        y = torch.stack(ys[start:start + L], 1)  # (B, L)
        rec["logp_teacher"].append(logp.gather(-1, y[..., None]).squeeze(-1))
        rec["kl"].append(reverse_kl(torch.stack(pending, 1), logp))
        rec["top1"].append((torch.stack(argmax_s, 1) == logp.argmax(-1)).float())  # a diagnostic: do both agree here?
        if keep_teacher_logits:
            store_write(teacher_out, start, logp)
        pending.clear(), argmax_s.clear()
        return start + L

    # One autocast region for the whole loop: autocast caches the bf16 copies of the student's fp32 weights for
    # as long as the region lasts, so they are cast once per rollout batch, not per token (a CUDA graph: per replay).
    with autocast(device, dtype):  # the prompt's last position only: the LM head over the prompt is wasted work
        zs = dec_s(None, keep=1)[:, -1]  # (B, V)
        V = zs.shape[-1]
        if keep_teacher_logits and teacher_out is None:
            teacher_out = torch.empty(B, N, V, dtype=store_dtype(dtype), device=logits_device or device)
        max_chunk = max_chunk or max(1, PENDING_BYTES // (B * V * 4))
        for t in range(N):
            logq = torch.log_softmax(zs, -1)  # (B, V) at τ = 1
            pending.append(logq)
            argmax_s.append(zs.argmax(-1))
            logp = None
            if coins[t] or len(pending) == max_chunk:  # the teacher catches up: log p at positions start..t
                logp_chunk = teacher_chunk(dec_t, ys, start, t)
                logp = logp_chunk[:, -1]  # (B, V): the distribution of y_t
            if not plain:
                q_tau, p_tau = torch.softmax(zs / temperature, -1), torch.softmax(logp / temperature, -1)
                mix = filter_probs(alpha * p_tau + (1 - alpha) * q_tau, top_k, top_p)
                y = draw(mix, u=u[t])  # (B,)
                rec["logp_mix"].append(mix.gather(-1, y[:, None]).squeeze(-1).log())
            else:
                y = draw(logp.exp() if coins[t] else logq.exp(), u=u[t])  # the coin says which model draws y_t
            ys.append(y)
            live = ~done
            rec["tokens"].append(torch.where(live, y, torch.full_like(y, pad_id)))
            rec["mask"].append(live.float())
            rec["logp_student"].append(logq.gather(-1, y[:, None]).squeeze(-1))
            if logp is not None:
                start = settle(logp_chunk)
            done = done | torch.isin(y, eos_ids)
            if t == N - 1 or (t + 1) % check == 0 and all_done(done, student, teacher):  # FSDP: every rank's rollouts
                break  # the last token needs no forward: nobody conditions on it
            zs = dec_s(y[:, None], keep=1)[:, -1]
        if pending:  # positions after the last teacher call: one pass over them
            settle(teacher_chunk(dec_t, ys, start, len(ys) - 1))
    out = {k: torch.stack(v, dim=1) for k, v in rec.items() if k not in ("logp_teacher", "kl", "top1", "logp_mix")}
    out.update({k: torch.cat(rec[k], dim=1) for k in ("logp_teacher", "kl", "top1")})
    out["logp_mix"] = mixture_logprobs(out["logp_student"], out["logp_teacher"], alpha) if plain else \
        torch.stack(rec["logp_mix"], dim=1)
    if check > 1:  # static and graph check for the end every CHECK_EVERY tokens (it waits for the device): drop
        # the columns decoded after every row had ended, so that the rollouts are the eager ones
        n = int(out["mask"].any(0).nonzero().max()) + 1
        out = {k: v[:, :n] for k, v in out.items()}
    m = out["mask"]
    for k in ["logp_student", "logp_teacher", "logp_mix", "kl", "top1"]:
        out[k] = out[k] * m
    out["w"] = importance_weights(out["logp_student"], out["logp_mix"]) * m
    if keep_teacher_logits:
        out["teacher_logits"] = landed(teacher_out, device)[:, :m.shape[1]]  # a view: no copy
    return out


def teacher_chunk(teacher, ys, start, t):
    """log p(·|y_<j) at response positions j = start..t, (B, t-start+1, V) fp32, by one cached forward over the
    tokens the teacher has not seen: y_{start-1} .. y_{t-1} (on its first call, start = 0: the prompt, which the
    decoder puts first, and y_0 .. y_{t-1}). teacher: the teacher's Decoder."""
    new = torch.stack(ys[max(start - 1, 0):t], 1) if t > 0 else None
    return torch.log_softmax(teacher(new, keep=t - start + 1), -1)


# ----------------------------------------------------------------------------------------------------
# The loss on a rollout buffer: a collection of rollouts padded to common shapes, with rewards and advantages.

def student_response_logits(student, mb, dtype):
    """Logits of the student at the response positions, (B, N, V): positions P-1 .. P+N-2 predict y_1..y_N."""
    ids = torch.cat([mb["prompt_ids"], mb["tokens"]], dim=1)
    attn = torch.cat([mb["prompt_mask"], mb["mask"].long()], dim=1)
    N = mb["tokens"].shape[1]
    with autocast(ids.device, dtype):  # the LM head on the last N+1 positions only, not on the prompt
        logits = forward(student, ids, attn, logits_to_keep=N + 1)  # (B, N+1, V): positions P-1 .. P+N-1
    return logits[:, :-1]


@torch.no_grad()
def recompute_logp_old(student, buf, groups, dtype):
    """log q_old(y_t) by the very forward the loss runs, for a bf16 run: student_response_logits on each group of
    rows (micro_batch_groups), in the same row order and trimmed to the same width as the loss will see them.

    Under bf16 two forwards of the same row agree only when they are the same computation: the KV-cached decode
    (one token at a time) and a full forward differ by up to 0.25 nats on GPT-2-like logits, and a full forward's
    result changes with the row's company (the padding width trim leaves). With log q_old from the loss's own
    forward, ρ_t = w_t·q_θ/q_old is exactly w_t on the first minibatch of every collection, whatever --rollouts,
    --batch-size and --micro-batch-size, and on later minibatches and epochs the ratio measures the policy's
    change only. (In fp32 all these forwards agree to 1e-5, and this pass is skipped.) w_t itself stays the
    sampling-time q_θ/p~: it corrects for the distribution the tokens were actually drawn from."""
    out = torch.zeros_like(buf["logp_student"])
    for rows in groups:
        idx = torch.tensor(rows, device=out.device)
        mb = trim({k: buf[k][idx] for k in ("prompt_ids", "prompt_mask", "tokens", "mask")})
        logp = token_logprobs(student_response_logits(student, mb, dtype), mb["tokens"])
        out[idx, :logp.shape[1]] = logp * mb["mask"]
    return out


def minillm_loss(student, mb, args, n_norm, dtype=torch.float32):
    """The MiniLLM objective on a minibatch of rollouts, as a SUM divided by n_norm (the token or
    sequence count of the whole optimizer batch, so gradient accumulation does not change it).

    L = L_long (PPO-clipped, with w_t) + L_single (full-vocabulary reverse KL), both through q_θ only.
    """
    mb = trim(mb)
    device = mb["prompt_ids"].device
    logits = student_response_logits(student, mb, dtype)  # (B, N, V)
    logq = torch.log_softmax(upcast(logits), dim=-1)  # once: the sampled token's log-prob and the KL both read it
    mask = mb["mask"]
    logp = logq.gather(-1, mb["tokens"].unsqueeze(-1)).squeeze(-1)  # (B, N)
    loss_long, clipped = long_term_loss(logp, mb["logp_student"], mb["w"], mb["adv"], args.clip_eps)
    loss = masked_sum(loss_long, mask)
    stats = {"loss_long": loss.item() / n_norm, "clipped": masked_sum(clipped.float(), mask).item()}
    if args.single_step:
        logp_teacher = torch.log_softmax(upcast(mb["teacher_logits"].to(device, non_blocking=True)), dim=-1)
        kl_sum = masked_sum(reverse_kl(logq, logp_teacher), mask)
        loss = loss + kl_sum
        stats["loss_single"] = kl_sum.item() / n_norm
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
    with torch.no_grad(), autocast(chunk.device, dtype):
        zt = forward(teacher, chunk, attn)[:, :-1]
    return (1 - kd_ratio) * lm + kd_ratio * forward_kl(logits, zt).mean()


# ----------------------------------------------------------------------------------------------------
# SFT: cross-entropy on the gold responses (and, with a teacher, word-level KD). Phase 1 of MiniLLM.

def sft_loss(model, ids, attn, labels, dtype, teacher=None, kd_ratio=0.0):
    """Token-mean CE on the response (labels != -100); with a teacher, (1-λ)·CE + λ·KL(p||q_θ)."""
    with autocast(ids.device, dtype):
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    targets, mask = labels[:, 1:], (labels[:, 1:] != -100).float()
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    loss_sum = masked_sum(ce.view_as(mask), mask)
    if teacher is not None and kd_ratio > 0:
        with torch.no_grad(), autocast(ids.device, dtype):
            zt = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
        loss_sum = (1 - kd_ratio) * loss_sum + kd_ratio * masked_sum(forward_kl(logits, zt), mask)
    return loss_sum, mask.sum()


def sft_backward(model, batch, n_tokens, pad_id, args, dtype, teacher=None, kd_ratio=0.0):
    """Gradient of the global batch's token-mean loss; this rank does its share, in micro-batches.
    Returns the batch's loss (all ranks)."""
    mine, mbs = batch[rank()::world()], args.sft_micro_batch_size
    n_micro = math.ceil(math.ceil(len(batch) / world()) / mbs)  # the same on every rank: DDP and FSDP sync in backward
    total = 0.0
    for j in range(n_micro):
        examples = mine[j * mbs:(j + 1) * mbs]  # an empty share still joins the collectives, with weight 0
        ids, attn, labels = (x.to(args.device) for x in collate_sft(examples or batch[:1], pad_id))
        with grad_sync(model, last=j == n_micro - 1):
            loss_sum, _ = sft_loss(model, ids, attn, labels, dtype, teacher, kd_ratio)
            # a SUM over tokens / the global batch's token count; × world because DDP and FSDP average the ranks
            (loss_sum / n_tokens * (world() if examples else 0)).backward()
        total += loss_sum.item() if examples else 0.0
    return all_sum(total) / n_tokens


def sft(model, tok, train, val, out_dir, args, lr, epochs, dtype, teacher=None, kd_ratio=0.0, resume=None):
    """Fine-tune `model` on (prompt, response) pairs; save the epoch with the lowest validation loss.
    resume: a checkpoint folder (find_checkpoint) to continue from; `model` was loaded from it."""
    device, name, ckpt_dir = args.device, Path(out_dir).name, Path(out_dir) / "ckpt"
    os.makedirs(out_dir, exist_ok=True)
    ddp = wrap_model(model, args, dtype)  # DDP, or FSDP (which swaps the parameters for shards: before the optimizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.sft_weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.sft_batch_size)
    total = epochs * steps_per_epoch if not args.sft_max_steps else min(args.sft_max_steps, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)  # the data order, the same on every rank
    best, step, first_epoch, first_batch, log_lines = float("inf"), 0, 0, 0, 0
    if resume:
        state = load_train_state(resume, opt, device, model)
        best, step, first_epoch, first_batch, log_lines = (state[k] for k in ["best", "step", "epoch", "batch", "log_lines"])
        g.set_state(state["rng"]["data_order"])  # as at the start of that epoch: its order is drawn again
        print(f"{name}: resuming from step {step} (epoch {first_epoch}, batch {first_batch}) of {resume}")
    start, logger = step, Logger(Path(out_dir) / "log.jsonl", keep=log_lines, args=args)
    model.train()  # dropout on during SFT, as the official code
    bar = __import__("tqdm").tqdm(total=total, initial=step, desc=f"sft {name}", dynamic_ncols=True, disable=not is_main())
    for epoch in range(first_epoch, epochs):
        epoch_rng = g.get_state()  # a checkpoint inside this epoch draws its order again from here
        order = torch.randperm(len(train), generator=g).tolist()
        for b in range(first_batch if epoch == first_epoch else 0, steps_per_epoch):
            if step >= total:
                break
            batch = [train[i] for i in order[b * args.sft_batch_size:(b + 1) * args.sft_batch_size]]
            n_tokens = sum(len(r) for _, r in batch)  # the whole batch's targets: a SUM, then one division
            for g_lr in opt.param_groups:
                g_lr["lr"] = cosine_lr(step, total, lr, args.min_lr)
            t0 = time.time()
            loss = sft_backward(ddp, batch, n_tokens, tok.pad_token_id, args, dtype, teacher, kd_ratio)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # global norm, also under FSDP
            check_finite(name, step + 1, ckpt_dir, loss=loss, grad_norm=gnorm.item())
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            logger.log(step=step, epoch=epoch, loss=loss, lr=opt.param_groups[0]["lr"], grad_norm=gnorm.item(),
                       ms=1000 * (time.time() - t0))
            bar.update(1)
            sig = stop_signal()  # SIGTERM/SIGUSR1 on any rank: save this step and exit
            if sig or args.save_interval and step % args.save_interval == 0:
                save_train_state(ckpt_dir, model, opt, rng_state(data_order=epoch_rng), step=step, epoch=epoch,
                                 batch=b + 1, best=best, log_lines=logger.lines)
            if sig:
                preempted(name, sig, step, ckpt_dir)
            maybe_stop(args, name, step - start, step)
        val_loss = eval_loss(model, val, tok.pad_token_id, args.sft_micro_batch_size, dtype, device)
        logger.log(step=step, epoch=epoch, val_loss=val_loss)
        bar.write(f"{name} epoch {epoch} | step {step} | val loss {val_loss:.4f}" + (" (best, saved)" if val_loss < best else ""))
        if val_loss < best:
            best = val_loss
            save_checkpoint(model, tok, out_dir)
        if step >= total:
            break
    bar.close()
    logger.close()
    mark_done(out_dir, best_val_loss=best, steps=step)
    barrier()  # the other ranks wait for rank 0's files
    return best


# ----------------------------------------------------------------------------------------------------
# MiniLLM distillation: collect rollouts from p~, then PPO-style epochs over them. Phase 2.

@torch.no_grad()
def collect_rollouts(student, teacher, prompts, args, eos_ids, pad_id, dtype, generator=None, store=None, minibatches=None,
                     coin_seed=None):
    """Sample len(prompts) rollouts in chunks of --gen-batch-size; add rewards r_t and advantages.
    eos_ids: every token id that ends a response (end_ids). store: teacher_store()'s buffer, reused from one
    collection to the next (allocated here if None). minibatches: the row lists the loss will train on (bf16: log
    q_old is recomputed in their micro-batches); default: the rows in order, --batch-size at a time.
    coin_seed: seeds the coins (sample_rollouts), the same on every rank (default --seed); `generator`, one per rank, the tokens."""
    student.eval()
    if store is None:
        store = teacher_store(args, len(prompts), n_logits(teacher), dtype)
    coin_gen = torch.Generator().manual_seed(args.seed if coin_seed is None else coin_seed)  # on the CPU: any device agrees
    chunks, eos_tensor = [], torch.tensor(sorted(eos_ids), device=args.device)
    width = max(len(p) for p in prompts)  # graph decoding: every batch in the same slots, replaying the same graphs
    with own_decoders():  # graph and static decoding: their caches are freed for the training steps
        for i in range(0, len(prompts), args.gen_batch_size):
            ids, attn = (x.to(args.device) for x in collate_prompts(prompts[i:i + args.gen_batch_size], pad_id))
            coins = torch.rand(args.max_new_tokens, generator=coin_gen) < args.alpha  # c_t = 1: y_t is drawn from p
            roll = sample_rollouts(student, teacher, ids, attn, eos_tensor, pad_id, args.max_new_tokens, args.alpha,
                                   args.temperature, args.top_p, args.top_k, dtype, keep_teacher_logits=store is not None,
                                   generator=generator, teacher_out=None if store is None else store[i:i + len(ids)],
                                   coins=coins, decode=decode_mode(args.decode, args.device), width=width)
            roll.pop("teacher_logits", None)  # already in `store`
            roll["prompt_ids"], roll["prompt_mask"] = ids, attn
            chunks.append(roll)
    buf = concat_rollouts(chunks, pad_id)
    if store is not None:  # a view; columns past a chunk's length hold finite leftovers, masked like all padding
        buf["teacher_logits"] = store[:len(prompts), :buf["mask"].shape[1]]
    if dtype in (torch.bfloat16, torch.float16):
        rows = list(range(len(prompts)))
        b = args.batch_size // world()  # this rank's share of a minibatch
        minibatches = minibatches or [rows[i:i + b] for i in range(0, len(rows), b)]
        buf["logp_student"] = recompute_logp_old(student, buf, micro_batch_groups(minibatches, args.micro_batch_size), dtype)
    mask = buf["mask"]
    r = rewards(buf["logp_teacher"], buf["logp_student"], mask, args.reward_scale, args.reward_clip)
    # Without the single-step term, r_t must be sampled inside the return again (paper's ablation).
    include_current = args.include_current or not args.single_step
    adv = long_term_returns(r, mask, args.gamma, include_current, args.length_norm)
    # A fork's extra reward. A per-token term c added to r_t (say a length penalty, c = -λ on every token) is mostly
    # cancelled under length normalisation: R^Norm_{t+1} is the *mean* of the future rewards, so c shifts every
    # return but the last (which is 0) by about c, whatever the response's length; only --no-length-norm sums it
    # into a length-dependent (T-t-1)·c. A sequence-level reward R(y), shape (B,) (a length penalty, a judge's
    # score), goes undivided into the advantage of every response token instead, here:
    #     adv = adv + R[:, None] * mask
    buf["adv"] = whiten_global(adv, mask) if args.whiten else adv  # statistics over every rank's rollouts
    buf["rewards"] = r
    return buf


def minillm_backward(model, mb, args, dtype, sync=True, teacher_logits=None, teacher=None):
    """Gradient of L_long + L_single on this rank's share of a minibatch, in micro-batches: a SUM over the
    whole (global) minibatch divided by its GLOBAL token or sequence count, whatever the micro-batch and the
    number of ranks. sync=False: a later backward (L_PT) does the all-reduce. Returns the global losses.
    The micro-batches are runs of --micro-batch-size rows (micro_batch_groups: bf16's log q_old came from these).
    The teacher's log-probs: mb["teacher_logits"] if there, else the rows mb["rows"] of `teacher_logits` (the
    collection's buffer: only a micro-batch's rows are ever copied), else a fresh teacher forward (recompute)."""
    n_norm = all_sum(normaliser(mb["mask"], args.normalize)) / world()  # ÷ world: DDP averages the ranks' gradients
    stats = {"loss_long": 0.0, "loss_single": 0.0, "clipped": 0.0}
    starts = range(0, mb["mask"].shape[0], args.micro_batch_size)
    for i in starts:
        micro = trim({k: v[i:i + args.micro_batch_size] for k, v in mb.items()})
        if args.single_step and "teacher_logits" not in micro:
            N = micro["tokens"].shape[1]
            if teacher_logits is not None:
                micro["teacher_logits"] = store_read(teacher_logits, micro["rows"], N, micro["tokens"].device)
            else:
                with torch.no_grad():
                    micro["teacher_logits"] = student_response_logits(teacher, micro, dtype)
        with grad_sync(model, last=sync and i == starts[-1]):
            loss, s = minillm_loss(model, micro, args, n_norm, dtype)
            loss.backward()
        for k, v in s.items():
            stats[k] += v
    clipped = stats.pop("clipped")
    stats = {k: all_sum(v) / world() for k, v in stats.items()}  # each rank holds world·(its sum)/(global count)
    stats["clip_frac"] = all_sum(clipped) / all_sum(mb["mask"].sum())
    return stats


def distill(student, teacher, tok, prompts, out_dir, args, dtype, pt_stream=None, resume=None):
    """The MiniLLM loop. One optimizer step = one minibatch of --batch-size rollouts (+ a PT batch); under
    DDP each rank samples and trains on its share of both. resume: a checkpoint folder (find_checkpoint);
    `student` was loaded from it. --save-interval checkpoints fall on collection boundaries (no rollout buffer to
    save); a stop signal saves inside a collection, with the rest of it (buffer and minibatch queue)."""
    device, ckpt_dir = args.device, Path(out_dir) / "ckpt"
    os.makedirs(out_dir, exist_ok=True)
    log_path = Path(out_dir) / "log.jsonl"
    assert not any(p.requires_grad for p in teacher.parameters()), "the teacher is frozen"
    model = wrap_model(student, args, dtype)  # the losses run through DDP/FSDP; sampling uses the bare student
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    gen = torch.Generator(device=device).manual_seed(args.seed + rank())  # each rank samples its own rollouts
    order_rng = random.Random(args.seed)  # the prompts and the minibatch order: the same on every rank
    per_rank = min(args.rollouts, len(prompts)) // world()  # rollouts per collection on each rank: an equal share
    store = teacher_store(args, per_rank, n_logits(teacher), dtype)  # once, reused by every collection
    eos_ids = end_ids(tok, *model_configs(student), *model_configs(teacher))  # run() checked that both list the same
    queue = []  # the minibatches still to train on in this collection: lists of row indices into this rank's buffer
    buf, roll_stats, start, pt_used, log_lines = None, None, 0, 0, 0
    if resume:  # the optimizer, the RNGs and the L_PT stream as they were; inside a collection, the rest of it
        start, pt_used, log_lines, buf, queue, roll_stats = resume_distill(resume, opt, student, gen, order_rng,
                                                                           pt_stream, store, device)
    logger = Logger(log_path, keep=log_lines, args=args)
    step, saved = start, start
    for step in range(start + 1, args.steps + 1):
        t0 = time.time()
        # ---- collect: --rollouts samples from p~, reused for --ppo-epochs epochs ----
        if not queue:
            t_s = time.time()
            batch_prompts = [prompts[i] for i in order_rng.sample(range(len(prompts)), per_rank * world())]
            # The minibatches are cut once per collection, and every epoch visits them in a new order: a minibatch
            # and its micro-batches keep their rows, so the loss sees each row in the company (and at the padding
            # width) in which bf16's log q_old was computed (recompute_logp_old), and --micro-batch-size never
            # changes which rows share an optimizer step.
            perm, b = order_rng.sample(range(per_rank), per_rank), args.batch_size // world()
            minibatches = [perm[i:i + b] for i in range(0, per_rank, b)]
            buf = None  # the last collection's tensors go before the next one's arrive
            with gathered(student, not args.fsdp_sample_sharded):  # FSDP: all-gathered once, not at every token
                buf = collect_rollouts(student, teacher, batch_prompts[rank()::world()], args, eos_ids,
                                       tok.pad_token_id, dtype, gen, store, minibatches,
                                       coin_seed=1_000_003 * args.seed + step)  # every rank: the same coins
            roll_stats = dict(rollout_stats(buf, time.time() - t_s, eos_ids), collection_step=step)
            for epoch in range(args.ppo_epochs):  # the first epoch in the permutation's order (already random)
                queue += minibatches if epoch == 0 else order_rng.sample(minibatches, len(minibatches))
        # ---- one optimizer step on a minibatch ----
        student.eval()  # no dropout during distillation, as the official code
        idx = torch.tensor(queue.pop(0))
        mb = {k: v[idx.to(v.device)] for k, v in buf.items() if k != "teacher_logits"}  # (B, N) each: small
        mb["rows"] = idx  # the teacher's (R, N, V) log-probs stay in the buffer; micro-batches read their rows
        use_pt = pt_stream is not None and args.pt_coef > 0
        stats = minillm_backward(model, mb, args, dtype, sync=not use_pt, teacher_logits=buf.get("teacher_logits"),
                                 teacher=teacher)  # L_long + L_single
        if use_pt:
            chunk = torch.stack([next(pt_stream) for _ in range(args.pt_batch_size // world())]).to(device)
            pt_used += chunk.shape[0]
            with grad_sync(model, last=True):
                lpt = pt_loss(model, teacher, chunk, args.pt_kd_ratio, dtype)  # a token mean: DDP's average is right
                (args.pt_coef * lpt).backward()
            stats["loss_pt"] = all_sum(lpt.item()) / world()
        lr = args.lr * min(1.0, step / max(1, args.warmup_steps))  # linear warmup, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        check_finite("minillm", step, ckpt_dir, **stats, grad_norm=gnorm.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms = 1000 * (time.time() - t0)
        row = dict(step=step, **roll_stats, **stats, lr=lr, grad_norm=gnorm.item(), ms=ms,
                   tok_s=all_sum(mb["mask"].sum()) / (ms / 1000))
        warning = training_warning(logger.rows + [row])  # against the run's first collection (a pure function of the log)
        logger.log(**row, **({"warning": warning} if warning else {}))
        if step % args.log_interval == 0 or step == args.steps:
            print(f"step {step:5d}/{args.steps} | rkl {row['rkl']:.4f} | w {row['w_mean']:.3f}/{row['w_max']:.2f} "
                  f"| clip {row['clip_frac']:.3f} | len {row['len']:.1f} | no-eos {row['no_eos']:.2f} | rep4 {row['rep4']:.2f} "
                  f"| distinct {row['distinct']:.2f} | top1 {row['top1']:.2f} | long {row['loss_long']:+.4f} "
                  f"| single {row['loss_single']:.4f} | pt {row.get('loss_pt', 0.0):.4f} | lr {lr:.2e} "
                  f"| {ms:.0f} ms | {row['tok_s']:.0f} tok/s | sample {row['sample_tok_s']:.0f} tok/s", flush=True)
        if warning and is_main():  # at every log interval or not: it is said once
            print(warning, flush=True)
        sig = stop_signal()  # SIGTERM/SIGUSR1 on any rank: save this step, inside its collection, and exit
        if sig or not queue and args.save_interval and step - saved >= args.save_interval:  # or a collection boundary
            rest = dict(buf=buf, queue=queue, roll_stats=roll_stats) if queue else None
            save_train_state(ckpt_dir, student, opt, rng_state(gen=gen.get_state(), order=order_rng.getstate()),
                             rollouts=rest, store=store, step=step, pt_used=pt_used, log_lines=logger.lines)
            saved = step
        if sig:
            preempted("minillm", sig, step, ckpt_dir)
        maybe_stop(args, "minillm", step - start, step)
    logger.close()
    save_checkpoint(student, tok, out_dir)
    if is_main():
        plot_curve(log_path, "rkl", Path(out_dir) / "reverse_kl.png", "MiniLLM: reverse KL(q_θ||p) per token on the rollouts")
        plot_diagnostics(log_path, Path(out_dir) / "diagnostics.png")
    mark_done(out_dir, steps=step)
    barrier()  # the other ranks wait for rank 0's files


# =========================================== END OF THE METHOD ============================================


# ----------------------------------------------------------------------------------------------------
# Baselines (docs/paper.md §4) and single-model sampling: SeqKD needs the teacher's own answers to the training
# prompts; eval.py samples each model alone with the same loop.

@torch.no_grad()
def sample_model(model, prompt_ids, prompt_mask, eos_ids, pad_id, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                 greedy=False, dtype=torch.float32, generator=None, decode="eager", width=None):
    """One model alone (evaluation, SeqKD's teacher data): -> (B, N) response tokens, pad_id after the first end id
    (eos_ids: every one, a list or a 1-D LongTensor; the end token itself kept). Our own loop rather than model.generate, so a checkpoint's generation_config.json
    (repetition penalty, minimum length, ...) can never slip in. decode, width: as sample_rollouts'; every mode
    gives the same tokens and leaves the generator where eager leaves it, so the next batch draws the same too."""
    assert not model.training, "sampling runs in eval mode (no dropout)"
    eos_ids = torch.as_tensor(eos_ids, device=prompt_ids.device).reshape(-1)  # every end id (1-D)
    dec = decoder(model, prompt_ids, prompt_mask, max_new_tokens, decode, width)
    check = 1 if dec.mode == "eager" else CHECK_EVERY  # tokens between two checks for the end (a host sync)
    rewind = check > 1 and not greedy  # static and graph draw up to CHECK_EVERY - 1 tokens past the end: undone below
    gen = generator or (default_generator(prompt_ids.device) if rewind else None)
    done, out, states = torch.zeros(len(prompt_ids), dtype=torch.bool, device=prompt_ids.device), [], []
    with autocast(prompt_ids.device, dtype):  # one region: the weights' bf16 copies are made once
        z = dec(None, keep=1)[:, -1]  # (B, V)
        for t in range(max_new_tokens):
            if rewind and gen is not None:
                states.append(gen.get_state())  # before y_t's draw
            y = z.argmax(-1) if greedy else draw(filter_probs(torch.softmax(z / temperature, -1), top_k, top_p), gen)
            y = torch.where(done, torch.full_like(y, pad_id), y)
            out.append(y)
            done = done | torch.isin(y, eos_ids)
            if t == max_new_tokens - 1 or (t + 1) % check == 0 and done.all():
                break  # no forward for the last token: nothing conditions on it
            z = dec(y[:, None], keep=1)[:, -1]
    tokens = torch.stack(out, dim=1)
    if check > 1:  # drop the tokens drawn after every row had ended, and give their uniforms back to the generator:
        # it is left where eager leaves it, so that the next batch draws what eager's would
        ended = (torch.isin(tokens, eos_ids).cumsum(1) > 0).all(0)  # (T,): every row ended at or before t
        n = int(ended.int().argmax()) + 1 if bool(ended[-1]) else tokens.shape[1]  # ended never turns back
        tokens = tokens[:, :n]
        if n < len(states):
            gen.set_state(states[n])
    return tokens


def sample_prompts(model, prompts, batch_size, pad_id, eos_ids, max_new_tokens, device, decode, progress=iter, **kw):
    """sample_model over `prompts` (token id lists) in batches of batch_size, yielding (ids, attn, tokens) per batch;
    kw: sample_model's. Every batch in the same decoders (--decode; the prompts left-padded to the longest, so one
    cache serves them all), freed after the last. progress: wraps the batch starts (a tqdm)."""
    width = max(map(len, prompts), default=1)
    with own_decoders():
        for i in progress(range(0, len(prompts), batch_size)):
            ids, attn = (x.to(device) for x in collate_prompts(prompts[i:i + batch_size], pad_id))
            yield ids, attn, sample_model(model, ids, attn, eos_ids, pad_id, max_new_tokens,
                                          decode=decode_mode(decode, device), width=width, **kw)


def default_generator(device):
    """The generator torch.rand uses on `device` when it is given none (None on a device other than CPU and CUDA:
    static decoding there may then draw a few uniforms more than eager, changing the next batches' draws)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.init()  # default_generators is empty until CUDA is initialised
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator if device.type == "cpu" else None


def decode_response(tok, ids, eos_ids):
    """Token ids of one response -> (text, length): cut at the first end id (any of eos_ids, end_ids), special tokens
    skipped, stripped. length counts the tokens before the end."""
    eos_ids = set(eos_ids)
    ends = [i for i, t in enumerate(ids) if t in eos_ids]
    ids = ids[:ends[0]] if ends else ids
    return tok.decode(ids, skip_special_tokens=True).strip(), len(ids)


@torch.no_grad()
def teacher_responses(model, tok, prompts, args, dtype, desc="seqkd: teacher samples"):
    """One sampled response per prompt (τ = --temperature, top-p/top-k as flags), batched with the KV cache."""
    model.eval()
    texts, eos_ids = [], end_ids(tok, *model_configs(model))
    progress = lambda starts: __import__("tqdm").tqdm(starts, desc=desc, dynamic_ncols=True)  # noqa: E731
    for _, _, out in sample_prompts(model, prompts, args.gen_batch_size, tok.pad_token_id, eos_ids, args.max_new_tokens,
                                    args.device, args.decode, progress, temperature=args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, dtype=dtype):
        texts += [decode_response(tok, row, eos_ids)[0] for row in out.tolist()]
    return texts


def seqkd_data(teacher_path, tok, train_rec, path, args, dtype):
    """The teacher's answers to the training prompts, written once to `path` (JSONL) and reused."""
    if os.path.exists(path):
        print(f"seqkd: reusing teacher data {path}")
        return load_records(path)
    teacher = load_frozen(teacher_path, args.device, dtype, args.trust_remote_code, len(tok))
    prompts, kept = [], []
    for r in train_rec:
        ex = tokenize_example(tok, r, args.max_prompt_len, args.max_len, args.template)
        if ex is not None:
            prompts.append(ex[0])
            kept.append(r)
    set_seed(args.seed + rank())  # as a stage: a rerun that skips the finished teacher SFT samples the same answers
    mine = teacher_responses(teacher, tok, prompts[rank()::world()], args, dtype)  # each rank answers its share
    texts = [t for group in zip_longest(*all_gather_objects(mine)) for t in group if t is not None]  # prompt order
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": t} for r, t in zip(kept, texts)]
    with write_guard(path, kept=f"the finished stages in {Path(path).parent.parent}; a rerun samples the same answers"):
        if is_main():
            os.makedirs(Path(path).parent, exist_ok=True)
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))  # written whole or not at all
    return rows


# ----------------------------------------------------------------------------------------------------
# main: the stages. minillm: teacher SFT -> student SFT -> MiniLLM. Baselines share the same stages:
# sft = the student SFT itself; kd and seqkd fine-tune the pre-trained student with the student-SFT
# hyperparameters (the paper's baselines), against the SFT'd teacher.

def sft_stage(path, init, tok, train, val, args, lr, epochs, dtype, teacher_path=None, kd_ratio=0.0):
    """Run one SFT stage into `path` unless it is already done there; continue it from its checkpoint if any."""
    if is_done(path):
        print(f"{Path(path).name}: done, skipping ({path})")
        drop_checkpoints(path)
        return path
    set_seed(args.seed + rank())  # every stage starts from the seed, so a stage started by a rerun starts the same
    resume = find_checkpoint(Path(path) / "ckpt")
    model = load_trained(resume, init, args, len(tok))
    teacher = None
    if kd_ratio > 0:
        teacher = load_teacher(teacher_path, args, dtype, len(tok))
        assert n_logits(teacher) == n_logits(model), "one tokenizer (check_teacher_vocab), so one shared vocabulary"
    sft(model, tok, train, val, path, args, lr, epochs, dtype, teacher, kd_ratio, resume)
    return path


def main(argv=None):
    args = parse_args(argv)
    init_distributed(args)
    with preemptible():
        result = run(args)
    if dist_on():
        torch.distributed.destroy_process_group()
    return result


def run(args):
    """The stages of one --method."""
    set_seed(args.seed + rank())  # dropout and sampling differ between ranks; data order and prompts do not
    dtype = resolve_dtype(args)
    out = Path(args.out)
    print(f"method {args.method} | device {args.device} | dtype {describe_dtype(args, dtype)} | recipe {args.recipe} | out {out}"
          + (f" | {world()} processes" if world() > 1 else ""))

    # Every input is checked before the run folder is touched (errors: one line, exit status 2).
    check_hub_names(args)  # every hub name at once, before anything is loaded: one message names all that are missing
    tok = load_tokenizer(args.student, args.trust_remote_code, args.template)
    records = load_records(args.data, required=("instruction", "output"))
    if len(records) <= args.val_size:
        die(f"{args.data} has {len(records)} records and the first --val-size {args.val_size} are the validation set: "
            "none is left to train on; lower --val-size")
    val_rec, train_rec = records[:args.val_size], records[args.val_size:]
    train = tokenize_dataset(tok, train_rec, args.max_prompt_len, args.max_len, "train", args.template)
    val = tokenize_dataset(tok, val_rec, args.max_prompt_len, args.max_len, "val", args.template)
    if args.method != "sft":
        check_teacher_vocab(args.teacher, tok, args)
    check_world(args, len(train))
    check_positions(args, train + val)
    check_pt_data(args, tok)
    warn_slow_stages(args, train)  # one line per stage that would take days on this device
    prepare_out(out, args)  # refuses a folder that holds a run with other arguments; saves args.json

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
        seq_train = tokenize_dataset(tok, rows, args.max_prompt_len, args.max_len, "seqkd train", args.template)
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
        if not link.exists() and is_main():
            link.symlink_to("student-sft", target_is_directory=True)  # the same checkpoint, not trained twice
        print(f"done: {link} (= {student_path})")
        return
    # (c) MiniLLM
    minillm_path = str(out / "minillm")
    if is_done(minillm_path):
        print(f"minillm: done, skipping ({minillm_path})")
        drop_checkpoints(minillm_path)
        return
    set_seed(args.seed + rank())
    resume = find_checkpoint(Path(minillm_path) / "ckpt")
    teacher = load_teacher(teacher_path, args, dtype, len(tok))
    student = load_trained(resume, student_path, args, len(tok))
    assert n_logits(teacher) == n_logits(student), "one tokenizer (check_teacher_vocab), so one shared vocabulary"
    pt_stream = None
    if uses_pt(args):  # each rank reads every world()-th chunk
        pt_stream = islice(pt_chunks(args.pt_data, tok, args.pt_seq_len, args.seed), rank(), None, world())
    prompts = [p for p, _ in train]
    distill(student, teacher, tok, prompts, minillm_path, args, dtype, pt_stream, resume)
    print(f"done: {minillm_path}")


def check_world(args, n_train):
    """Under DDP a global batch is split evenly: each rank trains on batch/world rollouts (and PT chunks)."""
    w = world()
    if w == 1:
        return
    for name in ["batch_size", "rollouts"] + (["pt_batch_size"] if args.pt_data != "none" and args.pt_coef > 0 else []):
        if getattr(args, name) % w:
            die(f"--{name.replace('_', '-')} {getattr(args, name)} must be a multiple of the number of processes ({w})")
    if n_train < w:
        die(f"{n_train} training examples for {w} processes; use fewer processes or more data")


def uses_pt(args):
    return args.method == "minillm" and args.pt_data != "none" and args.pt_coef > 0


def check_pt_data(args, tok):
    """The L_PT corpus is first read at the first distillation step, after both SFT stages (hours in): open it
    now and read and tokenise its first chunk with the very reader training uses."""
    if not uses_pt(args):
        return
    if looks_like_a_path(args.pt_data) and not os.path.exists(args.pt_data):
        die(f"pre-training corpus {args.pt_data} not found; give an existing .txt/.jsonl file, a hub dataset, or --pt-data none")
    try:
        next(pt_chunks(args.pt_data, tok, args.pt_seq_len, args.seed))
    except Exception as e:  # a hub dataset that cannot be streamed (offline, a typo, no `text` column): many types
        die(f"cannot read the pre-training corpus {args.pt_data!r} ({type(e).__name__}: {first_line(e)}); give a local "
            ".txt/.jsonl file, check the name and the network, or use --pt-data none")


def check_positions(args, examples):
    """Learned position embeddings (GPT-2, OPT) fail deep inside the model on a longer sequence ("index out of
    range in self"): every length a stage will feed the models must fit their positions."""
    need = {"--max-len": max(len(p) + len(r) for p, r in examples)}  # the longest SFT example, after truncation
    if args.method in ("minillm", "seqkd"):  # rollouts: the longest prompt + the sampled response
        need["--max-new-tokens"] = max(len(p) for p, _ in examples) + args.max_new_tokens
    if uses_pt(args):
        need["--pt-seq-len"] = args.pt_seq_len
    for name in [args.student] + ([args.teacher] if args.method != "sft" else []):
        limit = max_positions(load_config(name, args.trust_remote_code))
        for flag, n in need.items():
            if limit and n > limit:
                die(f"{name} has {limit} positions and {flag} asks for sequences of {n} tokens; lower {flag} "
                    f"(or --max-prompt-len)")


def hub_names(args):
    """(flag, name, repo type) of every hub name this run will load; local files and folders are checked elsewhere."""
    names = ([("--teacher", args.teacher, "model")] if args.method != "sft" else []) + [("--student", args.student, "model"),
             ("--data", args.data, "dataset")] + ([("--pt-data", args.pt_data, "dataset")] if uses_pt(args) else [])
    return [n for n in names if not os.path.exists(n[1]) and not looks_like_a_path(n[1])]


def check_hub_names(args):
    """Every hub name is looked up before anything is loaded, and all that cannot be had are named in one message.
    Each is looked for in the local cache and asked of the hub once, with a timeout and no retries (the hub
    libraries retry an unreachable host for about a minute per file); once the hub is unreachable it is asked
    nothing more, and if everything is cached the run reads the cache alone."""
    from huggingface_hub import constants, errors
    offline, reachable, error, missing = constants.HF_HUB_OFFLINE, None, "", {}  # missing: why -> the names
    for flag, name, kind in hub_names(args):
        try:
            cached = in_hub_cache(name, kind)
        except errors.HFValidationError:
            missing.setdefault("not a local path, nor a valid hub name", []).append(f"{name!r} ({flag})")
            continue
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        if not (offline or reachable is False or (cached and reachable)):
            try:
                why, reachable = hub_lookup(name, kind), True
            except Exception as e:  # no network, DNS, a timeout, a proxy: whatever the HTTP client raises
                reachable, error = False, f" ({type(e).__name__}: {first_line(e)[:100]})"
        if not cached and why:
            missing.setdefault(f"not a local path, not in the local cache, and {why}", []).append(f"{name!r} ({flag})")
    if missing:
        die(f"cannot load {'; '.join(', '.join(names) + ': ' + why for why, names in missing.items())}{error}. To fix: "
            f"connect to the network{' and unset HF_HUB_OFFLINE' if offline else ''}, or download each once (`hf download "
            "NAME`, adding `--repo-type dataset` for data; older huggingface_hub: `huggingface-cli download NAME`), or give "
            "a local folder or .jsonl file in its place. `python demo.py` runs the whole method offline")
    if reachable is False:  # everything is cached: read it without asking the hub again (and again)
        print(f"the hub cannot be reached{error}; every model and dataset is in the local cache: reading it alone, as "
              "HF_HUB_OFFLINE=1 does")
        read_cache_only()


def hub_lookup(name, kind):
    """None if the hub has `name`, else why not. One request, a timeout, no retries; no answer raises."""
    from huggingface_hub import HfApi, errors
    try:
        HfApi().repo_info(name, repo_type=kind, timeout=10)
    except errors.GatedRepoError:
        return "it is gated on the hub: accept its terms on its page, then `hf auth login`"
    except errors.RepositoryNotFoundError:
        return f"the hub has no such {kind} (a private one needs `hf auth login`)"


def in_hub_cache(name, kind):
    """Downloaded before? A model needs its config.json in the hub cache; a dataset its snapshot there, or the
    prepared copy `datasets` keeps in its own cache."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    if kind == "model":
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    try:
        return bool(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError: no snapshot in the hub cache
        import datasets
        return (Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___")).exists()


def read_cache_only():
    """What HF_HUB_OFFLINE=1 does, from here on in this process: the hub libraries read their caches and ask nothing."""
    import huggingface_hub
    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


SLOW_CPU_PARAMS = 5e8  # a model this big trains on a CPU for days: say so before starting


def warn_slow_stages(args, train):
    """One line before each stage that would be very slow on the device chosen (today: a model of more than
    SLOW_CPU_PARAMS parameters on a CPU), with an estimate: ≈ 6 FLOPs per parameter per trained token, 2 per
    token a model only runs, at the speed of a 512² fp32 matmul here. Parameter counts come from the configs."""
    names = [args.student] + ([args.teacher] if args.method != "sft" else [])
    if not args.device.startswith("cpu") or not is_main():
        return
    if max(rough_params(n, args.trust_remote_code) for n in names) < SLOW_CPU_PARAMS / 10:
        return  # clearly small (embeddings + 12·layers·width²): spare the tests the meta-device build
    ns, nt = (n_params(n, args.trust_remote_code) for n in (args.student, names[-1]))
    nt = nt if args.method != "sft" else 0
    if max(ns, nt) <= SLOW_CPU_PARAMS:
        return
    tokens = sum(len(p) + len(r) for p, r in train)  # one SFT epoch
    rollout = sum(len(p) for p, _ in train) / len(train) + args.max_new_tokens  # prompt + response, per rollout
    pt = args.pt_batch_size * args.pt_seq_len * uses_pt(args)  # L_PT tokens per step
    teacher_sft = ("teacher-sft", args.teacher, nt, 6 * nt * tokens * args.teacher_epochs)
    student_sft = ("student-sft", args.student, ns, 6 * ns * tokens * args.student_epochs)
    minillm = ("minillm", f"{args.teacher} and {args.student}", ns + nt, args.steps * (
        6 * ns * (args.batch_size * rollout + pt) + 2 * (ns + nt) * rollout * args.batch_size / args.ppo_epochs))
    kd = ("kd", f"{args.teacher} and {args.student}", ns + nt, (6 * ns + 2 * nt) * tokens * args.student_epochs)
    seqkd = ("seqkd", f"{args.teacher} and {args.student}", ns + nt, 2 * nt * tokens + 6 * ns * tokens * args.student_epochs)
    skipped = {"teacher-sft": args.skip_teacher_sft, "student-sft": args.skip_student_sft}
    stages = {"minillm": [teacher_sft, student_sft, minillm], "sft": [student_sft], "kd": [teacher_sft, kd],
              "seqkd": [teacher_sft, seqkd]}[args.method]
    flops = cpu_flops()
    for stage, who, size, work in stages:
        if size > SLOW_CPU_PARAMS and not skipped.get(stage) and not is_done(Path(args.out) / stage):
            print(f"warning: {stage} trains on the CPU with {who} ({size / 1e9:.2f} B parameters): ≈ {work:.1e} FLOPs, "
                  f"about {duration(work / flops)} at this CPU's {flops / 1e9:.0f} GFLOP/s; use a GPU (--device cuda) or "
                  "smaller models (python demo.py runs the whole method on a CPU in minutes)", flush=True)


def n_params(name, trust_remote_code=False):
    """Parameters of a model from its config alone: built on the meta device, no weights read."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(name, trust_remote_code), trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def rough_params(name, trust_remote_code=False):
    """A quick lower bound of n_params for decoder LMs, from the config's sizes."""
    c = load_config(name, trust_remote_code).get_text_config()
    width = getattr(c, "hidden_size", 0) or 0
    return (getattr(c, "vocab_size", 0) or 0) * width + 12 * (getattr(c, "num_hidden_layers", 0) or 0) * width ** 2


def cpu_flops():
    """This machine's fp32 matmul speed, FLOP/s (a 512² product: 0.1-0.5 s)."""
    x = torch.randn(512, 512)
    x @ x  # warm-up
    start = time.perf_counter()
    for _ in range(8):
        x @ x
    return 8 * 2 * 512 ** 3 / (time.perf_counter() - start)


def duration(seconds):
    for unit, s in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * s:
            return f"{seconds / s:.0f} {unit}"
    return f"{seconds:.0f} s"


# ================================================ PLUMBING ================================================
# Loading, logging, checkpoints and resume, several processes. A first reader can stop here.

# ----------------------------------------------------------------------------------------------------
# Helpers of the method: batching and padding, the data stream of L_PT, top-k/p and the draw, autocast, caches,
# the rollout buffer's storage, the SFT schedule and validation loss, and a collection's diagnostics (log only).

def text_start(tok):
    """The special tokens this tokenizer puts before a text: BOS for Llama, Mistral, Gemma and OPT, nothing for
    GPT-2 and Qwen. Models see them at the start of every training text; without it Gemma degrades badly."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):  # where the text begins; anything after it (an EOS) is not kept
        if full[k:k + len(plain)] == plain:
            return full[:k]
    return []


def tokenize_dataset(tok, records, max_prompt_len, max_len, name="data", template="alpaca"):
    out = [tokenize_example(tok, r, max_prompt_len, max_len, template) for r in records]
    kept = [x for x in out if x is not None]
    print(f"{name}: {len(kept)} examples, {len(out) - len(kept)} dropped (prompt > {max_prompt_len} tokens)")
    if not kept:
        die(f"{name}: no examples left: all {len(out)} prompts are longer than --max-prompt-len {max_prompt_len} tokens; "
            "raise --max-prompt-len or check the data")
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
    """Endless stream of seq_len-token chunks of the pre-training corpus (documents joined by the pre-training EOS,
    not --template chat's end of turn, each one starting as the tokenizer starts a text).
    Hub datasets are streamed, so OpenWebText is never downloaded whole."""
    if os.path.exists(spec):
        if spec.endswith(".jsonl"):
            texts = [r["text"] for r in load_records(spec, required=("text",))]
        else:
            texts = [t for t in read_text(spec, "pre-training corpus").split("\n\n") if t.strip()]
        source = lambda: iter(texts)  # noqa: E731
    else:
        import datasets
        source = lambda: (r["text"] for r in datasets.load_dataset(spec, split="train", streaming=True).shuffle(seed=seed))  # noqa: E731
    buf, start = [], text_start(tok)
    while True:
        n_docs = 0
        for text in source():
            n_docs += 1
            buf += start + tok(text, add_special_tokens=False)["input_ids"] + [pretrain_eos(tok)]
            while len(buf) >= seq_len:
                yield torch.tensor(buf[:seq_len])
                buf = buf[seq_len:]
        if n_docs == 0:
            die(f"pre-training corpus {spec} is empty; give a non-empty --pt-data, or --pt-data none")


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


def draw(probs, generator=None, u=None):
    """One token per row of a (B, V) distribution, by inverse CDF: one uniform per row, exact (float64 CDF, no
    rounding bias); u: those uniforms (B, 1) float64 if already drawn. torch.multinomial draws V exponentials per
    row instead: ~10 ms per token at (8, 50257) on one CPU core, a third of the sampling time of small models."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
    if u is None:
        u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    u = u * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)  # first v: cdf_v > u


# ----------------------------------------------------------------------------------------------------
# The LM head at fp32 precision (bf16 GEMMs with fp32 accumulation under bf16), over the shared vocabulary.

class FP32Head(torch.nn.Linear):
    """The LM head, returning fp32 logits for its first `n_out` tokens, whatever the autocast.

    fp32 logits: GPT-2's logits sit near -60, where one bf16 step is 0.25 nats; a bf16 head would put that much noise
    into every log q_θ, log p, reward and KL. Under bf16 the head still runs on tensor cores: fp32 operands are split
    into two bf16 parts and 1-3 bf16 GEMMs with fp32 accumulation give fp32-grade logits (head_matmul; bench.py
    measures each choice against fp64). An fp32 run computes the head in IEEE fp32. Only this one matmul is special.
    n_out: models of one family share a tokenizer but pad their embedding matrix differently (Qwen2.5-1.5B: 151,936
    rows, 7B: 152,064, for 151,665 tokens). The padded rows are no tokens: no KL may sum over them and no sample may
    draw them, so the head computes the shared rows only.
    An ordinary module: fp32_head swaps the class of the model's own nn.Linear, so its parameters, state_dict keys,
    weight tying, save_pretrained, deepcopy, pickling and hooks are those of the stock head."""

    def forward(self, h):  # (..., d) -> (..., n_out) fp32
        w = self.weight[:self.n_out]
        bias = None if self.bias is None else self.bias[:self.n_out].float()
        low = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else w.dtype
        with torch.autocast(h.device.type, enabled=False):
            if low not in (torch.bfloat16, torch.float16):  # an fp32 run: IEEE fp32
                return F.linear(h.float(), w.float(), bias)
            return head_matmul(h, head_weight(self, w, low), low, bias)


def fp32_head(model, vocab_size=None, name="the model"):
    """Make the model's LM head an FP32Head returning the first `vocab_size` logits. The weights are untouched.
    A head with fewer rows than the tokenizer has tokens cannot score every token: `name` is refused in one line."""
    head = model.get_output_embeddings()
    n = vocab_size or head.weight.shape[0]
    if n > head.weight.shape[0]:
        die(f"{name} has {head.weight.shape[0]} logits but its tokenizer {n} tokens; resize its embeddings "
            "(model.resize_token_embeddings) or use the tokenizer it was trained with")
    if type(head) not in (torch.nn.Linear, FP32Head):  # a subclass would lose its own forward
        die(f"{type(model).__name__}'s LM head is a {type(head).__name__}, not an nn.Linear: fp32_head cannot compute it")
    head.__class__, head.n_out = FP32Head, n
    return model


_head_casts = None  # {(FP32Head, dtype): its weight cast to dtype}, inside an autocast() region only


class autocast:
    """bf16 autocast for a bf16 run (nothing for fp32), and the lifetime of the LM heads' weight casts: like torch's
    own cache of the bf16 copies of fp32 weights, a head's cast (head_weight) is made once per region and dropped at
    its end. A sampling loop is one region, so a frozen head is cast once per batch of rollouts, not once per token;
    and no cast outlives its region, so an edit of the weights between regions (an optimizer step, an EMA update
    through .data, a deepcopy) is always seen. An object, not a @contextmanager generator: it may be entered again
    (`amp = autocast(...)`, then `with amp:` per micro-batch), each time with a torch.autocast of its own."""

    def __init__(self, device, dtype):
        self.device_type, self.dtype, self.entered = torch.device(device).type, dtype, []

    def __enter__(self):
        global _head_casts
        amp = torch.autocast(self.device_type, dtype=torch.bfloat16) if self.dtype == torch.bfloat16 else nullcontext()
        amp.__enter__()
        self.entered.append((amp, _head_casts is None))  # (its autocast, whether it opened the casts' region)
        if _head_casts is None:
            _head_casts = {}

    def __exit__(self, *exc):
        global _head_casts
        amp, outer = self.entered.pop()
        if outer:
            _head_casts = None
        return amp.__exit__(*exc)


def head_weight(head, w, dtype):
    """w (the head's rows) as head_matmul reads it: a list of `dtype` parts whose sum is w, one for a bf16 w (a
    teacher's), two (hi, lo) for an fp32 w (a student's master weights), so that no bit a fp32 head would see is
    lost. CUDA tensor cores take the bf16 parts; the CPU fallback their values held in fp32. Cached for the autocast
    region when no gradient needs the cast."""
    kernel = dtype if w.is_cuda and MM_OUT_DTYPE else torch.float32
    cache = _head_casts is not None and not (torch.is_grad_enabled() and w.requires_grad)
    if cache and (head, kernel) in _head_casts:
        return _head_casts[head, kernel]
    parts = split(w, dtype)
    parts = [x.to(kernel) for x in parts]  # rounded to dtype first: the CPU computes the numbers the GPU does
    if cache:
        _head_casts[head, kernel] = parts
    return parts


def split(x, dtype):
    """x as [x] if it is already in `dtype`, else [hi, lo] in `dtype` with hi + lo = x to ~16 mantissa bits."""
    if x.dtype == dtype:
        return [x]
    hi = x.to(dtype)
    return [hi, (x - hi.to(x.dtype)).to(dtype)]


MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(a, b, out_dtype=): bf16 in, fp32 out (CUDA, torch >= 2.8)


class TensorCoreMatmul(torch.autograd.Function):
    """h @ w.T for bf16 h (M, d) and w (n, d): fp32 accumulation and an fp32 result on tensor cores (torch.mm has no
    gradient for out_dtype=, so it is given here). The backward is any bf16 layer's: bf16 matmuls."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return torch.mm(h, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        g = g.to(h.dtype)
        return g @ w, g.t() @ h


def head_matmul(h, w, low=torch.bfloat16, bias=None):
    """The LM head's matmul at fp32 precision from `low` (bf16) GEMMs with fp32 accumulation and fp32 logits.
    Each fp32 operand is split into two bf16 parts (split: hi + lo keeps ~16 bits) and the products hi·hi, hi·lo,
    lo·hi are summed (lo·lo is below fp32's resolution): the logits equal an IEEE-fp32 head's to ~1e-5 nats (bench.py),
    so no rounding reaches a reward or the PPO ratio. A bf16 teacher (bf16 W) with a bf16 h (Llama's RMSNorm returns
    bf16) takes 1 GEMM; with an fp32 h (GPT-2's LayerNorm under autocast) 2; the fp32 student 2 or 3. On tensor
    cores that is still ~5x cheaper than one fp32 GEMM on CUDA cores. w: head_weight's parts.
    CUDA: tensor-core GEMMs. Elsewhere (CPU, or a torch without mm(out_dtype=)): fp32 on the same values, the same
    numbers (a bf16 value and the product of two are exact in fp32)."""
    hs = split(h, low) if h.dtype == torch.float32 else [h.to(low)]
    pairs = [(x, y) for i, x in enumerate(hs) for j, y in enumerate(w) if i + j < 2]  # all but lo·lo
    if w[0].dtype == torch.float32:
        z = sum(F.linear(x.float(), y) for x, y in pairs)
    else:
        z = sum(TensorCoreMatmul.apply(x.reshape(-1, h.shape[-1]), y) for x, y in pairs).view(*h.shape[:-1], w[0].shape[0])
    return z if bias is None else z + bias


def n_logits(model):
    """The number of logits the model returns: its shared vocabulary once fp32_head has sliced it."""
    head = model.get_output_embeddings()
    return getattr(head, "n_out", head.weight.shape[0])


def new_cache(model):
    """An empty KV cache laid out by the model's config: sliding-window layers (Gemma 2/3, Mistral) keep only
    their window instead of the whole sequence."""
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # an older transformers without config=
        return DynamicCache()


# ----------------------------------------------------------------------------------------------------
# Decoders: one model's KV cache over one batch of rollouts, and its forwards (--decode). The samplers see one
# call, dec(new_ids, keep) -> fp32 logits of the last `keep` positions; three ways compute the same numbers:
#   eager   transformers' DynamicCache, grown by concatenation at every forward; the model builds its own masks.
#   static  a cache preallocated at (B, slots) and written in place at a position held on the device, with our own
#           4-D mask and position ids: every forward of a given length has the same shapes and the same addresses,
#           and nothing in it reads a tensor's value on the host (no synchronisation).
#   graph   static, each forward length captured once as a CUDA graph and replayed: one launch instead of
#           hundreds per forward (decoding a small model is bound by kernel launches, not by the GPU).
# A slot is a position of the sequence (the left-padded prompt, then the response); a row's attention reaches the
# real slots at or before its own; position ids count real tokens only, as position_ids_from. A forward of L new
# tokens (L <= 64, after the prompt) runs padded to the next bucket length, so that a few graphs serve every
# catch-up; the padding's slots lie past the real ones (overwritten before any query can see them), and past the
# end all padding shares the last slot, which no real token takes: the last token y_N is fed to neither model.

DECODE_MODES = ("auto", "eager", "static", "graph")
PENDING_BYTES = 2 ** 30  # sample_rollouts: student log-probs (fp32) waiting for the teacher's catch-up, at most
CHECK_EVERY = 8  # static and graph decoding: tokens between two checks that every row has ended (a host sync)
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # graph mode: forward lengths with a graph of their own (longer: static, unreplayed)
CAPTURE_AT = 2  # graph mode: a bucket is captured at its 2nd forward in a decoder's life; its 1st is the warm-up
# that PyTorch's recipe asks for before a capture (a forward like any other, whose logits are used): at least 2. A bucket used once
# (a long catch-up, rare at α = 0.2) costs no capture and keeps no graph output, (B, n, V) fp32.
_decoders = {}  # static and graph: (role, model, mode, B, slots, autocast) -> Decoder, kept for a collection
_checked = weakref.WeakKeyDictionary()  # graph mode: model -> the bucket lengths whose forward HostReads has passed
_no_graphs = weakref.WeakKeyDictionary()  # graph mode: model -> why its forward cannot be captured (said once)


def decode_mode(requested, device):
    """--decode auto: graph on CUDA, eager elsewhere (a CPU gains nothing from fixed shapes)."""
    if requested != "auto":
        return requested
    return "graph" if torch.device(device).type == "cuda" else "eager"


def static_unsupported(model, length, mode):
    """Why `model` cannot decode `length` positions (prompt + response) from a static cache (None: it can). Our 4-D mask is what
    transformers' eager and sdpa attention take; a sliding window shorter than the sequence would need its own
    mask; a sharded model's forward is a collective."""
    cfg = model.config.get_text_config()
    impl = attention_of(model)
    if impl not in ("eager", "sdpa"):
        return f"its attention is {impl} (static decoding builds the 4-D masks that eager and sdpa take)"
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return f"its layers are {sorted(kinds)} (static decoding caches attention layers only)"
    window = getattr(cfg, "sliding_window", None)
    slides = "sliding_attention" in kinds or (getattr(cfg, "layer_types", None) is None and getattr(cfg, "use_sliding_window", True))
    if window and slides and window < length:  # a longer window sees every position: our mask is its mask
        return f"its sliding window ({window}) is shorter than the {length} positions decoded"
    if is_fsdp(model):
        return "it is sharded (--fsdp)"
    if mode == "graph" and next(model.parameters()).device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


def attention_of(model):
    """transformers' attention implementation of the model: eager, sdpa, flash_attention_2, ..."""
    return getattr(model.config.get_text_config(), "_attn_implementation", None) or "eager"


def decoder(model, prompt_ids, prompt_mask, max_new_tokens, mode="eager", width=None, role="student"):
    """A Decoder for this batch. Static and graph decoders are kept and restarted for every batch of the same shape
    until release_decoders (the end of a collection): their caches are allocated once, their graphs captured once.
    width: the prompt is left-padded to this many slots (in a collection: its longest prompt, so that all its batches
    share one decoder). A model that cannot decode statically decodes eagerly, and says why once; in graph mode, one
    whose forward could not be captured decodes statically from then on (Decoder.no_graphs)."""
    model = unwrap(model)
    width = max(width or 0, prompt_ids.shape[1])
    slots = width + max_new_tokens  # the last slot is never a real token's (y_N is fed to no model): padding's
    why = static_unsupported(model, slots, mode) if mode != "eager" else None
    if why:
        if (id(model), why) not in _warned:
            _warned.add((id(model), why))
            print(f"--decode {mode}: {type(model).__name__} decodes eagerly: {why}", file=sys.stderr)
        mode = "eager"
    if mode == "eager":
        return Decoder(model, prompt_ids, prompt_mask, slots, mode, width)
    device = prompt_ids.device.type  # the cache's dtype follows the autocast: part of the key
    amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    key = (role, id(model), mode, prompt_ids.shape[0], slots, amp)  # role: one model may be teacher and student
    if key not in _decoders:  # (it holds the model: the id cannot be another model's while the entry lives)
        for other in [k for k in _decoders if k[:3] == key[:3]]:  # another shape (a collection's smaller last
            del _decoders[other]  # batch): one cache per model and mode at a time
        runs = "static" if mode == "graph" and model in _no_graphs else mode  # its forward could not be captured
        _decoders[key] = Decoder(model, prompt_ids, prompt_mask, slots, runs, width)  # (the key keeps what was asked)
    return _decoders[key].start(prompt_ids, prompt_mask)


_warned = set()


def release_decoders(kept=()):
    """Free the static caches and the graphs, but those of the decoders in `kept`."""
    for key in set(_decoders) - set(kept):
        del _decoders[key]


@contextmanager
def own_decoders():
    """The static caches and graphs made in the block are freed at its end, those made before it kept
    (collect_rollouts: a collection's, so that the training steps until the next one have that memory)."""
    kept = set(_decoders)
    try:
        yield
    finally:
        release_decoders(kept)


class Decoder:
    """See the section comment. A decoder is filled by calls dec(new_ids, keep): the first call runs the prompt
    followed by new_ids (None: the prompt alone); each returns the fp32 logits (B, keep, V) at the last `keep`
    positions it ran."""

    def __init__(self, model, prompt_ids, prompt_mask, slots, mode, width):
        self.model, self.mode, self.slots, self.width = model, mode, slots, width
        self.graphs, self.pool, self.side, self.uses = {}, None, None, {}
        B, device = prompt_ids.shape[0], prompt_ids.device
        if mode == "eager":
            self.attn = torch.cat([prompt_mask, prompt_mask.new_ones(B, slots - prompt_mask.shape[1])], 1)  # once
            self.cache, self.filled, self.prompt = new_cache(model), 0, prompt_ids
            return
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # slots filled: where the next token goes
        self.slot = torch.arange(slots, device=device)  # (slots,): which slots a query may see
        self.attn = torch.zeros(B, slots, dtype=torch.bool, device=device)
        self.positions = torch.zeros(B, slots, dtype=torch.long, device=device)
        self.ids = torch.zeros(B, BUCKETS[-1], dtype=torch.long, device=device)  # graph inputs, padded to their length
        self.cache = slot_cache(model, self.pos, slots)
        self.additive = None if attention_of(model) == "sdpa" else model.get_input_embeddings().weight.dtype  # eager adds it
        self.start(prompt_ids, prompt_mask)

    def start(self, prompt_ids, prompt_mask):
        """A new batch in the same slots (graph mode reuses the cache, the buffers and the graphs)."""
        P, pad = prompt_ids.shape[1], self.width - prompt_ids.shape[1]
        self.prompt = torch.cat([prompt_ids.new_zeros(prompt_ids.shape[0], pad), prompt_ids], 1)  # left-padded to width
        self.pos.zero_()
        self.attn.copy_(torch.cat([prompt_mask.new_zeros(prompt_mask.shape[0], pad), prompt_mask,
                                   prompt_mask.new_ones(prompt_mask.shape[0], self.slots - P - pad)], 1).bool())
        self.positions.copy_(position_ids_from(self.attn.long()))
        self.filled = 0  # slots filled, on the host too: the next forward knows its shapes without a sync
        return self

    def __call__(self, new_ids, keep):
        first = self.filled == 0
        ids = new_ids if not first else self.prompt if new_ids is None else torch.cat([self.prompt, new_ids], 1)
        L = ids.shape[1]
        if self.mode == "eager":
            logits = forward(self.model, ids, self.attn[:, :self.filled + L], self.cache, logits_to_keep=keep)
            self.filled += L
            return logits.float()
        if first or L > BUCKETS[-1]:  # the prompt, or a long catch-up: once per batch at most, shapes vary
            logits = self.run(ids, keep)
        else:  # padded to its bucket: static runs exactly what graph replays
            n = next(b for b in BUCKETS if b >= L)
            self.ids[:, :L].copy_(ids)
            self.uses[n] = self.uses.get(n, 0) + 1
            logits = (self.graph_forward(n) if self.mode == "graph" else self.run(self.ids[:, :n]))[:, L - keep:L]
        self.pos += L
        self.filled += L
        return logits

    def run(self, ids, keep=0):
        """The static forward over ids (B, L) at slots pos..pos+L-1, reading pos on the device only."""
        q = new_slots(self.pos, ids.shape[1], self.slots)  # (L,)
        see = (self.attn[:, None, :] & (self.slot <= q[:, None])) | (self.slot == q[:, None])  # (B, L, slots)
        # (a pad slot sees itself: a row of -inf would give NaN keys that even a masked product carries forward)
        mask = see[:, None] if self.additive is None else \
            torch.zeros(see[:, None].shape, dtype=self.additive, device=see.device).masked_fill(~see[:, None], torch.finfo(self.additive).min)
        kw = {cache_argument(self.model): self.cache, "use_cache": True}
        if keep:
            kw["logits_to_keep"] = keep
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=self.positions.index_select(1, q), **kw)
        return out.logits.float()

    def graph_forward(self, n):
        """Graph mode's run(self.ids[:, :n]): the bucket's first forwards are warm-ups, its CAPTURE_AT-th is captured,
        and every one from then on replays the graph. A model whose forward cannot be captured (it reads a tensor on
        the host, say) decodes statically from then on, and says why."""
        if self.uses[n] < CAPTURE_AT:
            return self.warm_up(n)
        if n not in self.graphs:
            stream = torch.cuda.current_stream()
            try:
                self.graphs[n] = self.capture(n)
            except RuntimeError as e:  # torch.cuda.graph leaves its capture stream current when the capture fails
                torch.cuda.set_stream(stream)
                torch.cuda.synchronize()
                self.no_graphs((str(e.__context__ or e).strip().splitlines() or [type(e).__name__])[0])  # the cause
                return self.run(self.ids[:, :n])
        graph, out = self.graphs[n]
        graph.replay()
        return out

    def no_graphs(self, why):
        """This model decodes statically from now on, in this collection and the next ones."""
        self.mode, self.graphs = "static", {}
        if self.model in _no_graphs:  # said already (one model, two roles)
            return
        _no_graphs[self.model] = why
        print(f"--decode graph: {type(self.model).__name__} decodes statically, without graphs: its forward "
              f"could not be captured ({why})", file=sys.stderr)

    @staticmethod
    @contextmanager
    def graph_region():
        """What a captured forward runs under, its warm-ups too: weight casts (autocast's bf16 copies, the LM head's
        split) made afresh inside it, since a cast cached outside a graph would be freed at the end of its autocast
        region while the graph still read it."""
        global _head_casts
        saved, _head_casts = _head_casts, None
        try:
            amp = torch.is_autocast_enabled("cuda")
            with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False):
                yield
        finally:
            _head_casts = saved

    def warm_up(self, n):
        """A forward before the capture, on a side stream as PyTorch's recipe asks (its lazy initialisations, made
        outside any graph); its logits are the step's. It runs under HostReads: a forward that would fail the
        capture is refused before it (a failed capture can leave the allocator's graph pool behind), and this model
        decodes statically. Checked once per model and length in a process, not at every collection (its forward
        goes through Python at every operator: ~10 ms for gpt2-xl's)."""
        # Each stream waits for the other's work. The logits, made on the side stream and freed on the main one, need
        # no record_stream: the side stream allocates nothing before its next wait (here) or a capture's synchronize.
        side = self.side = self.side or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        check = n not in _checked.setdefault(self.model, set())
        with torch.cuda.stream(side), self.graph_region(), (HostReads() if check else nullcontext()) as reads:
            logits = self.run(self.ids[:, :n])
        torch.cuda.current_stream().wait_stream(side)
        if check and reads.seen:
            self.no_graphs(f"it reads a tensor on the host: {reads.seen[0]}")
        elif check:
            _checked[self.model].add(n)
        return logits

    def capture(self, n):
        """Capture run(ids[:, :n]) as a CUDA graph (its forward's kernels, replayed on the same buffers). The buckets'
        graphs share one memory pool, so a graph's output is valid until the next replay of this decoder: the
        sampler consumes each first."""
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        with self.graph_region(), torch.cuda.graph(graph, pool=self.pool):
            out = self.run(self.ids[:, :n])
        return graph, out


class HostReads(TorchDispatchMode):
    """Records, at torch's dispatcher, the operators of a block that a CUDA graph cannot capture, each of which makes
    the host wait for the device: a tensor's value read on the host (.item(), bool(), int(), torch.arange(tensor)),
    an output whose shape depends on the values (nonzero, a boolean index, unique, repeat_interleave by a tensor),
    and a copy between the host and the device (.cpu(), .tolist() of a GPU tensor, a host tensor moved to the GPU)."""
    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::equal",
             "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if (name in self.READS
                or name == "aten::index" and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
                or name == "aten::repeat_interleave" and func._overloadname != "self_int" and kwargs.get("output_size") is None
                or name in ("aten::_to_copy", "aten::copy_") and isinstance(out, torch.Tensor)
                and {t.device.type == "cpu" for t in [*args[:2], out] if isinstance(t, torch.Tensor)} == {True, False}):
            self.seen.append(name)
        return out


def cache_argument(model):
    """transformers renamed the forward's `past_key_values` to `cache` in 5.2x: the name this model takes
    (looked up once per model class, not at every forward)."""
    cls = type(model)
    if cls not in _cache_argument:
        _cache_argument[cls] = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return _cache_argument[cls]


_cache_argument = {}


def new_slots(pos, L, slots):
    """The slots of L new tokens: pos, pos+1, ...; a padded forward's padding past the end shares the last slot."""
    return (pos + torch.arange(L, device=pos.device)).clamp(max=slots - 1)


def slot_cache(model, pos, slots):
    """transformers' static cache with one change: every layer writes the new keys and values at slots pos.. given
    by our device tensor `pos` (transformers' StaticLayer keeps a write position of its own, which a padded graph
    forward would move too far). Allocated at the first forward, (B, heads, slots, head_dim) per layer."""
    from transformers.cache_utils import Cache, StaticLayer

    class SlotLayer(StaticLayer):
        def lazy_initialization(self, k, v):
            self.device, self.dtype = k.device, k.dtype
            self.keys = k.new_zeros(k.shape[0], k.shape[1], slots, k.shape[-1])
            self.values = v.new_zeros(v.shape[0], v.shape[1], slots, v.shape[-1])
            self.is_initialized = True

        def update(self, k, v, *args, **kwargs):
            if not self.is_initialized:  # at the prompt's forward, before any graph is captured
                self.lazy_initialization(k, v)
            at = new_slots(pos, k.shape[-2], slots)  # where Decoder.run's mask and positions put them
            self.keys.index_copy_(2, at, k)
            self.values.index_copy_(2, at, v)
            return self.keys, self.values

        def get_seq_length(self):
            return pos

    return Cache(layers=[SlotLayer(max_cache_len=slots) for _ in range(model.config.get_text_config().num_hidden_layers)])


def store_dtype(dtype):
    """What the rollout buffer keeps the teacher's log-probabilities in. fp32 runs: fp32. bf16 runs: fp16, at the
    same memory as bf16 but with an 8x finer step (log-probabilities are <= 0 and bounded, so fp16's range is enough)."""
    return torch.float16 if dtype in (torch.bfloat16, torch.float16) else dtype


def teacher_store(args, n_rollouts, vocab_size, dtype):
    """The rollout buffer's one big tensor: the teacher's log p(·|y_<t) at every response position of a
    collection, (R, max_new_tokens, V), allocated once and written in place while sampling. At the paper's sizes
    256 × 256 × 50,257 × 2 bytes = 6.6 GB; --teacher-logits offload puts it in pinned CPU memory, recompute
    keeps none and runs the teacher again on every micro-batch (the official code's way)."""
    if args.teacher_logits == "recompute" or not args.single_step:
        return None
    shape = (n_rollouts, args.max_new_tokens, vocab_size)
    if args.teacher_logits == "offload" and torch.device(args.device).type == "cuda":
        return pinned_zeros(shape, store_dtype(dtype))
    device = "cpu" if args.teacher_logits == "offload" else args.device
    return torch.zeros(shape, dtype=store_dtype(dtype), device=device)


def pinned_zeros(shape, dtype):
    """Zeros in page-locked host memory of exactly the size asked. torch.empty(pin_memory=True) goes through
    PyTorch's caching host allocator, which rounds every block up to a power of two (18.5 GiB asked: 32 GiB
    pinned, in torch 2.11 and, by default, 2.13). Here: plain host memory, page-locked in place with
    cudaHostRegister and released when the last tensor viewing it is gone. The copies see an ordinary pinned
    tensor: DMA, non-blocking."""
    import numpy as np
    import weakref
    host = np.zeros(math.prod(shape) * torch.empty((), dtype=dtype).element_size(), dtype=np.uint8)
    cudart = torch.cuda.cudart()
    if cudart.cudaHostRegister(host.ctypes.data, host.nbytes, 0) != cudart.cudaError.success:  # then pageable: correct, slower
        print("warning: cudaHostRegister failed; --teacher-logits offload uses pageable memory (slower copies)", file=sys.stderr)
    else:
        weakref.finalize(host, cudart.cudaHostUnregister, host.ctypes.data)  # before numpy frees the memory
    return torch.from_numpy(host).view(dtype).view(shape)  # holds `host`: it lives as long as any view of it


def offloaded(store, device):
    """Is the teacher's log-prob store in host memory while the models run on an accelerator (--teacher-logits offload)?"""
    return store.device.type == "cpu" and torch.device(device).type != "cpu"


def store_write(store, start, logp):
    """store[:, start:start+L] = log p, (B, L, V), clamped so that fp16 holds it (-inf would make 0·inf = NaN in a
    KL). Offloaded, one contiguous non-blocking copy per row into the pinned rows (row-major (R, N, V): a row's
    chunk is contiguous): a strided target would make each copy a synchronous pass through a pageable temporary."""
    src = logp.clamp(min=-1e4).to(store.dtype)  # converted on the device: the copy itself moves store bytes only
    if not offloaded(store, logp.device):
        store[:, start:start + src.shape[1]].copy_(src)
        return
    for b in range(src.shape[0]):  # sample_rollouts synchronises before the store is read
        store[b, start:start + src.shape[1]].copy_(src[b], non_blocking=True)


def landed(store, device):
    """The store, once every non-blocking copy into it has landed (offloaded: host memory written by the device)."""
    if offloaded(store, device) and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return store


def store_read(store, rows, n, device):
    """The store's rows `rows` (a LongTensor of buffer rows), first n positions, on `device`: (len(rows), n, V).
    Offloaded, each row is one contiguous non-blocking copy from pinned memory (store[rows] would gather them
    into a pageable temporary first, and the upload from pageable memory is synchronous)."""
    if not offloaded(store, device):
        return store[rows.to(store.device), :n].to(device)
    out = torch.empty(len(rows), n, store.shape[-1], dtype=store.dtype, device=device)
    for j, r in enumerate(rows.tolist()):
        out[j].copy_(store[r, :n], non_blocking=True)  # stream-ordered before the loss that reads `out`
    return out


def trim(mb):
    """Drop the columns that are padding in every row of a micro-batch (saves compute). In fp32 this changes nothing;
    under bf16 it does: a row's logits depend on how much left padding it carries (the kernels and the attention's
    sums change with the width), by up to 0.65 nats on an 8-layer cut of SmolLM2-135M (fp32: 1e-5). So a row's
    log q_old and its loss are computed in the same micro-batch, at the same width (micro_batch_groups)."""
    P = int(mb["prompt_mask"].sum(1).max())
    N = int(mb["mask"].sum(1).max())
    return {k: v if v.dim() == 1 else v[:, -P:] if k.startswith("prompt") else v[:, :N] for k, v in mb.items()}


def micro_batch_groups(minibatches, micro_batch_size):
    """The micro-batches the loss will run: each minibatch (a list of rows) cut into runs of --micro-batch-size rows,
    the last one shorter, exactly as minillm_backward cuts it. -> list of row lists."""
    return [mb[i:i + micro_batch_size] for mb in minibatches for i in range(0, len(mb), micro_batch_size)]


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


def cosine_lr(step, total, lr, min_lr, warmup=0):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def eval_loss(model, data, pad_id, batch_size, dtype, device):
    """Token-mean validation loss; each rank evaluates its share and the sums are all-reduced."""
    model.eval()
    total, n = 0.0, 0.0
    mine = data[rank()::world()]
    n_batches = math.ceil(math.ceil(len(data) / world()) / batch_size)  # the same on every rank (FSDP: collectives)
    for i in range(0, n_batches * batch_size, batch_size):
        examples = mine[i:i + batch_size]
        ids, attn, labels = (x.to(device) for x in collate_sft(examples or data[:1], pad_id))
        s, c = sft_loss(model, ids, attn, labels, dtype)
        if examples:  # an empty share still runs the forward, and counts nothing
            total, n = total + s.item(), n + c.item()
    model.train()
    return all_sum(total) / max(all_sum(n), 1)


# On-policy distillation can lower the reverse KL while the samples degenerate: answers that never end, loops,
# a few strings the teacher rates highly (the paper's "reward hacking"). These counts show it per collection.
def rollout_diagnostics(tokens, mask, eos_ids, top1=None, n=4):
    """Sums over a collection (so that ranks can add them) that reveal degenerate samples:
    rows; no_eos = rows that end without EOS (they hit --max-new-tokens); grams = n-grams inside responses (EOS
    excluded), repeated = those equal to an earlier n-gram of the same response; distinct = distinct responses;
    agree = positions where the student's and the teacher's argmax agree (top1: (B, N) 0/1, masked)."""
    eos_ids = set(eos_ids)
    ended = (torch.isin(tokens, torch.tensor(sorted(eos_ids), device=tokens.device)) & mask.bool()).any(1)  # (B,)
    responses = responses_of(tokens, mask)
    grams = repeated = 0
    for ids in responses:
        ids = [t for t in ids if t not in eos_ids]
        seen = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        grams, repeated = grams + len(seen), repeated + len(seen) - len(set(seen))
    return {"rows": tokens.shape[0], "no_eos": int((~ended).sum()), "grams": grams, "repeated": repeated,
            "distinct": len(set(responses)), "agree": float(top1.sum()) if top1 is not None else float("nan")}


def responses_of(tokens, mask):
    """Each row's response as a tuple of token ids (up to and including its EOS)."""
    return [tuple(row[:m]) for row, m in zip(tokens.tolist(), mask.sum(1).long().tolist())]


# The warnings compare each collection with the run's FIRST one, the SFT student's own samples: a change, not a
# level. A student that starts with long answers is not blamed for its start, and a drift shows at the second
# collection (a fixed threshold held for three collections fired at the fourth at best, or never). Margins:
DRIFT_MARGINS = {"no_eos": 0.2,     # share of responses that hit --max-new-tokens without EOS: +0.2 (25% -> 45%)
                 "len": 0.5,        # mean response length: +50% of the first collection's
                 "rep4": 0.1,       # share of 4-grams that repeat within their response: +0.1
                 "distinct": 0.2}   # distinct responses / responses: -0.2
CLIP_RISE = 0.2  # clip fraction: +0.2 within one collection over its first step, where ρ = w (the policy has not moved)
DRIFT_NAMES = {"no_eos": "no-EOS", "len": "mean length", "rep4": "repeated 4-grams", "distinct": "distinct responses"}


def drift(first, now):
    """How far each diagnostic of collection `now` has moved from the `first` collection towards degeneration,
    in margins (1.0 = one margin; <= 0: no worse than at the start)."""
    m = DRIFT_MARGINS
    return {"no_eos": (now["no_eos"] - first["no_eos"]) / m["no_eos"], "len": (now["len"] / first["len"] - 1) / m["len"],
            "rep4": (now["rep4"] - first["rep4"]) / m["rep4"], "distinct": (first["distinct"] - now["distinct"]) / m["distinct"]}


def badness(rows):
    """Distillation log rows (one per step; each carries its collection's diagnostics, `collection_step` and
    `clip_frac`) -> per row, how far each rule has moved towards trouble, in margins. Clip: this step's clip
    fraction against its collection's first step; drift, on a collection's first row only (its other rows share
    its diagnostics): this collection against the first one."""
    starts, out = {}, []
    for r in rows:
        start = starts.setdefault(r["collection_step"], r)
        out.append({"clip": (r["clip_frac"] - start["clip_frac"]) / CLIP_RISE, **(drift(rows[0], r) if start is r else {})})
    return out


def training_warning(rows):
    """The warning line for the last of `rows` (the log so far), or None. A rule speaks when it has moved one
    whole margin past where it last spoke (at first: past the start): once, and again only when it got worse."""
    said = {}
    for b in badness(rows):
        new = [k for k, v in b.items() if v >= said.get(k, 0.0) + 1 - 1e-9]  # 1e-9: 0.45 - 0.25 is 0.2 here
        said.update({k: b[k] for k in new})
    if not new:
        return None
    first, last = rows[0], rows[-1]
    start = next(r for r in rows if r["collection_step"] == last["collection_step"])
    parts = []
    fmt = lambda k, v: f"{v:.1f}" if k == "len" else f"{v:.0%}"
    drifted = [f"{DRIFT_NAMES[k]} {fmt(k, first[k])} -> {fmt(k, last[k])}" for k in new if k != "clip"]
    if drifted:
        parts.append(f"{', '.join(drifted)} since the first collection (the SFT student's own samples), while the "
                     f"reverse KL went {first['rkl']:.2f} -> {last['rkl']:.2f}; try a larger --alpha or --pt-coef, a lower "
                     "--lr or fewer --ppo-epochs, and evaluate with a larger --max-new-tokens")
    if "clip" in new:
        parts.append(f"the clip fraction rose {start['clip_frac']:.2f} -> {last['clip_frac']:.2f} within one collection: "
                     "the policy moves too far for this many inner epochs; try a lower --lr or fewer --ppo-epochs")
    return f"warning: step {last['step']}: " + "; ".join(parts) + " (docs/diagnostics.md)"


def rollout_stats(buf, seconds, eos_ids):
    """Per-token means of a collection over every rank's rollouts (for the log only), and the diagnostics:
    no_eos, rep4 (repeated 4-grams / 4-grams), distinct (distinct responses / responses, over every rank's),
    top1 (student-teacher argmax agreement per sampled position)."""
    n, rows = all_sum(buf["mask"].sum()), all_sum(buf["mask"].shape[0])
    d = {k: all_sum(v) for k, v in rollout_diagnostics(buf["tokens"], buf["mask"], eos_ids, buf.get("top1")).items()}
    if world() > 1:  # distinct over every rank's rollouts: not a sum of each rank's count
        d["distinct"] = len(set().union(*all_gather_objects(set(responses_of(buf["tokens"], buf["mask"])))))
    return {"rkl": all_sum(buf["kl"].sum()) / n, "w_mean": all_sum(buf["w"].sum()) / n, "w_max": all_max(buf["w"].max()),
            "len": n / rows, "reward": all_sum(buf["rewards"].sum()) / n, "sample_tok_s": n / seconds,
            "no_eos": d["no_eos"] / rows, "rep4": d["repeated"] / max(1, d["grams"]), "distinct": d["distinct"] / rows,
            "top1": d["agree"] / n}


# ----------------------------------------------------------------------------------------------------
# Loading: local files or hub names -> records, tokenizers, models. Bad input ends in one line (die).

def load_records(spec, split="train", required=()):
    """A local .jsonl (one object per line) or a hub dataset name -> list of dicts, each with the `required` keys.
    Bad input stops with the file and line number. Blank lines, a BOM and CRLF line ends are accepted."""
    if os.path.exists(spec):
        rows = []
        for n, line in enumerate(read_text(spec, "data file").split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                die(f"{spec}:{n}: not valid JSON ({e.msg}); fix or delete that line")
            except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, arrays nested thousands deep
                die(f"{spec}:{n}: JSON that Python cannot read ({type(e).__name__}: {first_line(e)[:100]}); fix or delete that line")
            check_record(rows[-1], required, f"{spec}:{n}")
        return rows
    if looks_like_a_path(spec):
        die(f"data file {spec} not found; give an existing .jsonl file (one JSON object per line) or a hub dataset name")
    import datasets  # imported lazily: only the hub path needs it
    try:
        rows = list(datasets.load_dataset(spec, split=split))
    except Exception as e:  # offline, a typo, no such split: `datasets` raises many unrelated types
        die(f"cannot load the dataset {spec!r} ({type(e).__name__}: {first_line(e)}); give a local .jsonl file, "
            "or check the name and the network")
    # A hub dataset is a table: a field that some records lack is None in them, as if absent
    rows = [{k: v for k, v in rec.items() if v is not None} for rec in rows]
    for i, rec in enumerate(rows):
        check_record(rec, required, f"{spec} record {i}")
    return rows


def read_text(path, what="file"):
    """A local text file that must be UTF-8 (an initial BOM is skipped, CRLF line ends become LF). A folder, an
    unreadable file or other bytes (UTF-16, binary) stop with the file and the line of the first bad byte."""
    if os.path.isdir(path):
        die(f"{what} {path} is a folder; give a file")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        die(f"cannot read {what} {path} ({e.strerror}); check the path and its permissions")
    bad = data.find(b"\0")  # valid UTF-8, but no text file holds NUL bytes: UTF-16 without a BOM, or binary
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = e.start if bad < 0 else min(bad, e.start)
    if bad >= 0:
        line = data.count(b"\n", 0, bad) + 1
        kind = "UTF-16 text, not UTF-8 (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") \
            else f"not UTF-8 text (byte 0x{data[bad]:02x} at offset {bad}{': UTF-16 or binary' if data[bad] == 0 else ''})"
        die(f"{path}:{line}: {kind}; save the {what} as UTF-8")
    return text.replace("\r\n", "\n")


def looks_like_a_path(spec):
    return spec.endswith((".jsonl", ".json", ".txt")) or spec.startswith((".", "/", "~"))


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:300]


def check_record(rec, required, where):
    """The fields that tokenisation reads must be strings (`output` may also be a non-empty list of references,
    as the test sets have): a number or null would otherwise fail deep inside the tokenizer or the model."""
    if not isinstance(rec, dict):
        die(f"{where}: expected a JSON object, got {type(rec).__name__}")
    # `prompt` (an already formatted prompt, as some test sets have) stands in for `instruction`
    missing = [k for k in required if k not in rec and not (k == "instruction" and "prompt" in rec)]
    if missing:
        die(f"{where}: the record has no {missing[0]!r} field; every record needs {' and '.join(map(repr, required))}")
    for k in [k for k in dict.fromkeys([*required, "instruction", "input", "output", "prompt"]) if k in rec]:
        v = rec[k]
        refs = k == "output" and isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v)
        if not (isinstance(v, str) or refs):
            shown = json.dumps(v, default=str)
            die(f"{where}: {k!r} must be a string{' or a non-empty list of strings' if k == 'output' else ''}, got "
                f"{shown[:60] + ('...' if len(shown) > 60 else '')}; fix that record")
        for text in v if refs else [v]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape (\ud800-\udfff): no tokenizer can read it
                die(f"{where}: {k!r} holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); fix that record")


def resolve_dtype(args):
    """--dtype -> the compute dtype (describe_dtype says why)."""
    if args.dtype == "auto":
        return torch.bfloat16 if native_bf16(args.device) else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]


def native_bf16(device):
    """A CUDA device whose tensor cores compute bf16 (compute capability 8.0+, or what torch says of a ROCm GPU). A T4
    or a V100 runs bf16 by emulation, slower than fp32 (fp16 would need loss scaling, which this code does not do)."""
    if torch.device(device).type != "cuda":
        return False
    try:  # about the current device: init_distributed made it `device`
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation (and counts emulation as support)
        return torch.cuda.get_device_capability(device) >= (8, 0)


def describe_dtype(args, dtype):
    """For the first log line: the dtype, and why when --dtype auto chose it."""
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    if args.dtype != "auto":
        return name
    if torch.device(args.device).type != "cuda":
        return f"{name} (auto: not a CUDA device)"
    gpu = torch.cuda.get_device_name(args.device)
    return f"{name} (auto: {gpu} {'computes bf16 natively' if dtype == torch.bfloat16 else 'has no native bf16'})"


def cannot_load(name, e):
    from huggingface_hub import constants
    hint = "unset HF_HUB_OFFLINE to download it" if constants.HF_HUB_OFFLINE else "HF_HUB_OFFLINE=1 uses the local cache only"
    die(f"cannot load {name!r} ({first_line(e)}); give a local folder with config.json, or check the name and the "
        f"network ({hint}); `python demo.py` runs the whole method offline")


def load_tokenizer(name, trust_remote_code=False, template="alpaca"):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # not on disk, not on the hub, offline, needs remote code
        cannot_load(name, e)
    if template == "chat":
        use_chat_end_token(tok, name)
    if tok.eos_token_id is None:
        die(f"the tokenizer of {name} has no EOS token; MiniLLM needs one to end responses (set eos_token in its tokenizer_config.json)")
    if tok.pad_token_id is None:  # padding is always masked by attention_mask, never by comparing ids
        tok.pad_token = tok.eos_token
    return tok


def use_chat_end_token(tok, name):
    """--template chat: a response ends with the token the chat template closes an assistant turn with
    (<|im_end|> for Qwen and SmolLM2, <|eot_id|> for Llama 3, <end_of_turn> for Gemma), which is what sampling
    stops at and what SFT teaches; it becomes the tokenizer's EOS (saved with every checkpoint)."""
    if not getattr(tok, "chat_template", None):
        die(f"the tokenizer of {name} has no chat template; use --template alpaca, or a tokenizer with one")
    tok.pretrain_eos_token_id = tok.eos_token_id  # L_PT's documents are still joined by it (pretrain_eos)
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OK"}]
    text = tok.apply_chat_template(turn, tokenize=False)
    after = tok(text[text.rindex("OK") + 2:], add_special_tokens=False)["input_ids"]
    if after and after[0] in tok.all_special_ids + [t for t in tok.added_tokens_decoder] and after[0] != tok.eos_token_id:
        tok.eos_token = tok.convert_ids_to_tokens(after[0])


def pretrain_eos(tok):
    """The EOS that ends a document in pre-training: the tokenizer's own, even after --template chat made the end of
    the assistant's turn its eos_token (use_chat_end_token)."""
    eos = getattr(tok, "pretrain_eos_token_id", None)
    return tok.eos_token_id if eos is None else eos


def end_ids(tok, *configs):
    """Every token id that ends a response, sorted: the tokenizer's EOS (under --template chat the end of the
    assistant's turn, and the EOS it replaced) and every eos_token_id listed by the models' config.json and
    generation_config.json (an int or a list: Llama 3 lists three, Gemma-it and Qwen2.5-Instruct two).
    configs: model_configs(model) or named_configs(name) of each model (None where a model has none)."""
    ids = {tok.eos_token_id, getattr(tok, "pretrain_eos_token_id", None)}
    for config in configs:
        text = config.get_text_config() if hasattr(config, "get_text_config") else None  # a multimodal model's LM
        for c in (config, text):
            e = getattr(c, "eos_token_id", None)
            ids |= set(e) if isinstance(e, (list, tuple)) else {e}
    return sorted(int(i) for i in ids if i is not None)


def model_configs(model):
    """A loaded model's config and generation config (end_ids)."""
    return [unwrap(model).config, getattr(unwrap(model), "generation_config", None)]


def named_configs(name, trust_remote_code=False):
    """The config and generation config of a hub name or folder, without loading weights (end_ids)."""
    from transformers import GenerationConfig
    try:
        gen = GenerationConfig.from_pretrained(name)
    except (OSError, ValueError):  # no generation_config.json: the config's eos_token_id is all there is
        gen = None
    return [load_config(name, trust_remote_code), gen]


def max_positions(config):
    """The longest sequence a model takes (learned position embeddings: GPT-2's n_positions, OPT's and Llama's
    max_position_embeddings), or None when its config does not say."""
    config = config.get_text_config()
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def load_config(name, trust_remote_code=False):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        cannot_load(name, e)


def load_model(name, device, dtype=torch.float32, trust_remote_code=False, vocab_size=None):
    """Weights in `dtype`. Trained models stay fp32 (master weights) and run under bf16 autocast:
    pure-bf16 weights would lose AdamW updates at lr 5e-6. We save safetensors; transformers reads an older
    pytorch_model.bin with torch.load(weights_only=True), so no checkpoint can run code either way.
    vocab_size: the tokenizer's length; the head returns fp32 logits for these tokens only (fp32_head)."""
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        cannot_load(name, e)
    return fp32_head(model, vocab_size, name).to(device)


def load_trained(resume, init, args, vocab_size=None):
    """The model a stage trains, in fp32 (master weights): from its resume checkpoint when that holds the weights
    whole (one process, DDP), else from `init`. --fsdp: sharded as it loads (load_sharded); an --fsdp checkpoint
    holds shards, which load_train_state reads into the sharded model, so `init` is not read at all then."""
    sharded = resume is not None and (Path(resume) / "dcp").exists()
    if args.fsdp:
        return load_sharded(init, args, resolve_dtype(args), torch.float32, vocab_size, read=not sharded)
    return load_model(str(resume) if resume and not sharded else init, args.device, torch.float32, args.trust_remote_code,
                      vocab_size)


def load_frozen(name, device, dtype=torch.float32, trust_remote_code=False, vocab_size=None):
    """A model that is only evaluated (the teacher, SeqKD's teacher, eval.py's models, the local judge, the demo's):
    in eval mode (no dropout) and frozen, so that no forward records a graph and no one can train it by mistake."""
    return load_model(name, device, dtype, trust_remote_code, vocab_size).eval().requires_grad_(False)


def load_teacher(path, args, dtype, vocab_size=None):
    """The frozen teacher p in the compute dtype, in eval mode: whole on every rank, or (--fsdp-teacher) sharded as
    it loads (load_sharded), each rank holding 1/K of it."""
    if args.fsdp_teacher:
        return load_sharded(path, args, dtype, dtype, vocab_size, frozen=True)
    return load_frozen(path, args.device, dtype, args.trust_remote_code, vocab_size)


def load_sharded(name, args, dtype, param_dtype, vocab_size=None, frozen=False, read=True):
    """--fsdp: a model that holds 1/K of its weights on each rank from the first byte. Every rank builds it with
    its parameters on the meta device (no memory; params_on_meta) and shards it; rank 0 alone reads the checkpoint,
    one tensor at a time, and every rank keeps its shard of each (fill_shards). Today's 70B teacher on one node of 8
    GPUs: one read of 140 GB, not 8 copies in host memory. The shards are then on args.device, in `param_dtype`
    (fp32 master weights for a trained model); `dtype` is the compute dtype (shard). frozen: a teacher, in eval mode
    with no gradients. read=False: the shards are left unset (a DCP checkpoint is about to fill them)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    config = load_config(name, args.trust_remote_code)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=param_dtype, trust_remote_code=args.trust_remote_code)
    try:  # as from_pretrained does: the checkpoint's generation settings, saved again with the model
        model.generation_config = GenerationConfig.from_pretrained(name)
    except OSError:
        pass
    fp32_head(model, vocab_size, name).eval().requires_grad_(not frozen)
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # computed from the config (rotary inv_freq): in no checkpoint
    shard(model, args.device, dtype, frozen)
    model.to_empty(device=args.device)  # this rank's shards, uninitialised
    with torch.no_grad():
        for k, b in buffers.items():
            model.get_buffer(k).copy_(b)
    if read:
        fill_shards(model, checkpoint_reader(name, model, args.trust_remote_code) if is_main() else None)
    return model


def check_same_vocab(tok_t, tok_s, vt, vs):
    """MiniLLM compares p and q_θ token by token: both must index the same tokens. The tokenizers must be the
    same; the models may pad their embedding matrices differently (vt, vs logits: Qwen2.5-1.5B has 151,936,
    Qwen2.5-7B 152,064, for the same 151,665 tokens), since fp32_head keeps the shared tokens only."""
    if tok_t.get_vocab() != tok_s.get_vocab():
        diff = len(set(tok_t.get_vocab().items()) ^ set(tok_s.get_vocab().items()))
        die(f"teacher and student tokenizers differ ({len(tok_t)} vs {len(tok_s)} tokens, {diff} (token, id) pairs not "
            "shared); MiniLLM compares p and q_θ token by token, which needs one tokenizer: pick a teacher and a student "
            "of the same family (distilling across tokenizers needs a token alignment this code does not do)")
    for who, v in (("teacher", vt), ("student", vs)):
        if v < len(tok_s):
            die(f"the {who} has {v} logits for {len(tok_s)} tokens; resize its embeddings or use its own tokenizer")


def check_teacher_vocab(teacher, tok, args):
    """Before any training: configs and tokenizer only, no weights are loaded. The two models must also end a response
    at the same tokens: the student is trained to end where the teacher would."""
    vt, vs = (load_config(n, args.trust_remote_code).get_text_config().vocab_size for n in (teacher, args.student))
    tok_t = load_tokenizer(teacher, args.trust_remote_code, args.template)
    check_same_vocab(tok_t, tok, vt, vs)
    et = end_ids(tok_t, *named_configs(teacher, args.trust_remote_code))
    es = end_ids(tok, *named_configs(args.student, args.trust_remote_code))
    if et != es:
        die(f"teacher and student end responses at different token ids (teacher {et}, student {es}: their tokenizers' EOS "
            "and the eos_token_id of their config.json and generation_config.json); make them list the same ids")


# ----------------------------------------------------------------------------------------------------
# Logging and stage folders.

class Logger:
    """One JSON object per line in log.jsonl, every metric; rank 0 alone writes. `keep`: the lines of an
    earlier run kept on resume (those written up to the checkpoint); a fresh start keeps none. `rows`: every
    row of the stage so far, kept ones included (the warnings read them). With --report-to, each row also goes
    to TensorBoard and/or W&B: its numbers as scalars named <stage>/<key> against `step`, its text as text."""

    def __init__(self, path, keep=0, args=None):
        self.f, self.lines, self.rows, self.reporters = None, keep, [], []
        if not is_main():
            return
        old = Path(path).read_text().splitlines(keepends=True)[:keep] if keep and Path(path).exists() else []
        self.f, self.lines, self.rows = open(path, "a"), len(old), [json.loads(line) for line in old]
        self.f.truncate(len("".join(old).encode()))  # cut in place: a kill before the next step loses no kept line
        for name in getattr(args, "report_to", None) or []:
            self.reporters.append(open_reporter(name, Path(path).parent, args, self.rows[-1]["step"] + 1 if self.rows else 0))

    def log(self, **kv):
        if self.f is None:
            return
        self.f.write(json.dumps(kv) + "\n")
        self.f.flush()
        self.lines += 1
        self.rows.append(kv)
        for reporter in self.reporters:
            reporter.log(kv)

    def close(self):
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []


def scalars_and_texts(row):
    """A log row -> ({key: number}, {key: text}); the step is the x axis, not a curve."""
    nums = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return nums, {k: v for k, v in row.items() if isinstance(v, str)}


class TensorBoard:
    """OUT/tb/<stage>/: `tensorboard --logdir OUT/tb` shows every stage. A resumed stage drops the events of the
    steps it will redo (purge_step), so the curves show each step once."""

    def __init__(self, stage_dir, args, first_step):
        from torch.utils.tensorboard import SummaryWriter  # optional: imported only when asked for
        self.stage = stage_dir.name
        self.w = SummaryWriter(str(Path(args.out) / "tb" / self.stage), purge_step=first_step or None)
        self.w.add_text(f"{self.stage}/args", "```\n" + json.dumps(vars(args), indent=1) + "\n```", first_step)

    def log(self, row):
        nums, texts = scalars_and_texts(row)
        for k, v in nums.items():
            self.w.add_scalar(f"{self.stage}/{k}", v, row["step"])
        for k, v in texts.items():
            self.w.add_text(f"{self.stage}/{k}", v, row["step"])
        self.w.flush()  # a step takes seconds: the dashboard is live, and a killed run loses nothing

    def close(self):
        self.w.close()


class WandB:
    """One W&B run per stage, named <--out folder>/<stage>, grouped by the --out folder, with the arguments as its
    config; the run's id is kept in the stage folder, so a resumed stage continues the same run. Offline:
    WANDB_MODE=offline (the run is then in OUT/wandb/, `wandb sync` uploads it)."""

    def __init__(self, stage_dir, args, first_step):
        import wandb  # optional: imported only when asked for
        out, stage = Path(args.out).resolve(), stage_dir.name
        id_file = stage_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else os.urandom(4).hex()  # not `random`: the seeded RNGs stay untouched
        write_atomic(id_file, run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minillm"), name=f"{out.name}/{stage}",
                              group=out.name, id=run_id, resume="allow", dir=str(out), config=vars(args))
        self.run.define_metric("step")
        self.run.define_metric(f"{stage}/*", step_metric="step")  # the stage's own step, even after a resume
        self.stage = stage

    def log(self, row):
        nums, texts = scalars_and_texts(row)
        self.run.log({"step": row["step"], **{f"{self.stage}/{k}": v for k, v in {**nums, **texts}.items()}})

    def close(self):
        self.run.finish()


def open_reporter(name, stage_dir, args, first_step):
    return {"tensorboard": TensorBoard, "wandb": WandB}[name](Path(stage_dir), args, first_step)


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


DIAGNOSTICS = [("rkl", "reverse KL(q_θ||p) per token"), ("len", "mean response length"),
               ("no_eos", "share without EOS (hit the limit)"), ("rep4", "repeated 4-grams within a response"),
               ("distinct", "distinct responses / responses"), ("top1", "student-teacher top-1 agreement")]


def plot_diagnostics(log_path, png_path):
    """One panel per training diagnostic of the distillation log (each value holds for a whole collection)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(log_path)]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5))
    for ax, (key, title) in zip(axes.flat, DIAGNOSTICS):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if key in ("no_eos", "rep4", "distinct", "top1"):  # shares: on [0, 1]
            ax.set_ylim(-0.02, 1.02)
        if key in DRIFT_MARGINS and rows and key in rows[0]:  # one margin from the first collection: where it warns
            m, v = DRIFT_MARGINS[key], rows[0][key]
            ax.axhline({"len": v * (1 + m), "distinct": v - m}.get(key, v + m), color="r", ls="--", lw=0.8)
        for r in rows:
            if "warning" in r:
                ax.axvline(r["step"], color="r", ls=":", lw=1.2)
                if key == "rkl":  # which rule, on the first panel: "clip" has no panel of its own
                    tag = "+".join(t for t, words in [("drift", "since the first"), ("clip", "clip fraction")] if words in r["warning"])
                    ax.annotate(tag, (r["step"], 1), xycoords=("data", "axes fraction"), rotation=90, va="top",
                                ha="right", fontsize=7, color="r")
    fig.suptitle("MiniLLM training diagnostics (per collection of rollouts; dashed: one warning margin from the first "
                 "collection; dotted: a warning fired)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def save_checkpoint(model, tok, path):
    """A stage's model as a Hugging Face folder (rank 0). Written to path/.saving first, then moved in file
    by file with os.replace (atomic), so a kill mid-save never leaves a half-written model.safetensors.
    Under FSDP every rank sends its shards and rank 0 writes the consolidated fp32 weights."""
    weights = full_state_dict(model)  # None unless sharded (a collective: every rank calls save_checkpoint)
    tmp = Path(path) / ".saving"
    with write_guard(path, tmp, kept=lambda: kept_in(path)):  # the previous model stays whole, .saving is deleted
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            unwrap(model).save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            tok.save_pretrained(tmp)
            fsync_tree(tmp)  # on the disk before any name points to them
            for f in tmp.iterdir():
                os.replace(f, Path(path) / f.name)
            fsync(path)  # the renames themselves
            tmp.rmdir()


def mark_done(path, **info):
    """The stage is finished: later runs skip it, and its resume checkpoint is no longer needed. Every rank calls it."""
    with write_guard(Path(path) / "done.json", kept=lambda: kept_in(path)):  # a rerun resumes, to the same end
        if is_main():
            write_atomic(Path(path) / "done.json", json.dumps(info, indent=1))
    drop_checkpoints(path)


def drop_checkpoints(path):
    """A finished stage's resume checkpoints (optimizer moments: twice the model's size, useless from now on): removed
    by mark_done, and by a rerun that finds the stage done, in case a kill came between done.json and their removal."""
    if is_main():
        for suffix in ("", ".old", ".tmp"):
            shutil.rmtree(Path(path) / ("ckpt" + suffix), ignore_errors=True)


def is_done(path):
    return (Path(path) / "done.json").exists()


def write_atomic(path, text):
    """`path` holds the old text or the new one, never a part: written to path.tmp, then renamed over it."""
    tmp = Path(str(path) + ".tmp")
    try:
        tmp.write_text(text)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(Path(path).parent)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no path.tmp behind


def fsync(path):
    """A file's bytes, or a folder's entries (the names created or renamed in it), from the page cache to the disk.
    A rename reaches the disk on its own schedule, possibly before the data it names: after a power loss the new
    name would point to an empty file. So: fsync the files, rename, fsync the folder (as DCP's writer does)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:  # some file systems (and Windows) cannot sync a folder: its entries are as durable as they get
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.EACCES, errno.EBADF)):
            raise


def fsync_tree(folder):
    """fsync every file under `folder`, every folder in it (bottom-up), and `folder` itself."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(Path(root) / name)
        fsync(root)


# A failed write (ENOSPC, EDQUOT, EACCES, EROFS) surfaces as an OSError from Python, a RuntimeError from torch.save
# and a SafetensorError from save_pretrained's safetensors writer.
WRITE_ERRORS = (OSError, RuntimeError, __import__("safetensors").SafetensorError)


@contextmanager
def write_guard(path, tmp=None, kept=None):
    """Files written in the block (by any rank) that cannot be written, for a full disk, a quota or an unwritable
    folder, end the run on every rank in one line (exit status 2) naming `path` and what was kept, instead of a
    traceback hours into a run. The ranks learn of any rank's failure through one all-reduce at the end of the
    block, which is also the barrier after it: no rank waits forever in a collective for a rank that stopped.
    tmp: the half-written file or folder, deleted (it is never read, and deleting it gives the space back).
    kept: what is intact, as text or a function that says it (called after the failure)."""
    error = None
    try:
        yield
    except WRITE_ERRORS as e:
        error = f"{type(e).__name__}: {first_line(e)}"
    if not all_max(error is not None):
        return
    errors = all_gather_objects(error)
    if is_main():
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if Path(tmp).is_dir() else Path(tmp).unlink(missing_ok=True)
        who = next(i for i, e in enumerate(errors) if e)
        on = f" on rank {who}" if world() > 1 else ""
        kept = kept() if callable(kept) else kept or "everything written before"
        die(f"cannot write {path}{on} ({errors[who]}); kept: {kept}. Free space or fix the "
            "folder's permissions, then rerun the same command to resume")
    sys.exit(2)  # the other ranks: rank 0 said why


def kept_in(stage):
    """What a failed write in a stage folder leaves: the stage's last complete resume checkpoint and its model."""
    stage = Path(stage)
    ckpt = find_checkpoint(stage / "ckpt")
    kept = [f"the resume checkpoint {ckpt} (step {checkpoint_step(ckpt)})" if ckpt else "no resume checkpoint yet"]
    if (stage / "config.json").exists():
        kept.append(f"the model saved earlier in {stage}")
    return " and ".join(kept)


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Resumable checkpoints. OUT/stage/ckpt/ holds what a rerun needs to continue as if never stopped:
#   model.safetensors + config.json   the weights being trained (the stage's best model lives in OUT/stage/)
#   optimizer.pt                      AdamW moments (read back with torch.load(weights_only=True): no code runs)
#   state.pt                          step, data position, best val loss, log lines, every rank's RNG states
# Under --fsdp the weights and AdamW moments are instead dcp/, every rank's shards (torch.distributed.checkpoint):
# no rank ever holds the whole training state. The run folder must then be on a file system all ranks share.
# The learning-rate schedule is a function of the step, so the step is all it needs.

def save_train_state(path, model, opt, rng, rollouts=None, store=None, **state):
    """Write ckpt.tmp/, then swap it in with two renames. Until the new checkpoint is complete the previous
    one stays, as ckpt/ or (killed between the renames) ckpt.old/; find_checkpoint looks at both.
    rollouts: this rank's rest of a rollout collection ({"buf": ..., "queue": ..., ...}), saved by every rank to
    rollouts{rank}.pt when the checkpoint falls inside a collection (save_rollouts). A write that fails on any
    rank (full disk, quota, read-only folder) stops every rank in one line, the previous checkpoint kept."""
    rngs = all_gather_objects(rng)  # every rank's RNG states; rank 0 writes them all
    path = Path(path)
    tmp, old = Path(str(path) + ".tmp"), Path(str(path) + ".old")
    kept = lambda: kept_in(path.parent)  # noqa: E731  (evaluated after a failure: ckpt/ or ckpt.old/)
    with write_guard(path, tmp, kept):
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # a folder left by a killed save: never read, now replaced
            tmp.mkdir(parents=True)
    if is_fsdp(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, opt_sd = get_state_dict(model, opt)  # this rank's shards, keyed by their names in the whole model
        with write_guard(path, tmp, kept):
            try:
                dcp.save({"model": model_sd, "optimizer": opt_sd}, checkpoint_id=str(tmp / "dcp"))  # every rank its own
            except dcp.api.CheckpointException as e:  # a BaseException, raised on every rank when one rank's write fails
                raise OSError(first_line(e)) from e
    if rollouts is not None:
        with write_guard(path, tmp, kept):  # every rank's own buffer, before state.pt marks the folder complete
            save_rollouts(tmp / f"rollouts{rank()}.pt", rollouts, store)
    with write_guard(path, tmp, kept):
        if is_main():
            if not is_fsdp(model):
                unwrap(model).save_pretrained(tmp, safe_serialization=True)
                torch.save(opt.state_dict(), tmp / "optimizer.pt")
            torch.save(dict(state, rng=rngs), tmp / "state.pt")  # written last: a folder with state.pt is complete
            fsync_tree(tmp)  # every rank's files are written (write_guard's all-reduce): all on the disk, then renamed
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)  # path is complete, so an older ckpt.old is not needed
                os.replace(path, old)
            os.replace(tmp, path)
            fsync(path.parent)  # the renames on the disk before the previous checkpoint goes
            shutil.rmtree(old, ignore_errors=True)


def save_rollouts(file, rollouts, store=None):
    """The rest of a rollout collection, as it is: any dict of tensors ("buf"), the minibatch queue, the stats.
    A tensor that is a view into the preallocated teacher store is written as that view (torch.save keeps the
    view's offset and strides over the store's storage, so nothing is copied in memory) and read back into it."""
    buf = rollouts["buf"]
    in_store = [k for k, v in buf.items() if torch.is_tensor(store) and torch.is_tensor(v)
                and v.untyped_storage().data_ptr() == store.untyped_storage().data_ptr()]
    devices = {k: v.device.type for k, v in buf.items() if torch.is_tensor(v)}
    torch.save(dict(rollouts, in_store=in_store, devices=devices), file)
    fsync(file)  # by the rank that wrote it (on another node, rank 0's fsync could not reach its cache)


def load_rollouts(path, device, store=None):
    """save_rollouts' dict for this rank, or None (the checkpoint fell on a collection boundary). Read through mmap,
    so the teacher's log-probs go from the file into `store` without a second copy in memory."""
    file = Path(path) / f"rollouts{rank()}.pt"
    if all_sum(file.exists()) not in (0, world()):  # (a collective: every rank calls load_rollouts)
        die(f"{path} holds the rollout buffers of some ranks only: they wrote them to file systems they do not share; "
            "put --out on a file system every node mounts, or delete the checkpoint to restart the stage")
    if not file.exists():
        return None
    saved = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    buf, nbytes = {}, store.untyped_storage().nbytes() if torch.is_tensor(store) else None
    for k, v in saved["buf"].items():
        if k in saved["in_store"] and v.dtype == getattr(store, "dtype", None) and v.untyped_storage().nbytes() == nbytes:
            buf[k] = store.as_strided(v.shape, v.stride(), v.storage_offset()).copy_(v)  # the same view as before
        else:
            buf[k] = v.to("cpu" if saved["devices"].get(k) == "cpu" else device, copy=True)  # off the mmap
    return dict(saved, buf=buf)


def find_checkpoint(path):
    """The newest complete resume checkpoint under `path` (OUT/stage/ckpt), or None."""
    for p in (Path(path), Path(str(path) + ".old")):
        if (p / "state.pt").exists():
            return p
    return None


def load_train_state(path, opt, device, model=None):
    """Optimizer moments into `opt` (and, from an --fsdp checkpoint, the weights' shards into the sharded `model`);
    returns the state dict, with this rank's RNG states already restored."""
    state = torch.load(Path(path) / "state.pt", weights_only=True)
    if len(state["rng"]) != world():
        die(f"the checkpoint {path} was written by {len(state['rng'])} processes and this run has {world()}; resume with "
            f"as many (torchrun --nproc_per_node={len(state['rng'])}), or delete {path} to restart the stage")
    if (Path(path) / "dcp").exists():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, opt_sd = get_state_dict(model, opt)  # the layout to fill: this rank's shards
        dcp.load({"model": model_sd, "optimizer": opt_sd}, checkpoint_id=str(Path(path) / "dcp"))
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd)
    else:
        # read on the CPU: load_state_dict moves the moments to their parameters' devices and keeps AdamW's step
        # counter on the CPU (on the GPU, reading it back would sync at every parameter of every step)
        opt.load_state_dict(torch.load(Path(path) / "optimizer.pt", map_location="cpu", weights_only=True))
    state["rng"] = state["rng"][rank()]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():  # a run resumed on another kind of device has none
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state


def restore_generator(gen, saved):
    """A generator's saved state; a run resumed on another kind of device (--device may change) cannot use it, so
    sampling goes on from the generator's seed instead, and the run is no longer bitwise the uninterrupted one."""
    try:
        gen.set_state(saved)
    except RuntimeError:
        print("warning: the sampler's random state was saved on another kind of device; sampling continues from "
              "the seed (the run is no longer bitwise reproducible)", flush=True)


def rng_state(**own):
    """This rank's random states: torch (CPU, CUDA), Python's, and the loop's own generators (`own`)."""
    s = dict(own, torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def resume_distill(resume, opt, student, gen, order_rng, pt_stream, store, device):
    """distill's state from its checkpoint `resume`: -> step, L_PT chunks used, log lines, and, when it stopped inside
    a collection, the rest of it (buffer, minibatch queue, rollout stats; else None, [], None)."""
    state = load_train_state(resume, opt, device, student)
    restore_generator(gen, state["rng"]["gen"])
    order_rng.setstate(state["rng"]["order"])
    for _ in range(state["pt_used"]):  # a stream cannot seek: skip the chunks already trained on
        next(pt_stream)
    rest = load_rollouts(resume, device, store) or dict(buf=None, queue=[], roll_stats=None)
    print(f"minillm: resuming from step {state['step']} of {resume}" + (
        f" ({len(rest['queue'])} minibatches left in its rollout collection)" if rest["queue"] else ""))
    return state["step"], state["pt_used"], state["log_lines"], rest["buf"], rest["queue"], rest["roll_stats"]


def checkpoint_step(path):
    return torch.load(Path(path) / "state.pt", weights_only=True)["step"]


def check_finite(stage, step, ckpt_dir, **values):
    """A NaN/inf loss or gradient norm stops the run before the optimizer step, so the last checkpoint
    is the last good one. The values are global (all-reduced), so every rank stops together."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        ckpt = find_checkpoint(ckpt_dir)
        kept = f"the last good checkpoint is {ckpt} (step {checkpoint_step(ckpt)})" if ckpt else "no checkpoint was written yet"
        die(f"{stage}: non-finite {' and '.join(bad)} at step {step}, stopped before the update; {kept}. "
            "Lower the learning rate or check the data")


def maybe_stop(args, stage, steps_done, step):
    """--stop-after K: exit after K steps of this process in the stage, as if killed (nothing more is saved)."""
    if args.stop_after and steps_done >= args.stop_after:
        print(f"{stage}: stopping at step {step} (--stop-after {args.stop_after}); rerun without it to resume", flush=True)
        sys.exit(3)


# Preemption. SLURM (time limit with --signal=USR1@120, preemption), Kubernetes (eviction) and spot instances send
# SIGTERM or SIGUSR1, then SIGKILL after a grace period. The handler only raises a flag: the signal may land inside
# a collective, the sampler or a checkpoint write, none of which may be cut. The loops read the flag once per
# optimizer step, all ranks together (one all-reduce), then save a resume checkpoint of exactly that step and exit.
PREEMPTED = 75  # sysexits.h EX_TEMPFAIL, "temporary failure; retry": not 2 (bad input), 3 (--stop-after), 143 (killed)
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_stop = {"signal": 0}  # the first stop signal received, 0 if none


def on_stop_signal(signum, frame):
    _stop["signal"] = _stop["signal"] or signum


@contextmanager
def preemptible():
    """SIGTERM and SIGUSR1 set the flag while the block runs (Python allows handlers in the main thread only)."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)  # Windows has no SIGUSR1
            if sig is not None:
                old[sig] = signal.signal(sig, on_stop_signal)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _stop["signal"] = 0


def stop_signal():
    """The stop signal received by any rank since the start (0: none). A collective: every rank calls it at the same
    point of every step, so all stop after the same step."""
    return int(all_max(_stop["signal"]))


def preempted(stage, sig, step, ckpt_dir):
    """After the checkpoint of `step` is written: say where, and exit with PREEMPTED."""
    print(f"{stage}: {signal.Signals(sig).name} received, stopped after step {step}; resume checkpoint written to "
          f"{ckpt_dir}; rerun the same command to continue (exit status {PREEMPTED})", flush=True)
    sys.exit(PREEMPTED)


# Flags that change neither the method nor its numbers beyond float rounding (memory, logging, device, the run
# folder's own place): a run folder accepts a rerun that changes them, e.g. a smaller micro-batch after an
# out-of-memory crash, or the folder copied to another disk.
HARMLESS = {"log_interval", "report_to", "save_interval", "stop_after", "overwrite", "method", "device", "micro_batch_size",
            "sft_micro_batch_size", "gen_batch_size", "teacher_logits", "dist_timeout", "out"}
PATHS = ["teacher", "student", "data", "pt_data"]  # compared relative to --out when they lie inside it
STAGES = ["teacher-sft", "student-sft", "minillm", "sft", "kd", "seqkd"]


def run_settings(settings):
    """What args.json records and a rerun must match: every flag, with paths inside the run folder written relative
    to it ("$OUT/student-sft"), so that a run folder moved or copied elsewhere is still the same run."""
    now = json.loads(json.dumps(settings))
    out = Path(now["out"]).resolve()
    for k in PATHS:
        if isinstance(now.get(k), str) and not now[k].startswith("$OUT/") and Path(now[k]).resolve().is_relative_to(out):
            now[k] = "$OUT/" + Path(now[k]).resolve().relative_to(out).as_posix()
    return now


def parser_defaults(recipe="paper"):
    """Every flag's default as the parser gives it (the recipe's for the RECIPES flags): what a run recorded before
    a flag existed must have used."""
    d = vars(build_parser().parse_args([]))
    d.update({name: paper if recipe == "paper" else lmops for name, (paper, lmops) in RECIPES.items()})
    return json.loads(json.dumps(d))


def prepare_out(out, args):
    """Refuse a run folder that holds a run with other arguments: its stages would be skipped or resumed
    under settings they were not trained with. A flag the old args.json does not know (one a fork added since) is
    compared with its default. With --overwrite, its stages are deleted instead."""
    now = run_settings(vars(args))
    old = json.loads((out / "args.json").read_text()) if (out / "args.json").exists() else None
    diff = []
    if old is not None:
        default = parser_defaults(old.get("recipe", "paper"))
        old = run_settings({k: old.get(k, default.get(k)) for k in now})  # an older args.json: absolute paths
        diff = [k for k in now if k not in HARMLESS and now[k] != old[k]]
    if diff and not args.overwrite:
        changes = ", ".join(f"--{k.replace('_', '-')} {old[k]} -> {now[k]}" for k in diff[:4])
        die(f"{out} holds a run with other arguments ({changes}); rerun with the same arguments to resume, "
            "use another --out, or add --overwrite to delete that run")
    if diff and is_main():
        print(f"--overwrite: deleting the stages of the earlier run in {out}")
        for name in STAGES:
            p = out / name
            if p.is_symlink():
                p.unlink()
            elif p.exists():
                shutil.rmtree(p)
    barrier()
    with write_guard(out / "args.json", kept=f"{out} as it was"):
        if is_main():
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "args.json", json.dumps(now, indent=1))


# ----------------------------------------------------------------------------------------------------
# Several processes: `torchrun --nproc_per_node=K minillm.py ...` runs every stage data-parallel (DDP; --fsdp
# below shards instead). Every rank holds the whole student and the whole teacher; a global batch is drawn identically on every
# rank and each rank trains on its share; gradients are all-reduced by DDP. Without torchrun these helpers
# do nothing, and the single-process code path is exactly the one above.

def dist_on():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank():
    return torch.distributed.get_rank() if dist_on() else 0


def world():
    return torch.distributed.get_world_size() if dist_on() else 1


def is_main():
    return rank() == 0


def barrier():
    if dist_on():
        torch.distributed.barrier()


def cuda_device(device, world_size=1, local_rank=0):
    """The device a process binds, with its index: torch.cuda.set_device refuses a bare `cuda` ("Expected a
    torch.device with a specified index"), and DDP's device_ids need the index. Several processes: each takes
    its LOCAL_RANK's GPU, as torchrun means it. One: the index given, and `cuda` is cuda:0, the current device of a
    fresh process (CUDA_VISIBLE_DEVICES decides which GPU that is). Other devices have nothing to bind."""
    d = torch.device(device)
    if d.type != "cuda":
        return device
    return f"cuda:{local_rank if world_size > 1 else d.index or 0}"


def bind_device(args, world_size=1, local_rank=0):
    """args.device indexed (cuda_device), and made the current CUDA device: on cuda:1 alone its RNG state is the one
    saved, its memory the one pinned, not GPU 0's."""
    args.device = cuda_device(args.device, world_size, local_rank)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def fix_mmap_threshold(nbytes=64 * 1024):
    """Blocks of `nbytes` or more from mmap, handed back to the system when freed. glibc's malloc raises its mmap
    threshold each time a large block is freed (up to 32 MB), after which FSDP's per-block all-gather and gradient
    buffers come from the heap and their freed memory stays in the process: on the CPU each of 2 ranks peaked at
    0.96-1.11x of one unsharded process, no saving at all (bench.py --fsdp-memory). A fixed threshold (mallopt, what
    MALLOC_MMAP_THRESHOLD_ does) keeps the memory at what is live. Only glibc's malloc has it; a threshold set in the
    environment wins. Returns whether it was set."""
    import ctypes
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes) == 1
    except (OSError, AttributeError):  # no glibc (macOS, Windows, musl)
        return False


def init_distributed(args):
    """torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE: join the group.
    --fsdp in one process without torchrun: a group of one (FSDP needs a process group)."""
    torchrun = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    bind_device(args, world_size, int(os.environ.get("LOCAL_RANK", 0)))
    if args.fsdp and torch.device(args.device).type == "cpu":  # before any model is loaded (on a GPU the caching allocator decides)
        fix_mmap_threshold()
    if world_size <= 1 and not args.fsdp:
        return
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(minutes=args.dist_timeout)  # rank 0 may write a large checkpoint while the rest wait
    if torchrun:
        torch.distributed.init_process_group(backend, timeout=timeout)
    else:
        import socket
        with socket.socket() as s:  # a free port on this machine
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                             timeout=timeout)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints; errors (stderr) still show on every rank


def comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x):
    """Σ over ranks of a number (or 0-dim tensor), as a float; one process: x itself."""
    if not dist_on():
        return x.item() if torch.is_tensor(x) else x
    t = torch.tensor(float(x), dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(t)
    return t.item()


def all_max(x):
    if not dist_on():
        return x.item() if torch.is_tensor(x) else x
    t = torch.tensor(float(x), dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def all_gather_objects(obj):
    """[rank 0's obj, rank 1's obj, ...]; one process: [obj]."""
    if not dist_on():
        return [obj]
    out = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def wrap_ddp(model, device):
    """DDP all-reduces (averages) gradients during backward. Buffers are constants here: no broadcast."""
    if not dist_on():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                                   broadcast_buffers=False)


def unwrap(model):
    return getattr(model, "module", model)


def grad_sync(model, last):
    """DDP: accumulate micro-batch gradients locally and all-reduce once, on the step's last backward.
    FSDP: every backward reduce-scatters (FSDP2 sums into the sharded gradient), so no rank ever holds a whole
    gradient: more communication, the memory FSDP is for."""
    return model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()


# ----------------------------------------------------------------------------------------------------
# --fsdp: PyTorch FSDP2 (torch.distributed.fsdp.fully_shard). Each rank holds 1/K of every parameter, gradient
# and AdamW moment; a transformer block is all-gathered just before its forward (and again in backward) and
# freed after, gradients are reduce-scattered. Every forward is therefore a collective: all ranks must run
# the same forwards, which is why eval_loss, sft_backward and the samplers keep the ranks in step.

def shard(model, device, dtype=torch.float32, frozen=False):
    """fully_shard each transformer block (the model's _no_split_modules), then the root (embeddings, final norm,
    LM head). The sharded parameters keep their dtype (fp32 master weights for a trained model); with dtype bf16
    the all-gathered copy the forward uses is bf16 and gradients are reduced in fp32.
    frozen (the teacher): the root is resharded after every forward too. FSDP2 keeps a root unit gathered after
    its forward, since a backward follows at once; a teacher has no backward, and would keep its embeddings and
    LM head whole on every rank (V × d: 1.2 GB of Llama-3-70B's bf16) for the rest of the run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(torch.device(device).type, (world(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        die(f"--fsdp: cannot find the transformer blocks of {type(model).__name__} (its _no_split_modules is empty)")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, **({"reshard_after_forward": True} if frozen else {}))
    return model


def wrap_model(model, args, dtype):
    """The trained model across processes: sharded (--fsdp: already, by load_sharded) or wrapped by DDP; one process:
    itself."""
    if args.fsdp:
        return model if is_fsdp(model) else shard(model, args.device, dtype)
    return wrap_ddp(model, args.device)


@contextmanager
def params_on_meta():
    """Build a model with its parameters on the meta device: shapes only, no memory, and their random init costs
    nothing. Buffers are built as usual, on the CPU: the non-persistent ones (rotary inv_freq, Gemma's embedding
    scale, causal masks) are functions of the config, in no checkpoint, and must be right. A parameter already on
    the meta device is kept as it is, so that tied weights (GPT-2's head is its embedding) stay one parameter."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def checkpoint_reader(name, model, trust_remote_code=False):
    """Rank 0: key -> that tensor of the checkpoint `name` (a folder or a hub name), for every key of the model's
    state dict. Read one tensor at a time from its safetensors files when they hold every weight under the model's
    names (or without its base-model prefix, as the hub's gpt2); each read maps the file and unmaps it after, so
    the pages read do not pile up in this rank's memory. Else (a .bin or GGUF checkpoint, renamed weights) from the
    whole model, loaded by from_pretrained on this rank alone."""
    from safetensors import safe_open
    names = {}  # every name of each tensor: a tied weight may be stored under either
    for key, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(key)
    aliases = {k: v for v in names.values() for k in v}
    try:
        folder = Path(name) if Path(name).is_dir() else Path(__import__("huggingface_hub").snapshot_download(
            name, allow_patterns=["*.safetensors", "*.safetensors.index.json", "config.json"]))
        where = {}  # checkpoint key -> its file
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                where.update((k, str(f)) for k in st.keys())
        prefix = getattr(model, "base_model_prefix", "") + "."
        found = {}
        for key in aliases:
            hit = [k for a in aliases[key] for k in (a, a.removeprefix(prefix)) if k in where]
            if not hit:
                raise KeyError(key)
            found[key] = hit[0]

        def read(key):
            with safe_open(where[found[key]], framework="pt") as st:
                return st.get_tensor(found[key])
        return read
    except Exception:  # noqa: BLE001  (no usable safetensors: from_pretrained reads whatever the checkpoint is)
        whole = load_model(name, "cpu", next(model.parameters()).dtype, trust_remote_code).state_dict()
        return whole.__getitem__


def fill_shards(model, read):
    """Every rank: each tensor of the sharded model's state dict in turn is read by rank 0 (`read`; None on the other
    ranks), broadcast, and cut to this rank's shard. No rank holds more than its shards and one whole tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    seen = set()
    with torch.no_grad():
        for key, local in model.state_dict(keep_vars=True).items():
            if id(local) in seen:  # a tied weight: one parameter, filled once
                continue
            seen.add(id(local))
            full = read(key).to(comm_device(), local.dtype) if is_main() else torch.empty(local.shape, dtype=local.dtype,
                                                                                         device=comm_device())
            assert full.shape == local.shape, f"{key}: {tuple(full.shape)} in the checkpoint, {tuple(local.shape)} in the model"
            torch.distributed.broadcast(full, 0)
            if isinstance(local, DTensor):  # this rank's shard, cut as fully_shard cut it (no communication)
                full, local = distribute_tensor(full, local.device_mesh, local.placements, src_data_rank=None).to_local(), local.to_local()
            local.copy_(full)


def is_fsdp(model):
    if not dist_on():
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def all_done(done, *models):
    """Decoding may stop once every sequence has ended: on this rank, or, with a sharded model, on every rank,
    since each forward is then a collective (a finished rank keeps decoding padding until the others end)."""
    if not any(is_fsdp(m) for m in models):
        return bool(done.all())
    return all_sum(float(not done.all())) == 0


@contextmanager
def gathered(model, on=True):
    """FSDP: keep `model` all-gathered (whole, in its compute dtype) for the length of the block, then shard it
    again. A rollout collection runs one forward per token: sharded, each would all-gather every block again.
    Costs the whole model's bf16 weights on every rank. Does nothing to a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule
    if not (on and is_fsdp(model)):
        yield model
        return
    model.set_reshard_after_forward(False)  # the first forward gathers each block and keeps it
    try:
        yield model
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # fully_shard's default for the root unit
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def full_state_dict(model):
    """FSDP: the whole model's weights, gathered to rank 0 on the CPU (other ranks get {}); otherwise None."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = {}  # tied weights (GPT-2's LM head is its embedding) arrive as copies: share them again, so that
    for name, p in model.named_parameters(remove_duplicate=False):  # save_pretrained writes them once, as always
        first.setdefault(id(p), name)
        if name in weights and first[id(p)] != name:
            weights[name] = weights[first[id(p)]]
    return weights


def whiten_global(x, mask, eps=1e-8):
    """whiten() with the mean and variance over every rank's rollouts (lmops recipe)."""
    if not dist_on():
        return whiten(x, mask, eps)
    n = all_sum(mask.sum())
    mean = all_sum((x * mask).sum()) / n
    var = all_sum(((x - mean) ** 2 * mask).sum()) / n
    return (x - mean) * (var + eps) ** -0.5 * mask


if __name__ == "__main__":
    main()
