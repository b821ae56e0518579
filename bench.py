"""
Benchmark of minillm.py: is the faithful version also a fast one?

    python bench.py                                  # tiny shapes on the CPU (< 5 minutes on 2 cores)
    python bench.py --device cuda --shapes paper     # gpt2-xl -> gpt2, B = 64, prompt 256, 256 new tokens, bf16
    python bench.py --json                           # one JSON object instead of the table

Models have random weights built from GPT2Config (no download, no tokenizer: prompts are random token ids),
with the real 50,257-token vocabulary, so the vocabulary-wide work (softmax, KL, LM head) is to scale.
Every rollout has exactly N new tokens (the EOS cannot be sampled), so every side does identical work.

What is measured, each a median of --repeats rounds after one warm-up round; every job runs once per round
(interleaved, so a busy machine slows all alike). On the CPU torch uses 1 thread unless --threads says otherwise:
  1. mixed_vs_generate   minillm.sample_rollouts (student and teacher decode together, token drawn from
                         p~ = α·p + (1-α)·q_θ) ÷ [HF generate of the student alone + HF generate of the teacher
                         alone] (KV cache, do_sample, top_k = 0, exactly N tokens). Target <= 1.10.
  2. teacher_evals_per_token   teacher positions that output a response-token distribution ÷ response tokens,
                         counted with a forward pre-hook on the teacher over one whole distillation step. A
                         forward over L >= P columns starting at the prompt yields L - (P-1) such positions per row
                         (the prefill of a P-token prompt: 1, the distribution of y_1); a one-token decode call
                         yields 1. The P-1 prompt-only positions of a prefill are reported apart. The official code
                         needs >= 3 (reward, log p, single-step KL); ours should be exactly 1.
  3. step_vs_parts       one step ÷ the sum of its parts, each timed alone. A step is `minillm.distill` with
                         --steps 1 --rollouts B --batch-size B --ppo-epochs 1: one collection of B rollouts and one
                         optimisation pass (one inner epoch, one optimizer step) over it, plus one L_PT batch.
                         Parts: collect_rollouts; minillm_loss + backward over the micro-batches; pt_loss + backward;
                         grad clip + AdamW step. Target <= 1.20.
  4. step_vs_trl         our step without L_PT (TRL has none) ÷ TRL's GKDTrainer step (beta = 1: reverse KL,
                         lmbda = 1: fully on-policy) on the same models, B, P, N: TRL's student generates alone
                         (HF generate), then student forward/backward and one teacher forward over prompt+response,
                         then grad clip + AdamW. We sample with the teacher in the loop instead and never re-run it.
                         Target <= 0.80.
  5. peak memory per phase (CUDA: max_memory_allocated; CPU: the process RSS, polled) and tokens/s.
  6. lm_head               the LM head's share of a step's FLOPs for GPT-2, Qwen2.5-0.5B/1.5B and Llama-3.2-1B
                         students (from their configs) and the log-probability error of each way of computing it
                         (fp32, TF32, bf16 inputs with fp32 output, bf16 output) against fp64, on synthetic heads of
                         the real sizes (smoke shapes: toy sizes).

trl is optional (`pip install trl`); without it step_vs_trl is null and a note says why.

    python bench.py --preemption [--json]            # only this: SIGTERM inside a rollout collection, on the CLI
  6. preemption          `minillm.py` in a subprocess (random tiny GPT-2s with the real vocabulary, --teacher-logits
                         keep), SIGTERM in the middle of a rollout collection: seconds from the signal to the exit,
                         the resume checkpoint's size (the rollout buffer apart), steps lost (logged but not in the
                         checkpoint: 0), the rerun's resume line; this disk's write speed, and from it the buffer's
                         size and write time at the paper's shapes (256 rollouts x 256 tokens x 50,257 x 2 bytes).
"""

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch

import minillm as M

V = 50257  # GPT-2's vocabulary: the vocabulary-wide ops are the real size even on tiny models

