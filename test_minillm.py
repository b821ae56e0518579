"""Claims about the method, each checked on the CPU in seconds, offline (HF_HUB_OFFLINE=1).

Tiny GPT-2 models are built from configs and saved to a temporary folder, so `from_pretrained` on a
local path is what the tests exercise; data is a small JSONL the tests write.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import minillm as M

HERE = Path(__file__).parent


# ---------------------------------------------------------------------------------------------------
# fixtures: tiny models and a word-level tokenizer, saved and loaded back by path

WORDS = ("the a cat dog sat on mat ran to park red blue green big small one two three four five "
         "name color animal say list count what is of and write short story about").split()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    specials = ["<pad>", "<eos>", "<unk>"]
    prompt_words = M.build_prompt("x", "y").replace("\n", " ").replace(":", " : ").replace(".", " . ").replace(",", " , ").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + prompt_words + WORDS + ["#", ":", ".", ","]))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_gpt2(vocab_size, seed, n_layer=2, n_embd=32, scale=1.0, dtype=torch.float32, tied=True):
    torch.manual_seed(seed)
    cfg = GPT2Config(tie_word_embeddings=tied, vocab_size=vocab_size, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharper distributions than the default init, so p and q differ clearly
        model.transformer.wte.weight.mul_(scale)
        if not tied:
            model.lm_head.weight.normal_(0, scale / n_embd ** 0.5)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tok):
    """A 'teacher' (4 layers) and a 'student' (1 layer) saved to disk with the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, layers, seed in [("teacher", 4, 1), ("student", 1, 2)]:
        model = tiny_gpt2(len(tok), seed, n_layer=layers)
        model.config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def write_jsonl(path, n=12):
    rows = []
    for i in range(n):
        a, b = WORDS[i % 10], WORDS[(3 * i + 1) % 10]
        rows.append({"instruction": f"say {a} and {b}", "input": "" if i % 2 else "the cat", "output": f"{a} {b} {a}"})
    Path(path).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def loss_args(**kw):
    """The real parser's defaults (a fork's new flag is there too), with the flags a loss test sets."""
    args = M.parse_args(["--device", "cpu", "--clip-eps", "0", "--normalize", "sequence"])
    for k, v in kw.items():
        assert hasattr(args, k), f"no flag --{k.replace('_', '-')}"
        setattr(args, k, v)
    return args


def boost_eos(model, eos_id, by):
    """Raise the EOS logit by `by` (a hook on the LM head, so sampling and every later forward see it): sampled
    responses then end at EOS at different steps, and a batch holds right-padded responses."""
    bias = torch.zeros(model.get_output_embeddings().weight.shape[0], device=model.get_output_embeddings().weight.device)
    bias[eos_id] = by
    model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out + bias.to(out.dtype))
    return model


# ---------------------------------------------------------------------------------------------------
# 1. The gradient is the exact gradient of the sequence-level reverse KL.

V, EOS, PROMPT, N_MAX = 4, 3, [0, 1], 3


def all_responses():
    """Every response of at most N_MAX tokens that stops at its first EOS."""
    out = []
    for n in range(1, N_MAX + 1):
        for ys in itertools.product(range(V), repeat=n):
            if EOS not in ys[:-1] and (n == N_MAX or ys[-1] == EOS):
                out.append(list(ys))
    return out


def response_logits(model, y):
    ids = torch.tensor([PROMPT + y])
    return model(input_ids=ids).logits[:, len(PROMPT) - 1:-1]  # (1, n, V)


def fake_sampler(rollout, teacher_out):
    """sample_rollouts' contract: the teacher's log-probs go into `teacher_out` (the collection's buffer) when given."""
    out = {k: v.clone() for k, v in rollout.items()}
    if teacher_out is not None:
        n = out["tokens"].shape[1]
        teacher_out[:, :n] = torch.log_softmax(out["teacher_logits"], -1)
        out["teacher_logits"] = teacher_out[:, :n]
    return out


def surrogate_gradient(student, teacher, include_current=False, single_step=True, length_norm=False):
    """Σ_y q_θ(y) ∇ loss(y): the expectation over every response of the per-sequence surrogate. The rewards and
    advantages of each response come from the production code (`collect_rollouts`, flags parsed by `parse_args`),
    with the sampler replaced by one that returns that response."""
    flags = ["--device", "cpu", "--alpha", "0", "--clip-eps", "0", "--normalize", "sequence", "--gen-batch-size", "1",
             "--max-new-tokens", str(N_MAX)]
    flags += ([] if length_norm else ["--no-length-norm"]) + (["--include-current"] if include_current else []) + ([] if single_step else ["--no-single-step"])
    args = M.parse_args(flags)
    student.zero_grad()
    for y in all_responses():
        tokens = torch.tensor([y])
        with torch.no_grad():
            zs, zt = response_logits(student, y), response_logits(teacher, y)
            logq, logp = M.token_logprobs(zs, tokens), M.token_logprobs(zt, tokens)
        ones = torch.ones_like(logq)
        rollout = {"tokens": tokens, "mask": ones, "logp_student": logq, "logp_teacher": logp, "logp_mix": logq,
                   "w": ones, "kl": M.reverse_kl(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)),
                   "teacher_logits": zt}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(M, "sample_rollouts", lambda *a, **k: fake_sampler(rollout, k.get("teacher_out")))
            mb = M.collect_rollouts(student, teacher, [PROMPT], args, [EOS], 0, torch.float64)
        loss, _ = M.minillm_loss(student, mb, args, n_norm=1, dtype=torch.float64)
        (logq.sum().exp() * loss).backward()  # weight by q_θ(y): an exact expectation, no sampling
    return torch.cat([p.grad.flatten() for p in student.parameters()])


