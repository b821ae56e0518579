"""Claims about long runs, checked on the CPU, offline: a stopped run resumes to the same weights, a killed
save never loses the previous checkpoint, bad input stops with one line and exit status 2, and two DDP
processes (gloo) train as one process with twice the batch.

Runs go through `minillm.main([...])` in this process (fast); one subprocess proves that no traceback is
printed, and one `torchrun` subprocess runs two ranks.
"""

import json
import re
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

import minillm as M
from test_minillm import HERE, run_cli, tiny_gpt2, word_tokenizer, write_jsonl


# ---------------------------------------------------------------------------------------------------
# fixtures: tiny teacher and student saved with the word-level tokenizer, data, a PT corpus

def save_model(path, tok, n_layer, seed, dropout=0.0):
    model = tiny_gpt2(len(tok), seed, n_layer=n_layer)
    model.config.update(dict(eos_token_id=tok.eos_token_id, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_files(root, tok, dropout=False):
    """Data, an L_PT corpus and a tiny teacher/student pair under `root` (with dropout twins if asked)."""
    write_jsonl(root / "data.jsonl")
    (root / "pt.txt").write_text("the cat sat on the mat\n\nthe dog ran to the park\n\na big red dog\n")
    files = dict(root=root, data=str(root / "data.jsonl"), pt=str(root / "pt.txt"),
                 teacher=save_model(root / "teacher", tok, 2, 1), student=save_model(root / "student", tok, 1, 2))
    if dropout:  # dropout on: resuming must also restore the RNG that draws the dropout masks
        files.update(teacher_drop=save_model(root / "teacher-drop", tok, 2, 1, 0.1),
                     student_drop=save_model(root / "student-drop", tok, 1, 2, 0.1))
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files(tmp_path_factory.mktemp("resume"), word_tokenizer(), dropout=True)


def cli(f, dropout=False, **kw):
    """A tiny run: SFT 4 steps (3 per epoch: a resume crosses an epoch), MiniLLM 4 steps (2 per collection)."""
    d = "_drop" if dropout else ""
    args = dict(teacher=f["teacher" + d], student=f["student" + d], data=f["data"], val_size=3, pt_data=f["pt"], device="cpu",
                teacher_epochs=2, student_epochs=2, sft_max_steps=4, sft_batch_size=4, sft_micro_batch_size=2, steps=4,
                rollouts=4, batch_size=2, micro_batch_size=1, gen_batch_size=4, ppo_epochs=1, max_new_tokens=6,
                pt_batch_size=2, pt_seq_len=8, recipe="lmops", log_interval=100, save_interval=2)
    args.update(kw)
    return [x for k, v in args.items() for x in ("--" + k.replace("_", "-"), str(v))]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def log_rows(folder):
    timing = {"ms", "tok_s", "sample_tok_s"}  # wall-clock: the only numbers allowed to differ
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(Path(folder) / "log.jsonl")]


# ---------------------------------------------------------------------------------------------------
# 1. Resume: stopped and resumed = uninterrupted, bitwise on the CPU.

def test_stopped_and_resumed_run_equals_the_uninterrupted_run(tmp_path, files, capsys):
    """--stop-after 3 with a checkpoint every 2 steps, in each stage in turn (the SFT resume crosses an epoch
    boundary, the MiniLLM one a collection): the same weights and the same log as one uninterrupted run."""
    base = cli(files, dropout=True)
    M.main(base + ["--out", str(tmp_path / "a")])
    out = tmp_path / "b"
    for stage in ["teacher-sft", "student-sft", "minillm"]:
        with pytest.raises(SystemExit) as stop:
            M.main(base + ["--out", str(out), "--stop-after", "3"])
        assert stop.value.code == 3
        assert not (out / stage / "done.json").exists()
        assert M.checkpoint_step(M.find_checkpoint(out / stage / "ckpt")) == 2  # step 3 was lost, as in a crash
    capsys.readouterr()
    M.main(base + ["--out", str(out)])
    assert "minillm: resuming from step 2" in capsys.readouterr().out
    for stage in ["teacher-sft", "student-sft", "minillm"]:
        a, b = weights(tmp_path / "a" / stage), weights(out / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        assert log_rows(tmp_path / "a" / stage) == log_rows(out / stage), stage  # no step logged twice
        assert not (out / stage / "ckpt").exists()  # a finished stage drops its optimizer state


def test_sft_resume_message_and_position(tmp_path, files, capsys):
    base = cli(files, method="sft", sft_max_steps=5)
    with pytest.raises(SystemExit):
        M.main(base + ["--out", str(tmp_path), "--stop-after", "3"])
    M.main(base + ["--out", str(tmp_path)])
    assert "student-sft: resuming from step 2 (epoch 0, batch 2)" in capsys.readouterr().out
    assert json.loads((tmp_path / "student-sft" / "done.json").read_text())["steps"] == 5


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_gpt2(20, 0)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = tmp_path / "ckpt"
    M.save_train_state(ckpt, model, opt, M.rng_state(), step=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    real_save = torch.save

    def killed_mid_save(obj, f, *a, **k):  # the weights are written, then the process dies
        if str(f).endswith("optimizer.pt"):
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        M.save_train_state(ckpt, model, opt, M.rng_state(), step=2)
    monkeypatch.undo()
    found = M.find_checkpoint(ckpt)
    assert found == ckpt and M.checkpoint_step(found) == 1
    loaded = M.load_model(str(found), "cpu").state_dict()
    assert all(torch.equal(loaded[k], before[k]) for k in before)
    # killed between the two renames: the previous checkpoint is ckpt.old, and is found there
    os.replace(ckpt, str(ckpt) + ".old")
    assert M.checkpoint_step(M.find_checkpoint(ckpt)) == 1
    # the next save cleans up after both
    M.save_train_state(ckpt, model, opt, M.rng_state(), step=3)
    assert M.checkpoint_step(M.find_checkpoint(ckpt)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    state = M.load_train_state(ckpt, torch.optim.AdamW(model.parameters()), "cpu")  # weights_only=True inside
    assert state["step"] == 3


def test_a_run_folder_with_other_arguments_is_refused(tmp_path, files, capsys):
    base = cli(files, method="sft", sft_max_steps=1, student_epochs=1) + ["--out", str(tmp_path)]
    M.main(base)
    saved = (tmp_path / "args.json").read_text()
    with pytest.raises(SystemExit) as e:
        M.main(base + ["--student-lr", "0.001"])
    assert e.value.code == 2
    assert "holds a run with other arguments (--student-lr 0.0005 -> 0.001)" in capsys.readouterr().err
    assert (tmp_path / "args.json").read_text() == saved
    M.main(base + ["--log-interval", "7", "--micro-batch-size", "1"])  # logging and memory flags are accepted
    assert "student-sft: done, skipping" in capsys.readouterr().out
    M.main(base + ["--student-lr", "0.001", "--overwrite"])
    assert "deleting the stages" in capsys.readouterr().out
    assert json.loads((tmp_path / "args.json").read_text())["student_lr"] == 0.001
    assert (tmp_path / "student-sft" / "done.json").exists()


# ---------------------------------------------------------------------------------------------------
# 2. Bad input: one line on stderr, exit status 2, the run folder untouched.

def bad_inputs(f):
    root = f["root"]
    (root / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output"\n')
    (root / "no-output.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    (root / "no-instruction.jsonl").write_text('{"input": "a", "output": "b"}\n')
    if not (root / "other-vocab").exists():
        tok = word_tokenizer()
        tok.add_tokens(["zebra"])
        save_model(root / "other-vocab", tok, 1, 3)
    if not (root / "no-eos").exists():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(root / "no-eos")
    return {
        "missing data file": (dict(data=root / "nope.jsonl"), r"data file .*nope.jsonl not found"),
        "malformed JSONL line": (dict(data=root / "bad.jsonl"), r"bad.jsonl:3: not valid JSON"),
        "record without output": (dict(data=root / "no-output.jsonl"), r"no-output.jsonl:2: the record has no 'output' field"),
        "record without instruction": (dict(data=root / "no-instruction.jsonl"), r"no 'instruction' field"),
        "all prompts too long": (dict(max_prompt_len=3), r"no examples left: all 9 prompts are longer than --max-prompt-len 3"),
        "nothing left after val": (dict(val_size=12), r"none is left to train on"),
        "vocabularies differ": (dict(teacher=root / "other-vocab"), r"tokenizers differ .*needs one tokenizer"),
        "tokenizer without EOS": (dict(student=root / "no-eos"), r"has no EOS token"),
        "alpha > 1": (dict(alpha=1.5), r"--alpha must be in \[0, 1\], got 1.5"),
        "alpha NaN": (dict(alpha="nan"), r"--alpha must be in \[0, 1\]"),
        "zero steps": (dict(steps=0), r"--steps must be > 0"),
        "negative batch": (dict(sft_batch_size=-4), r"--sft-batch-size must be > 0"),
        "zero rollouts": (dict(rollouts=0), r"--rollouts must be > 0"),
        "zero epochs": (dict(teacher_epochs=0), r"--teacher-epochs must be > 0"),
        "zero length": (dict(max_new_tokens=0), r"--max-new-tokens must be > 0"),
        "unreachable model": (dict(teacher="no-such-org/no-such-model"), r"cannot load 'no-such-org/no-such-model'.*HF_HUB_OFFLINE"),
        "missing PT corpus": (dict(pt_data=root / "nope.txt"), r"pre-training corpus .*nope.txt not found"),
    }


CASES = ["missing data file", "malformed JSONL line", "record without output", "record without instruction",
         "all prompts too long", "nothing left after val", "vocabularies differ", "tokenizer without EOS", "alpha > 1",
         "alpha NaN", "zero steps", "negative batch", "zero rollouts", "zero epochs", "zero length", "unreachable model",
         "missing PT corpus"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, tmp_path, files, capsys):
    change, message = bad_inputs(files)[case]
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run")
    with pytest.raises(SystemExit) as e:
        M.main(cli(files, **change) + ["--out", str(out)])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, nothing damaged


@pytest.mark.parametrize("stage", ["student-sft", "minillm"])
def test_non_finite_loss_stops_before_the_update(stage, tmp_path, files, monkeypatch, capsys):
    """A NaN loss at step 3 stops the run with exit status 2 before the optimizer step: the weights are those
    the NaN step started from, and the message names the last good checkpoint (step 2)."""
    name, key = ("sft_backward", "loss") if stage == "student-sft" else ("minillm_backward", "loss_long")
    real, seen = getattr(M, name), []

    def nan_at_step_3(model, *a, **k):
        out = real(model, *a, **k)
        seen.append(model)
        if len(seen) < 3:
            return out
        seen.append({n: t.detach().clone() for n, t in model.state_dict().items()})  # before the update
        return float("nan") if stage == "student-sft" else dict(out, loss_long=float("nan"))

    monkeypatch.setattr(M, name, nan_at_step_3)
    extra = ["--method", "sft"] if stage == "student-sft" else ["--skip-teacher-sft", "--skip-student-sft"]
    with pytest.raises(SystemExit) as e:
        M.main(cli(files) + extra + ["--out", str(tmp_path)])
    assert e.value.code == 2 and len(seen) == 4
    err = capsys.readouterr().err
    assert f"error: {stage}: non-finite {key} at step 3, stopped before the update; the last good checkpoint is" in err
    assert "(step 2)" in err
    model, before = seen[2], seen[3]
    after = model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)  # no optimizer step with the NaN
    assert M.checkpoint_step(M.find_checkpoint(tmp_path / stage / "ckpt")) == 2
    assert not (tmp_path / stage / "done.json").exists()


def test_cli_error_has_no_traceback(tmp_path, files):
    res = run_cli(cli(files, data=tmp_path / "nope.jsonl") + ["--out", str(tmp_path / "run")], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: data file {tmp_path / 'nope.jsonl'} not found; give an existing "
                                              ".jsonl file (one JSON object per line) or a hub dataset name"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# 3. Two processes with torchrun (gloo on the CPU).

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_train_as_one_process_with_the_global_batch(tmp_path, files):
    """Every stage runs under torchrun --nproc_per_node=2; the SFT updates (2 ranks × 2 examples) equal
    one process's (1 × 4): same global batch, gradients summed over ranks, one token count. Step 3's batch
    has a single example: rank 1's share is empty and it still joins the all-reduce."""
    args = cli(files, sft_max_steps=3, steps=2, save_interval=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(HERE / "minillm.py"), *args, "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stdout and res.stdout.count("step     2/2 | rkl") == 1  # rank 0 alone prints
    M.main(args + ["--out", str(tmp_path / "one")])
    for stage in ["teacher-sft", "student-sft", "minillm"]:
        assert (tmp_path / "ddp" / stage / "done.json").exists()
    for stage in ["teacher-sft", "student-sft"]:
        a, b = weights(tmp_path / "ddp" / stage), weights(tmp_path / "one" / stage)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, stage
        # Adam hides a gradient scaled by a constant; the logged global loss and gradient norm do not
        for ra, rb in zip(log_rows(tmp_path / "ddp" / stage), log_rows(tmp_path / "one" / stage), strict=True):
            assert ra.keys() == rb.keys() and all(abs(ra[k] - rb[k]) <= 1e-5 * max(1, abs(rb[k])) for k in ra), (ra, rb)
        assert not all(torch.equal(a[k], weights(files[stage.split("-")[0]])[k]) for k in a)  # it did train
    rows = [json.loads(line) for line in open(tmp_path / "ddp" / "minillm" / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(M.math.isfinite(r["loss_long"]) for r in rows)


def shared_minibatch():
    """The same student and the same minibatch of 4 rollouts on every rank (seeded); the responses end at EOS after
    4, 6, 1 and 3 tokens."""
    from test_minillm import eos_batch, loss_args
    student, _, mb = eos_batch()
    return student, mb, loss_args(clip_eps=0.2, micro_batch_size=1)


def share_gradients(normalize):
    """This rank's rows of the minibatch, advantages whitened over all ranks, the gradient through DDP."""
    student, mb, args = shared_minibatch()
    args.normalize = normalize
    mine = {k: v[M.rank()::M.world()] for k, v in mb.items()}  # rows 0, 2 | rows 1, 3
    if M.world() > 1:
        assert mine["mask"].sum().item() == [5, 9][M.rank()]  # unequal token counts: the count must be global
    mine["adv"] = M.whiten_global(mine["adv"], mine["mask"])
    stats = M.minillm_backward(M.wrap_ddp(student, "cpu"), mine, args, torch.float32)
    return torch.cat([p.grad.flatten() for p in student.parameters()]), stats


def ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.save({how: share_gradients(how) for how in ["token", "sequence"]}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_minillm_gradient_equals_the_single_process_gradient(tmp_path):
    """Token counts and whitening statistics are global: 2 ranks × 2 rollouts give the gradient (and the
    logged losses) of 1 process × 4 rollouts, for both normalisations."""
    # fork: the children inherit this process's imports (a spawn would import torch and transformers again)
    torch.multiprocessing.start_processes(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for how in ["token", "sequence"]:
        one_grad, one_stats = share_gradients(how)
        for rank in range(2):
            grad, stats = torch.load(tmp_path / f"rank{rank}.pt")[how]
            torch.testing.assert_close(grad, one_grad, atol=1e-6, rtol=1e-5)
            assert stats.keys() == one_stats.keys()
            assert all(abs(stats[k] - one_stats[k]) < 1e-6 for k in stats), (how, stats, one_stats)


def test_a_sampler_state_from_another_device_type_falls_back_to_the_seed(capsys):
    """--device may change on resume (cuda -> cpu, say); the sampler's saved CUDA state cannot seed a CPU generator,
    so sampling continues from the seed, with a warning, instead of crashing."""
    g = torch.Generator().manual_seed(3)
    M.restore_generator(g, torch.zeros(16, dtype=torch.uint8))  # a CUDA Philox state is 16 bytes
    assert "another kind of device" in capsys.readouterr().out
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(3)))
