"""Claims about preemption and faults, checked on the CPU, offline:
- SIGTERM or SIGUSR1 stops every stage after the optimizer step in progress, with a resume checkpoint of exactly
  that step (inside a rollout collection: the rest of it, buffer and minibatch queue), exit status 75; the rerun
  ends bitwise equal to the uninterrupted run, on one process and on two (gloo), where the ranks stop together;
- SIGKILL at any instant, inside a checkpoint write too, leaves a checkpoint that resumes to the same end;
- a write that fails (full disk) ends every rank in one line, status 2, the previous checkpoint and model intact;
- after a power loss a name points to whole data: every file is fsynced before its rename, the folder after.

Signals are real (os.kill); runs go through `minillm.main` in this process, or in forked children (no new imports)
for the two ranks and the SIGKILLs. The tiny run: student SFT 4 steps (3 per epoch), MiniLLM 4 steps (2 per
collection). Slowest: the two-rank test (~10 s when the machine is idle).
"""

import errno
import multiprocessing
import os
import random
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import minillm as M
from test_resume import cli, files, free_port, log_rows, weights  # noqa: F401  (files: the fixture)

FORK = multiprocessing.get_context("fork")  # children inherit this process's imports
SECONDS = {}


def base(files, **kw):
    """Student SFT (dropout on: its RNG must resume too) and MiniLLM; no periodic checkpoint unless asked."""
    return cli(files, dropout=True, **dict(dict(save_interval=100), **kw)) + ["--skip-teacher-sft"]


def no_plots():
    M.plot_curve = M.plot_diagnostics = lambda *a, **k: None  # matplotlib: half of a tiny run's time, not tested here


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run of this module in one thread: a forked child cannot use the OpenMP pool its parent started (it
    hangs), and the same thread count in the reference and in the children keeps the sums' order, so the bits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory, one_thread):
    """The uninterrupted run, once."""
    out = tmp_path_factory.mktemp("reference")
    saved = M.plot_curve, M.plot_diagnostics
    no_plots()
    t0 = time.time()
    try:
        M.main(base(files) + ["--out", str(out)])
    finally:
        M.plot_curve, M.plot_diagnostics = saved
    SECONDS["reference"] = time.time() - t0
    return out


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(M, "plot_curve", lambda *a, **k: None)
    monkeypatch.setattr(M, "plot_diagnostics", lambda *a, **k: None)


def plant_signal(name, call, sig=signal.SIGTERM):
    """This process receives `sig` during the `call`-th call of M.<name>: inside an optimizer step (sft_backward,
    minillm_backward) or a rollout collection (sample_rollouts). Returns the function replaced."""
    real, n = getattr(M, name), [0]

    def wrapped(*a, **k):
        n[0] += 1
        if n[0] == call:
            os.kill(os.getpid(), sig)
        return real(*a, **k)
    setattr(M, name, wrapped)
    return real


@contextmanager
def signal_at(name, call, sig=signal.SIGTERM):
    real = plant_signal(name, call, sig)
    try:
        yield
    finally:
        setattr(M, name, real)


def plant_full_disk(match, kind=OSError, nth=1):
    """torch.save, safetensors' writer and Path.write_text fail as on a full disk, after writing a part, from the
    `nth` write of a path containing `match` on. Returns a function that puts the real writers back."""
    st, seen = __import__("transformers").modeling_utils, [0]

    def fail(f):
        seen[0] += match in str(f)
        if match in str(f) and seen[0] >= nth:
            Path(f).write_bytes(b"half")
            if kind is OSError:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise kind("Error while serializing: I/O error: No space left on device (os error 28)")
    real = torch.save, st.safe_save_file, Path.write_text
    torch.save = lambda obj, f, *a, **k: fail(f) or real[0](obj, f, *a, **k)
    st.safe_save_file = lambda t, f, *a, **k: fail(f) or real[1](t, f, *a, **k)
    Path.write_text = lambda self, *a, **k: fail(self) or real[2](self, *a, **k)

    def undo():
        torch.save, st.safe_save_file, Path.write_text = real
    return undo


@contextmanager
def full_disk(match, kind=OSError, nth=1):
    undo = plant_full_disk(match, kind, nth)
    try:
        yield
    finally:
        undo()