def exact_kl_gradient(student, teacher):
    """∇_θ KL(q_θ||p) = ∇ Σ_y q_θ(y) log(q_θ(y)/p(y)) by autograd over the enumeration."""
    student.zero_grad()
    kl = 0.0
    for y in all_responses():
        tokens = torch.tensor([y])
        logq = M.token_logprobs(response_logits(student, y), tokens).sum()
        with torch.no_grad():
            logp = M.token_logprobs(response_logits(teacher, y), tokens).sum()
        kl = kl + logq.exp() * (logq - logp)
    kl.backward()
    return kl.item(), torch.cat([p.grad.flatten() for p in student.parameters()])


@pytest.fixture(scope="module")
def enum_models():
    student = tiny_gpt2(V, seed=0, n_layer=1, n_embd=8, scale=20.0, dtype=torch.float64)
    teacher = tiny_gpt2(V, seed=1, n_layer=1, n_embd=8, scale=20.0, dtype=torch.float64).requires_grad_(False)
    return student, teacher


def test_enumeration_is_a_distribution(enum_models):
    student, _ = enum_models
    with torch.no_grad():
        total = sum(M.token_logprobs(response_logits(student, y), torch.tensor([y])).sum().exp() for y in all_responses())
    assert len(all_responses()) == 1 + 3 + 36
    assert abs(total.item() - 1.0) < 1e-12


def test_paper_gradient_is_exact_reverse_kl_gradient(enum_models):
    """(∇L)_Single + (∇L)_Long with R_{t+1} is an unbiased estimate of ∇KL(q_θ||p) (docs/paper.md §1)."""
    student, teacher = enum_models
    kl, exact = exact_kl_gradient(student, teacher)
    assert kl > 0.05 and exact.norm() > 1e-3  # a non-trivial problem
    ours = surrogate_gradient(student, teacher)
    torch.testing.assert_close(ours, exact, atol=1e-6, rtol=0)


def test_reinforce_without_single_step_is_also_exact(enum_models):
    """--no-single-step puts r_t back in the return: plain REINFORCE, still unbiased."""
    student, teacher = enum_models
    _, exact = exact_kl_gradient(student, teacher)
    ours = surrogate_gradient(student, teacher, single_step=False)
    torch.testing.assert_close(ours, exact, atol=1e-6, rtol=0)


def test_official_return_counts_r_t_twice(enum_models):
    """The lmops return includes r_t while the single-step term already has it: biased (docs/paper.md §2)."""
    student, teacher = enum_models
    _, exact = exact_kl_gradient(student, teacher)
    biased = surrogate_gradient(student, teacher, include_current=True)
    assert (biased - exact).norm() > 0.1 * exact.norm()


def test_length_norm_changes_the_gradient(enum_models):
    student, teacher = enum_models
    assert not torch.allclose(surrogate_gradient(student, teacher, length_norm=True), surrogate_gradient(student, teacher))


# ---------------------------------------------------------------------------------------------------
# 2. Pure functions on hand-checked values.

def test_long_term_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # T = 3
    # paper: R_{t+1} = sum of future rewards; normalised = their mean (divisor T-t-1)
    assert M.long_term_returns(r, m, length_norm=False).tolist() == [[6.0, 4.0, 0.0, 0.0]]
    assert M.long_term_returns(r, m, length_norm=True).tolist() == [[3.0, 4.0, 0.0, 0.0]]
    # lmops: G_t = Σ_{k>=t} γ^{k-t} r_k, divided by T-t
    g = 0.5
    G = [1 + g * 2 + g * g * 4, 2 + g * 4, 4.0]
    got = M.long_term_returns(r, m, gamma=g, include_current=True, length_norm=True)
    torch.testing.assert_close(got, torch.tensor([[G[0] / 3, G[1] / 2, G[2] / 1, 0.0]]))


def test_mixture_and_weights():
    lq, lp = torch.log(torch.tensor([0.5, 0.1])), torch.log(torch.tensor([0.1, 0.7]))
    mix = M.mixture_logprobs(lq, lp, 0.2)
    torch.testing.assert_close(mix.exp(), torch.tensor([0.8 * 0.5 + 0.2 * 0.1, 0.8 * 0.1 + 0.2 * 0.7]))
    assert torch.equal(M.importance_weights(lq, M.mixture_logprobs(lq, lp, 0.0)), torch.ones(2))
    torch.testing.assert_close(M.importance_weights(lq, mix), torch.tensor([0.5 / 0.42, 0.1 / 0.22]))


def test_rewards_are_detached_scaled_clipped():
    lq = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    lp = torch.tensor([[-3.0, -500.0]])
    r = M.rewards(lp, lq, torch.ones(1, 2), scale=0.5, clip=100.0)
    assert not r.requires_grad
    assert r.tolist() == [[-4.0, -100.0]]


def test_ppo_clip():
    lq = torch.zeros(1, 3, requires_grad=True)
    w = torch.tensor([[1.0, 2.0, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clipped = M.long_term_loss(lq, torch.zeros(1, 3), w, adv, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.2, 0.8]]))  # ρ = 2 clipped to 1.2 (A>0); ρ = 0.5 clipped to 0.8 (A<0)
    assert clipped.tolist() == [[False, True, True]]
    loss.sum().backward()
    assert lq.grad.tolist() == [[-1.0, 0.0, 0.0]]  # clipped tokens pass no gradient


def test_reverse_kl_closed_form():
    zs, zt = torch.tensor([[[0.0, 1.0]]], requires_grad=True), torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    kl = M.reverse_kl(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1))
    q = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    torch.testing.assert_close(kl, (q * (q / p).log()).sum().view(1, 1))
    kl.sum().backward()
    assert zt.grad is None  # gradient through the student only