# layers, width, heads; B rollouts, P prompt tokens, N new tokens; micro-batch; PT chunks (1/8 of the rollout
# tokens, the ratio of the paper's 8 × 512 PT tokens to its 64 × 512 rollout tokens)
SHAPES = {
    "tiny": dict(teacher=(4, 256, 4), student=(2, 128, 2), B=8, P=32, N=32, micro=8, pt_batch=1, repeats=5),
    "paper": dict(teacher=(48, 1600, 25), student=(12, 768, 12), B=64, P=256, N=256, micro=16, pt_batch=8, repeats=3),
    "smoke": dict(teacher=(1, 32, 2), student=(1, 16, 2), B=2, P=8, N=8, micro=2, pt_batch=1, repeats=1),  # for test_bench.py
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", choices=list(SHAPES), default="tiny")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, after one warm-up (tiny 5, paper 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL peer (step_vs_trl = null)")
    p.add_argument("--trl-micro-batch", type=int, default=0,
                   help="TRL: prompts per training_step, gradients accumulated over B/m calls, each generating its own m "
                        "rollouts (how GKDTrainer accumulates); 0 = all B in one call (its fastest generation)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch threads (default 1: on a small shared machine, 2 OpenMP threads wait on each other "
                        "whenever another process takes a core, which inflates ops-heavy decode loops; 0 = torch's default)")
    p.add_argument("--baseline", default=None,
                   help="another minillm.py (e.g. `git show 38259c6:minillm.py > /tmp/old/minillm.py`): its sample_rollouts "
                        "is timed in the same rounds as ours (mixed_vs_generate_baseline, depth.speedup_vs_baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-compiled", action="store_true",
                   help="CUDA: also time HF generate with a static cache and its compiled forward (compiling takes minutes)")
    p.add_argument("--fsdp-memory", action="store_true",
                   help="instead: peak RSS per rank of 2-rank --fsdp SFT against one process (gloo, CPU; ~5 minutes, "
                        "~5 GB of memory at once)")
    p.add_argument("--preemption", action="store_true", help="measure only 6. preemption (a minillm.py subprocess)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Measuring.

def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory inside a block: the CUDA allocator's peak, or on the CPU the process RSS polled every 2 ms
    (ru_maxrss only ever grows, so it cannot separate phases; it is reported once, for the whole run)."""

    def __init__(self, device):
        self.cuda, self.peak = device.startswith("cuda"), 0

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.002)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/statm"):
            self._stop = threading.Event()
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
        else:  # no /proc (macOS): the lifetime maximum, in bytes
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(jobs, device, repeats):
    """Median wall time of each job over `repeats` rounds after one warm-up round. jobs: {name: fn or (fn, setup)};
    setup() runs untimed before fn(). The jobs run interleaved, one of each per round, so a machine shared with
    other processes slows all of them alike and the ratios stay fair."""
    jobs = {k: v if isinstance(v, tuple) else (v, None) for k, v in jobs.items()}
    res = {k: {"all_s": [], "peak_bytes": 0} for k in jobs}
    for i in range(repeats + 1):  # round 0 is the warm-up (allocator, kernels, lazy optimizer state)
        for name, (fn, setup) in jobs.items():
            if setup is not None:
                setup()
            with PeakMemory(device) as mem:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                dt = time.perf_counter() - t0
            res[name]["peak_bytes"] = max(res[name]["peak_bytes"], mem.peak)
            if i > 0:
                res[name]["all_s"].append(dt)
    for r in res.values():
        r["median_s"] = statistics.median(r["all_s"])
    return res


# ----------------------------------------------------------------------------------------------------
# Models, prompts, arguments.

def gpt2(layers, width, heads, device, dtype, seed):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=V, n_positions=1024, n_layer=layers, n_embd=width, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # the student trains in eval mode anyway
                     bos_token_id=V - 1, eos_token_id=None)  # no end id but FakeTokenizer's: fixed-length rollouts
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: a 1.5B model initialised on the CPU takes minutes
        model = GPT2LMHeadModel(cfg)
    return M.fp32_head(model.to(dtype).eval())  # as minillm.load_model: fp32 logits from the LM head


class FakeTokenizer:
    """What minillm.distill reads from a tokenizer. eos = -1 can never be sampled: fixed-length rollouts."""
    eos_token_id, pad_token_id = -1, V - 1


def distill_args(sh, device, pt):
    return M.parse_args(["--device", device, "--steps", "1", "--rollouts", str(sh["B"]), "--batch-size", str(sh["B"]),
                         "--gen-batch-size", str(sh["B"]), "--micro-batch-size", str(sh["micro"]), "--ppo-epochs", "1",
                         "--max-new-tokens", str(sh["N"]), "--pt-batch-size", str(sh["pt_batch"]),
                         "--pt-seq-len", str(sh["P"] + sh["N"]), "--pt-coef", "1.0" if pt else "0.0",
                         "--warmup-steps", "1", "--log-interval", "1"])


@contextlib.contextmanager
def quiet_distill():
    """minillm.distill saves a checkpoint, two plots and prints a line: not part of a step, so switched off here."""
    saved = M.save_checkpoint, M.plot_curve, M.plot_diagnostics, M.mark_done
    M.save_checkpoint = M.plot_curve = M.plot_diagnostics = M.mark_done = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        M.save_checkpoint, M.plot_curve, M.plot_diagnostics, M.mark_done = saved


# ----------------------------------------------------------------------------------------------------
# 1. Sampling: teacher-mixed vs Hugging Face generate.

COARSE_BUCKETS = (1, 4, 16, 64)  # sample_coarse: minillm.BUCKETS to weigh against (1, 2, 4, ..., 64) on a GPU


def sampling_jobs(student, teacher, ids, attn, sh, device, dtype, calls=None, baseline=None, compiled=False):
    """calls: a dict that counts the teacher's forward calls and the positions decoded by `ours` (every round).
    baseline: another minillm module (--baseline): its sample_rollouts, on the same shapes, as sample_baseline."""
    N, gen = sh["N"], torch.Generator(device=device).manual_seed(1)
    eos = torch.tensor([FakeTokenizer.eos_token_id], device=device)

    def ours(decode=M.decode_mode("auto", device), cold=False, count=True, **kw):
        def run():
            if cold:  # a first collection: graph mode captures its graphs again
                M.release_decoders()
            handle = None if calls is None or decode != "eager" or not count else teacher.register_forward_pre_hook(
                lambda *_: calls.update(teacher=calls["teacher"] + 1))  # graph replays call no forward
            # static: its caches go (nothing to capture), and the graph rows keep theirs, warm
            with M.own_decoders() if decode == "static" else contextlib.nullcontext():
                roll = M.sample_rollouts(student, teacher, ids, attn, eos, FakeTokenizer.pad_token_id, N, alpha=0.2,
                                         dtype=dtype, keep_teacher_logits=True, generator=gen, decode=decode, **kw)
            if handle is not None:
                handle.remove()
                calls["positions"] += roll["tokens"].shape[1]
        return run

    # sample_ours: what minillm.py runs (--decode auto: graph on CUDA, eager on the CPU), its decoders kept from one
    # call to the next as within a collection; then each --decode mode, and graph mode paying its captures
    modes = ["eager", "static"] + (["graph"] if device.startswith("cuda") else [])
    jobs = {"sample_ours": ours(), **{f"sample_{m}": ours(m) for m in modes}}
    # Jobs that keep their graphs warm find them gone after the jobs that free every decoder first (HF generate, the
    # step: their peaks should not count our caches): an untimed collection captures them again.
    if M.decode_mode("auto", device) == "graph":
        for k in {"sample_ours", "sample_graph"} & set(jobs):
            jobs[k] = (jobs[k], lambda run=jobs[k]: None if M._decoders else run())
    if device.startswith("cuda"):
        jobs["sample_graph_cold"] = ours("graph", cold=True)

    def coarse():  # fewer bucket lengths: fewer captures per collection, more padding per catch-up (graph mode pays
        # its captures: decoders made afresh; those of the other rows set aside meanwhile and kept warm)
        kept, buckets = dict(M._decoders), M.BUCKETS
        M._decoders.clear()
        M.BUCKETS = COARSE_BUCKETS
        try:
            ours(M.decode_mode("auto", device) if device.startswith("cuda") else "static")()
        finally:
            M.BUCKETS = buckets
            M._decoders.clear()
            M._decoders.update(kept)
    jobs["sample_coarse"] = coarse
    # the teacher decoded in lockstep with the student, one token at a time (one graph, N replays), instead of
    # catching up over the tokens drawn since its last call (fewer, longer forwards, a graph per bucket length)
    jobs["sample_lockstep"] = ours(count=False, max_chunk=1)
    if baseline is not None:
        jobs["sample_baseline"] = lambda: baseline.sample_rollouts(
            student, teacher, ids, attn, eos, FakeTokenizer.pad_token_id, N, alpha=0.2, dtype=dtype,
            keep_teacher_logits=True, generator=gen)

    def hf(model, amp, **kw):
        def run():
            with M.autocast(device, dtype) if amp else contextlib.nullcontext():
                out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0, top_p=1.0,
                                     temperature=1.0, min_new_tokens=N, max_new_tokens=N, use_cache=True,
                                     pad_token_id=V - 1, eos_token_id=V - 1, **kw)
            assert out.shape[1] == ids.shape[1] + N
        return run

    jobs.update(generate_student=(hf(student, True), M.release_decoders),  # the student under autocast, as ours
                generate_teacher=(hf(teacher, False), M.release_decoders))  # bf16 weights, as ours
    if device.startswith("cuda"):  # the fair GPU baseline: a static cache, then also a compiled forward (slow to compile)
        for name, model, amp in [("student", student, True), ("teacher", teacher, False)]:
            jobs[f"generate_{name}_static"] = (hf(model, amp, cache_implementation="static", disable_compile=True),
                                               M.release_decoders)
            if compiled:
                jobs[f"generate_{name}_static_compiled"] = (hf(model, amp, cache_implementation="static"), M.release_decoders)
    return jobs


# ----------------------------------------------------------------------------------------------------
# 2. Teacher evaluations per response token over one distillation step.

class PositionCounter:
    """Forward pre-hook: for each teacher call, how many positions yield a response-token distribution."""

    def __init__(self, model, P):
        self.P, self.response, self.prompt_only, self.calls = P, 0, 0, 0
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        b, L = ids.shape
        end = kwargs["attention_mask"].shape[1] if kwargs.get("attention_mask") is not None else L  # positions so far
        self.calls += 1
        # The call covers positions end-L .. end-1; those from P-1 on predict a response token (a decode step: one,
        # a chunk of the coin sampler: L, a prefill: L - (P-1)); the others only read the prompt.
        prompt_only = max(0, min(end, self.P - 1) - (end - L))
        self.prompt_only += b * prompt_only
        self.response += b * (L - prompt_only)


def bench_teacher_evals(student, teacher, prompts, pt_stream, sh, device, dtype):
    counter = PositionCounter(teacher, sh["P"])
    with quiet_distill(), tempfile.TemporaryDirectory() as tmp:
        M.distill(student, teacher, FakeTokenizer(), prompts, tmp, distill_args(sh, device, pt=True), dtype, pt_stream)
    counter.handle.remove()
    n_tokens = sh["B"] * sh["N"]
    return {"teacher_evals_per_token": counter.response / n_tokens,
            "teacher_prompt_positions_per_prompt_token": counter.prompt_only / (sh["B"] * (sh["P"] - 1)),
            "teacher_calls": counter.calls}


# ----------------------------------------------------------------------------------------------------
# 3. One distillation step and its parts.

def step_jobs(student, teacher, prompts, pt_stream, sh, device, dtype):
    """The step (with and without L_PT) and its four parts, as jobs for measure()."""
    jobs = {}
    for name, pt, mode in [("step", True, "keep"), ("step_no_pt", False, "keep"), ("step_recompute", True, "recompute")]:
        args = distill_args(sh, device, pt)
        args.teacher_logits = mode  # recompute: no logit buffer, a teacher forward per micro-batch (the official way)

        def step(args=args, stream=pt_stream if pt else None):
            with quiet_distill(), tempfile.TemporaryDirectory() as tmp:
                M.distill(student, teacher, FakeTokenizer(), prompts, tmp, args, dtype, stream)
        # as in a run: no decoder left by the sampling jobs (their caches would count in the step's peak, and their
        # graphs would spare its collection the captures that every collection of a run makes)
        jobs[name] = (step, M.release_decoders)

    # The parts, each alone, on the same shapes and with the same code the step runs.
    args = distill_args(sh, device, pt=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    zero = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731  (a step starts with no gradients)
    buf = {}

    def sampling():
        buf.update(M.collect_rollouts(student, teacher, prompts, args, [FakeTokenizer.eos_token_id],
                                      FakeTokenizer.pad_token_id, dtype, gen))

    def loss_backward():
        student.eval()
        n_norm = M.normaliser(buf["mask"], args.normalize)
        for i in range(0, sh["B"], args.micro_batch_size):
            micro = {k: v[i:i + args.micro_batch_size] for k, v in buf.items()}
            loss, _ = M.minillm_loss(student, micro, args, n_norm, dtype)
            loss.backward()

    def recompute():  # what a bf16 run adds to each collection: log q_old by the loss's own forward, on its micro-batches
        M.recompute_logp_old(student, buf, M.micro_batch_groups([list(range(sh["B"]))], args.micro_batch_size), dtype)

    def pt_backward():
        chunk = torch.stack([next(pt_stream) for _ in range(args.pt_batch_size)]).to(device)
        (args.pt_coef * M.pt_loss(student, teacher, chunk, args.pt_kd_ratio, dtype)).backward()

    def fill_grads():
        for p in student.parameters():
            p.grad = torch.randn_like(p) * 1e-3

    def opt_step():
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    jobs.update(part_sampling=(sampling, lambda: (zero(), M.release_decoders())),  # no decoder kept, as the step's
                part_loss_backward=(loss_backward, zero), part_pt=(pt_backward, zero),
                part_optimizer=(opt_step, fill_grads), recompute_logp_old=(recompute, zero))
    return jobs


# ----------------------------------------------------------------------------------------------------
# 3b. Teacher-mixed sampling at a real-model-like depth ratio: the teacher 4x deeper than the student.

DEPTH = {  # (layers, width, heads) of each model, B rollouts, P prompt tokens, N new tokens
    "tiny": dict(teacher=(16, 256, 4), student=(4, 256, 4), B=8, P=32, N=64, repeats=3),
    "paper": dict(teacher=(48, 1600, 25), student=(12, 768, 12), B=64, P=256, N=256, repeats=3),  # gpt2-xl / gpt2: 4x
    "smoke": dict(teacher=(4, 16, 2), student=(1, 16, 2), B=2, P=8, N=8, repeats=1),
}


def bench_depth(shapes, device, dtype, repeats=None, baseline=None, alpha=0.2):
    """One collection of B rollouts (sample_rollouts, N new tokens, α = 0.2 and α = 0) with the teacher 4x deeper
    than the student, against the teacher at every position (coins all 1: the cost of stepping the teacher at
    every token, as the sampler did before the coins) and, with --baseline, the old sample_rollouts itself."""
    sh = DEPTH[shapes]
    teacher = gpt2(*sh["teacher"], device, dtype, seed=3).requires_grad_(False)
    student = gpt2(*sh["student"], device, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    ids, attn = (x.to(device) for x in M.collate_prompts(torch.randint(0, V - 1, (sh["B"], sh["P"]), generator=g).tolist(),
                                                           FakeTokenizer.pad_token_id))
    eos, gen, N = torch.tensor([FakeTokenizer.eos_token_id], device=device), torch.Generator(device=device).manual_seed(1), sh["N"]

    def sample(alpha, coins=None, module=M):
        kw = {} if module is not M else {"coins": coins}
        return lambda: module.sample_rollouts(student, teacher, ids, attn, eos, FakeTokenizer.pad_token_id, N, alpha=alpha,
                                              dtype=dtype, keep_teacher_logits=True, generator=gen, **kw)

    jobs = {"coins_alpha_0.2": sample(alpha), "coins_alpha_0": sample(0.0),
            "teacher_every_position": sample(alpha, torch.ones(N, dtype=torch.bool))}
    if baseline is not None:
        jobs["baseline_alpha_0.2"] = sample(alpha, module=baseline)
    res = measure(jobs, device, repeats or sh["repeats"])
    t = {k: v["median_s"] for k, v in res.items()}
    out = {"config": dict(teacher=sh["teacher"], student=sh["student"], B=sh["B"], P=sh["P"], N=N, vocab=V,
                          repeats=repeats or sh["repeats"]),
           "collection_s": t, "collection_all_s": {k: v["all_s"] for k, v in res.items()},
           "speedup_vs_every_position": t["teacher_every_position"] / t["coins_alpha_0.2"]}
    if baseline is not None:
        out["speedup_vs_baseline"] = t["baseline_alpha_0.2"] / t["coins_alpha_0.2"]
    del teacher, student
    return out


# ----------------------------------------------------------------------------------------------------
# 3c. --teacher-logits offload: what each decoded token moves and allocates on the host.

def next_pow2(n):
    return 1 << (n - 1).bit_length()


class CopyLog(torch.overrides.TorchFunctionMode):
    """Records every Tensor.copy_: the bytes written, and whether the target is one contiguous run of the source's
    dtype (then a CPU<->GPU copy is one DMA from/to pinned memory, non-blocking) or not (then PyTorch's copy goes
    through a contiguous pageable host temporary: a synchronous transfer plus a CPU strided copy; Copy.cu,
    copy_requires_temporaries)."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            direct = dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype
            self.copies.append((dst.numel() * dst.element_size(), direct))
        return func(*args, **kwargs)


def traffic(copies, gathered=0):
    """Per-copy costs by PyTorch's rules, as on a GPU: bytes over the bus, pageable host bytes allocated, bytes the
    CPU reads and writes, synchronous transfers. gathered: bytes of a CPU index gather before an upload."""
    t = dict(bus_bytes=0, host_alloc_bytes=gathered, cpu_copy_bytes=2 * gathered, copies=len(copies), sync_copies=0)
    for n, direct in copies:
        t["bus_bytes"] += n
        if not direct or gathered:  # a pageable temporary (or a pageable source): staged and synchronous
            t["host_alloc_bytes"] += 0 if gathered else n
            t["cpu_copy_bytes"] += 0 if gathered else 2 * n
            t["sync_copies"] += 1
    return t


def bench_offload(B=64, N=256, vocab=151665, R=256, micro=16, chunk=8):
    """--teacher-logits offload at a Qwen-sized vocabulary (B rollouts per sampling batch, fp16 store), counted on
    the CPU: the real write and read code runs on CPU tensors with `minillm.offloaded` forced true, CopyLog
    records its copies, traffic() prices them as a GPU would. Before: the store written one strided (B, V)
    fp32 -> fp16 slice per token, minibatch rows gathered by indexing; after: store_write / store_read. Scaled
    down by `scale` in V (the counts are linear in V) to keep the host memory of the count small."""
    scale = 64
    v = vocab // scale
    store = torch.zeros(B, N, v, dtype=torch.float16)
    logp = torch.randn(B, chunk, v).log_softmax(-1)
    with CopyLog() as old:  # before: teacher_out[:, t].copy_(logp.clamp(min=-1e4), non_blocking=True), per token
        for t in range(chunk):
            store[:, t].copy_(logp[:, t].clamp(min=-1e4), non_blocking=True)
    saved = M.offloaded
    M.offloaded = lambda *a: True  # the GPU path of store_write / store_read, on CPU tensors
    try:
        with CopyLog() as new:
            M.store_write(store, 0, logp)
        rows = torch.arange(micro)
        with CopyLog() as new_read:
            M.store_read(store, rows, N, "cpu")
    finally:
        M.offloaded = saved
    per = lambda t, k: {key: (val * scale if "bytes" in key else val) / k for key, val in t.items()}  # noqa: E731
    rows_bytes = micro * N * v * 2  # (micro, N, V) fp16, at the scaled-down V
    old_read = traffic([(rows_bytes, False)], gathered=rows_bytes)  # store[rows] (a gather), then .to(device)
    total = R * N * vocab * 2
    return {"shape": dict(B=B, N=N, vocab=vocab, R=R, micro_batch=micro, store_dtype="float16"),
            "per_token_before": per(traffic(old.copies), chunk), "per_token_after": per(traffic(new.copies), chunk),
            "per_micro_batch_read_before": per(old_read, 1), "per_micro_batch_read_after": per(traffic(new_read.copies), 1),
            "store_bytes": total, "pinned_bytes_before": next_pow2(total), "pinned_bytes_after": total,
            "note": "before: one (B, V) strided fp16 slice per token, written from fp32 (a pageable temporary + a "
                    "synchronous copy + a CPU strided copy), rows read by an index gather into pageable memory, and "
                    "the store pinned by PyTorch's host allocator (rounded up to a power of two); after: per row and "
                    "chunk one contiguous non-blocking DMA each way, and the store page-locked at its exact size"}


# ----------------------------------------------------------------------------------------------------
# 4. The peer: TRL's GKDTrainer, beta = 1 (reverse KL), lmbda = 1 (fully on-policy).

def word_tokenizer():
    """A tokenizer TRL can hold: V word-level tokens, never used to encode text (prompts are token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(V)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=f"t{V - 1}", pad_token=f"t{V - 1}", unk_token="t0")


def trl_job(student, teacher, ids, attn, sh, device, dtype, micro=0):
    try:
        import transformers
        import trl
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except Exception as e:  # trl is a benchmark-only extra
        return None, None, f"trl unavailable ({type(e).__name__}: {e}); pip install trl"
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp()
    cuda = device.startswith("cuda")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.2x renames gradient_checkpointing
    cfg = GKDConfig(output_dir=tmp, per_device_train_batch_size=sh["B"], gradient_accumulation_steps=1,
                    lmbda=1.0, beta=1.0, temperature=1.0, seq_kd=False, max_new_tokens=sh["N"],
                    max_length=sh["P"] + sh["N"], learning_rate=5e-6, adam_beta1=0.9, adam_beta2=0.95,
                    weight_decay=1e-6, max_grad_norm=1.0, optim="adamw_torch", lr_scheduler_type="constant",
                    gradient_checkpointing=False,  # on: generate() without KV cache, and recomputation; ours has neither
                    disable_dropout=True, bf16=cuda, fp16=False, use_cpu=not cuda, report_to=[], logging_strategy="no",
                    save_strategy="no", dataloader_num_workers=0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, processing_class=word_tokenizer(),
                             train_dataset=Dataset.from_dict({"prompt": ["unused"]}))  # we hand training_step its batch
    # Exactly N new tokens, as every other measurement: the EOS is masked until N (HF's min_new_tokens).
    trainer.generation_config.min_new_tokens = sh["N"]
    trainer.generation_config.max_new_tokens = sh["N"]
    trainer.generation_kwargs.update(min_new_tokens=sh["N"], max_new_tokens=sh["N"])
    trainer.create_optimizer()
    m = micro or sh["B"]
    trainer.current_gradient_accumulation_steps = sh["B"] // m  # set by trainer.train(), which we do not call
    model, opt = trainer.model, trainer.optimizer
    # Outside trainer.train() accelerate does not wrap the forward in autocast, so we do, as it would with bf16=True
    # (an fp32 run: none). One object entered once per micro-batch: M.autocast may be entered again.
    amp = M.autocast(device, dtype)

    def step():
        for i in range(0, sh["B"], m):
            inputs = {"prompts": ids[i:i + m], "prompt_attention_mask": attn[i:i + m], "input_ids": ids[i:i + m],
                      "attention_mask": attn[i:i + m],  # all replaced by the on-policy generation (lmbda = 1)
                      "labels": torch.full_like(ids[i:i + m], -100)}
            with amp:
                trainer.training_step(model, inputs)
        trainer.accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()  # training_step left the student in train mode; our sampling asserts eval mode (µs)

    counter = PositionCounter(teacher, sh["P"])  # the peer's teacher evaluations, same definition as ours
    try:
        step()
    except torch.cuda.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        model.eval()
        torch.cuda.empty_cache()
        return None, None, f"TRL ran out of GPU memory with {m} prompts per training_step; try --trl-micro-batch {max(1, m // 4)}"
    finally:
        counter.handle.remove()
    evals = counter.response / (sh["B"] * sh["N"])
    note = (f"trl {trl.__version__} GKDTrainer(beta=1, lmbda=1), {sh['B'] // m} training_step(s) of {m} prompts: the "
            "student generates alone (HF generate, KV cache), then student forward+backward and one teacher forward "
            "over prompt+response, then clip and AdamW")
    return step, evals, note


# ----------------------------------------------------------------------------------------------------
# 6. Preemption: SIGTERM in the middle of a rollout collection of a real `minillm.py` run.

def write_speed(folder, nbytes=2**29):
    """Bytes per second of torch.save of one fp16 tensor to `folder`, fsync included (the page cache is not the disk)."""
    x = torch.zeros(nbytes // 2, dtype=torch.float16)
    f = Path(folder) / "speed.pt"
    t0 = time.time()
    torch.save(x, f)
    with open(f, "rb+") as h:
        os.fsync(h.fileno())
    seconds = time.time() - t0
    f.unlink()
    return nbytes / seconds


def buffer_io(folder, device, rows=16, new=256):
    """minillm.save_rollouts / load_rollouts of a rollout buffer at the paper's width (N = 256 new tokens, V, fp16 as
    under bf16), `rows` rollouts of the paper's 256: seconds to write (fsync included) and to read back into the store."""
    store = torch.zeros(rows, new, V, dtype=torch.float16, device=device)
    buf = {"teacher_logits": store[:, :new - 8], "tokens": torch.zeros(rows, new - 8, dtype=torch.long, device=device)}
    f = Path(folder) / "rollouts0.pt"
    sync(device)
    t0 = time.time()
    M.save_rollouts(f, dict(buf=buf, queue=[[0, 1]], roll_stats={}), store)
    with open(f, "rb+") as h:
        os.fsync(h.fileno())
    t1 = time.time()
    M.load_rollouts(folder, device, store)
    sync(device)
    t2 = time.time()
    nbytes = f.stat().st_size
    f.unlink()
    return dict(rows=rows, file_bytes=nbytes, write_s=t1 - t0, read_s=t2 - t1, paper_rows=256,
                paper_write_s=(t1 - t0) * 256 / rows, paper_read_s=(t2 - t1) * 256 / rows)