def same_as(reference, out, stages=("student-sft", "minillm")):
    for stage in stages:
        a, b = weights(reference / stage), weights(out / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        assert log_rows(reference / stage) == log_rows(out / stage), stage  # every step logged once: none lost
        assert (out / stage / "done.json").exists() and not (out / stage / "ckpt").exists()


# ---------------------------------------------------------------------------------------------------
# 1. One process: SIGTERM in the middle of an SFT epoch, SIGUSR1 in the middle of a rollout collection.

def test_a_stop_signal_saves_the_step_reached_and_the_rerun_is_bitwise_the_uninterrupted_run(
        reference, files, tmp_path, capsys):
    out = tmp_path / "run"
    with signal_at("sft_backward", 2, signal.SIGTERM), pytest.raises(SystemExit) as e:  # step 2 of 3 in epoch 0
        M.main(base(files) + ["--out", str(out)])
    assert e.value.code == M.PREEMPTED == 75
    msg = [line for line in capsys.readouterr().out.splitlines() if "received" in line]
    assert msg == [f"student-sft: SIGTERM received, stopped after step 2; resume checkpoint written to "
                   f"{out / 'student-sft' / 'ckpt'}; rerun the same command to continue (exit status 75)"]
    state = torch.load(out / "student-sft" / "ckpt" / "state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch"]) == (2, 0, 2)  # the step reached: nothing lost
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not M._stop["signal"]  # handlers restored

    with signal_at("sample_rollouts", 2, signal.SIGUSR1), pytest.raises(SystemExit) as e:  # sampling the 2nd collection
        M.main(base(files) + ["--out", str(out)])
    assert e.value.code == 75
    assert "minillm: SIGUSR1 received, stopped after step 3;" in capsys.readouterr().out
    ckpt = out / "minillm" / "ckpt"
    assert M.checkpoint_step(ckpt) == 3  # inside the collection of steps 3-4
    rest = M.load_rollouts(ckpt, "cpu")
    assert len(rest["queue"]) == 1 and rest["buf"]["tokens"].shape[0] == 4

    M.main(base(files) + ["--out", str(out)])
    assert "minillm: resuming from step 3 of" in capsys.readouterr().out
    same_as(reference, out)


def test_the_buffer_view_into_the_teacher_store_comes_back_into_the_store(tmp_path):
    """The teacher's log-probs are a view into the preallocated store (no copy); they are saved as that view and
    read back into the store, the other tensors and the queue as they were."""
    store = torch.randn(4, 6, 5)
    buf = {"teacher_logits": store[:3, :4], "tokens": torch.arange(12).view(3, 4), "w": torch.rand(3, 4)}
    M.save_rollouts(tmp_path / "rollouts0.pt", dict(buf=buf, queue=[[2, 0], [1]], roll_stats={"rkl": 0.5}), store)
    expected = store.clone()
    store.zero_()
    rest = M.load_rollouts(tmp_path, "cpu", store)
    assert torch.equal(store[:3, :4], expected[:3, :4])
    t = rest["buf"]["teacher_logits"]
    assert t.untyped_storage().data_ptr() == store.untyped_storage().data_ptr() and torch.equal(t, expected[:3, :4])
    assert all(torch.equal(rest["buf"][k], buf[k]) for k in ["tokens", "w"])
    assert rest["queue"] == [[2, 0], [1]] and rest["roll_stats"] == {"rkl": 0.5}


# ---------------------------------------------------------------------------------------------------
# 2. SIGKILL: inside the preemption checkpoint's write (a grace period too short), and at a random instant.

def killable(argv, out_file, block_in=None):
    """M.main(argv) in a forked child; block_in: a file name whose torch.save is written, then blocks (a marker
    file says so), so that the parent's SIGKILL lands inside the checkpoint write."""
    def child():
        no_plots()
        sys.stdout = sys.stderr = open(out_file, "w")
        if block_in:
            real = torch.save

            def slow_save(obj, f, *a, **k):
                real(obj, f, *a, **k)
                if Path(str(f)).name == block_in:
                    Path(str(out_file) + ".writing").touch()
                    time.sleep(600)
            torch.save = slow_save
            plant_signal("sample_rollouts", 2)  # SIGTERM while sampling minillm's 2nd collection: saved at step 3
        M.main(argv)
    p = FORK.Process(target=child)
    p.start()
    return p


