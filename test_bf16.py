"""bf16 is exact where it must be, whatever the minibatch; every end-of-sequence id ends a response; the GPU-only
choices (the dtype --dtype auto picks, the process-group timeout) checked on the CPU by monkeypatching torch.cuda and
torch.distributed (the device a process binds: test_cuda_paths.py). Tiny models built from configs, saved and loaded back by path."""

import datetime
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import eval as E
import minillm as M
from test_minillm import WORDS, word_tokenizer


def save(model, tok, path, eos):
    """Save with `eos` (an int or a list) as the eos_token_id of both config.json and generation_config.json."""
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_prompts(path, lengths):
    """Instructions of very different lengths (in words), so that rows of a collection carry very different padding."""
    rows = [{"instruction": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)), "output": "the cat"}
            for i, n in enumerate(lengths)]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def distill_log(tmp_path, teacher, student, data, *flags):
    M.main(["--teacher", teacher, "--student", student, "--data", str(data), "--val-size", "1", "--pt-data", "none",
            "--out", str(tmp_path / "run"), "--skip-teacher-sft", "--skip-student-sft", "--device", "cpu",
            "--log-interval", "100", "--save-interval", "0", *flags])
    return [json.loads(line) for line in (tmp_path / "run" / "minillm" / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# 1. Under bf16, ρ_t = w_t exactly on the first minibatch, for any minibatch and micro-batch sizes

def tiny_llama(V, seed):
    """A model whose bf16 log-probabilities depend on how much left padding a row carries: up to 0.02 nats here
    between a row alone and in a batch of long prompts (0.6 on an 8-layer SmolLM2-135M), far above the 0.001 clip."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=V, max_position_embeddings=256))
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)  # sharp distributions, as a trained model's
    return m.eval()


def test_bf16_ratio_is_exactly_w_with_several_micro_batches_per_collection(tmp_path):
    """--alpha 0 makes w ≡ 1 and --lr 1e-12 leaves the weights as they are, so every ratio q_θ/q_old must be exactly 1
    and --clip-eps 0.001 must clip nothing: with prompts of 2 to 30 words, 4 micro-batches per collection and two PPO
    epochs (the second visits the minibatches in another order). Before, log q_old came from a forward over the buffer
    in its own order, and tokens were clipped at every step."""
    tok = word_tokenizer()
    teacher = save(tiny_llama(len(tok), 1), tok, tmp_path / "teacher", tok.eos_token_id)
    student = save(tiny_llama(len(tok), 2), tok, tmp_path / "student", tok.eos_token_id)
    write_prompts(tmp_path / "data.jsonl", [3, 30, 5, 24, 9, 2, 18, 12, 27])
    log = distill_log(tmp_path, teacher, student, tmp_path / "data.jsonl", "--dtype", "bf16", "--alpha", "0",
                      "--clip-eps", "0.001", "--lr", "1e-12", "--warmup-steps", "0", "--steps", "4", "--rollouts", "8",
                      "--batch-size", "4", "--micro-batch-size", "2", "--gen-batch-size", "8", "--ppo-epochs", "2",
                      "--max-new-tokens", "4")
    assert [r["clip_frac"] for r in log] == [0.0] * 4


# ---------------------------------------------------------------------------------------------------
# 2. Every end-of-sequence id ends a response (Llama 3 lists three, Gemma-it and Qwen2.5-Instruct two)

SECOND_EOS = 13  # listed by config.json and generation_config.json next to the tokenizer's EOS


def says_13(V, seed):
    """A model that emits token 13 at every position (probability ~1): logits 60 for 13 and 0 elsewhere."""
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=128, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=False))
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(torch.eye(16)[0])
        m.lm_head.weight.zero_()
        m.lm_head.weight[SECOND_EOS, 0] = 60.0
    return m.eval()


@pytest.fixture(scope="module")
def two_eos(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_eos")
    tok = word_tokenizer()
    eos = [tok.eos_token_id, SECOND_EOS]
    paths = {who: save(says_13(len(tok), seed), tok, root / who, eos) for who, seed in [("teacher", 1), ("student", 2)]}
    write_prompts(root / "data.jsonl", [2, 5, 3, 7, 4, 6])
    return tok, paths, root / "data.jsonl"


def test_end_ids_list_the_tokenizer_config_and_generation_config(two_eos):
    tok, paths, _ = two_eos
    assert M.end_ids(tok, *M.named_configs(paths["student"])) == sorted([tok.eos_token_id, SECOND_EOS])
    model = M.load_model(paths["student"], "cpu")
    assert M.end_ids(tok, *M.model_configs(model)) == sorted([tok.eos_token_id, SECOND_EOS])


def test_a_listed_eos_ends_the_rollouts_mask_and_diagnostics(two_eos, tmp_path):
    """The issue's reproduction: config and generation_config list [EOS, 13], the models emit 13 first. One MiniLLM
    step must log len 1.0 and no-eos 0.00 at --max-new-tokens 8 (before: len 8.0, no-eos 1.00)."""
    tok, paths, data = two_eos
    log = distill_log(tmp_path, paths["teacher"], paths["student"], data, "--steps", "1", "--rollouts", "4",
                      "--batch-size", "4", "--micro-batch-size", "2", "--gen-batch-size", "4", "--max-new-tokens", "8")
    assert (log[0]["len"], log[0]["no_eos"]) == (1.0, 0.0)


def test_a_listed_eos_ends_single_model_sampling_decoding_seqkd_and_eval(two_eos):
    tok, paths, data = two_eos
    model = M.load_model(paths["teacher"], "cpu").eval()
    eos_ids = M.end_ids(tok, *M.model_configs(model))
    ids = tok("the cat sat")["input_ids"]
    assert M.decode_response(tok, ids + [SECOND_EOS] + ids, eos_ids) == ("the cat sat", 3)
    assert E.response_mask(torch.tensor([ids + [SECOND_EOS] + ids]), eos_ids).sum() == len(ids) + 1
    args = M.parse_args(["--device", "cpu", "--max-new-tokens", "8", "--gen-batch-size", "2"])
    prompts = [ids, ids[:1], ids + ids]
    assert M.teacher_responses(model, tok, prompts, args, torch.float32) == ["", "", ""]  # SeqKD's teacher data
    examples = E.prepare(tok, M.load_records(str(data)), 256, 8)
    eargs = E.parse_args(["--model", paths["teacher"], "--device", "cpu", "--max-new-tokens", "8", "--batch-size", "4",
                          "--out", str(data.parent / "eval")])
    assert E.generate(model, tok, examples, 10, eargs, torch.float32) == [("", 0)] * len(examples)
    batches = E.sample_batches(model, examples[:2], 2, 10, eargs, torch.float32, tok, tok.pad_token_id)  # exposure
    assert all(mask.sum(1).tolist() == [1.0] * 4 for _, _, _, mask in batches)


def test_teacher_and_student_with_other_end_ids_stop_with_one_line(two_eos, tmp_path, capsys):
    tok, paths, data = two_eos
    student = save(says_13(len(tok), 3), tok, tmp_path / "student", tok.eos_token_id)  # lists the tokenizer's EOS only
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        distill_log(tmp_path, paths["teacher"], student, data, "--steps", "1", "--max-new-tokens", "8")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "end responses at different token ids" in err[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_chat_template_ends_at_the_end_of_turn_and_pt_documents_at_the_pretraining_eos(tmp_path):
    """--template chat: a response ends with <|im_end|> (and still with the tokenizer's own EOS), while the L_PT
    documents are joined by the pre-training EOS <|endoftext|>, never by the end of a turn."""
    from test_families import bpe_tokenizer
    bpe_tokenizer("<|endoftext|>", extra=["<|im_start|>", "<|im_end|>"], chat=True).save_pretrained(tmp_path / "tok")
    tok = M.load_tokenizer(str(tmp_path / "tok"), template="chat")
    end, text_eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == end and M.end_ids(tok) == sorted([end, text_eos])
    (tmp_path / "pt.txt").write_text("the cat sat on the mat\n\na dog ran to the park\n\nname a color\n")
    chunk = next(M.pt_chunks(str(tmp_path / "pt.txt"), tok, 40)).tolist()
    assert text_eos in chunk and end not in chunk


# ---------------------------------------------------------------------------------------------------
# 3. GPU-only choices, on the CPU

@pytest.mark.parametrize("native, cc, new_torch, want", [(True, (9, 0), True, torch.bfloat16), (False, (7, 5), True, torch.float32),
                                                         (None, (8, 0), False, torch.bfloat16), (None, (7, 0), False, torch.float32)])
def test_dtype_auto_is_bf16_only_where_native(native, cc, new_torch, want, monkeypatch, capsys):
    """A100/H100: bf16; T4 (7.5) / V100 (7.0): fp32. torch < 2.3 has no including_emulation: the compute capability
    decides. The first log line says which and why."""
    def is_bf16_supported(including_emulation=True):
        if not new_torch:
            raise TypeError("unexpected keyword argument 'including_emulation'")
        return native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    args = M.parse_args(["--device", "cpu"])
    args.device = "cuda"
    assert M.resolve_dtype(args) == want
    def stop(*a, **k):  # the first thing run() does after its first line: stop there
        raise SystemExit(0)
    monkeypatch.setattr(M, "load_tokenizer", stop)
    with pytest.raises(SystemExit):
        M.run(args)
    first = capsys.readouterr().out.splitlines()[0]
    assert f"dtype {'bf16' if want == torch.bfloat16 else 'fp32'} (auto: Some GPU " in first


def test_process_group_timeout_comes_from_the_flag(monkeypatch):
    """Rank 0 writing a large checkpoint keeps the others in a collective: NCCL's 10 minutes would kill the job."""
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append(k))
    for var in ["RANK", "MASTER_ADDR", "WORLD_SIZE"]:
        monkeypatch.delenv(var, raising=False)
    assert M.parse_args(["--device", "cpu"]).dist_timeout == 60.0
    M.init_distributed(M.parse_args(["--device", "cpu", "--fsdp", "--dist-timeout", "90"]))  # one process, a group of one
    assert calls[0]["timeout"] == datetime.timedelta(minutes=90)