def preemption(device, rollouts=16, batch=4, new=32, signal_after_step=5):
    """minillm.py --skip-teacher-sft --skip-student-sft on random GPT-2s (teacher 2 x 128, student 1 x 64, V = 50,257),
    --rollouts 16 --batch-size 4: 4 steps per collection. SIGTERM when step 5's line is printed (the first of the 2nd
    collection: the run stops after step 5 or 6, inside the collection); then the rerun, SIGTERM again at its first
    step's line."""
    import signal
    import subprocess
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    root = Path(tempfile.mkdtemp(prefix="bench-preempt-"))
    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(V)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=f"t{V - 1}", pad_token=f"t{V - 1}", unk_token="t0")
    for name, (layers, width) in {"teacher": (2, 128), "student": (1, 64)}.items():
        torch.manual_seed(len(name))
        GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=512, n_layer=layers, n_embd=width, n_head=2, bos_token_id=V - 1,
                                   eos_token_id=V - 1)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(0)
    rows = [{"instruction": " ".join(f"t{i}" for i in torch.randint(1, V - 1, (8,), generator=g).tolist()), "output": "t1 t2"}
            for _ in range(rollouts + 4)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "run"
    cmd = [sys.executable, str(Path(__file__).with_name("minillm.py")), "--teacher", str(root / "teacher"), "--student",
           str(root / "student"), "--data", str(root / "data.jsonl"), "--val-size", "2", "--out", str(out), "--device", device,
           "--skip-teacher-sft", "--skip-student-sft", "--pt-data", "none", "--steps", "1000", "--rollouts", str(rollouts),
           "--batch-size", str(batch), "--micro-batch-size", str(batch), "--gen-batch-size", str(rollouts),
           "--ppo-epochs", "1", "--max-new-tokens", str(new), "--save-interval", "1000", "--log-interval", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))

    def stopped(after_line):
        """Run cmd, SIGTERM it when a line starts with after_line; (seconds from SIGTERM to the stop line (checkpoint
        written) and to the exit, status, stdout)."""
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        lines, t0, t_line = [], None, None
        for line in proc.stdout:
            lines.append(line)
            if t0 is None and line.startswith(after_line):
                t0 = time.time()
                proc.send_signal(signal.SIGTERM)
            if "received" in line:
                t_line = time.time()
        proc.wait()
        return (t_line - t0, time.time() - t0), proc.returncode, "".join(lines)

    seconds, status, text = stopped(f"step {signal_after_step:5d}/")
    ckpt = out / "minillm" / "ckpt"
    step = M.checkpoint_step(ckpt)
    logged = len((out / "minillm" / "log.jsonl").read_text().splitlines())
    size = {f.name: f.stat().st_size for f in ckpt.iterdir() if f.is_file()}
    seconds2, status2, text2 = stopped("step ")
    resumed = [line.strip() for line in text2.splitlines() if "resuming from" in line]
    bandwidth = write_speed(root)
    io_ = buffer_io(root, device)
    buffer_paper = teacher_logits_bytes()  # one rank's buffer on one GPU; K ranks: 1/K each, written in parallel
    return {"seconds_sigterm_to_saved": seconds[0], "seconds_sigterm_to_exit": seconds[1], "exit_status": status, "checkpoint_step": step, "steps_logged": logged,
            "steps_lost": logged - step, "stop_line": [line for line in text.splitlines() if "received" in line],
            "checkpoint_bytes": sum(size.values()), "rollout_buffer_bytes": size.get("rollouts0.pt"),
            "teacher_store_bytes": teacher_logits_bytes(rollouts, new, V, 4), "files_bytes": size, "rerun_resume_line": resumed,
            "rerun_seconds_sigterm_to_exit": seconds2[1], "rerun_exit_status": status2,
            "disk_write_bytes_per_s": bandwidth, "paper_buffer_bytes": buffer_paper,
            "paper_buffer_write_s_at_this_disk": buffer_paper / bandwidth, "buffer_save_load": io_,
            "config": dict(device=device, rollouts=rollouts, batch=batch, new_tokens=new, vocab=V, signal_at_line_of_step=signal_after_step,
                           teacher="2 x 128", student="1 x 64", threads=torch.get_num_threads())}