def test_whiten():
    x, m = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(M.whiten(x, m), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# 3. Teacher-mixed sampling.

@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("alpha,coins,max_chunk,top_k", [
    (0.5, None, None, 0),  # coins drawn inside: the teacher catches up in chunks of varying length
    (0.0, None, None, 0),  # one teacher pass over the finished responses, prompt included
    (1.0, None, None, 0),  # the teacher at every position
    (0.5, [0, 0, 1, 0, 0, 0, 0, 1], 2, 0),  # catch-ups forced by max_chunk between the coins
    (0.5, None, None, 3)])  # top-k over the mixture: the per-token path
def test_recorded_logprobs_equal_a_fresh_forward(alpha, coins, max_chunk, top_k, decode):
    """KV-cached, left-padded sampling records the log-probs and teacher logits of a plain forward of each row
    alone: model(input_ids=prompt + response), no padding, default positions, however the teacher's calls are
    chunked, with a growing cache or a static one (padded forwards, our own masks). Rows end at EOS at different
    steps."""
    student = boost_eos(tiny_gpt2(40, 3, scale=5.0), 1, 2.0)
    teacher = boost_eos(tiny_gpt2(40, 4, n_layer=3, scale=5.0), 1, 2.0)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, attn = M.collate_prompts(prompts, pad_id=0)
    roll = M.sample_rollouts(student, teacher, ids, attn, eos_ids=torch.tensor([1]), pad_id=0, max_new_tokens=8, alpha=alpha,
                             top_k=top_k, generator=torch.Generator().manual_seed(4), max_chunk=max_chunk,
                             coins=None if coins is None else torch.tensor(coins, dtype=torch.bool), decode=decode)
    lengths = roll["mask"].sum(1).long().tolist()
    assert max(lengths) == 8 and min(lengths) < 8  # rows end at EOS at different steps
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        y = roll["tokens"][i, :n]
        assert (y[-1] == 1 or n == 8) and 1 not in y[:-1].tolist()  # ended at its first EOS, or at the limit
        with torch.no_grad():
            zs = student(input_ids=torch.tensor([p + y.tolist()])).logits[0, len(p) - 1:-1]  # (n, V)
            zt = teacher(input_ids=torch.tensor([p + y.tolist()])).logits[0, len(p) - 1:-1]
        lq, lp = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
        idx = torch.arange(n)
        mix = M.filter_probs((1 - alpha) * lq.exp() + alpha * lp.exp(), top_k)[idx, y]
        expected = {"logp_student": lq[idx, y], "logp_teacher": lp[idx, y], "logp_mix": mix.log(),
                    "w": lq[idx, y].exp() / mix, "kl": (lq.exp() * (lq - lp)).sum(-1),
                    "top1": (zs.argmax(-1) == zt.argmax(-1)).float()}
        for k, v in expected.items():
            torch.testing.assert_close(roll[k][i, :n], v, atol=1e-4, rtol=0, msg=k)
            assert (roll[k][i, n:] == 0).all(), k  # masked after the EOS
        torch.testing.assert_close(roll["teacher_logits"][i, :n], lp, atol=1e-4, rtol=0)  # kept as log-probs
        assert (roll["tokens"][i, n:] == 0).all()  # pad after the EOS


def test_response_mask_first_eos_is_a_target():
    student, teacher = tiny_gpt2(6, 5, scale=5.0), tiny_gpt2(6, 6, scale=5.0)
    ids, attn = M.collate_prompts([[2, 3]] * 64, pad_id=0)
    roll = M.sample_rollouts(student, teacher, ids, attn, eos_ids=torch.tensor([1]), pad_id=0, max_new_tokens=6, alpha=0.2)
    for toks, m in zip(roll["tokens"].tolist(), roll["mask"].tolist()):
        n = int(sum(m))
        assert m == [1.0] * n + [0.0] * (len(m) - n)  # a prefix of ones
        assert 1 not in toks[:n - 1]  # no EOS before the last target
        assert n == len(m) or toks[n - 1] == 1  # stopped early only at an EOS, which is a target
    assert (roll["mask"][:, -1] == 0).any()  # some responses did stop early


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_samples_follow_the_mixture(alpha):
    """Tokens are drawn from p~ = α·p + (1-α)·q_θ as a coin flip shared by the batch: coin 1, every row draws from
    p; coin 0, from q_θ (α = 0: never the teacher, α = 1: always). The recorded log p~ and w = q_θ/p~ are those of
    the exact mixture whatever the coin: they take a different code path from the draw."""
    student, teacher = tiny_gpt2(5, 7, scale=2.0, tied=False), tiny_gpt2(5, 8, scale=2.0, tied=False)
    prompt = torch.tensor([[2, 3, 4]])
    with torch.no_grad():
        q = torch.softmax(student(input_ids=prompt).logits[0, -1], -1)
        p = torch.softmax(teacher(input_ids=prompt).logits[0, -1], -1)
    assert (p - q).abs().sum() > 0.3  # the two are easy to tell apart
    n = 2000
    ids, attn = M.collate_prompts([[2, 3, 4]] * n, pad_id=0)
    target = alpha * p + (1 - alpha) * q
    for coin in [c for c in (False, True) if (alpha > 0 if c else alpha < 1)]:  # the coins of positive probability
        roll = M.sample_rollouts(student, teacher, ids, attn, eos_ids=torch.tensor([99]), pad_id=0, max_new_tokens=1,
                                 alpha=alpha, generator=torch.Generator().manual_seed(0), coins=torch.tensor([coin]))
        freq = torch.bincount(roll["tokens"][:, 0], minlength=5).float() / n
        assert (freq - (p if coin else q)).abs().max() < 4 * (0.25 / n) ** 0.5  # 4 standard errors
        y = roll["tokens"][:, 0]
        torch.testing.assert_close(roll["logp_mix"][:, 0], target[y].log(), atol=1e-5, rtol=0)
        torch.testing.assert_close(roll["w"][:, 0], q[y] / target[y], atol=1e-5, rtol=0)
    if alpha == 0:
        assert torch.equal(roll["w"], torch.ones_like(roll["w"]))


def response_probs(model, ys):
    """Per-token probabilities of each response in `ys` under `model`: a list of (n,) tensors. One forward over all
    of them, right-padded (a causal model's earlier positions never see the padding)."""
    padded = torch.tensor([PROMPT + y + [0] * (N_MAX - len(y)) for y in ys])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=padded).logits[:, len(PROMPT) - 1:-1].double(), -1)  # (R, N_MAX, V)
    return [probs[i, torch.arange(len(y)), y] for i, y in enumerate(ys)]