def test_sigkill_at_any_instant_and_inside_a_checkpoint_write_resumes_bitwise(reference, files, tmp_path):
    argv = base(files, save_interval=2) + ["--out", str(tmp_path / "run")]
    # SIGTERM at step 3, then SIGKILL while its checkpoint (with the rollout buffer) is being written
    p = killable(argv, tmp_path / "log1", block_in="rollouts0.pt")
    for _ in range(600):
        if (tmp_path / "log1.writing").exists() or not p.is_alive():
            break
        time.sleep(0.1)
    p.kill()
    p.join()
    assert (tmp_path / "log1.writing").exists(), (tmp_path / "log1").read_text()[-2000:]
    ckpt = tmp_path / "run" / "minillm" / "ckpt"
    assert (Path(str(ckpt) + ".tmp") / "rollouts0.pt").exists()  # the half-written one: never read
    assert M.checkpoint_step(M.find_checkpoint(ckpt)) == 2  # the previous one, intact
    # then SIGKILL at a random instant of a rerun (which resumes from step 2)
    at = random.uniform(0.0, SECONDS["reference"])  # in loading, sampling, a step or a write: all must resume
    print(f"SIGKILL at {at:.3f} s of a {SECONDS['reference']:.3f} s run")  # shown if the test fails: the instant to retry
    p = killable(argv, tmp_path / "log2")
    time.sleep(at)
    p.kill()
    p.join()
    M.main(argv)  # and the last rerun to the end
    same_as(reference, tmp_path / "run")


class Killed(BaseException):
    """The process dies here (SIGKILL), as far as the run's files are concerned."""