# ----------------------------------------------------------------------------------------------------
# Report.

def teacher_logits_bytes(rollouts=256, n=256, vocab=V, bytes_per=2):
    """Keeping the teacher's log-probs of one collection (paper: 256 rollouts × 256 tokens × V, 2 bytes)."""
    return rollouts * n * vocab * bytes_per


# Published shapes: parameters, layers, K/V width per layer (heads × head dim, GQA included), shared vocabulary.
PAIRS = {
    "gpt2-xl -> gpt2 (paper)": (dict(params=1.558e9, layers=48, kv=1600), dict(params=124e6, layers=12, kv=768), 50257),
    "OPT-13B -> OPT-1.3B (paper)": (dict(params=12.85e9, layers=40, kv=5120), dict(params=1.316e9, layers=24, kv=2048), 50265),
    "LLaMA-13B -> LLaMA-7B (paper)": (dict(params=13.0e9, layers=40, kv=5120), dict(params=6.74e9, layers=32, kv=4096), 32000),
    "Qwen2.5-7B -> Qwen2.5-1.5B": (dict(params=7.62e9, layers=28, kv=512), dict(params=1.54e9, layers=28, kv=256), 151665),
}


def memory_plan(teacher, student, vocab, rollouts=256, prompt=256, new=256, gen_batch=64, micro=16):
    """Peak GPU memory of one rank, computed from shapes (bytes), for each --teacher-logits mode, with the paper's
    sizes. Weights: teacher bf16 (2 B/param); student fp32 weights + grads + AdamW moments (16 B/param) + the bf16
    copies autocast makes (2 B/param). Sampling: both KV caches (bf16) for gen_batch rows, static: sized once for
    prompt + new tokens; the student's log-probs waiting
    for the teacher's catch-up (fp32, at most M.PENDING_BYTES); the catch-up's fp32 logits and log-probs over as
    many positions; graph mode's outputs, the teacher's fp32 logits (gen_batch, n, vocab) of every bucket length n,
    kept by their graphs. The rollout buffer: the teacher's log-probs, rollouts × new × vocab × 2 B. The loss: about six
    fp32 (micro, new, vocab) tensors alive at once (logits, log q, q, the teacher's log p, two gradients)."""
    weights = 2 * teacher["params"] + 18 * student["params"]
    slots = prompt + new  # padded forwards share the last slot (minillm's Decoder)
    kv = sum(2 * m["layers"] * m["kv"] * slots * gen_batch * 2 for m in (teacher, student))
    pending = min(M.PENDING_BYTES, gen_batch * new * vocab * 4)
    catch_up = 2 * pending  # logits and log-softmax over the positions pending
    graph_outputs = sum(M.BUCKETS) * gen_batch * vocab * 4
    sampling = kv + pending + catch_up + graph_outputs
    loss = 6 * micro * new * vocab * 4
    buffer = rollouts * new * vocab * 2
    plan = {}
    for mode in ["keep", "offload", "recompute"]:
        on_gpu = buffer if mode == "keep" else micro * new * vocab * 2 if mode == "offload" else 0
        plan[mode] = dict(gpu=weights + max(sampling, loss) + on_gpu, cpu_pinned=buffer if mode == "offload" else 0)
    return dict(weights=weights, kv_cache=kv, pending_logprobs=pending, catch_up_logits=catch_up,
                graph_outputs=graph_outputs, sampling=sampling,
                loss_logits=loss, teacher_logprob_buffer=buffer, modes=plan)


