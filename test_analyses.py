"""
Claims about the training diagnostics (minillm.py) and the paper's analyses (eval.py --analysis): exposure bias,
calibration, the judge score. Tiny models built from configs, offline, CPU, seconds.
"""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import minillm as M
from test_minillm import tiny_gpt2, word_tokenizer


# ---------------------------------------------------------------------------------------------------
# 1. Training diagnostics: what a collection of rollouts says about degeneration.

def test_rollout_diagnostics_by_hand():
    eos, pad = 1, 0
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
    roll = M.sample_rollouts(student, teacher, ids, attn, eos_id=1, pad_id=0, max_new_tokens=8, alpha=0.5,
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
