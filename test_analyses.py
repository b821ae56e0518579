"""
Claims about the training diagnostics (minillm.py) and the paper's analyses (eval.py --analysis): exposure bias,
calibration, the judge score. Tiny models built from configs, offline, CPU, seconds.
"""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import minillm as M
from test_minillm import tiny_gpt2, word_tokenizer


# ---------------------------------------------------------------------------------------------------
# 1. Training diagnostics: what a collection of rollouts says about degeneration.

def test_rollout_diagnostics_by_hand():
    eos = 1
    tokens = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5],   # no EOS (hit the limit); 6 4-grams, 2 repeat an earlier one
                           [5, 6, 1, 0, 0, 0, 0, 0, 0],   # ended; too short for a 4-gram
                           [5, 6, 1, 0, 0, 0, 0, 0, 0],   # the same response again
                           [9, 9, 9, 9, 9, 1, 0, 0, 0]])  # ended; 9 9 9 9 twice: 2 4-grams, 1 repeated
    mask = torch.tensor([[1] * 9, [1] * 3 + [0] * 6, [1] * 3 + [0] * 6, [1] * 6 + [0] * 3]).float()
    top1 = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0]]).float()
    d = M.rollout_diagnostics(tokens, mask, eos, top1)
    assert d == {"rows": 4, "no_eos": 1, "grams": 8, "repeated": 3, "distinct": 3, "agree": 14.0}
    buf = {"tokens": tokens, "mask": mask, "top1": top1, "kl": mask * 0.5, "w": mask, "rewards": mask * 0}
    s = M.rollout_stats(buf, seconds=1.0, eos_id=eos)
    assert (s["no_eos"], s["rep4"], s["distinct"], s["len"]) == (0.25, 3 / 8, 0.75, 21 / 4)
    assert s["top1"] == pytest.approx(14 / 21) and s["rkl"] == pytest.approx(0.5)


def test_warning_after_several_degenerate_collections():
    ok, long_ = dict(no_eos=0.1, rep4=0.0), dict(no_eos=0.9, rep4=0.0)
    loops = dict(no_eos=0.0, rep4=0.5)
    assert M.degeneration_warning([long_] * (M.WARN_PATIENCE - 1)) is None  # not yet "several"
    assert M.degeneration_warning([ok] + [long_] * (M.WARN_PATIENCE - 1)) is None  # one good collection resets it
    assert "90% of the responses hit --max-new-tokens" in M.degeneration_warning([long_] * M.WARN_PATIENCE)
    assert "50% of the 4-grams repeat" in M.degeneration_warning([loops] * M.WARN_PATIENCE)


