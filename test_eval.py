"""Claims about the evaluation protocol (eval.py), checked on the CPU in seconds, offline (HF_HUB_OFFLINE=1).

The metrics are checked on hand-computed cases; the CLI runs end to end on a tiny GPT-2 and a word-level
tokenizer saved to a temporary folder, with a local JSONL test set.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import eval as E
import minillm as M

HERE = Path(__file__).parent


# ---------------------------------------------------------------------------------------------------
# fixtures: a word-level tokenizer and a tiny GPT-2, saved and loaded back by path

WORDS = "the a cat dog sat on mat ran to park red blue green big small one two three say and".split()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    specials = ["<pad>", "<eos>", "<unk>"]
    template = M.build_prompt("x", "y").replace("\n", " ")
    for p in ":.,#":
        template = template.replace(p, f" {p} ")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + template.split() + WORDS + list(":.,#")))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_gpt2(vocab_size, eos_id, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_gpt2(len(tok), tok.eos_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_test_set(path, n=10):
    """Instructions with and without input; references a string or a list (max over references)."""
    rows = []
    for i in range(n):
        a, b = WORDS[i % 8], WORDS[(3 * i + 1) % 8]
        long = "the big red dog ran to the park and sat on one small mat"  # 13 words: bucket [11,inf)
        out = [f"{a} {b}", long] if i % 3 == 0 else long if i % 3 == 1 else f"{a} {b} {a} and {b} {a} {b}"  # 2 / 13 / 7 words
        rows.append({"instruction": f"say {a} and {b}", "input": "" if i % 2 else "the cat", "output": out})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------------
# 1. Rouge-L is the paper's: rouge_score's LCS F-measure, stemmed, max over references, x100.

def test_rouge_l_identical_and_disjoint():
    assert E.rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert E.rouge_l(["red blue green"], ["one two three"]) == 0.0


def test_rouge_l_stems_words():
    assert E.rouge_l(["running dogs"], ["run dog"]) == pytest.approx(100.0)  # Porter: running -> run, dogs -> dog


def test_rouge_l_by_hand():
    # LCS("cat dog bird", "cat fish dog bird") = 3: P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7
    assert E.rouge_l(["cat dog bird"], ["cat fish dog bird"]) == pytest.approx(100 * 6 / 7)
    # LCS = the cat on mat (4 of 6 words each side): F = 2/3; the mean over two examples is (2/3 + 1)/2
    assert E.rouge_l(["the cat sat on the mat", "a b"], ["the cat lay on a mat", "a b"]) == pytest.approx(100 * 5 / 6)


def test_rouge_l_takes_the_best_reference():
    refs = [["one two three", "cat fish dog bird", "cat dog bird"]]
    assert E.rouge_l(["cat dog bird"], refs) == pytest.approx(100.0)
    assert E.rouge_l(["cat dog bird"], [["one two three", "cat fish dog bird"]]) == pytest.approx(100 * 6 / 7)


def test_rouge_l_empty_prediction_scores_zero():
    assert E.rouge_l([""], ["the cat"]) == 0.0


def test_rouge_scorer_is_built_once():
    E.rouge_l(["a"], ["a"])
    assert E._rouge_scorer() is E._rouge_scorer()


# ---------------------------------------------------------------------------------------------------
# 2. The analyses: Dist-4 and the reference-length buckets.

def test_distinct_4_by_hand():
    # 4-grams: (a b c d), (b c d e) from the first, (a b c d) from the second, none from "x y z": 2 distinct / 3
    assert E.distinct_n(["a b c d e", "a b c d", "x y z"], 4) == pytest.approx(2 / 3)
    assert E.distinct_n(["a b c d", "b c d a"], 4) == 1.0  # n-grams never cross two responses
    assert E.distinct_n(["a a a a a a"], 4) == pytest.approx(1 / 3)
    assert E.distinct_n(["too short", ""], 4) == 0.0


def test_length_buckets_by_hand():
    assert [E.length_bucket(n) for n in [0, 5, 6, 10, 11, 300]] == ["[0,5]", "[0,5]", "[6,10]", "[6,10]", "[11,inf)", "[11,inf)"]


def test_mean_std_over_seeds():
    assert E.mean_std([20.0, 24.0]) == (22.0, pytest.approx(2 ** 0.5 * 2))  # sample std (n-1)
    assert E.mean_std([5.0]) == (5.0, 0.0)
    assert E.mean_std([None, None]) == (None, None)


# ---------------------------------------------------------------------------------------------------
# 3. Prompts and generation follow training: same template, long prompts dropped, padding changes nothing.

def test_long_prompts_are_dropped_and_counted(tok, capsys):
    records = [{"instruction": "say cat", "input": "", "output": "cat"},
               {"instruction": " ".join(["dog"] * 300), "input": "", "output": "dog"},
               {"prompt": "say<n>cat", "output": ["cat", "a cat"]}]
    kept = E.prepare(tok, records, max_prompt_len=64, max_new_tokens=8, name="t")
    assert [ex["idx"] for ex in kept] == [0, 2]
    assert "2 examples, 1 dropped" in capsys.readouterr().out
    assert kept[0]["prompt_ids"] == M.tokenize_example(tok, records[0], 64, 72)[0]  # the training template
    assert kept[1]["references"] == ["cat", "a cat"] and kept[1]["ref_len"] == 1


def test_left_padding_does_not_change_greedy_responses(tok):
    model = tiny_gpt2(len(tok), tok.eos_token_id, seed=3)
    short, long = tok("say cat")["input_ids"], tok("the big red dog sat on the small mat")["input_ids"]

    def greedy(prompts):
        ids, attn = M.collate_prompts(prompts, tok.pad_token_id)
        return E.sample(model, ids, attn, torch.tensor([tok.eos_token_id]), tok.pad_token_id, 6, greedy=True)

    alone, batched = greedy([short]), greedy([long, short])
    assert batched[1, :alone.shape[1]].tolist() == alone[0].tolist()


def test_decode_cuts_at_the_first_eos(tok):
    ids = tok("cat dog")["input_ids"] + [tok.eos_token_id] + tok("red")["input_ids"]
    assert E.decode_response(tok, ids, [tok.eos_token_id]) == ("cat dog", 2)


def test_missing_file_is_a_one_line_error(tmp_path, capsys):
    for data, message in [(str(tmp_path / "nope.jsonl"), "not found"), ("dolly-typo", "unknown test set")]:
        with pytest.raises(SystemExit) as e:
            E.main(["--model", "x", "--data", data])
        assert e.value.code == 2  # minillm.die: the same convention as minillm.py
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and message in err[0], err


def test_official_test_sets_are_the_hub_files_of_the_official_evaluation(tmp_path, monkeypatch, capsys):
    """The hub cannot be reached here: a fake download records what would be fetched."""
    import huggingface_hub
    fake = tmp_path / "valid.jsonl"
    fake.write_text("".join(json.dumps({"instruction": f"say {i}", "output": "cat"}) + "\n" for i in range(10_005)))
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: asked.append(kw) or str(fake))
    assert len(E.load_test_set("dolly")[1]) == 10_005
    assert len(E.load_test_set("uinst")[1]) == 10_000  # UnNI: the first 10,000 only
    assert len(E.load_test_set("MiniLLM/sinst:6_10/valid.jsonl", limit=7)[1]) == 7
    assert [(a["repo_id"], a["filename"], a["repo_type"]) for a in asked] == [
        ("MiniLLM/dolly", "valid.jsonl", "dataset"), ("MiniLLM/uinst", "11_/valid.jsonl", "dataset"),
        ("MiniLLM/sinst", "6_10/valid.jsonl", "dataset")]
    assert E.expand_data(["all"]) == ["dolly", "self-inst", "vicuna", "sinst", "uinst"]

    def offline(**kw):
        raise OSError("offline mode is enabled\nmore detail")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        E.load_test_set("vicuna")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: could not fetch valid.jsonl of the hub dataset MiniLLM/Vicuna: OSError: offline mode is enabled\n"


def test_import_has_no_side_effects(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    importlib.reload(E)  # executes the module's top level again
    assert capsys.readouterr().out == "" and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# 4. End to end: the table prints, generations are written, a seed reproduces itself, seeds differ.

def run_cli(args, cwd):
    # one thread: on a tiny model, thread hand-offs cost more than the arithmetic (8 ms vs 20 µs a layer norm)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(HERE / "eval.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_end_to_end_cli(tmp_path, model_dir):
    data = tmp_path / "toy.jsonl"
    write_test_set(data)
    common = ["--model", model_dir, "--data", str(data), "--max-new-tokens", "12", "--batch-size", "4", "--device", "cpu"]
    stdout = run_cli(common + ["--seeds", "10", "20", "--out", str(tmp_path / "a")], tmp_path)

    assert "| model | toy |" in stdout and " ± " in stdout  # the Markdown table, mean ± std over seeds
    assert "Dist-4" in stdout and "[11,inf)" in stdout
    assert (tmp_path / "a" / "results.md").read_text() in stdout
    res = json.loads((tmp_path / "a" / "results.json").read_text())["results"][model_dir]["toy"]
    assert res["n_examples"] == 10 and res["seeds"] == [10, 20] and len(res["rouge_l"]["per_seed"]) == 2
    assert 0 <= res["rouge_l"]["mean"] <= 100 and 0 < res["dist4"]["mean"] <= 100 and res["lm_loss"] > 0
    assert {b: v["n"] for b, v in res["buckets"].items()} == {"[0,5]": 4, "[6,10]": 3, "[11,inf)": 3}

    gen = tmp_path / "a" / "generations" / E.safe_name(model_dir) / "toy"
    rows10 = [json.loads(line) for line in open(gen / "seed10.jsonl")]
    assert len(rows10) == 10 and {"prompt", "references", "response", "rouge_l", "bucket"} <= set(rows10[0])
    assert res["rouge_l"]["per_seed"][0] == pytest.approx(sum(r["rouge_l"] for r in rows10) / 10)

    # Same seed, run again (here in-process, after other work) -> the same generations, byte for byte;
    # another seed -> other samples. One thread, as in the subprocess, so even the float sums are the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        E.main(common + ["--seeds", "10", "--out", str(tmp_path / "b")])
    finally:
        torch.set_num_threads(threads)
    again = tmp_path / "b" / "generations" / E.safe_name(model_dir) / "toy" / "seed10.jsonl"
    assert again.read_text() == (gen / "seed10.jsonl").read_text()
    assert (gen / "seed20.jsonl").read_text() != (gen / "seed10.jsonl").read_text()