def response_code(tokens, n):
    """A response (its first n of N_MAX tokens) as one integer, (..., N_MAX), (...) -> (...)."""
    pos = torch.arange(N_MAX)
    return (tokens * (pos < n[..., None]) * V ** pos).sum(-1) + V ** N_MAX * n


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_whole_responses_follow_the_product_of_mixtures(alpha):
    """The law of a whole response is Π_t p~(y_t|y_<t), for coins drawn in advance and shared by the batch.
    Given the coins c, the rows are independent draws from Π_t (c_t ? p : q_θ)(y_t|y_<t) (a χ² test with a fixed
    seed, for every coin sequence); averaged over c ~ Bernoulli(α)^N this is Π_t p~ (exact, by enumeration)."""
    student, teacher = tiny_gpt2(V, 20, n_layer=1, n_embd=8, scale=3.0), tiny_gpt2(V, 21, n_layer=1, n_embd=8, scale=3.0)
    ys = all_responses()
    q, p = response_probs(student, ys), response_probs(teacher, ys)
    law = torch.zeros(len(ys), dtype=torch.float64)  # Σ_c P(c) Π_t (c_t ? p : q)
    n = 2000
    ids, attn = M.collate_prompts([PROMPT] * n, pad_id=0)
    for c in itertools.product([0, 1], repeat=N_MAX):
        weight = alpha ** sum(c) * (1 - alpha) ** (N_MAX - sum(c))
        if weight == 0:
            continue
        given_c = torch.stack([torch.where(torch.tensor(c[:len(y)]).bool(), pi, qi).prod() for y, pi, qi in zip(ys, p, q)])
        law += weight * given_c
        roll = M.sample_rollouts(student, teacher, ids, attn, torch.tensor([EOS]), 0, N_MAX, alpha,
                                 generator=torch.Generator().manual_seed(sum(c)), coins=torch.tensor(c).bool())
        drawn = response_code(roll["tokens"], roll["mask"].sum(1).long())  # one integer per response
        counts = torch.stack([(drawn == response_code(torch.tensor(y + [0] * (N_MAX - len(y))), torch.tensor(len(y))))
                              .sum() for y in ys]).double()
        assert counts.sum() == n  # every sample is one of the enumerated responses
        expected = n * given_c
        big = expected >= 5  # χ² over the cells expected 5+ times, the rest lumped into one cell
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        chi2, df = ((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum().item(), len(obs) - 1
        assert chi2 < df + 5 * (2 * df) ** 0.5, (c, chi2, df)  # ~5 standard deviations of a χ²(df)
    mix = [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)]
    torch.testing.assert_close(law, torch.stack([m.prod() for m in mix]), atol=1e-12, rtol=0)
    torch.testing.assert_close(law.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12, rtol=0)


class CallCounter:
    """Counts a model's forward calls (a forward pre-hook)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("coins,max_chunk,calls", [
    ([0] * 8, None, 1),  # α = 0: one pass over the finished responses (the prompt included)
    ([1] * 8, None, 8),  # α = 1: every position
    ([0, 1, 0, 0, 1, 0, 0, 0], None, 3),  # at each coin, and once more for the positions after the last one
    ([0, 1, 0, 0, 1, 0, 0, 1], None, 3),  # the last position is a coin: nothing is left after it
    ([0] * 8, 3, 3)])  # max_chunk: positions 0-2, 3-5, 6-7
def test_teacher_runs_at_coins_only(coins, max_chunk, calls):
    """The student decodes every token; the teacher runs once per coin that says "teacher", plus once for the
    positions after the last coin (and whenever max_chunk positions are waiting). Every position is scored."""
    student, teacher = tiny_gpt2(12, 30, scale=3.0), tiny_gpt2(12, 31, scale=3.0)
    count_s, count_t = CallCounter(student), CallCounter(teacher)
    ids, attn = M.collate_prompts([[2, 3], [4, 5, 6]], pad_id=0)
    roll = M.sample_rollouts(student, teacher, ids, attn, torch.tensor([99]), 0, 8, 0.5, max_chunk=max_chunk,
                             coins=torch.tensor(coins).bool(), generator=torch.Generator().manual_seed(0))
    assert roll["mask"].all() and roll["tokens"].shape == (2, 8)  # no EOS: 8 tokens each
    assert count_s.calls == 8 and count_t.calls == calls  # the student: the prompt + 7 decode steps
    assert (roll["teacher_logits"] < 0).all() and (roll["logp_teacher"] < 0).all()  # every position written


def test_teacher_stops_when_every_row_has_ended():
    """Rows ending at EOS at different times: the teacher's last pass covers up to the last live row's end."""
    student = boost_eos(tiny_gpt2(12, 32, scale=3.0), 1, 2.0)
    teacher = boost_eos(tiny_gpt2(12, 33, scale=3.0), 1, 2.0)
    count_t = CallCounter(teacher)
    ids, attn = M.collate_prompts([[2, 3]] * 6, pad_id=0)
    roll = M.sample_rollouts(student, teacher, ids, attn, torch.tensor([1]), 0, 16, 0.0,
                             generator=torch.Generator().manual_seed(2))
    lengths = roll["mask"].sum(1)
    assert roll["mask"].shape[1] == lengths.max() < 16 and len(set(lengths.tolist())) > 2  # ended apart, all before 16
    assert count_t.calls == 1  # α = 0: one pass, after the last row ended


# ---------------------------------------------------------------------------------------------------
# 4. Padding, SFT masking, the teacher-once property.

def make_batch(student, teacher, prompts, n_new=5, seed=0):
    ids, attn = M.collate_prompts(prompts, pad_id=0)
    roll = M.sample_rollouts(student, teacher, ids, attn, torch.tensor([1]), 0, n_new, 0.2, generator=torch.Generator().manual_seed(seed))
    roll.update(prompt_ids=ids, prompt_mask=attn)
    r = M.rewards(roll["logp_teacher"], roll["logp_student"], roll["mask"])
    roll["adv"] = M.long_term_returns(r, roll["mask"])
    return roll


EOS_PROMPTS = [[3, 4], [5, 6, 7], [8], [9, 10, 11, 12]]


def eos_batch():
    """4 rollouts whose prompts differ in length (left padding) and whose responses end at EOS after 4, 6, 1 and 3
    tokens (right padding; row 1 hits the 6-token limit), with paper-style advantages."""
    student, teacher = boost_eos(tiny_gpt2(30, 12, scale=5.0), 1, 2.0), boost_eos(tiny_gpt2(30, 13, scale=5.0), 1, 2.0)
    mb = make_batch(student, teacher, EOS_PROMPTS, n_new=6, seed=1)
    assert mb["mask"].sum(1).tolist() == [4, 6, 1, 3]
    return student, teacher, mb


def row(mb, i):
    return {k: v[i:i + 1] for k, v in mb.items()}


def test_padding_invariance():
    """Padding (left on prompts, right on responses that ended at EOS) changes neither logits nor loss: each row
    alone, with no padding at all, gives the same logits as a plain forward and the same loss as inside the batch."""
    student, _, mb = eos_batch()
    padded = {k: M.pad_to(v, v.shape[1] + 4, 1, 0, left=True) if k.startswith("prompt") else M.pad_to(v, v.shape[1] + 3, 1, 0)
              for k, v in mb.items()}
    with torch.no_grad():
        batch_logits = M.student_response_logits(student, padded, torch.float32)  # (4, 9, V)
    for i, n in enumerate(mb["mask"].sum(1).long().tolist()):
        ids = EOS_PROMPTS[i] + mb["tokens"][i, :n].tolist()
        with torch.no_grad():
            plain = student(input_ids=torch.tensor([ids])).logits[0, len(EOS_PROMPTS[i]) - 1:-1]  # (n, V)
        torch.testing.assert_close(batch_logits[i, :n], plain, atol=1e-5, rtol=0)
    args = loss_args(clip_eps=0.2)
    rows = sum(M.minillm_loss(student, row(mb, i), args, n_norm=1)[0] for i in range(4))  # no padding anywhere
    for batch in (mb, padded):
        loss, _ = M.minillm_loss(student, batch, args, n_norm=1)  # a sum over the batch's response tokens
        torch.testing.assert_close(loss, rows, atol=1e-5, rtol=0)


def test_sft_masks_the_prompt(tok):
    examples = [([5, 6, 7], [8, 9, 1]), ([5], [10, 1])]
    ids, attn, labels = M.collate_sft(examples, pad_id=0)
    assert labels.tolist() == [[-100, -100, -100, 8, 9, 1], [-100, 10, 1, -100, -100, -100]]
    assert attn.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    model = tiny_gpt2(20, 11)
    loss_sum, n = M.sft_loss(model, ids, attn, labels, torch.float32)
    assert n.item() == 5  # response tokens and the EOS only
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits
        lp = torch.log_softmax(logits, -1)
    manual = -(lp[0, 2, 8] + lp[0, 3, 9] + lp[0, 4, 1] + lp[1, 0, 10] + lp[1, 1, 1])
    torch.testing.assert_close(loss_sum, manual, atol=1e-5, rtol=0)


def test_alpaca_template():
    assert M.build_prompt("say red") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nsay red\n\n### Response:\n")
    assert M.build_prompt("say red", "the cat") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nsay red\n\n### Input:\nthe cat"
        "\n\n### Response:\n")


def test_tokenization_matches_the_official_rule(tok):
    rec = {"instruction": "say red", "input": "", "output": "red blue"}
    p, r = M.tokenize_example(tok, rec, 256, 512)
    assert tok.convert_ids_to_tokens(p) == ("Below is an instruction that describes a task . Write a response that "
                                            "appropriately completes the request . ### Instruction : say red ### "
                                            "Response :").split()  # the word-level tokenizer drops the newlines
    assert tok.convert_ids_to_tokens(r) == ["red", "blue", "<eos>"]
    assert M.tokenize_example(tok, rec, max_prompt_len=5, max_len=512) is None  # long prompts are dropped
    assert len(M.tokenize_example(tok, dict(rec, output="red blue red blue"), 256, len(p) + 3)[1]) == 3  # cut, EOS kept


def merging_tokenizer():
    """Characters, plus one merge: "\n" + "r" -> "\nr", so the prompt's last "\n" and a response starting with
    "r" become one token, as BPE tokenizers do across the prompt/response boundary."""
    from tokenizers import Tokenizer, models
    chars = sorted(set(M.build_prompt("say red") + "blue "))
    vocab = {c: i for i, c in enumerate(["<eos>", "<unk>"] + chars + ["\nr"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "r")], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def test_tokenization_across_a_merge_at_the_boundary():
    """response = tokens(prompt + output) minus the first len(tokens(prompt)), then EOS (docs/paper.md §5): when the last
    prompt token merges with the first response token, the merged token stays in the prompt's count and the response
    starts after it (tokenising the output alone would give "r e d ...")."""
    tk = merging_tokenizer()
    rec = {"instruction": "say red", "input": "", "output": "red blue"}
    p, r = M.tokenize_example(tk, rec, 256, 512)
    assert tk.convert_ids_to_tokens(p)[-2:] == [":", "\n"]
    assert tk.convert_ids_to_tokens(r) == ["e", "d", " ", "b", "l", "u", "e", "<eos>"]


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_gradient_accumulation_does_not_change_the_update(normalize):
    """minillm_backward with micro-batches of 1 and of the whole batch (rows of 4, 6, 1, 3 tokens) gives the
    gradient of Σ loss / (the batch's 14 tokens, or its 4 sequences)."""
    student, _, mb = eos_batch()
    args = loss_args(clip_eps=0.2, normalize=normalize)

    def grad(micro):
        args.micro_batch_size = micro
        student.zero_grad()
        stats = M.minillm_backward(student, mb, args, torch.float32)
        return torch.cat([p.grad.flatten() for p in student.parameters()]), stats

    (g1, s1), (g4, s4) = grad(1), grad(4)
    torch.testing.assert_close(g1, g4, atol=1e-6, rtol=1e-5)
    assert s1.keys() == s4.keys() and all(abs(s1[k] - s4[k]) < 1e-6 for k in s1), (s1, s4)
    student.zero_grad()
    count = {"token": 14, "sequence": 4}[normalize]
    (sum(M.minillm_loss(student, row(mb, i), args, n_norm=1)[0] for i in range(4)) / count).backward()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in student.parameters()]), g4, atol=1e-6, rtol=1e-5)


