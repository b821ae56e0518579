"""Real GPUs and real models, proved on the CPU: bf16 does not change the algorithm, and any Hugging Face causal
LM works (BOS tokens, padded vocabularies, chat templates, sliding-window caches), each family through the whole
pipeline. Tiny models built offline from configs of GPT-2, OPT, Llama, Qwen2 and Gemma 2, with byte-level BPE
tokenizers trained here on a few sentences (the way each family's tokenizer starts a text is set up as theirs)."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, GPT2Config, GPT2LMHeadModel, LlamaConfig, OPTConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

import eval as E
import minillm as M

os.environ["HF_HUB_OFFLINE"] = "1"

CORPUS = ["the cat sat on the mat", "a dog ran to the park", "name a color: red blue green",
          M.build_prompt("say the cat", "the dog"), M.build_prompt("count to three")] * 10
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(eos, bos=None, add_bos=False, extra=(), chat=False):
    """A byte-level BPE (300 tokens) trained on CORPUS. add_bos: the tokenizer puts `bos` before every text, as
    Llama's, Gemma's and OPT's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([eos] + ([bos] if bos else []) + list(extra)))
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    if chat:
        tok.chat_template = CHAT
    return tok


def family(name, vocab_size, seed):
    """A tiny model of `name`'s architecture with `vocab_size` logits (>= the tokenizer: padded rows allowed)."""
    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=256, vocab_size=vocab_size)
    cfg = {"gpt2": lambda: GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2),
           "opt": lambda: OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=2, max_position_embeddings=256, word_embed_proj_dim=32,
                                    bos_token_id=2, eos_token_id=2, pad_token_id=1),
           "llama": lambda: LlamaConfig(**small),
           "qwen2": lambda: Qwen2Config(**small),
           "gemma2": lambda: Gemma2Config(**small, head_dim=16, sliding_window=8, attn_implementation="eager")}[name]()
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # sharper distributions than the default init
        model.get_output_embeddings().weight.mul_(30.0)
    return model.eval()


FAMILIES = {  # name: (tokenizer, teacher logits, student logits)
    "gpt2": (lambda: bpe_tokenizer("<|endoftext|>"), 300, 300),
    "opt": (lambda: bpe_tokenizer("</s>", bos="</s>", add_bos=True, extra=["<pad>"]), 300, 300),
    "llama": (lambda: bpe_tokenizer("</s>", bos="<s>", add_bos=True), 300, 300),
    "qwen2": (lambda: bpe_tokenizer("<|endoftext|>", extra=["<|im_start|>", "<|im_end|>"], chat=True), 320, 304),  # padded
    "gemma2": (lambda: bpe_tokenizer("<eos>", bos="<bos>", add_bos=True), 300, 300),
}


def save_family(root, name):
    make_tok, vt, vs = FAMILIES[name]
    tok = make_tok()
    paths = {}
    for who, v, seed in [("teacher", vt, 1), ("student", vs, 2)]:
        model = family(name, v, seed)
        model.config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / f"{name}-{who}")
        tok.save_pretrained(root / f"{name}-{who}")
        paths[who] = str(root / f"{name}-{who}")
    return tok, paths


