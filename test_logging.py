"""
Claims about the training warnings and the dashboards (minillm.py): a drift from the run's first collection warns
at the second collection, once, and again only when it gets worse; a policy that moves too far within a collection
warns; every warning reaches stdout, log.jsonl, TensorBoard and W&B, whose numbers equal log.jsonl's. Offline, CPU.
"""

import glob
import importlib.util
import json
import os
import struct

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import minillm as M
from test_minillm import tiny_gpt2, word_tokenizer, write_jsonl


# ---------------------------------------------------------------------------------------------------
# 1. The rule, on sequences of collection statistics.

def log_rows(collections, steps_per_collection=2):
    """Log rows as the distillation loop writes them: each collection's diagnostics on each of its steps.
    collections: dicts of diagnostics (missing ones at a healthy value), each with an optional `clip` list."""
    rows, step = [], 0
    for c in collections:
        clips = c.get("clip", [0.1] * steps_per_collection)
        at = step + 1
        for clip in clips:
            step += 1
            rows.append(dict(step=step, collection_step=at, rkl=1.0, len=c.get("len", 50.0), no_eos=c.get("no_eos", 0.1),
                             rep4=c.get("rep4", 0.0), distinct=c.get("distinct", 1.0), clip_frac=clip))
    return rows


def warnings_of(rows):
    """step -> the warning the loop logs there (the function sees the log so far, as in the loop)."""
    return {r["step"]: w for i, r in enumerate(rows) if (w := M.training_warning(rows[:i + 1]))}


def test_a_weak_start_that_stays_is_not_a_drift():
    """A student that starts with 60% of its answers cut at --max-new-tokens and stays there: no warning (the old
    absolute rule warned about the starting point from the third collection on)."""
    rows = log_rows([dict(no_eos=x, len=120.0) for x in [0.6, 0.62, 0.58, 0.65, 0.6, 0.7]])
    assert warnings_of(rows) == {}


def test_the_issues_drift_warns_at_the_second_collection_with_the_numbers():
    """Issue 23's SmolLM2 run: no-EOS 0.25 -> 0.88 -> 0.94, length 73.0 -> 117.7 -> 126.5."""
    rows = log_rows([dict(no_eos=0.25, len=73.0), dict(no_eos=0.88, len=117.7), dict(no_eos=0.94, len=126.5)])
    w = warnings_of(rows)
    assert list(w) == [3]  # the first step of the second collection; the third is not worse by another margin
    for part in ["no-EOS 25% -> 88%", "mean length 73.0 -> 117.7", "--alpha", "--pt-coef", "--lr", "--ppo-epochs",
                 "--max-new-tokens"]:
        assert part in w[3], part


def test_said_once_and_again_only_when_worse():
    """The tiny pair of the issue: 0.00 -> 0.38 -> 0.62 -> 1.00 warns at every collection, because each is worse
    by another margin; a drift that stops (or wobbles back) is not repeated."""
    worse = warnings_of(log_rows([dict(no_eos=x) for x in [0.0, 0.38, 0.62, 1.0]]))
    assert list(worse) == [3, 5, 7] and "0% -> 38%" in worse[3] and "0% -> 62%" in worse[5] and "0% -> 100%" in worse[7]
    assert list(warnings_of(log_rows([dict(no_eos=x) for x in [0.0, 0.38, 0.40, 0.30, 0.45, 0.41]]))) == [3]


def test_each_diagnostic_drifts_by_its_own_margin():
    m = M.DRIFT_MARGINS
    for key, base, bad, name in [("len", 40.0, 40.0 * (1 + m["len"]) + 1, "mean length"),
                                 ("rep4", 0.05, 0.05 + m["rep4"] + 0.01, "repeated 4-grams"),
                                 ("distinct", 0.9, 0.9 - m["distinct"] - 0.01, "distinct responses")]:
        w = warnings_of(log_rows([{key: base}, {key: bad}]))
        assert list(w) == [3] and name in w[3], key
        just_inside = base * (1 + m["len"]) - 1 if key == "len" else base + (m[key] - 0.01) * (-1 if key == "distinct" else 1)
        assert warnings_of(log_rows([{key: base}, {key: just_inside}])) == {}, key  # within the margin: quiet
    # better, not worse: shorter answers that end, fewer loops, more variety
    assert warnings_of(log_rows([dict(len=80.0, no_eos=0.5, rep4=0.3, distinct=0.5), dict(len=30.0, no_eos=0.0, rep4=0.0, distinct=1.0)])) == {}


def test_clip_fraction_climbing_within_a_collection_warns():
    """0.18 -> 0.50 within one collection (the issue's lr 2e-5 run) warns when it passes +CLIP_RISE; a high clip
    fraction from the collection's first step (importance weights, the policy has not moved) does not."""
    rows = log_rows([dict(clip=[0.18, 0.25, 0.40, 0.50]), dict(clip=[0.16, 0.30, 0.33, 0.35]),
                     dict(clip=[0.1, 0.3, 0.55, 0.6])], steps_per_collection=4)
    w = warnings_of(rows)
    assert list(w) == [3, 11] and "clip fraction rose 0.18 -> 0.40" in w[3] and "0.10 -> 0.55" in w[11]
    assert "--ppo-epochs" in w[3] and "--lr" in w[3]
    assert warnings_of(log_rows([dict(clip=[0.5, 0.5, 0.55])] * 3, steps_per_collection=3)) == {}