def test_recorded_top1_agreement_equals_a_fresh_forward():
    student, teacher = tiny_gpt2(40, 3, scale=2.0, tied=False), tiny_gpt2(40, 4, n_layer=3, scale=2.0, tied=False)
    ids, attn = M.collate_prompts([[5, 6, 7, 8], [11, 12], [13, 14, 15]], pad_id=0)
    roll = M.sample_rollouts(student, teacher, ids, attn, eos_ids=torch.tensor([1]), pad_id=0, max_new_tokens=8, alpha=0.5,
                             generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mb = dict(roll, prompt_ids=ids, prompt_mask=attn)
        zs, zt = M.student_response_logits(student, mb, torch.float32), M.student_response_logits(teacher, mb, torch.float32)
    expected = (zs.argmax(-1) == zt.argmax(-1)).float() * roll["mask"]
    assert torch.equal(roll["top1"], expected)
    assert 0 < expected.sum() < roll["mask"].sum()  # a case where they agree somewhere, not everywhere


def test_distill_logs_the_diagnostics_and_plots_them(tmp_path):
    from test_minillm import distill_args
    tok = word_tokenizer()
    student, teacher = tiny_gpt2(len(tok), 14, scale=5.0), tiny_gpt2(len(tok), 15, scale=5.0).requires_grad_(False)
    M.distill(student, teacher, tok, [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], str(tmp_path / "d"),
              distill_args(tmp_path), torch.float32)
    rows = [json.loads(line) for line in open(tmp_path / "d" / "log.jsonl")]
    for key in ["no_eos", "rep4", "distinct", "top1", "len"]:
        assert all(0 <= r[key] <= (6 if key == "len" else 1) for r in rows), key
    assert (tmp_path / "d" / "diagnostics.png").exists()


# ---------------------------------------------------------------------------------------------------
# 2. Exposure bias: ExAccErr(l) from KL(p‖q_θ) on the student's and on the teacher's prefixes.

import itertools  # noqa: E402

import eval as E  # noqa: E402

V, EOS, PROMPT, N_MAX = 4, 3, [0, 1], 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A word-level tokenizer, a teacher and a student saved by path, and a small instruction file."""
    root = tmp_path_factory.mktemp("analyses")
    tok = word_tokenizer()
    for name, layers, seed in [("teacher", 2, 21), ("student", 1, 22)]:
        model = tiny_gpt2(len(tok), seed, n_layer=layers, scale=2.0, tied=False)
        model.config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = [{"instruction": f"name a {w}", "input": "", "output": w} for w in ["color", "animal", "dog", "cat"]]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_exposure_of_the_teacher_against_itself_is_zero(saved, tmp_path):
    t = str(saved / "teacher")
    E.main(["--analysis", "exposure", "--model", t, "--teacher", t, "--data", str(saved / "test.jsonl"), "--samples", "2",
            "--max-new-tokens", "5", "--seeds", "10", "--out", str(tmp_path), "--device", "cpu"])
    lines = (tmp_path / "exposure.csv").read_text().splitlines()
    assert lines[0] == "l,teacher_R,teacher_eps,teacher_exaccerr,teacher_running_student,teacher_running_teacher"
    assert len(lines) == 1 + 5
    for line in lines[1:]:
        _, R, eps, err, n_s, n_t = line.split(",")
        assert abs(float(R)) < 1e-6 and abs(float(eps)) < 1e-6  # q_θ = p: no error on any prefix
        assert 0 <= float(n_s) <= 4 * 2 and 0 <= float(n_t) <= 4 * 2  # 4 prompts x 2 samples
    assert (tmp_path / "exposure_bias.png").exists()


def all_responses():
    """Every response of at most N_MAX tokens that stops at its first EOS."""
    return [list(ys) for n in range(1, N_MAX + 1) for ys in itertools.product(range(V), repeat=n)
            if EOS not in ys[:-1] and (n == N_MAX or ys[-1] == EOS)]


def test_exaccerr_equals_enumeration():
    """Padded batch + weighted means = the exact expectations over every prefix, computed prefix by prefix."""
    student, teacher = tiny_gpt2(V, 31, scale=2.0, tied=False), tiny_gpt2(V, 32, n_layer=2, scale=2.0, tied=False)
    ys = all_responses()
    tokens = torch.tensor([y + [EOS] * (N_MAX - len(y)) for y in ys])
    mask = E.response_mask(tokens, EOS)
    ids, attn = torch.tensor([PROMPT] * len(ys)), torch.ones(len(ys), len(PROMPT), dtype=torch.long)
    kl = E.kl_teacher_student(teacher, student, ids, attn, tokens, mask, torch.float32)

    @torch.no_grad()
    def dist(model, prefix):
        return torch.softmax(model(input_ids=torch.tensor([PROMPT + prefix])).logits[0, -1].double(), -1)

    def seq_prob(model, y):
        return torch.stack([dist(model, y[:t])[y[t]] for t in range(len(y))]).prod()

    w_q, w_p = (torch.stack([seq_prob(m, y) for y in ys]) for m in (student, teacher))
    assert abs(w_q.sum() - 1) < 1e-9 and abs(w_p.sum() - 1) < 1e-9  # the enumeration is complete
    R, eps, err = E.exposure_curves(kl, mask, kl, mask, w_q, w_p)

    exact_q, exact_p = [], []  # E_{y<t ~ model}[KL(p‖q)(y<t) | still running], prefix by prefix
    for t in range(N_MAX):
        prefixes = list(itertools.product([v for v in range(V) if v != EOS], repeat=t))
        for model, acc in [(student, exact_q), (teacher, exact_p)]:
            w = torch.stack([seq_prob(model, list(pre)) if pre else torch.tensor(1.0, dtype=torch.float64) for pre in prefixes])
            k = torch.stack([(dist(teacher, list(pre)) * (dist(teacher, list(pre)).log() - dist(student, list(pre)).log())).sum()
                             for pre in prefixes])
            acc.append((w * k).sum() / w.sum())
    l = torch.arange(1, N_MAX + 1, dtype=torch.float64)
    R_exact, eps_exact = torch.stack(exact_q).cumsum(0), torch.stack(exact_p).cumsum(0) / l
    torch.testing.assert_close(R, R_exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps, eps_exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(err, 100 * (R_exact - l * eps_exact) / (l * eps_exact), atol=1e-3, rtol=0)
    assert (eps > 0).all() and (R > 0).all()


def test_exposure_curves_by_hand():
    """Positions average over the samples still running; ε divides by l; R does not."""
    kl_s, m_s = torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    kl_t, m_t = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    R, eps, err = E.exposure_curves(kl_s, m_s, kl_t, m_t)
    assert R.tolist() == [1.5, 4.5] and eps.tolist() == [1.0, 1.0] and err.tolist() == [50.0, 125.0]


# ---------------------------------------------------------------------------------------------------
# 3. Calibration: ECE of zero-shot classification.

def test_ece_by_hand():
    conf = [0.95, 0.95, 0.65, 0.65, 0.65, 0.65, 1.0]
    correct = [1, 0, 1, 1, 1, 0, 1]
    e, bins = E.ece(conf, correct)
    # bin [0.9, 1]: 3 predictions, mean conf (0.95+0.95+1)/3, accuracy 2/3; bin [0.6, 0.7): 4, conf 0.65, acc 0.75
    expected = 3 / 7 * abs(2 / 3 - 2.9 / 3) + 4 / 7 * abs(0.75 - 0.65)
    assert e == pytest.approx(expected, abs=1e-12)
    assert [b[0] for b in bins] == [0, 0, 0, 0, 0, 0, 4, 0, 0, 3]
    assert E.ece([0.8] * 5, [1, 1, 1, 1, 0])[0] == pytest.approx(0.0, abs=1e-12)  # 80% sure, 80% right


def test_ece_on_a_local_file_uses_a_fresh_forward(saved, tmp_path):
    recs = [{"instruction": "name a color", "choices": ["red", "blue"], "label": 0},
            {"instruction": "name an animal", "input": "the cat", "choices": ["dog", "cat"], "label": 1},
            {"instruction": "say one", "choices": ["one", "two", "three"], "label": 2}]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = str(saved / "student")
    res = E.main(["--analysis", "ece", "--model", m, "--data", str(path), "--out", str(tmp_path), "--device", "cpu"])[m]
    tok, model = M.load_tokenizer(m), M.load_model(m, "cpu").eval()
    conf, correct = [], []
    for r in recs:  # one prompt at a time, no padding
        ids = tok(M.build_prompt(r["instruction"], r.get("input", "")), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
        pc = torch.stack([p[tok.convert_tokens_to_ids(w)] for w in r["choices"]])
        conf.append((pc.max() / pc.sum()).item())
        correct.append(int(pc.argmax().item() == r["label"]))
    assert res["ece"] == pytest.approx(E.ece(conf, correct)[0], abs=1e-5)
    assert res["accuracy"] == pytest.approx(sum(correct) / 3) and (tmp_path / "calibration.png").exists()


def test_ece_label_words_the_tokenizer_cannot_tell_apart(saved, tmp_path, capsys):
    """SST-2's words are unknown to the word-level tokenizer: both are <unk>, a one-line error (exit 2), not ECE 0.5."""
    path = tmp_path / "sst.jsonl"
    path.write_text(json.dumps({"text": "a big red dog", "label": 1}) + "\n")
    with pytest.raises(SystemExit) as e:
        E.main(["--analysis", "ece", "--model", str(saved / "student"), "--data", str(path), "--device", "cpu",
                "--out", str(tmp_path)])
    assert e.value.code == 2 and "start with the same token" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# 4. The judge score: 100·Σ s_model / Σ s_reference, parse failures counted.

def test_parse_scores_and_the_score():
    assert E.parse_scores("8 6\nAssistant 1 is better.") == (8.0, 6.0)
    assert E.parse_scores("\n 7.5, 9 \nbecause") == (7.5, 9.0)
    assert E.parse_scores("Assistant 1: 8") is None and E.parse_scores("8 11") is None and E.parse_scores("") is None
    assert E.judge_score([(8, 6), None, (2, 4)]) == (100.0 * 10 / 10, 2, 1)
    assert E.judge_score([None, None]) == (None, 0, 2)


def test_judge_through_an_openai_compatible_endpoint(saved, tmp_path):
    """A tiny server on 127.0.0.1 answers like vLLM: two parseable ratings, one refusal, one malformed reply."""
    seen, replies = [], iter(["8 6\nfine", "I cannot rate this.", "10 5", None])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            text = next(replies)
            out = {"choices": [{"message": {"role": "assistant", "content": text}}]} if text else {"oops": 1}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        m = str(saved / "student")
        res = E.main(["--analysis", "judge", "--judge-url", f"http://127.0.0.1:{server.server_port}/v1", "--judge-model", "j",
                      "--model", m, "--data", str(saved / "test.jsonl"), "--seeds", "10", "--max-new-tokens", "3",
                      "--out", str(tmp_path), "--device", "cpu"])
    finally:
        server.shutdown()
    r = res[m]["test"]
    assert r["score"] == pytest.approx(100 * (6 + 5) / (8 + 10)) and (r["failed"], r["rated"]) == (2, 4)
    path, body = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "j" and body["temperature"] == 0.7
    assert "[Question]\nname a color\n\n[The Start of Assistant 1's Answer]\ncolor\n" in body["messages"][1]["content"]
    rows = [json.loads(line) for line in open(tmp_path / "judge" / E.safe_name(m) / "test" / "seed10.jsonl")]
    assert [row["rating"] for row in rows] == [[8.0, 6.0], None, [10.0, 5.0], None]


def test_a_local_judge_that_writes_garbage_is_counted_not_dropped(saved, tmp_path):
    m = str(saved / "student")
    res = E.main(["--analysis", "judge", "--judge", str(saved / "teacher"), "--judge-max-tokens", "4", "--model", m,
                  "--data", str(saved / "test.jsonl"), "--seeds", "10", "--max-new-tokens", "3", "--out", str(tmp_path),
                  "--device", "cpu"])[m]["test"]
    assert (res["rated"], res["failed"], res["score"]) == (4, 4, None)
    with pytest.raises(SystemExit) as e:  # no room left for the prompt in the judge's 128 positions
        E.main(["--analysis", "judge", "--judge", str(saved / "teacher"), "--judge-max-tokens", "128", "--model", m,
                "--data", str(saved / "test.jsonl"), "--seeds", "10", "--max-new-tokens", "3", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_ece_hub_sets_map_to_the_papers_prompts(monkeypatch):
    """sst2 / boolq load their hub validation split (faked here: no network) into the paper's two prompts."""
    import datasets
    asked = []
    fake = {"stanfordnlp/sst2": [{"idx": 0, "sentence": "a gripping film", "label": 1}],
            "google/boolq": [{"question": "is the sky blue", "answer": False, "passage": "It is grey."}]}
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split: asked.append((repo, split)) or fake[repo])
    assert E.load_classification("sst2") == [(E.SST2_PROMPT, "a gripping film", ["negative", "positive"], 1)]
    assert E.load_classification("boolq") == [('Read the input passage and answer the question: is the sky blue? Your '
                                                'answer should be "Yes" or "No".', "It is grey.", ["No", "Yes"], 0)]
    assert asked == [("stanfordnlp/sst2", "validation"), ("google/boolq", "validation")]