def test_a_kill_between_done_and_the_checkpoints_removal_leaves_no_checkpoint(reference, files, tmp_path, monkeypatch):
    """A kill after a stage's done.json is written and before its checkpoints are removed: the rerun finds the stage
    done, skips it, and removes them then (a 7B student's optimizer moments are ~100 GB to leave behind)."""
    argv = base(files, save_interval=2) + ["--out", str(tmp_path / "run")]
    drop = M.drop_checkpoints

    def killed_at_the_last(path):
        if Path(path).name == "minillm":
            raise Killed
        drop(path)
    monkeypatch.setattr(M, "drop_checkpoints", killed_at_the_last)
    with pytest.raises(Killed):
        M.main(argv)
    assert (tmp_path / "run" / "minillm" / "done.json").exists() and (tmp_path / "run" / "minillm" / "ckpt").exists()
    monkeypatch.setattr(M, "drop_checkpoints", drop)
    M.main(argv)
    same_as(reference, tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# 3. Two ranks (gloo): the signal reaches rank 1 only; both stop after the same step. A failed write on one rank
#    stops both, in one line, with no rank left waiting in a collective.

def rank_main(rank, port, argv, out, plant):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    no_plots()
    sys.stdout = sys.stderr = open(Path(out) / f"out{rank}", "w")
    if plant:
        plant(rank)
    code = 0
    try:
        M.main(argv)
    except SystemExit as e:
        code = e.code
    (Path(out) / f"rc{rank}").write_text(str(code))


def two_ranks(argv, out, plant=None):
    """(exit statuses, rank 0's output): 2 forked ranks running M.main(argv) under env:// rendezvous."""
    out.mkdir(exist_ok=True)
    port = free_port()
    ps = [FORK.Process(target=rank_main, args=(r, port, argv, str(out), plant)) for r in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(timeout=180)
    hung = [p.is_alive() for p in ps]
    for p in ps:
        p.kill()
    assert not any(hung), "a rank hangs"
    return [int((out / f"rc{r}").read_text()) for r in range(2)], (out / "out0").read_text()


def signal_rank1(name, call):
    return lambda rank: rank == 1 and plant_signal(name, call)


def test_two_ranks_stop_together_resume_bitwise_and_a_failed_write_stops_every_rank(files, tmp_path):
    argv = base(files)
    rc, _ = two_ranks(argv + ["--out", str(tmp_path / "ref")], tmp_path / "ref-logs")
    assert rc == [0, 0]
    run = ["--out", str(tmp_path / "run")]
    rc, out = two_ranks(argv + run, tmp_path / "logs1", signal_rank1("sft_backward", 2))  # mid-epoch
    assert rc == [75, 75] and "student-sft: SIGTERM received, stopped after step 2;" in out
    # rank 1 is signalled while sampling step 3's collection; rank 0 cannot write the checkpoint while rank 1 waits
    # for it (a barrier once): both stop, status 2, in one line
    rc, out = two_ranks(argv + run, tmp_path / "logs2",
                        lambda rank: plant_signal("sample_rollouts", 2) if rank else plant_full_disk("ckpt.tmp/optimizer.pt"))
    ckpt = tmp_path / "run" / "minillm" / "ckpt"
    assert rc == [2, 2]
    err = [line for line in out.splitlines() if line.startswith("error:")]
    assert err == [f"error: cannot write {ckpt} on rank 0 (OSError: [Errno 28] No space left on device); kept: no resume "
                   "checkpoint yet. Free space or fix the folder's permissions, then rerun the same command to resume"]
    assert not Path(str(ckpt) + ".tmp").exists() and not ckpt.exists()
    rc, out = two_ranks(argv + run, tmp_path / "logs3", signal_rank1("sample_rollouts", 2))
    assert rc == [75, 75] and "minillm: SIGTERM received, stopped after step 3;" in out
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("rollouts")) == ["rollouts0.pt", "rollouts1.pt"]
    rc, out = two_ranks(argv + run, tmp_path / "logs4")
    assert rc == [0, 0] and "minillm: resuming from step 3" in out
    same_as(tmp_path / "ref", tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# 4. A full disk at every write of an SFT stage in turn: one line, status 2, nothing half-written left, the last
#    checkpoint and model intact; each rerun continues, and the last ends bitwise equal to the uninterrupted run.

def test_a_full_disk_at_any_write_stops_in_one_line_and_keeps_the_last_good_files(reference, files, tmp_path, capsys):
    out, stage = tmp_path / "run", tmp_path / "run" / "student-sft"
    argv = cli(files, dropout=True, save_interval=2, method="sft") + ["--out", str(out)]
    ckpt, SafetensorError = stage / "ckpt", M.WRITE_ERRORS[-1]
    tail = ". Free space or fix the folder's permissions, then rerun the same command to resume"
    # (the n-th write that fails, its error, the path named, what is kept, the stage's checkpoint step after it)
    and_model = f" and the model saved earlier in {stage}"
    cases = [("args.json.tmp", 1, OSError, out / "args.json", f"{out} as it was", None),
             ("ckpt.tmp/optimizer.pt", 1, OSError, ckpt, "no resume checkpoint yet", None),  # step 2
             ("ckpt.tmp/state.pt", 2, OSError, ckpt, f"the resume checkpoint {ckpt} (step 2)" + and_model, 2),  # step 4
             ("student-sft/.saving/model", 2, SafetensorError, stage, f"the resume checkpoint {ckpt} (step 4)" + and_model, 4),
             ("done.json.tmp", 1, OSError, stage / "done.json", f"the resume checkpoint {ckpt} (step 4)" + and_model, 4)]
    for match, nth, kind, path, kept, step in cases:
        best = (stage / "model.safetensors").read_bytes() if (stage / "model.safetensors").exists() else None
        with full_disk(match, kind, nth), pytest.raises(SystemExit) as e:
            M.main(argv)
        assert e.value.code == 2, match
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        what = ("[Errno 28] No space left on device" if kind is OSError
                else "Error while serializing: I/O error: No space left on device (os error 28)")
        assert err == [f"error: cannot write {path} ({kind.__name__}: {what}); kept: {kept}{tail}"], match
        left = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == ".saving"]
        assert not left, left  # nothing half-written left behind, nothing to mistake for a checkpoint
        assert (M.checkpoint_step(M.find_checkpoint(ckpt)) if M.find_checkpoint(ckpt) else None) == step, match
        if path == stage:  # epoch 1's best model could not be written: epoch 0's is intact
            assert (stage / "model.safetensors").read_bytes() == best
    M.main(argv)  # space freed: the last rerun
    same_as(reference, out, ["student-sft"])


def test_a_full_disk_while_writing_the_seqkd_data(files, tmp_path, capsys):
    with full_disk("teacher_data.jsonl"), pytest.raises(SystemExit) as e:
        M.main(cli(files, method="seqkd") + ["--skip-teacher-sft", "--out", str(tmp_path)])
    assert e.value.code == 2
    path = tmp_path / "seqkd" / "teacher_data.jsonl"
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] == [
        f"error: cannot write {path} (OSError: [Errno 28] No space left on device); kept: the finished stages in "
        f"{tmp_path}; a rerun samples the same answers. Free space or fix the folder's permissions, then rerun the same "
        "command to resume"]
    assert sorted(p.name for p in path.parent.iterdir()) == []


