"""Claims about --fsdp (PyTorch FSDP2), checked on the CPU with gloo, offline: two sharded ranks train as one
process with the same global batch (SFT and MiniLLM), a killed sharded run resumes bitwise, and the consolidated
checkpoint is the sharded model's weights, loadable by from_pretrained in one process.

NCCL, bf16 mixed precision and real multi-GPU runs are not exercised here (no GPU on the test machine).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from transformers import AutoModelForCausalLM

import minillm as M
from test_minillm import HERE, tiny_gpt2, word_tokenizer
from test_resume import cli, files, free_port, log_rows, weights  # noqa: F401  (files: a fixture)


def fsdp_cli(f, **kw):
    """Student SFT (4 steps, 2 micro-batches per rank) then MiniLLM (4 steps, one collection of all 8 prompts per
    step). --top-k 1 makes sampling deterministic, so each prompt's rollout does not depend on the rank that draws it."""
    args = dict(val_size=4, student_epochs=2, sft_max_steps=4, sft_batch_size=4, sft_micro_batch_size=1, rollouts=8,
                batch_size=8, micro_batch_size=2, gen_batch_size=4, top_k=1, lr=1e-3, warmup_steps=1)
    args.update(kw)
    return cli(f, **args) + ["--skip-teacher-sft"]


def torchrun(args, out, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(HERE / "minillm.py"), *args, "--out", str(out)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sharded_run(files, tmp_path_factory):
    """One uninterrupted 2-rank run, student and teacher sharded; the reference of both torchrun tests."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    res = torchrun(fsdp_cli(files) + ["--fsdp", "--fsdp-teacher"], out, out.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stdout and res.stdout.count("step     4/4 | rkl") == 1
    return out


def test_fsdp_two_ranks_train_as_one_process_with_the_global_batch(sharded_run, files, tmp_path):
    """SFT and MiniLLM: the consolidated weights of 2 sharded ranks (2 of the 4 SFT examples, 4 of the 8 rollouts
    each) equal one unsharded process's (all of them) to 1e-5, and so does every logged loss and gradient norm."""
    M.main(fsdp_cli(files) + ["--out", str(tmp_path / "one")])
    for stage, start in [("student-sft", files["student"]), ("minillm", tmp_path / "one" / "student-sft")]:
        a, b = weights(sharded_run / stage), weights(tmp_path / "one" / stage)
        assert a.keys() == b.keys()  # the tied LM head is written once, as save_pretrained does unsharded
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, stage
        assert max((b[k] - weights(start)[k]).abs().max().item() for k in b) > 1e-3, stage  # it did train
        for ra, rb in zip(log_rows(sharded_run / stage), log_rows(tmp_path / "one" / stage), strict=True):
            assert ra.keys() == rb.keys() and all(abs(ra[k] - rb[k]) <= 1e-5 * max(1, abs(rb[k])) for k in ra), (ra, rb)
    # the consolidated checkpoint is a plain Hugging Face folder: one process loads it, no torch.distributed
    loaded = AutoModelForCausalLM.from_pretrained(sharded_run / "minillm").state_dict()
    a = weights(sharded_run / "minillm")
    assert all(torch.equal(loaded[k], a[k]) for k in a)


def main_worker(rank, port, args):
    """One rank of `minillm.py ARGS` as torchrun would start it (forked: no second import of torch and transformers)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        M.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    sys.stdout.flush()
    os._exit(code)


def two_ranks(args):
    """Exit codes of the two ranks."""
    import multiprocessing
    fork, port = multiprocessing.get_context("fork"), free_port()
    procs = [fork.Process(target=main_worker, args=(rank, port, args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    return [p.exitcode for p in procs]


def test_fsdp_killed_and_resumed_equals_the_uninterrupted_run(sharded_run, files, tmp_path):
    """--stop-after 3 with a sharded checkpoint (torch.distributed.checkpoint) every 2 steps: 2 ranks killed in
    the SFT, then in MiniLLM, then finished. The result is bitwise the uninterrupted torchrun run's."""
    args = fsdp_cli(files) + ["--fsdp", "--fsdp-teacher", "--out", str(tmp_path)]
    for stage in ["student-sft", "minillm"]:
        assert two_ranks(args + ["--stop-after", "3"]) == [3, 3]
        ckpt = M.find_checkpoint(tmp_path / stage / "ckpt")
        assert M.checkpoint_step(ckpt) == 2 and sorted(p.name for p in ckpt.iterdir()) == ["dcp", "state.pt"]
    assert two_ranks(args) == [0, 0]
    for stage in ["student-sft", "minillm"]:
        a, b = weights(sharded_run / stage), weights(tmp_path / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        assert log_rows(sharded_run / stage) == log_rows(tmp_path / stage), stage
        assert not (tmp_path / stage / "ckpt").exists()


def consolidate_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    model = M.shard(tiny_gpt2(30, 7, n_layer=2), "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(rank))  # other data on each rank
    model(input_ids=x, labels=x).loss.backward()
    opt.step()  # the shards now differ from the initial weights
    whole = {name: p.full_tensor() for name, p in model.named_parameters()}  # gathered by hand
    M.save_checkpoint(model, word_tokenizer(), out)
    if rank == 0:
        torch.save(whole, Path(out) / "whole.pt")
    torch.distributed.destroy_process_group()


def test_consolidated_checkpoint_equals_the_sharded_weights(tmp_path):
    """save_checkpoint on a sharded model writes, on rank 0, exactly the weights its shards make up."""
    torch.multiprocessing.start_processes(consolidate_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    whole = torch.load(tmp_path / "whole.pt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    params = dict(loaded.named_parameters())
    assert params.keys() == whole.keys() and all(torch.equal(params[k], whole[k]) for k in whole)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    assert not torch.equal(whole["transformer.wte.weight"], tiny_gpt2(30, 7, n_layer=2).transformer.wte.weight)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