def distill_args(tmp_path, **kw):
    args = M.parse_args(["--device", "cpu", "--out", str(tmp_path), "--steps", "2", "--rollouts", "4", "--batch-size", "2",
                         "--micro-batch-size", "1", "--gen-batch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "6",
                         "--warmup-steps", "1", "--log-interval", "100"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_teacher_runs_once_per_rollout_token(tmp_path, tok, monkeypatch):
    student, teacher = tiny_gpt2(len(tok), 14, scale=5.0), tiny_gpt2(len(tok), 15, scale=5.0).requires_grad_(False)
    calls = []
    teacher.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    bufs = []
    orig = M.collect_rollouts
    monkeypatch.setattr(M, "collect_rollouts", lambda *a, **k: bufs.append(orig(*a, **k)) or bufs[-1])
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    M.distill(student, teacher, tok, prompts, str(tmp_path / "d"), distill_args(tmp_path), torch.float32)
    assert len(bufs) == 1  # 2 steps × batch 2 = one collection of 4 rollouts, one epoch
    P, N = bufs[0]["prompt_ids"].shape[1], bufs[0]["tokens"].shape[1]
    assert all(b == 4 for b, _ in calls) and calls[0][1] >= P  # the whole batch; the first call reads the prompt
    assert sum(w for _, w in calls) == P + N - 1  # every prompt and response token once; the last needs no forward
    # teacher evaluations per response position: exactly one, none during the two optimizer steps


def test_every_stabiliser_switch_changes_training(tmp_path, tok):
    """α = 0, no length norm, no single-step term, no clipping, no L_PT: each really changes the update."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    pt = iter(lambda: torch.arange(3, 19), None)

    def run(**kw):
        student, teacher = tiny_gpt2(len(tok), 16, scale=5.0), tiny_gpt2(len(tok), 17, scale=5.0).requires_grad_(False)
        stream = None if kw.pop("no_pt", False) else pt
        args = distill_args(tmp_path, pt_batch_size=2, **kw)
        M.set_seed(0)
        M.distill(student, teacher, tok, prompts, str(tmp_path / "d"), args, torch.float32, stream)
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    base = run()
    assert torch.equal(base, run())  # seeded: the same run twice is identical
    for change in [dict(alpha=0.0), dict(length_norm=False), dict(single_step=False), dict(clip_eps=0.0), dict(no_pt=True)]:
        assert not torch.allclose(base, run(**change), atol=1e-7, rtol=0), change


def test_teacher_logit_modes_train_alike(tmp_path, tok):
    """--teacher-logits keep, offload and recompute change where the teacher's log-probs live, not the update: keep and
    offload give bitwise the same weights, recompute (a fresh teacher forward per micro-batch) the same to 1e-5.
    Responses end at EOS at different steps and the buffer is reused by a second, shorter or longer collection, so
    stale rows of the buffer would show if any reached the loss unmasked."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]

    def run(mode):
        student = boost_eos(tiny_gpt2(len(tok), 16, scale=5.0), tok.eos_token_id, 2.0)
        teacher = boost_eos(tiny_gpt2(len(tok), 17, scale=5.0), tok.eos_token_id, 2.0).requires_grad_(False)
        args = distill_args(tmp_path, steps=4, batch_size=2, micro_batch_size=1, teacher_logits=mode)
        M.set_seed(0)
        M.distill(student, teacher, tok, prompts, str(tmp_path / mode), args, torch.float32)
        rows = [json.loads(line) for line in open(tmp_path / mode / "log.jsonl")]
        return torch.cat([p.detach().flatten() for p in student.parameters()]), rows

    keep, rows = run("keep")
    assert len({r["len"] for r in rows}) > 1 and min(r["len"] for r in rows) < 6  # early EOS, collections differ
    assert torch.equal(keep, run("offload")[0])
    torch.testing.assert_close(run("recompute")[0], keep, atol=1e-5, rtol=0)


def test_offload_copies_are_contiguous_and_exact(monkeypatch):
    """--teacher-logits offload on a GPU (its branch forced on CPU tensors): every write of a chunk and every read of
    a minibatch's rows is a copy between contiguous tensors of one dtype (a DMA, non-blocking), and the store ends
    up holding what a plain slice assignment gives."""
    monkeypatch.setattr(M, "offloaded", lambda *a: True)
    logp = torch.randn(3, 4, 7).log_softmax(-1)
    store, ref = torch.zeros(5, 6, 7, dtype=torch.float16), torch.zeros(5, 6, 7, dtype=torch.float16)
    copies = []
    orig = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda d, s, *a, **k: copies.append(
        d.is_contiguous() and s.is_contiguous() and d.dtype == s.dtype) or orig(d, s, *a, **k))
    M.store_write(store[1:4], 2, logp)  # rows 1..3 of the collection, positions 2..5
    rows = torch.tensor([3, 1])
    got = M.store_read(store, rows, 6, "cpu")
    monkeypatch.undo()
    ref[1:4, 2:6] = logp.half()
    assert torch.equal(store, ref) and torch.equal(got, ref[rows])
    assert copies == [True] * 5  # 3 rows written, 2 rows read: one contiguous copy each


def test_pinned_store_is_exact_and_unpinned_with_its_last_view(monkeypatch):
    """The offloaded store is page-locked at exactly its size (no power-of-two rounding) and unregistered only
    when no tensor views it any more. cudart is faked: the CPU has none."""
    calls = []

    class FakeCudart:
        cudaError = type("cudaError", (), {"success": 0})

        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    store = M.pinned_zeros((3, 5, 7), torch.float16)
    assert store.shape == (3, 5, 7) and store.dtype == torch.float16 and not store.any()
    assert calls == [("register", store.data_ptr(), 3 * 5 * 7 * 2)]  # exact: 210 bytes, not 256
    view = store[1:]
    del store
    import gc
    gc.collect()
    assert len(calls) == 1  # a view still reads it
    view.fill_(1.0)
    ptr = calls[0][1]
    del view
    gc.collect()
    assert calls[1] == ("unregister", ptr)


def test_pt_switches_change_training_through_the_cli(tmp_path, saved_models, capsys):
    """--pt-data none and --pt-coef 0 each remove L_PT from the command line: the same weights as each other,
    other weights than with L_PT; and the logged loss_pt is there only with L_PT."""
    write_jsonl(tmp_path / "data.jsonl")
    (tmp_path / "pt.txt").write_text("the cat sat on the mat\n\nthe dog ran to the park\n\na big red dog\n")
    base = ["--teacher", saved_models["teacher"], "--student", saved_models["student"], "--data", str(tmp_path / "data.jsonl"),
            "--val-size", "3", "--device", "cpu", "--skip-teacher-sft", "--skip-student-sft", "--steps", "2", "--rollouts", "4",
            "--batch-size", "2", "--micro-batch-size", "2", "--gen-batch-size", "4", "--ppo-epochs", "1",
            "--max-new-tokens", "6", "--pt-batch-size", "2", "--pt-seq-len", "8", "--log-interval", "100"]

    def run(name, *flags):
        M.main(base + ["--out", str(tmp_path / name), "--pt-data", str(tmp_path / "pt.txt"), *flags])
        rows = [json.loads(line) for line in open(tmp_path / name / "minillm" / "log.jsonl")]
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name / "minillm")
        return torch.cat([p.detach().flatten() for p in model.parameters()]), rows

    with_pt, rows = run("pt")
    assert all(r["loss_pt"] > 0 for r in rows)
    no_data, rows_no_data = run("pt-data", "--pt-data", "none")
    no_coef, rows_no_coef = run("pt-coef", "--pt-coef", "0")
    for without, rows in ((no_data, rows_no_data), (no_coef, rows_no_coef)):
        assert not any("loss_pt" in r for r in rows)
        assert not torch.allclose(without, with_pt, atol=1e-7, rtol=0)
    assert torch.equal(no_data, no_coef)  # two ways to switch L_PT off, one training