def write_data(path, n=10):
    rows = [{"instruction": f"say the {w}", "input": "" if i % 2 else "the dog ran", "output": f"the {w} sat on the mat"}
            for i, w in enumerate(["cat", "dog", "mat", "park", "color"] * (n // 5))]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------------
# 1. bf16 does not change the algorithm

def gpt2_like(V, seed, n_layer):
    """GPT-2's real logits are large and not centred (around -60): a shared direction in every embedding row that
    the final hidden state points against gives the same, here about -38 with a spread of 2."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_positions=128, n_embd=64, n_layer=n_layer, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    m = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        m.transformer.wte.weight.mul_(8.0)
        c = torch.randn(64)
        c /= c.norm()
        m.transformer.wte.weight.add_(c * 3.0)
        m.transformer.ln_f.bias.copy_(-c * 20.0)
    return m.eval()


@pytest.fixture(scope="module")
def bf16_collection():
    V = 2000
    student = M.fp32_head(gpt2_like(V, 0, 2), V)
    teacher = M.fp32_head(gpt2_like(V, 1, 3).to(torch.bfloat16), V).requires_grad_(False)
    args = M.parse_args(["--device", "cpu", "--max-new-tokens", "16", "--gen-batch-size", "16", "--micro-batch-size", "8"])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V - 1, (int(n),), generator=g).tolist() for n in torch.randint(4, 12, (32,), generator=g)]
    torch.manual_seed(0)
    buf = M.collect_rollouts(student, teacher, prompts, args, V - 1, V - 1, torch.bfloat16, torch.Generator().manual_seed(1))
    return student, teacher, buf, args


def test_bf16_first_minibatch_ratio_is_w(bf16_collection):
    """On the first minibatch of a collection q_θ = q_old, so ρ_t = w_t·q_θ/q_old must be w_t: under bf16 autocast,
    with GPT-2-like logits, to 1e-3. (Before: the KV-cached decode's log q_θ with a bf16 LM head was off by up to
    0.25 nats here; now log q_old is recomputed by the loss's own forward.)"""
    student, teacher, buf, args = bf16_collection
    mb = M.trim({k: v[torch.randperm(32, generator=torch.Generator().manual_seed(3))[:16]] for k, v in buf.items()})
    with torch.no_grad():
        logq = M.token_logprobs(M.student_response_logits(student, mb, torch.bfloat16), mb["tokens"])
    m = mb["mask"].bool()
    rho = mb["w"] * torch.exp(logq - mb["logp_student"])
    assert ((rho - mb["w"]).abs() / mb["w"])[m].max() < 1e-3


def test_bf16_rewards_match_a_full_precision_evaluation(bf16_collection):
    """r_t = log p(y_t) - log q_old(y_t) under bf16 equals an fp32 evaluation of the same tokens (the teacher's bf16
    weights upcast) to what bf16 activations allow: mean error under 0.01 nats (a bf16 LM head alone makes 0.07)."""
    student, teacher, buf, args = bf16_collection
    ids = torch.cat([buf["prompt_ids"], buf["tokens"]], 1)
    attn = torch.cat([buf["prompt_mask"], buf["mask"].long()], 1)
    N = buf["tokens"].shape[1]
    with torch.no_grad():
        lp = M.token_logprobs(M.forward(M.fp32_head(teacher.float(), 2000), ids, attn)[:, -N - 1:-1], buf["tokens"])
        lq = M.token_logprobs(M.forward(student, ids, attn)[:, -N - 1:-1], buf["tokens"])
    teacher.to(torch.bfloat16)
    m = buf["mask"].bool()
    err = (buf["rewards"] - (lp - lq))[m].abs()
    assert err.mean() < 0.01 and err.max() < 0.1, (err.mean(), err.max())
    assert buf["teacher_logits"].dtype == torch.float16  # log-probs, 8x finer than bf16 at the same memory


# ---------------------------------------------------------------------------------------------------
# 2. Any Hugging Face causal LM

def test_texts_start_as_the_tokenizer_starts_them(tmp_path):
    """BOS: Llama/Gemma/OPT tokenizers put one before every text; prompts, SFT sequences and L_PT chunks get it,
    responses do not. GPT-2's and Qwen's put nothing."""
    llama = bpe_tokenizer("</s>", bos="<s>", add_bos=True)
    bos = llama.bos_token_id
    rec = {"instruction": "say the cat", "input": "", "output": "the cat sat"}
    prompt, response = M.tokenize_example(llama, rec, 256, 512)
    plain = llama(M.build_prompt("say the cat"), add_special_tokens=False)["input_ids"]
    assert prompt == [bos] + plain and bos not in response and response[-1] == llama.eos_token_id
    (tmp_path / "pt.txt").write_text("the cat sat on the mat\n\na dog ran to the park\n")
    chunk = next(M.pt_chunks(str(tmp_path / "pt.txt"), llama, 40)).tolist()
    first = llama("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert chunk[:len(first) + 3] == [bos] + first + [llama.eos_token_id, bos]
    gpt2 = bpe_tokenizer("<|endoftext|>")
    assert M.text_start(gpt2) == [] and M.tokenize_example(gpt2, rec, 256, 512)[0] == gpt2(M.build_prompt("say the cat"))["input_ids"]
    assert M.text_start(bpe_tokenizer("</s>", bos="</s>", add_bos=True)) == [llama.convert_tokens_to_ids("</s>")]  # OPT


def test_chat_template_sft_targets_are_the_assistants_tokens(tmp_path):
    """--template chat: the prompt is the tokenizer's chat template with the generation prompt; the SFT targets are
    exactly the tokens the template renders for the assistant's answer, up to and including the token that closes
    its turn, which becomes the EOS that sampling stops at."""
    bpe_tokenizer("<|endoftext|>", extra=["<|im_start|>", "<|im_end|>"], chat=True).save_pretrained(tmp_path)
    tok = M.load_tokenizer(str(tmp_path), template="chat")
    assert tok.eos_token == "<|im_end|>"
    rec = {"instruction": "say the cat", "input": "the dog", "output": "the cat sat"}
    prompt, response = M.tokenize_example(tok, rec, 256, 512, template="chat")
    turn = [{"role": "user", "content": "say the cat\n\nthe dog"}, {"role": "assistant", "content": "the cat sat"}]
    full = tok(tok.apply_chat_template(turn, tokenize=False), add_special_tokens=False)["input_ids"]
    assert prompt + response == full[:len(prompt) + len(response)] and response[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(response[:-1]) == "the cat sat"
    _, _, labels = M.collate_sft([(prompt, response)], tok.pad_token_id)
    assert labels[0][labels[0] != -100].tolist() == response
    (tmp_path / "no-template").mkdir()
    bpe_tokenizer("<|endoftext|>").save_pretrained(tmp_path / "no-template")
    with pytest.raises(SystemExit) as e:
        M.load_tokenizer(str(tmp_path / "no-template"), template="chat")
    assert e.value.code == 2


def test_padded_vocabularies_share_the_tokenizers_tokens(tmp_path):
    """Qwen-style pair: one tokenizer (300 tokens), teacher 320 logits, student 304. The check accepts it, both heads
    return exactly the 300 shared tokens (fp32), so no KL includes a padded row and none can be sampled; different
    tokenizers are still refused in one line."""
    tok, paths = save_family(tmp_path, "qwen2")
    M.check_same_vocab(tok, tok, 320, 304)
    teacher = M.load_model(paths["teacher"], "cpu", torch.float32, vocab_size=len(tok))
    student = M.load_model(paths["student"], "cpu", torch.float32, vocab_size=len(tok))
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zt, zs = M.forward(teacher, ids, torch.ones_like(ids)), M.forward(student, ids, torch.ones_like(ids))
    assert zt.shape[-1] == zs.shape[-1] == len(tok) and zt.dtype == zs.dtype == torch.float32
    full = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()  # the same rows, unpatched, in fp32
    torch.testing.assert_close(M.forward(teacher, ids, torch.ones_like(ids)), full(input_ids=ids).logits[..., :len(tok)])
    other = bpe_tokenizer("<|endoftext|>", extra=["<|im_start|>"])  # one token fewer: another tokenizer
    with pytest.raises(SystemExit) as e:
        M.check_same_vocab(other, tok, 320, 304)
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        M.check_same_vocab(tok, tok, 320, 299)  # a model with fewer logits than tokens


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rollouts_equal_a_fresh_forward_in_every_family(name, tmp_path):
    """For each family: the log-probs recorded while sampling (left padding, KV cache made from the config, Gemma 2's
    sliding window of 8 on prompts up to 20 tokens) equal a plain forward of each row alone, unpadded, with the
    model's default positions."""
    _, paths = save_family(tmp_path, name)
    tok = M.load_tokenizer(paths["student"])
    student = M.load_model(paths["student"], "cpu", vocab_size=len(tok)).eval()
    teacher = M.load_model(paths["teacher"], "cpu", vocab_size=len(tok)).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [M.text_start(tok) + torch.randint(3, 290, (n,), generator=g).tolist() for n in (20, 11, 5)]
    ids, attn = M.collate_prompts(prompts, tok.pad_token_id)
    roll = M.sample_rollouts(student, teacher, ids, attn, torch.tensor([tok.eos_token_id]), tok.pad_token_id, 6, alpha=0.3,
                             generator=torch.Generator().manual_seed(1))
    for i, p in enumerate(prompts):
        n = int(roll["mask"][i].sum())
        y = roll["tokens"][i, :n].tolist()
        row = torch.tensor([p + y])
        with torch.no_grad():
            for model, key in [(student, "logp_student"), (teacher, "logp_teacher")]:
                logits = model(input_ids=row).logits[0, len(p) - 1:-1]
                torch.testing.assert_close(M.token_logprobs(logits, torch.tensor(y)), roll[key][i, :n], atol=1e-4, rtol=0)
    if name == "gemma2":  # the cache keeps only the window on sliding layers
        cache = M.new_cache(student)
        M.forward(student, ids, attn, cache)
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        assert min(lengths) <= 8 < max(lengths) == ids.shape[1], lengths


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_runs_the_whole_pipeline(name, tmp_path):
    """Teacher SFT -> student SFT -> MiniLLM (with L_PT) -> eval.py, in process, on each family; Qwen2 with its
    chat template and a padded vocabulary pair. The distilled student loads with from_pretrained and evaluates."""
    tok, paths = save_family(tmp_path, name)
    write_data(tmp_path / "data.jsonl")
    (tmp_path / "pt.txt").write_text("the cat sat on the mat\n\na dog ran to the park\n\nname a color: red\n")
    out = tmp_path / "run"
    template = ["--template", "chat"] if name == "qwen2" else []
    M.main(["--teacher", paths["teacher"], "--student", paths["student"], "--data", str(tmp_path / "data.jsonl"),
            "--val-size", "2", "--pt-data", str(tmp_path / "pt.txt"), "--out", str(out), "--device", "cpu",
            "--teacher-epochs", "1", "--student-epochs", "1", "--sft-max-steps", "1", "--sft-batch-size", "4",
            "--steps", "2", "--rollouts", "4", "--batch-size", "2", "--micro-batch-size", "1", "--gen-batch-size", "4",
            "--max-new-tokens", "5", "--ppo-epochs", "1", "--pt-batch-size", "2", "--pt-seq-len", "12", *template])
    rows = [json.loads(line) for line in open(out / "minillm" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss_single"])) for r in rows)
    model = AutoModelForCausalLM.from_pretrained(out / "minillm")
    assert model.get_output_embeddings().weight.shape[0] == FAMILIES[name][2]  # saved whole, padding rows included
    E.main(["--model", str(out / "minillm"), "--data", str(tmp_path / "data.jsonl"), "--seeds", "1", "--max-new-tokens", "4",
            "--out", str(tmp_path / "eval"), "--device", "cpu", *template])
    (res,) = json.loads((tmp_path / "eval" / "results.json").read_text())["results"].values()
    assert 0 < res["data"]["lm_loss"] < 100 and res["data"]["n_dropped"] == 0  # every prompt went through