def test_a_resumed_log_keeps_its_lines_on_disk_before_the_first_new_step(tmp_path):
    """Resuming cuts log.jsonl after the checkpoint's lines in place: a kill before the next step is logged (a whole
    rollout collection later) finds them all on disk, not in an unflushed buffer of a truncated file."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    logger = M.Logger(log, keep=2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n' and logger.lines == 2
    logger.log(step=3)
    assert log.read_text().splitlines()[-1] == '{"step": 3}'


# ---------------------------------------------------------------------------------------------------
# 4. Power loss: a rename is only as durable as the data it names and the folder that holds it.

@pytest.fixture
def disk_log(monkeypatch):
    """The real os.fsync and os.replace, each call recorded in order: ("fsync", (device, inode) of the fd), or
    ("replace", destination). An inode survives a rename, so a file synced under its temporary name is recognised."""
    events, fsync, replace = [], os.fsync, os.replace

    def spy_fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return events


def inode(p):
    st = os.stat(p)
    return st.st_dev, st.st_ino


def synced(events, until=None, since=0):
    return {x for kind, x in events[since:until] if kind == "fsync"}


def test_a_checkpoint_is_on_the_disk_before_its_name_and_its_rename_before_the_previous_one_goes(tmp_path, disk_log):
    """Every file of the resume checkpoint (rollout buffer included) and the folder itself are fsynced before the
    folder is renamed into place; the parent folder after, so that the renames are on the disk too before ckpt.old
    is deleted. Else a power loss could leave ckpt/ naming empty files and no ckpt.old to fall back to."""
    from test_minillm import tiny_gpt2
    model = tiny_gpt2(20, 0)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = tmp_path / "ckpt"
    M.save_train_state(ckpt, model, opt, M.rng_state(), step=1)
    disk_log.clear()
    rollouts = dict(buf={"tokens": torch.arange(6).view(2, 3)}, queue=[[1, 0]])
    M.save_train_state(ckpt, model, opt, M.rng_state(), rollouts=rollouts, step=2)  # over a previous checkpoint
    i = disk_log.index(("replace", ckpt))
    written = list(ckpt.rglob("*")) + [ckpt]
    assert {"model.safetensors", "optimizer.pt", "state.pt", "rollouts0.pt"} <= {p.name for p in written}
    assert {inode(p) for p in written} <= synced(disk_log, until=i)
    assert inode(tmp_path) in synced(disk_log, since=i)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # ckpt.old deleted, after that


def test_a_saved_model_and_a_small_file_are_on_the_disk_before_their_names(tmp_path, disk_log):
    """save_checkpoint moves each file in with its own rename: each one fsynced before, the stage folder after.
    write_atomic (args.json, done.json, the rollout logs) the same for its one file."""
    from test_minillm import tiny_gpt2, word_tokenizer
    tok = word_tokenizer()
    M.save_checkpoint(tiny_gpt2(len(tok), 0), tok, tmp_path)
    renamed = [(j, dst) for j, (kind, dst) in enumerate(disk_log) if kind == "replace"]
    assert {dst.name for _, dst in renamed} >= {"model.safetensors", "config.json", "tokenizer.json"}
    for j, dst in renamed:
        assert inode(dst) in synced(disk_log, until=j), dst.name
    assert inode(tmp_path) in synced(disk_log, since=renamed[-1][0])
    disk_log.clear()
    M.write_atomic(tmp_path / "done.json", "{}")
    assert disk_log == [("fsync", inode(tmp_path / "done.json")), ("replace", tmp_path / "done.json"),
                        ("fsync", inode(tmp_path))]