# ---------------------------------------------------------------------------------------------------
# 5. End to end, through the command line.

def run_cli(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(HERE / "minillm.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_end_to_end_cli(tmp_path, saved_models):
    write_jsonl(tmp_path / "data.jsonl")
    (tmp_path / "pt.txt").write_text("the cat sat on the mat\n\nthe dog ran to the park\n\na big red dog\n")
    out = tmp_path / "run"
    cmd = ["--teacher", saved_models["teacher"], "--student", saved_models["student"], "--data", str(tmp_path / "data.jsonl"),
           "--val-size", "3", "--pt-data", str(tmp_path / "pt.txt"), "--out", str(out), "--device", "cpu",
           "--teacher-epochs", "1", "--student-epochs", "2", "--sft-max-steps", "2", "--sft-batch-size", "4",
           "--sft-micro-batch-size", "2", "--steps", "2", "--rollouts", "4", "--batch-size", "2", "--micro-batch-size", "1",
           "--gen-batch-size", "2", "--max-new-tokens", "8", "--pt-batch-size", "2", "--pt-seq-len", "8", "--recipe", "lmops"]
    res = run_cli(cmd, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ["teacher-sft", "student-sft", "minillm"]:
        assert (out / stage / "done.json").exists()
        assert (out / stage / "model.safetensors").exists()
        AutoModelForCausalLM.from_pretrained(out / stage)
        rows = [json.loads(line) for line in open(out / stage / "log.jsonl")]
        assert rows and all("step" in r for r in rows)
    rows = [json.loads(line) for line in open(out / "minillm" / "log.jsonl")]
    assert len(rows) == 2 and {"rkl", "w_mean", "w_max", "clip_frac", "len", "loss_long", "loss_single", "loss_pt", "lr", "ms", "tok_s"} <= set(rows[0])
    assert (out / "minillm" / "reverse_kl.png").exists()
    assert "step     2/2 | rkl" in res.stdout
    res2 = run_cli(cmd, tmp_path)  # a finished run is not redone
    assert res2.returncode == 0 and res2.stdout.count("skipping") == 3


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_kd_loss_by_hand(lam):
    """KD: (1-λ)·Σ CE(gold) + λ·Σ KL(p||q_θ) over response tokens (λ = 0: SFT's cross-entropy, λ = 1: the KL
    alone), on two sequences of different lengths, so the shorter one is right-padded."""
    examples = [([5, 6], [8, 1]), ([7], [9, 10, 11, 1])]
    ids, attn, labels = M.collate_sft(examples, pad_id=0)
    assert attn.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    student, teacher = tiny_gpt2(20, 20, scale=3.0), tiny_gpt2(20, 21, scale=3.0)
    kd_sum, n = M.sft_loss(student, ids, attn, labels, torch.float32, teacher, lam)
    with torch.no_grad():
        lq = torch.log_softmax(student(input_ids=torch.tensor([[5, 6, 8, 1]])).logits[0], -1)  # each row alone
        lp = torch.log_softmax(teacher(input_ids=torch.tensor([[5, 6, 8, 1]])).logits[0], -1)
        lq2 = torch.log_softmax(student(input_ids=torch.tensor([[7, 9, 10, 11, 1]])).logits[0], -1)
        lp2 = torch.log_softmax(teacher(input_ids=torch.tensor([[7, 9, 10, 11, 1]])).logits[0], -1)
    manual = 0.0
    for q_, p_, pos, target in [(lq, lp, 1, 8), (lq, lp, 2, 1), (lq2, lp2, 0, 9), (lq2, lp2, 1, 10), (lq2, lp2, 2, 11),
                                (lq2, lp2, 3, 1)]:  # the position that predicts each target
        ce = -q_[pos, target]
        kl = (p_[pos].exp() * (p_[pos] - q_[pos])).sum()
        manual = manual + (1 - lam) * ce + lam * kl
    assert n.item() == 6
    torch.testing.assert_close(kd_sum, manual, atol=1e-5, rtol=0)


def test_baselines_end_to_end(tmp_path, saved_models):
    """sft, kd and seqkd each train from one command; SeqKD's teacher data is written once, then reused."""
    write_jsonl(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    common = ["--teacher", saved_models["teacher"], "--student", saved_models["student"], "--data", str(tmp_path / "data.jsonl"),
              "--val-size", "3", "--out", str(out), "--device", "cpu", "--teacher-epochs", "1", "--student-epochs", "1",
              "--sft-max-steps", "2", "--sft-batch-size", "4", "--gen-batch-size", "4", "--max-new-tokens", "6"]
    for method in ["sft", "kd", "seqkd"]:
        res = run_cli(common + ["--method", method], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (out / method / "done.json").exists(), method
        AutoModelForCausalLM.from_pretrained(out / method)
    assert not (out / "minillm").exists()
    data = out / "seqkd" / "teacher_data.jsonl"
    rows = [json.loads(line) for line in open(data)]
    assert len(rows) == 9 and all(set(r) == {"instruction", "input", "output"} for r in rows)
    stamp = data.stat().st_mtime_ns
    (out / "seqkd" / "done.json").unlink()  # force the stage to train again: the teacher data must be reused
    res = run_cli(common + ["--method", "seqkd"], tmp_path)
    assert res.returncode == 0 and "reusing teacher data" in res.stdout
    assert data.stat().st_mtime_ns == stamp
    assert res.stdout.count("teacher-sft: done, skipping") == 1


def test_recipe_defaults_and_overrides():
    """Defaults are the paper's (docs/paper.md §1, §3); --recipe lmops switches the six settings the official code computes
    differently, and nothing else; an explicit flag wins over either."""
    paper, lmops = vars(M.parse_args([])), vars(M.parse_args(["--recipe", "lmops"]))
    expected_paper = dict(gamma=1.0, include_current=False, whiten=False, reward_scale=1.0, reward_clip=0.0, pt_kd_ratio=0.0)
    expected_lmops = dict(gamma=0.95, include_current=True, whiten=True, reward_scale=0.5, reward_clip=100.0, pt_kd_ratio=0.5)
    assert {k: paper[k] for k in expected_paper} == expected_paper
    assert {k: lmops[k] for k in expected_lmops} == expected_lmops
    assert {k for k in paper if paper[k] != lmops[k]} == set(expected_lmops) | {"recipe"}
    shared = dict(alpha=0.2, clip_eps=0.2, length_norm=True, single_step=True, normalize="token", pt_coef=1.0, lr=5e-6,
                  warmup_steps=100, weight_decay=1e-6, batch_size=64, rollouts=256, ppo_epochs=4, steps=5000,
                  temperature=1.0, top_p=1.0, top_k=0, max_prompt_len=256, max_len=512, max_new_tokens=256,
                  teacher_lr=5e-5, student_lr=5e-4, sft_batch_size=32, teacher_epochs=10, val_size=1000, grad_clip=1.0)
    assert {k: paper[k] for k in shared} == shared
    mixed = M.parse_args(["--recipe", "lmops", "--no-whiten", "--gamma", "1.0"])
    assert mixed.whiten is False and mixed.gamma == 1.0 and mixed.include_current is True
    assert M.parse_args(["--include-current"]).include_current is True


def test_import_has_no_side_effects():
    """`import minillm` prints nothing, and pulls in neither eval.py nor demo.py (they import minillm, never the
    other way round)."""
    code = "import sys, minillm; print(sorted({'eval', 'demo'} & set(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "[]\n", res.stdout + res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_smoke(tmp_path, tok):
    """bf16 teacher, fp32 student under autocast: one distillation step runs and the loss is finite."""
    student = tiny_gpt2(len(tok), 18, scale=5.0).cuda()
    teacher = tiny_gpt2(len(tok), 19, scale=5.0).cuda().to(torch.bfloat16).requires_grad_(False)
    args = distill_args(tmp_path, device="cuda", steps=1)
    M.distill(student, teacher, tok, [[5, 6, 7], [8, 9], [10, 11], [12]], str(tmp_path / "d"), args, torch.bfloat16)
    assert next(student.parameters()).dtype == torch.float32
    rows = [json.loads(line) for line in open(tmp_path / "d" / "log.jsonl")]
    assert all(torch.isfinite(torch.tensor(rows[-1][k])) for k in ["loss_long", "loss_single", "rkl"])