def memory_table():
    return {name: memory_plan(t, s, v) for name, (t, s, v) in PAIRS.items()}


# ----------------------------------------------------------------------------------------------------
# 6. --fsdp memory: peak RSS per rank of two sharded ranks against one whole process (gloo, CPU).

# ~160M parameters, Llama-shaped (untied head): 2 × 32000 × 768 embeddings and head + 16 blocks of 7.1M. fp32 weights
# 0.65 GB; with gradients and AdamW moments 2.6 GB, what a rank of 2 should hold half of.
FSDP_BIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                num_key_value_heads=12, vocab_size=32000, max_position_embeddings=256)
FSDP_TINY = dict(FSDP_BIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=128)

RSS_SHIM = """import atexit, os, runpy, sys
def peak():  # VmHWM: the peak RSS of this address space (ru_maxrss would also count the launcher's, kept across exec)
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    open(os.environ["RSS_OUT"] + "." + os.environ.get("RANK", "0"), "w").write(str(int(hwm.split()[1]) * 1024))
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
LOAD_SCRIPT = """import sys
import minillm as M
args = M.parse_args(sys.argv[1:])
M.init_distributed(args)
tok = M.load_tokenizer(args.student)
model = M.wrap_model(M.load_trained(None, args.student, args, len(tok)), args, M.resolve_dtype(args))  # loaded and sharded
M.barrier()
"""
# glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), after which FSDP's
# per-block all-gather and gradient buffers come from the heap and their freed memory stays counted in the RSS:
# measured, 3.6 GB per rank where 2.2 GB is live. minillm.py --fsdp on the CPU fixes the threshold itself
# (fix_mmap_threshold), so every process runs as a user's would: no MALLOC_* variable, none inherited either.
# (On a GPU the caching allocator decides instead; this is the CPU's proxy.)


def fsdp_memory(root):
    """Two SFT steps of a ~160M Llama-shaped student (FSDP_BIG): peak RSS of one process, and of each rank of
    `torchrun --nproc_per_node=2 ... --fsdp`; from each, the same run's peak with a tiny model (FSDP_TINY) is
    subtracted, which leaves what the model costs (weights, gradients, AdamW moments, activations) without the
    fixed cost of torch and transformers. Sharding weights, gradients and moments should give each rank about half.
    The same for loading alone (LOAD_SCRIPT: the student loaded and sharded, as a stage starts): the peak that every
    rank used to pay in host memory for the whole model, which decides whether a large model loads at all."""
    import subprocess
    from transformers import LlamaConfig, LlamaForCausalLM
    from demo import demo_tokenizer  # an offline word-level tokenizer over the texts
    root = Path(root)
    rows = [{"instruction": f"say the {w}", "input": "", "output": f"the {w} sat on the mat"} for w in ["cat", "dog", "mat"] * 4]
    tok = demo_tokenizer([M.build_prompt(r["instruction"], r["input"]) + r["output"] for r in rows])
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "shim.py").write_text(RSS_SHIM)
    (root / "load.py").write_text(LOAD_SCRIPT)
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(here))
    peaks = {}
    for size, cfg in [("big", FSDP_BIG), ("tiny", FSDP_TINY)]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(root / size)
        tok.save_pretrained(root / size)
        del model
        cli = [str(here / "minillm.py"), "--method", "sft", "--student", str(root / size), "--teacher", str(root / size),
               "--data", str(root / "data.jsonl"), "--val-size", "4", "--student-epochs", "1", "--sft-max-steps", "2",
               "--sft-batch-size", "4", "--sft-micro-batch-size", "2", "--device", "cpu", "--save-interval", "0"]
        one = ("one", [sys.executable, str(root / "shim.py")], [])
        fsdp = ("fsdp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                         str(root / "shim.py")], ["--fsdp"])
        runs = [("sft", *one), ("sft", *fsdp), ("load", *fsdp)]
        for phase, kind, launch, extra in runs:  # load: only load the student (and shard it), as a stage starts
            out = root / f"{size}-{kind}-{phase}"
            script = str(here / "minillm.py") if phase == "sft" else str(root / "load.py")
            res = subprocess.run(launch + [script] + cli[1:] + extra + ["--out", str(out)],
                                 env=dict(env, RSS_OUT=str(out) + ".rss"), capture_output=True, text=True, cwd=root)
            if res.returncode:
                raise RuntimeError(f"{size} {kind} {phase}: {res.stderr[-2000:]}")
            peaks[size, kind, phase] = [int(Path(f"{out}.rss.{r}").read_text()) for r in range(2 if kind == "fsdp" else 1)]
        if size == "big":
            big_params = params
    res = {"params": big_params, "world": 2, "target": "<= 0.75 on every rank (sft)",
           "peak_rss_bytes": {f"{s}_{k}_{ph}": v for (s, k, ph), v in peaks.items()}}
    one = peaks["big", "one", "sft"][0] - peaks["tiny", "one", "sft"][0]
    ranks = [b - t for b, t in zip(peaks["big", "fsdp", "sft"], peaks["tiny", "fsdp", "sft"])]
    res["sft"] = {"one_process_extra_bytes": one, "rank_extra_bytes": ranks, "rank_vs_one_process": [r / one for r in ranks]}
    # loading alone is not compared with one process: from_pretrained maps the safetensors file and reads a page
    # only when it is used, so one process that only loads holds almost nothing yet
    ranks = [b - t for b, t in zip(peaks["big", "fsdp", "load"], peaks["tiny", "fsdp", "load"])]
    res["load"] = {"rank_extra_bytes": ranks, "rank_vs_fp32_weights": [r / (4 * big_params) for r in ranks]}
    return {**res,
            "how": "peak RSS (VmHWM) of each process (sft: two SFT steps; load: loading and sharding the student), "
                   "minus the same run's with a tiny model; no MALLOC_* variable (--fsdp on the CPU sets glibc's mmap "
                   "threshold itself; the one process runs with glibc's default)"}


# The LM head (issue: the fp32 head at tensor-core speed). Its share of a step's FLOPs, from published configs
# (no download), and what each way of computing it does to log-probabilities, against an fp64 reference.

# hidden d, layers, query heads, K/V heads, head dim, MLP width, gated MLP (3 matrices), tokens the head computes
HEAD_CONFIGS = {
    "gpt2 (124M)": dict(d=768, layers=12, heads=12, kv_heads=12, head_dim=64, ffn=3072, gated=False, vocab=50257),
    "Qwen2.5-0.5B": dict(d=896, layers=24, heads=14, kv_heads=2, head_dim=64, ffn=4864, gated=True, vocab=151665),
    "Qwen2.5-1.5B": dict(d=1536, layers=28, heads=12, kv_heads=2, head_dim=128, ffn=8960, gated=True, vocab=151665),
    "Llama-3.2-1B": dict(d=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192, gated=True, vocab=128256),
}
FP32_VS_TENSOR_CORE = 14.8  # H100/H200 SXM dense: bf16 tensor cores 989 TFLOP/s ÷ fp32 CUDA cores 67 TFLOP/s


def head_flop_share(cfg, context=384):
    """The LM head's share of the matmul FLOPs per token (forward; the backward is 2x of every matmul alike, so a
    training step has the same share). context: the mean number of positions a response token attends to (MiniLLM:
    prompt 256 + 256 new tokens -> 384)."""
    d, q = cfg["d"], cfg["heads"] * cfg["head_dim"]
    proj = 2 * d * q * 2 + 2 * d * cfg["kv_heads"] * cfg["head_dim"] * 2  # W_q, W_o; W_k, W_v
    mlp = 2 * d * cfg["ffn"] * (3 if cfg["gated"] else 2)
    attn = 2 * 2 * context * q  # q·k over the context, then the weighted sum of v
    head = 2 * d * cfg["vocab"]
    share = head / (cfg["layers"] * (proj + mlp + attn) + head)
    return dict(head_share=share, step_fp32_head_vs_tensor_core=(1 - share) + share * FP32_VS_TENSOR_CORE)


def round_tf32(x):
    """fp32 -> TF32 (10 mantissa bits, round to nearest even), as a tensor core reads fp32 inputs under TF32."""
    b = x.float().view(torch.int32)
    b = (b + 0x0FFF + ((b >> 13) & 1)) & ~0x1FFF
    return b.view(torch.float32).double()


def bf16_split(x):
    """x ≈ hi + lo with hi, lo bf16: the '3 bf16 matmuls' trick (hi·hi + hi·lo + lo·hi) keeps ~16 mantissa bits."""
    hi = x.float().bfloat16().double()
    return hi, (x - hi).float().bfloat16().double()


def synthetic_head(kind, d, vocab, rows, seed=0, chunk=4096):
    """Final hidden states h (rows, d) and the head W (vocab, d) in fp64, generated chunk by chunk (W is never held
    whole). gpt2-like: every row of W shares a mean direction μ that h points away from, so the logits sit around
    -50 with a spread of a few nats (GPT-2's logits are near -60). llama-like: zero-mean rows, logits around 0 with
    a few sharp winners (std 0.02 rows, |h| ~ 125). Yields (h, W_chunk)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gpt2":
        mu = torch.randn(d, generator=g, dtype=torch.float64)
        mu = mu / mu.norm() * 2.0
        sigma = 0.14
        noise = torch.randn(rows, d, generator=g, dtype=torch.float64)
        noise -= (noise @ mu)[:, None] * mu / mu.dot(mu)
        h = -25.0 * mu / mu.norm() + noise / noise.norm(dim=1, keepdim=True) * 3.0 / sigma
    else:
        sigma = 0.02
        h = torch.randn(rows, d, generator=g, dtype=torch.float64) * (125.0 / d ** 0.5)
    for start in range(0, vocab, chunk):
        n = min(chunk, vocab - start)
        w = torch.randn(n, d, generator=g, dtype=torch.float64) * sigma
        if kind == "gpt2":
            w += mu
        elif start == 0:  # a few tokens the model is sure about: logits up to ~+20
            w[:rows] += 0.16 * h / h.norm(dim=1, keepdim=True)  # row i of h favours token i
        yield h, w


def head_precision(kind, d, vocab, rows=8, seed=0):
    """Each way of computing the head's logits -> log_softmax in fp32 (as the losses), against fp64 throughout.
    "W stored in bf16": the error against the fp64 head of the bf16 weights a teacher actually has (a Llama-family h
    is bf16 already, its RMSNorm returns the input dtype, so there the bf16-input head equals the fp32 one exactly).
    Inputs h and W are rounded as the hardware would (emulated in fp64; the accumulation is exact then rounded once to
    fp32, which differs from a tensor core's fp32 accumulation by ~1e-7 relative). Returns, per option, the mean
    |Δ log p| at a token drawn from p (what reaches a reward or a ratio), the max over tokens with p >= 1e-4, and the
    logit range."""
    opts = ["fp32", "tf32", "bf16 in, fp32 out (bf16x3 split)", "bf16 in, fp32 out", "bf16 out",
            "bf16 in, fp32 out, W stored in bf16", "h split in 2 bf16, W rounded to bf16",
            "h split in 2 bf16, W stored in bf16"]
    z = {k: [] for k in ["fp64", "fp64, W stored in bf16"] + opts}
    for h, w in synthetic_head(kind, d, vocab, rows, seed):
        z["fp64"].append(h @ w.T)
        z["fp64, W stored in bf16"].append(h @ w.float().bfloat16().double().T)  # a bf16 teacher's head, exactly
        z["fp32"].append((h.float() @ w.float().T).double())
        z["tf32"].append((round_tf32(h) @ round_tf32(w).T).float().double())
        (hh, hl), (wh, wl) = bf16_split(h), bf16_split(w)
        z["bf16 in, fp32 out (bf16x3 split)"].append((hh @ wh.T + hh @ wl.T + hl @ wh.T).float().double())
        bf = hh @ wh.T
        bf32, h_split = bf.float().double(), ((hh + hl) @ wh.T).float().double()  # each read by two options below
        z["bf16 in, fp32 out"].append(bf32)
        z["bf16 out"].append(bf.float().bfloat16().double())
        z["bf16 in, fp32 out, W stored in bf16"].append(bf32)
        z["h split in 2 bf16, W rounded to bf16"].append(h_split)
        z["h split in 2 bf16, W stored in bf16"].append(h_split)
    z = {k: torch.cat(v, dim=1) for k, v in z.items()}
    ref = torch.log_softmax(z["fp64"], -1)
    p = ref.exp()
    out = {"logits_mean": z["fp64"].mean().item(), "logits_max": z["fp64"].max().item(),
           "top1_prob_mean": p.max(-1).values.mean().item()}
    for k in opts:  # the last one against the head as a bf16 model stores it: only the rounding of h is left
        ref_k = torch.log_softmax(z["fp64, W stored in bf16"], -1) if "stored" in k else ref
        err = (torch.log_softmax(z[k].float(), -1).double() - ref_k).abs()
        out[k] = dict(sampled_mean_abs=(p * err).sum(-1).mean().item(), max_abs_p_ge_1e4=err[p >= 1e-4].max().item())
    return out


def head_report(smoke=False):
    """bench --json's "lm_head": the FLOP share per student and the log-prob error of each precision."""
    shapes = {"gpt2-like (d 768, V 50257)": ("gpt2", 768, 50257), "llama-like (d 2048, V 128256)": ("llama", 2048, 128256)}
    if smoke:  # test_bench: the same code at toy sizes
        shapes = {k: (kind, 64, 3000) for k, (kind, _, _) in shapes.items()}
    return {"flop_share": {name: head_flop_share(cfg) for name, cfg in HEAD_CONFIGS.items()},
            "logprob_error_nats": {name: head_precision(*s) for name, s in shapes.items()},
            "choice": "bf16 GEMMs with fp32 accumulation and output, every fp32 operand split in 2 bf16 parts "
                      "(1 GEMM for a bf16 teacher with bf16 h, 2 with fp32 h, 2-3 for the fp32 student)",
            "notes": "flop_share: the head's share of a token's matmul FLOPs (context 384), and the estimated step time with "
                     f"an IEEE-fp32 head on CUDA cores over one on bf16 tensor cores ({FP32_VS_TENSOR_CORE}x per FLOP). "
                     "logprob_error_nats: synthetic heads (random weights of the real sizes), log_softmax error against fp64; "
                     "sampled_mean_abs = E_{v~p}|Δ log p(v)|."}


def load_baseline(path):
    """--baseline: another minillm.py imported under its own name (the module next to it is not touched)."""
    if path is None:
        return None
    import importlib.util
    spec = importlib.util.spec_from_file_location("minillm_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    a = parse_args(argv)
    if a.fsdp_memory:
        with tempfile.TemporaryDirectory() as root:
            res = {"fsdp_memory": fsdp_memory(root)}
        if a.json:
            print(json.dumps(res))
        else:
            m = res["fsdp_memory"]
            f, ld = m["sft"], m["load"]
            print(f"--fsdp memory, {m['params'] / 1e6:.0f}M parameters, world 2 (gloo, CPU), two SFT steps: one process +"
                  f"{f['one_process_extra_bytes'] / 1e9:.2f} GB; ranks " + ", ".join(
                      f"+{b / 1e9:.2f} GB ({r:.2f}×)" for b, r in zip(f["rank_extra_bytes"], f["rank_vs_one_process"]))
                  + f" (target {m['target']})")
            print("loading and sharding alone: ranks " + ", ".join(
                f"+{b / 1e9:.2f} GB ({r:.2f}× the fp32 weights)" for b, r in zip(ld["rank_extra_bytes"], ld["rank_vs_fp32_weights"])))
        return res
    device = a.device
    if a.shapes == "paper" and not device.startswith("cuda"):
        print("warning: paper shapes on the CPU will take hours; they are meant for --device cuda", file=sys.stderr)
    threads = torch.get_num_threads()
    if not device.startswith("cuda") and a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        return run(a, device)
    finally:
        torch.set_num_threads(threads)  # main() is also called from tests: leave the process as it was


def run(a, device):
    if a.preemption:
        res = {"preemption": preemption(device)}
        print(json.dumps(res) if a.json else json.dumps(res, indent=1))
        return res
    sh = dict(SHAPES[a.shapes])
    repeats = a.repeats or sh["repeats"]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # as minillm.resolve_dtype
    torch.manual_seed(a.seed)
    t_start = time.time()

    teacher = gpt2(*sh["teacher"], device, dtype, seed=1).requires_grad_(False)  # bf16 weights on CUDA
    student = gpt2(*sh["student"], device, torch.float32, seed=2)  # fp32 master weights, bf16 autocast on CUDA
    B, P, N = sh["B"], sh["P"], sh["N"]
    g = torch.Generator().manual_seed(a.seed)
    prompt_ids = torch.randint(0, V - 1, (B, P), generator=g)
    prompts = prompt_ids.tolist()
    ids, attn = (x.to(device) for x in M.collate_prompts(prompts, FakeTokenizer.pad_token_id))
    pt_stream = iter(lambda: torch.randint(0, V - 1, (P + N,), generator=g), None)

    baseline = load_baseline(a.baseline)
    evals = bench_teacher_evals(student, teacher, prompts, pt_stream, sh, device, dtype)
    calls = {"teacher": 0, "positions": 0}
    jobs = {**sampling_jobs(student, teacher, ids, attn, sh, device, dtype, calls, baseline, a.hf_compiled),
            **step_jobs(student, teacher, prompts, pt_stream, sh, device, dtype)}
    trl_step, trl_evals, trl_note = (None, None, "skipped (--no-trl)") if a.no_trl else \
        trl_job(student, teacher, ids, attn, sh, device, dtype, a.trl_micro_batch)
    if trl_step is not None:
        jobs["trl_step"] = trl_step
    step = measure(jobs, device, repeats)  # every job once per round, so a busy machine slows all alike
    samp = {"ours": step["sample_ours"], "generate_student": step["generate_student"], "generate_teacher": step["generate_teacher"]}
    trl_res = {"step": step["trl_step"], "teacher_evals_per_token": trl_evals} if trl_step is not None else None
    med = lambda r: r["median_s"]  # noqa: E731
    parts = ["part_sampling", "part_loss_backward", "part_pt", "part_optimizer"]
    tokens = B * N
    depth = bench_depth(a.shapes, device, dtype, a.repeats, baseline)
    res = {
        "mixed_vs_generate": med(samp["ours"]) / (med(samp["generate_student"]) + med(samp["generate_teacher"])),
        "teacher_evals_per_token": evals["teacher_evals_per_token"],
        "teacher_calls_per_token": calls["teacher"] / calls["positions"],  # sample_ours, α = 0.2, every round
        "mixed_vs_generate_baseline": med(step["sample_baseline"]) / (med(samp["generate_student"]) + med(samp["generate_teacher"]))
        if baseline else None,
        "depth": depth,
        "offload": bench_offload(),
        "step_vs_parts": med(step["step"]) / sum(med(step[k]) for k in parts),
        "step_vs_trl": med(step["step_no_pt"]) / med(trl_res["step"]) if trl_res else None,
        # the same ratios taken within each round, then the median: steadier when the machine is shared
        "ratios_per_round_median": {
            "mixed_vs_generate": statistics.median(o / (gs + gt) for o, gs, gt in zip(
                samp["ours"]["all_s"], samp["generate_student"]["all_s"], samp["generate_teacher"]["all_s"])),
            "step_vs_trl": statistics.median(o / t for o, t in zip(step["step_no_pt"]["all_s"], trl_res["step"]["all_s"]))
            if trl_res else None},
        "targets": {"mixed_vs_generate": "<= 0.50", "teacher_calls_per_token": "<= 0.35 (α = 0.2; about α + 1/N)", "teacher_evals_per_token": "1.0 (official code: >= 3)",
                    "step_vs_parts": "<= 1.20", "step_vs_trl": "<= 0.80"},
        "config": dict(shapes=a.shapes, device=device, device_name=torch.cuda.get_device_name() if device.startswith("cuda") else
                       f"cpu ({torch.get_num_threads()} threads)", dtype=str(dtype), teacher=sh["teacher"], student=sh["student"],
                       vocab=V, B=B, P=P, N=N, micro_batch=sh["micro"], pt_chunks=sh["pt_batch"], pt_seq_len=P + N,
                       repeats=repeats, torch=torch.__version__, transformers=__import__("transformers").__version__),
        "timings_s": {"sample_ours": med(samp["ours"]), "generate_student": med(samp["generate_student"]),
                      "generate_teacher": med(samp["generate_teacher"]), "step": med(step["step"]),
                      "step_no_pt": med(step["step_no_pt"]), **{k: med(step[k]) for k in parts},
                      "step_recompute": med(step["step_recompute"]), "recompute_logp_old": med(step["recompute_logp_old"]),
                      "trl_step": med(trl_res["step"]) if trl_res else None,
                      **{k: med(v) for k, v in step.items() if k.startswith(("sample_", "generate_"))}},
        "timings_all_s": {k: v["all_s"] for k, v in step.items()},
        "peak_memory_bytes": {"sample_ours": samp["ours"]["peak_bytes"], "generate_student": samp["generate_student"]["peak_bytes"],
                              "generate_teacher": samp["generate_teacher"]["peak_bytes"], "step": step["step"]["peak_bytes"],
                              "step_no_pt": step["step_no_pt"]["peak_bytes"], "trl_step": trl_res["step"]["peak_bytes"] if trl_res else None,
                              "step_recompute": step["step_recompute"]["peak_bytes"],
                              **{k: step[k]["peak_bytes"] for k in parts},
                              "kind": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "process RSS (polled)",
                              "process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "tokens_per_s": {"sample_ours": tokens / med(samp["ours"]),
                         "generate_student": tokens / med(samp["generate_student"]),
                         "generate_teacher": tokens / med(samp["generate_teacher"]),
                         "train_step": tokens / med(step["step"]), "train_step_no_pt": tokens / med(step["step_no_pt"]),
                         "trl_step": tokens / med(trl_res["step"]) if trl_res else None},
        "teacher_evals": {**evals, "trl_teacher_evals_per_token": trl_res["teacher_evals_per_token"] if trl_res else None},
        "decode": decode_report(step, tokens),
        "teacher_logits_one_collection_bytes": teacher_logits_bytes(),
        "memory_plan_bytes": memory_table(),
        "lm_head": head_report(smoke=a.shapes == "smoke"),
        "recompute": {"recompute_logp_old_vs_step": med(step["recompute_logp_old"]) / med(step["step"]),
                      # bf16's recompute (one no-grad forward per rollout, once per collection) against one PPO epoch of
                      # the loss over the same rollouts (forward + backward): a collection pays it once, --ppo-epochs times
                      "recompute_logp_old_vs_epoch": med(step["recompute_logp_old"]) / med(step["part_loss_backward"]),
                      "step_recompute_vs_keep": med(step["step_recompute"]) / med(step["step"])},
        "notes": {
            "trl": trl_note,
            "step": "minillm.distill(--steps 1 --rollouts B --batch-size B --ppo-epochs 1): one collection of B rollouts, "
                    "one optimisation pass over it, one optimizer step; checkpoint saving and plotting switched off",
            "step_vs_trl": "our step without L_PT (TRL has none) vs GKDTrainer.training_step on the same B prompts "
                           "(see trl) + clip + AdamW step; the ratio of medians, and per round in ratios_per_round_median",
            "teacher_evals_per_token": "(teacher positions whose output is a response-token distribution) / (B*N response "
                                       "tokens) over one distill step; prefill: 1 per row (y_1), decode: 1 per call and row; "
                                       "the P-1 prompt-only prefill positions are in teacher_prompt_positions_per_prompt_token",
        },
        "wall_s": time.time() - t_start,
    }
    if a.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return res


def decode_report(step, tokens):
    """The collection (sample_rollouts, B prompts, α = 0.2) under each --decode mode, and HF generate's static-cache
    baselines where they ran: median seconds, sampled tokens/s, peak memory."""
    names = [k for k in step if k.startswith("sample_") and k != "sample_baseline" or "_static" in k]
    out = {k: {"s": step[k]["median_s"], "tokens_per_s": tokens / step[k]["median_s"], "peak_bytes": step[k]["peak_bytes"]}
           for k in names}
    gen = [k for k in ("generate_student_static_compiled", "generate_student_static") if k in step]
    if gen and "generate_teacher" in step:  # mixed_vs_generate against the fair GPU baseline
        teacher = step.get(gen[0].replace("student", "teacher"), step["generate_teacher"])
        out["mixed_vs_generate_static"] = step["sample_ours"]["median_s"] / (step[gen[0]]["median_s"] + teacher["median_s"])
    return out


def print_table(r):
    c, t, m, tok = r["config"], r["timings_s"], r["peak_memory_bytes"], r["tokens_per_s"]
    gb = lambda x: "-" if x is None else f"{x / 2**30:.2f} GiB"  # noqa: E731
    ms = lambda x: "-" if x is None else f"{1000 * x:.0f} ms"  # noqa: E731
    ts = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    print(f"MiniLLM bench | {c['shapes']} | {c['device_name']} | {c['dtype']} | teacher {c['teacher']} student {c['student']} "
          f"(layers, width, heads) | V {c['vocab']} | B {c['B']} P {c['P']} N {c['N']} | median of {c['repeats']}")
    print(f"{'measurement':<44}{'time':>10}{'tok/s':>10}{'peak mem':>12}")
    rows = [("sample_rollouts (teacher-mixed)", t["sample_ours"], tok["sample_ours"], m["sample_ours"]),
            ("HF generate, student alone", t["generate_student"], tok["generate_student"], m["generate_student"]),
            ("HF generate, teacher alone", t["generate_teacher"], tok["generate_teacher"], m["generate_teacher"]),
            ("distill step (collect + 1 pass + L_PT + opt)", t["step"], tok["train_step"], m["step"]),
            ("  part: collect_rollouts", t["part_sampling"], None, m["part_sampling"]),
            ("  part: minillm_loss + backward", t["part_loss_backward"], None, m["part_loss_backward"]),
            ("  part: pt_loss + backward", t["part_pt"], None, m["part_pt"]),
            ("  part: clip + AdamW step", t["part_optimizer"], None, m["part_optimizer"]),
            ("distill step without L_PT", t["step_no_pt"], tok["train_step_no_pt"], m["step_no_pt"]),
            ("distill step, --teacher-logits recompute", t["step_recompute"], None, m["step_recompute"]),
            ("bf16 only: recompute_logp_old", t["recompute_logp_old"], None, None),
            ("TRL GKDTrainer step (beta=1, lmbda=1)", t["trl_step"], tok["trl_step"], m["trl_step"])]
    labels = {"sample_coarse": "  buckets " + "/".join(map(str, COARSE_BUCKETS)) + ", cold",
              "sample_lockstep": "  --decode auto, teacher in lockstep"}
    for k, v in r["decode"].items():
        if isinstance(v, dict):
            mode = f"  --decode {k.removeprefix('sample_').replace('ours', 'auto')}" if k.startswith("sample_") else f"  HF {k}"
            rows.append((labels.get(k, mode), v["s"], v["tokens_per_s"], v["peak_bytes"]))
    for name, x, k, mem in rows:
        print(f"{name:<44}{ms(x):>10}{ts(k):>10}{gb(mem):>12}")
    e = r["teacher_evals"]
    print(f"{'ratio':<44}{'value':>10}  target")
    for k in ["mixed_vs_generate", "teacher_evals_per_token", "step_vs_parts", "step_vs_trl"]:
        v = r[k]
        print(f"{k:<44}{'null' if v is None else f'{v:.3f}':>10}  {r['targets'][k]}")
    rr = r["ratios_per_round_median"]
    print("per-round medians: mixed_vs_generate " + f"{rr['mixed_vs_generate']:.3f}, step_vs_trl "
          + ("null" if rr["step_vs_trl"] is None else f"{rr['step_vs_trl']:.3f}"))
    print(f"teacher_evals_per_token = {r['notes']['teacher_evals_per_token']}")
    trl_evals = e["trl_teacher_evals_per_token"]
    print(f"teacher: {e['teacher_calls']} calls per step, prompt-only positions per prompt token "
          f"{e['teacher_prompt_positions_per_prompt_token']:.2f}; TRL's teacher evals per response token "
          + ("-" if trl_evals is None else f"{trl_evals:.3f}"))
    print(f"teacher logits of one paper collection (256 rollouts × 256 tokens × {V} × 2 B, bf16): "
          f"{r['teacher_logits_one_collection_bytes'] / 1e9:.2f} GB ({gb(r['teacher_logits_one_collection_bytes'])}) "
          "— computed, not measured; --teacher-logits offload keeps them in CPU memory, recompute keeps none")
    rc = r["recompute"]
    print(f"recompute_logp_old / step {rc['recompute_logp_old_vs_step']:.3f} (bf16 runs pay it once per collection), "
          f"/ one epoch of loss + backward {rc['recompute_logp_old_vs_epoch']:.3f}; "
          f"step with --teacher-logits recompute / keep {rc['step_recompute_vs_keep']:.3f}")
    print("computed peak GPU memory of one rank, paper sizes (256 rollouts, prompt 256, 256 new tokens, gen batch 64, micro 16):")
    print(f"{'pair':<32}{'weights':>11}{'buffer':>11}{'keep':>11}{'offload':>11}{'recompute':>11}")
    for name, pl in r["memory_plan_bytes"].items():
        md = pl["modes"]
        print(f"{name:<32}{gb(pl['weights']):>11}{gb(pl['teacher_logprob_buffer']):>11}{gb(md['keep']['gpu']):>11}"
              f"{gb(md['offload']['gpu']):>11}{gb(md['recompute']['gpu']):>11}")
    lh = r["lm_head"]
    print("LM head: share of a token's matmul FLOPs, and the estimated step time of an fp32 head over a tensor-core one: "
          + ", ".join(f"{k} {v['head_share']:.1%} (x{v['step_fp32_head_vs_tensor_core']:.1f})" for k, v in lh["flop_share"].items()))
    for shape, e in lh["logprob_error_nats"].items():
        print(f"LM head {shape}, |Δ log p| at a sampled token (mean / max over p >= 1e-4), nats: "
              + ", ".join(f"{k} {v['sampled_mean_abs']:.1e}/{v['max_abs_p_ge_1e4']:.1e}" for k, v in e.items() if isinstance(v, dict)))
    d = r["depth"]
    print(f"teacher calls per decoded position (α = 0.2): {r['teacher_calls_per_token']:.3f}; mixed_vs_generate of "
          "--baseline: " + ("-" if r["mixed_vs_generate_baseline"] is None else f"{r['mixed_vs_generate_baseline']:.3f}"))
    print(f"one collection, teacher {d['config']['teacher']} / student {d['config']['student']} (4x deeper), "
          f"B {d['config']['B']} N {d['config']['N']}: " + ", ".join(f"{k} {ms(v)}" for k, v in d["collection_s"].items())
          + f"; speed-up vs the teacher at every position {d['speedup_vs_every_position']:.2f}x"
          + (f", vs --baseline {d['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in d else ""))
    o = r["offload"]
    for when in ("before", "after"):
        w, rd = o[f"per_token_{when}"], o[f"per_micro_batch_read_{when}"]
        print(f"offload {when}: per token {w['bus_bytes'] / 1e6:.1f} MB over the bus, {w['host_alloc_bytes'] / 1e6:.1f} MB "
              f"pageable allocated, {w['sync_copies']:.0f} synchronous copies; per micro-batch read "
              f"{rd['host_alloc_bytes'] / 1e6:.0f} MB allocated; store pinned {gb(o[f'pinned_bytes_{when}'])}")
    print(f"memory: {m['kind']}; process max RSS {gb(m['process_max_rss'])}")
    print(f"trl: {r['notes']['trl']}")
    print(f"wall time {r['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