def test_report_to_flag(monkeypatch, capsys):
    """Spaces or commas; 'none' drops out; an unknown name or a missing library: one line, exit status 2."""
    assert M.parse_args(["--device", "cpu"]).report_to == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in M.REPORTERS else real(name, *a))
    assert M.parse_args(["--device", "cpu", "--report-to", "tensorboard,wandb"]).report_to == ["tensorboard", "wandb"]
    assert M.parse_args(["--device", "cpu", "--report-to", "wandb", "none", "wandb"]).report_to == ["wandb"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for flags, msg in [(["wandb"], "needs the wandb package: pip install wandb"), (["tensorbord"], "unknown")]:
        with pytest.raises(SystemExit) as e:
            M.parse_args(["--device", "cpu", "--report-to", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------
# 2. Through the command line, on tiny models built to drift, with the dashboards.

def ends_with(model, eos, logit):
    """Every position's next-token distribution the same, EOS at `logit` above the rest's scale: ln_f's output is
    its bias b alone (weight 0) and the EOS row of the head is logit·b/|b|²."""
    with torch.no_grad():
        b = model.transformer.ln_f.bias.normal_(0, 1)
        model.transformer.ln_f.weight.zero_()
        model.lm_head.weight[eos] = logit * b / b.dot(b)
    return model


def wandb_history(run_dir):
    """The history rows of an offline W&B run, read from its .wandb file: a 7-byte header, then LevelDB-log
    records (crc 4 bytes, length 2, type 1: full, first, middle, last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")[0], "rb").read()
    pos, part, rows, config = 7, b"", [], {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record
            r, part = pb.Record.FromString(part), b""
            if r.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
            if r.WhichOneof("record_type") == "run":
                config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    return rows, config


def test_cli_drift_warns_within_two_collections_and_reaches_the_dashboards(tmp_path, capsys, monkeypatch):
    """A student that ends often (EOS logit +4) against a teacher that never does (-20): no-EOS goes 0 -> ~0.8
    in one collection, and the warning is on stdout, in log.jsonl, in TensorBoard and in W&B by the second
    collection (step 3: two steps per collection). Their scalars equal log.jsonl's."""
    tok = word_tokenizer()
    for name, seed, logit in [("teacher", 1, -20.0), ("student", 2, 4.0)]:
        model = ends_with(tiny_gpt2(len(tok), seed, n_layer=1, n_embd=16, tied=False), tok.eos_token_id, logit)
        model.config.eos_token_id = tok.eos_token_id
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    write_jsonl(tmp_path / "data.jsonl")
    report = [r for r in ["tensorboard", "wandb"] if importlib.util.find_spec(r)]
    for k, v in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off").items():  # no network, stdout alone
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    M.main(["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"), "--data",
                   str(tmp_path / "data.jsonl"), "--val-size", "3", "--pt-data", "none", "--skip-teacher-sft",
                   "--skip-student-sft", "--device", "cpu", "--steps", "4", "--rollouts", "8", "--batch-size", "4",
                   "--micro-batch-size", "4", "--gen-batch-size", "8", "--ppo-epochs", "1", "--max-new-tokens", "8",
                   "--lr", "0.05", "--warmup-steps", "1", "--out", str(out), "--report-to", *(report or ["none"])])
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("warning: step") and "no-EOS 0% ->" in line)
    assert lines[at - 1].startswith("step     3/4")  # printed with the second collection's first step
    rows = [json.loads(line) for line in open(out / "minillm" / "log.jsonl")]
    assert [r["collection_step"] for r in rows] == [1, 1, 3, 3]
    assert "no-EOS 0% ->" in rows[2]["warning"]
    assert (out / "minillm" / "diagnostics.png").exists()
    numbers = [(r["step"], k, v) for r in rows for k, v in r.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if "tensorboard" in report:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(str(out / "tb" / "minillm"), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        tb = {(e.step, tag.split("/", 1)[1]): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
        assert {(s, k) for s, k, _ in numbers} == set(tb)
        assert all(tb[s, k] == torch.tensor(v, dtype=torch.float32).item() for s, k, v in numbers)  # stored as float32
        texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("minillm/warning/text_summary")}
        assert texts == {r["step"]: r["warning"] for r in rows if "warning" in r}
        assert '"lr": 0.05' in acc.Tensors("minillm/args/text_summary")[0].tensor_proto.string_val[0].decode()
    if "wandb" in report:
        history, config = wandb_history(out)
        wb = {(h["step"], k.split("/", 1)[1]): v for h in history for k, v in h.items() if k.startswith("minillm/")}
        assert all(wb[s, k] == v for s, k, v in numbers) and wb[3, "warning"] == rows[2]["warning"]
        assert config["lr"] == 0.05 and (out / "minillm" / "wandb_id.txt").exists()
