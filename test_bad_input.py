"""Claims about bad input, checked on the CPU, offline: everything a user can get wrong ends in one line on
stderr and exit status 2 before anything is trained or written, never in a traceback hours in.

Most runs go through `minillm.main([...])` / `eval.main([...])` in this process (fast); a few subprocesses prove
that the command line prints no traceback. The corruption test stops each run where training would begin
(prepare_out, the first write), so a few hundred corrupted files cost seconds; two harmless corruptions then
train for real and must give the clean file's weights.
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch

import eval as E
import minillm as M
from test_minillm import HERE, run_cli, word_tokenizer
from test_resume import cli, tiny_files, weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files(tmp_path_factory.mktemp("bad"), word_tokenizer())


def clean_rows(f):
    return [json.loads(line) for line in open(f["data"])]


def write_rows(path, rows, raw=None):
    """rows: dicts, written one JSON object per line; raw: {line index: text} written as is instead."""
    lines = [raw[i] if raw and i in raw else json.dumps(r) for i, r in enumerate(rows)]
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def one_error_line(stderr):
    """The whole of stderr, which must be one line 'error: ...'."""
    err = stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


# ---------------------------------------------------------------------------------------------------
# 1. The cases a new user hit (issue 12), each one line and exit 2 before anything is written.

def table_cases(f):
    root, rows = f["root"], clean_rows(f)
    (root / "utf16.jsonl").write_bytes(Path(f["data"]).read_text().encode("utf-16"))
    head = "".join(json.dumps(r) + "\n" for r in rows[:2]).encode()
    (root / "binary.jsonl").write_bytes(head + bytes(range(128, 256)) + b"\n")
    (root / "folder.jsonl").mkdir(exist_ok=True)
    number, null = [dict(r) for r in rows], [dict(r) for r in rows]
    number[4]["instruction"], null[6]["output"] = 7, None
    (root / "pt-latin1.txt").write_bytes("the cat\n\nthe dog\n\nun caf\xe9 noir\n".encode("latin-1"))
    (root / "pt-notext.jsonl").write_text('{"text": "the cat sat"}\n{"body": "the dog"}\n')
    return {
        "data is UTF-16": (dict(data=root / "utf16.jsonl"), r"utf16.jsonl:1: UTF-16 text, not UTF-8 .*save the data file as UTF-8"),
        "data is binary": (dict(data=root / "binary.jsonl"), rf"binary.jsonl:3: not UTF-8 text \(byte 0x80 at offset {len(head)}\)"),
        "data is a folder": (dict(data=root / "folder.jsonl"), r"data file .*folder.jsonl is a folder; give a file"),
        "instruction is a number": (dict(data=write_rows(root / "number.jsonl", number)),
                                    r"number.jsonl:5: 'instruction' must be a string, got 7; fix that record"),
        "output is null": (dict(data=write_rows(root / "null.jsonl", null)),
                           r"null.jsonl:7: 'output' must be a string or a non-empty list of strings, got null"),
        "PT corpus not UTF-8": (dict(pt_data=root / "pt-latin1.txt"), r"pt-latin1.txt:5: not UTF-8 text \(byte 0xe9"),
        "PT record without text": (dict(pt_data=root / "pt-notext.jsonl"), r"pt-notext.jsonl:2: the record has no 'text' field"),
        "PT hub dataset unreachable": (dict(pt_data="no-such-org/no-such-corpus"),
                                       r"cannot load 'no-such-org/no-such-corpus' \(--pt-data\): .*not in the local cache"),
        "--device cuda without CUDA": (dict(device="cuda"), r"--device cuda: this machine has no CUDA GPU"),
        "--device typo": (dict(device="gpu"), r"--device gpu is not a device name"),
        "sequences longer than the positions": (dict(max_new_tokens=120), r"has 128 positions and --max-new-tokens asks for "
                                                                          r"sequences of 1\d\d tokens"),
    }


@pytest.mark.parametrize("case", ["data is UTF-16", "data is binary", "data is a folder", "instruction is a number",
                                  "output is null", "PT corpus not UTF-8", "PT record without text",
                                  "PT hub dataset unreachable", "--device cuda without CUDA", "--device typo",
                                  "sequences longer than the positions"])
def test_bad_input_stops_before_training(case, tmp_path, files, capsys, monkeypatch):
    change, message = table_cases(files)[case]
    monkeypatch.setattr(M.torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    sft_steps = []
    monkeypatch.setattr(M, "sft_backward", lambda *a, **k: sft_steps.append(1))
    with pytest.raises(SystemExit) as e:
        M.main(cli(files, **change) + ["--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert re.search(message, one_error_line(capsys.readouterr().err))
    assert sft_steps == [] and not (tmp_path / "run").exists()  # the L_PT corpus too is read before the first SFT step


def test_cli_bad_pt_corpus_fails_before_any_stage(tmp_path, files):
    """Through the command line: one line, no traceback, no run folder; before, this failed after both SFT stages."""
    table_cases(files)
    res = run_cli(cli(files, pt_data=files["root"] / "pt-latin1.txt") + ["--out", str(tmp_path / "run")], tmp_path)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"error: {files['root'] / 'pt-latin1.txt'}:5: not UTF-8 text (byte 0xe9 at offset 24); "
                                       "save the pre-training corpus as UTF-8"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# 2. Seeded random corruptions of a valid JSONL file: each run trains (harmless ones) or stops with one line,
#    file:line and exit 2, and never leaves a run folder behind.

FIELDS = ["instruction", "input", "output"]
BAD_VALUES = [5, 3.5, True, {"text": "the cat"}, [1, 2], [], ["the cat", 3], [["nested"]]]


def corrupt(rng, rows, path):
    """One corruption of the valid `rows`, written to `path` -> (class, expected) where expected is "ok" (trains
    on the same records), "accepted" (trains, other records), "either" (random bytes may still be valid JSON),
    or (line, regex) of the one error line; random bytes: ("either", first, last line the error may name)."""
    kind = rng.choice(["crlf", "bom", "empty lines", "truncated line", "wrong type", "null", "missing field",
                       "extra nesting", "random bytes", "very long line", "utf-16", "latin-1", "lone surrogate",
                       "huge integer", "bom mid-file", "no records"])
    i = rng.randrange(len(rows))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    lines = [json.dumps(r) for r in rows]
    if kind == "crlf":
        Path(path).write_bytes(text.replace("\n", "\r\n").encode())
        return kind, "ok"
    if kind == "bom":
        Path(path).write_bytes(b"\xef\xbb\xbf" + (text.replace("\n", "\r\n") if rng.random() < 0.5 else text).encode())
        return kind, "ok"
    if kind == "empty lines":
        for _ in range(rng.randint(1, 5)):
            lines.insert(rng.randint(0, len(lines)), rng.choice(["", " ", "\t", "  \t "]))
        Path(path).write_text("\n".join(lines) + "\n")
        return kind, "ok"
    if kind == "truncated line":  # any proper prefix of an object lacks its closing brace
        write_rows(path, rows, {i: lines[i][:rng.randint(1, len(lines[i]) - 1)]})
        return kind, (i + 1, r"not valid JSON")
    if kind in ("wrong type", "null"):
        k = rng.choice(FIELDS)
        bad = rng.choice(BAD_VALUES) if kind == "wrong type" else None
        write_rows(path, rows[:i] + [{**rows[i], k: bad}] + rows[i + 1:])
        return kind, (i + 1, rf"'{k}' must be a string.*, got {re.escape(json.dumps(bad)[:20])}")
    if kind == "missing field":
        k = rng.choice(["instruction", "output"])
        write_rows(path, rows[:i] + [{f: v for f, v in rows[i].items() if f != k}] + rows[i + 1:])
        return kind, (i + 1, rf"the record has no '{k}' field")
    if kind == "extra nesting":
        how = rng.choice(["list", "wrapped", "field", "deep"])
        raw = {"list": json.dumps([rows[i]]), "wrapped": json.dumps({"record": rows[i]}),
               "field": json.dumps({**rows[i], "instruction": {"text": rows[i]["instruction"]}}),
               "deep": "[" * 100_000 + "]" * 100_000}[how]
        expected = {"list": "expected a JSON object, got list", "wrapped": "the record has no 'instruction' field",
                    "field": "'instruction' must be a string", "deep": r"JSON that Python cannot read \(RecursionError"}[how]
        write_rows(path, rows, {i: raw})
        return kind, (i + 1, expected)
    if kind == "random bytes":  # overwrite or insert a few random bytes (newlines included) inside line i
        line = lines[i].encode()
        a = rng.randrange(len(line))
        b = a + rng.randint(0, 8) if rng.random() < 0.5 else a
        noise = rng.randbytes(rng.randint(1, 16))
        data = "".join(x + "\n" for x in lines[:i]).encode() + line[:a] + noise + line[b:] + \
            "".join("\n" + x for x in lines[i + 1:]).encode() + b"\n"
        Path(path).write_bytes(data)
        return kind, ("either", i + 1, i + 1 + noise.count(b"\n"))
    if kind == "very long line":  # 60,000 words: a prompt that long is dropped, a response that long is cut at --max-len
        k = rng.choice(["instruction", "output"])
        write_rows(path, rows[:i] + [{**rows[i], k: " ".join(rng.choice(["cat", "dog", "zebra"]) for _ in range(60_000))}]
                   + rows[i + 1:])
        return kind, "accepted"
    if kind == "utf-16":
        Path(path).write_bytes(text.encode(rng.choice(["utf-16", "utf-16-le", "utf-16-be"])))
        return kind, (1, r"(UTF-16 text, not UTF-8|not UTF-8 text)")  # without a BOM it is just bad UTF-8 (or bad JSON)
    if kind == "latin-1":
        Path(path).write_bytes("".join(x + "\n" for x in lines[:i]).encode() +
                               json.dumps({**rows[i], "output": "caf\xe9"}, ensure_ascii=False).encode("latin-1") + b"\n")
        return kind, (i + 1, r"not UTF-8 text \(byte 0xe9")
    if kind == "lone surrogate":
        write_rows(path, rows, {i: lines[i].replace('"say ', '"say \\ud800 ', 1)})
        return kind, (i + 1, r"'instruction' holds an unpaired UTF-16 surrogate")
    if kind == "huge integer":
        write_rows(path, rows, {i: lines[i].replace('"input": ""', '"input": ' + "9" * 5000).replace('"input": "the cat"', '"input": ' + "9" * 5000)})
        return kind, (i + 1, r"JSON that Python cannot read \(ValueError")
    if kind == "bom mid-file":  # only a BOM that starts the file is skipped (cat a.jsonl b.jsonl leaves one inside)
        i = max(i, 1)
        write_rows(path, rows, {i: "\ufeff" + lines[i]})
        return kind, (i + 1, r"not valid JSON \(Unexpected UTF-8 BOM")
    Path(path).write_text(rng.choice(["", "\n\n", "  \n"]))  # no records
    return kind, (None, r"has 0 records and the first --val-size 3 are the validation set")


class Accepted(Exception):
    """Raised where the run would create its folder: every start-up check has passed."""


N_CORRUPTIONS = 300


def test_random_corruptions_train_or_stop_with_one_line(tmp_path, files, capsys, monkeypatch):
    def accepted(out, args):
        raise Accepted
    monkeypatch.setattr(M, "prepare_out", accepted)
    rows, rng, tally = clean_rows(files), random.Random(0), {}
    clean_records = M.load_records(files["data"])
    for n in range(N_CORRUPTIONS):
        path, out = tmp_path / f"data{n}.jsonl", tmp_path / f"run{n}"
        kind, expected = corrupt(rng, rows, path)
        args = cli(files, method="sft", data=path, pt_data="none", max_prompt_len=64, max_len=96) + ["--out", str(out)]
        try:
            M.main(args)
            outcome = "no stop"  # impossible: prepare_out raises
        except Accepted:
            outcome = "trains"
        except SystemExit as e:
            outcome = f"exit {e.code}"
        stderr = capsys.readouterr().err
        where = f"corruption {n} ({kind}, {path.read_bytes()[:200]!r})"
        assert not out.exists(), where
        if outcome == "trains":
            assert stderr == "", where
            assert expected in ("ok", "accepted") or expected[0] == "either", where
            if expected == "ok":  # CRLF, a BOM, blank lines: the very same records
                assert M.load_records(str(path)) == clean_records, where
        else:
            assert outcome == "exit 2", (where, outcome)
            line = one_error_line(stderr)
            assert expected != "ok" and expected != "accepted", (where, line)
            if expected[0] == "either":  # the error names the line the bytes went into, or one their newlines made
                found = re.search(rf"^error: {re.escape(str(path))}:(\d+): ", line)
                assert found and expected[1] <= int(found.group(1)) <= expected[2], (where, line)
            else:
                at, message = expected
                prefix = f"error: {path}:{at}: " if at else f"error: {path} "
                assert line.startswith(prefix) and re.search(message, line), (where, line)
        tally.setdefault(kind, {}).setdefault(outcome, 0)
        tally[kind][outcome] += 1
    print("\ncorruption class: outcomes over", N_CORRUPTIONS, "seeded corruptions")
    for kind, outcomes in sorted(tally.items()):
        print(f"  {kind:16s} {outcomes}")
    assert len(tally) == 16  # every class was tried


def test_harmless_corruptions_train_exactly_as_the_clean_file(tmp_path, files):
    """A BOM, CRLF line ends and blank lines change nothing: one SFT step gives the clean file's weights, bitwise.
    Very long lines train too: the prompt that long is dropped, the response that long is cut at --max-len."""
    text = Path(files["data"]).read_text()
    messy = tmp_path / "messy.jsonl"
    messy.write_bytes(b"\xef\xbb\xbf" + ("\r\n  \r\n" + text.replace("\n", "\r\n\r\n")).encode())
    rows = clean_rows(files)
    long = write_rows(tmp_path / "long.jsonl", rows[:5] + [{**rows[5], "instruction": "cat " * 60_000}]
                      + [{**rows[6], "output": "dog " * 60_000}] + rows[7:])
    trained = []
    for name, data in [("clean", files["data"]), ("messy", messy), ("long", long)]:
        M.main(cli(files, method="sft", data=data, sft_max_steps=1, student_epochs=1, max_len=96) + ["--out", str(tmp_path / name)])
        trained.append(weights(tmp_path / name / "student-sft"))
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert json.loads((tmp_path / "long" / "student-sft" / "done.json").read_text())["steps"] == 1


def test_cli_corrupted_data_has_no_traceback(tmp_path, files):
    """Random bytes in the middle of line 5, through the command line."""
    lines = Path(files["data"]).read_bytes().split(b"\n")
    lines[4] = lines[4][:20] + b"\x93\xff\x00\x1b[2J" + lines[4][20:]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    res = run_cli(cli(files, data=path) + ["--out", str(tmp_path / "run")], tmp_path)
    assert res.returncode == 2
    offset = sum(len(x) + 1 for x in lines[:4]) + 20
    assert res.stderr.splitlines() == [f"error: {path}:5: not UTF-8 text (byte 0x93 at offset {offset}); save the data file as UTF-8"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# 3. eval.py: the same convention for every input (models, data, seeds, the output folder).

def eval_cases(f, tmp_path):
    rows = clean_rows(f)
    write_rows(tmp_path / "nums.jsonl", rows[:2] + [{**rows[2], "output": 42}])
    write_rows(tmp_path / "refs.jsonl", rows[:1] + [{**rows[1], "output": []}])
    (tmp_path / "a-file").write_text("in the way")
    good = ["--data", f["data"], "--device", "cpu", "--max-new-tokens", "4", "--seeds", "1", "--out", str(tmp_path / "ev")]
    model = ["--model", f["student"]]
    return {
        "output is a number": (model + good + ["--data", str(tmp_path / "nums.jsonl")], r"nums.jsonl:3: 'output' must be a string"),
        "no references": (model + good + ["--data", str(tmp_path / "refs.jsonl")], r"refs.jsonl:2: 'output' must be .*, got \[\]"),
        "data is a folder": (model + good + ["--data", str(tmp_path)], r"is a folder"),
        "second model unreachable": (["--model", f["student"], "no-such-org/model"] + good, r"cannot load 'no-such-org/model'"),
        "seed twice": (model + good + ["--seeds", "10", "20", "10"], r"--seeds lists a seed twice: 10 20 10"),
        "negative seed": (model + good + ["--seeds", "-1"], r"--seeds must be in \[0, 2\^63\), got -1"),
        "output folder under a file": (model + good + ["--out", str(tmp_path / "a-file" / "ev")], r"a-file is a file, not a folder"),
        "zero batch": (model + good + ["--batch-size", "0"], r"--batch-size must be > 0"),
        "too long for the positions": (model + good + ["--max-new-tokens", "200"], r"exceeds the 128 positions of"),
        "temperature 0": (model + good + ["--temperature", "0"], r"--temperature must be > 0"),
    }


@pytest.mark.parametrize("case", ["output is a number", "no references", "data is a folder", "second model unreachable",
                                  "seed twice", "negative seed", "output folder under a file", "zero batch",
                                  "too long for the positions", "temperature 0"])
def test_eval_bad_input_exits_2_with_one_line(case, tmp_path, files, capsys, monkeypatch):
    argv, message = eval_cases(files, tmp_path)[case]
    monkeypatch.setattr(E, "generate", lambda *a, **k: pytest.fail("sampled before every input was checked"))
    with pytest.raises(SystemExit) as e:
        E.main(argv)
    assert e.value.code == 2
    assert re.search(message, one_error_line(capsys.readouterr().err))
    assert not (tmp_path / "ev").exists()


def test_eval_cli_error_has_no_traceback(tmp_path, files):
    argv, _ = eval_cases(files, tmp_path)["output is a number"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(HERE / "eval.py"), *argv], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"error: {tmp_path / 'nums.jsonl'}:3: 'output' must be a string or a non-empty list "
                                       "of strings, got 42; fix that record"]
