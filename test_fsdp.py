"""Claims about --fsdp (PyTorch FSDP2), checked on the CPU with gloo, offline: two sharded ranks train as one
process with the same global batch (SFT and MiniLLM), a killed sharded run resumes bitwise, and the consolidated
checkpoint is the sharded model's weights, loadable by from_pretrained in one process.

NCCL, bf16 mixed precision and real multi-GPU runs are not exercised here (no GPU on the test machine).
"""

import ctypes
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


def two_nodes(args, out, cwd):
    """The run as two machines start it: two torchrun launchers (--nnodes 2, one process each) that meet through
    c10d rendezvous at node 0's address. Both see one run folder (here, the same disk; across machines, a shared file
    system). Returns both launchers' (exit code, stdout, stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    port, logs = free_port(), [(Path(cwd) / f"node{n}.out", Path(cwd) / f"node{n}.err") for n in range(2)]
    streams = [(open(o, "w"), open(e, "w")) for o, e in logs]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
                               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
                               "--rdzv-id=minillm", str(HERE / "minillm.py"), *args, "--out", str(out)],
                              cwd=cwd, env=env, stdout=o, stderr=e) for n, (o, e) in enumerate(streams)]
    try:
        codes = [p.wait(timeout=300) for p in nodes]
    finally:  # a hung node must not outlive the test
        for p in nodes:
            p.kill() if p.poll() is None else None
        for o, e in streams:
            o.close(), e.close()
    return [(code, o.read_text(), e.read_text()) for code, (o, e) in zip(codes, logs)]


@pytest.fixture(scope="module")
def sharded_run(files, tmp_path_factory):
    """One uninterrupted 2-rank run, student and teacher sharded, launched as two nodes of one process each; the
    reference of both tests below (which compare it with one process, and with a 2-rank run killed and resumed)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    nodes = two_nodes(fsdp_cli(files) + ["--fsdp", "--fsdp-teacher"], out, out.parent)
    assert all(code == 0 for code, _, _ in nodes), [err[-3000:] for _, _, err in nodes]
    stdout = "".join(o for _, o, _ in nodes)  # rank 0 alone prints, whichever node it is on
    assert stdout.count("2 processes") == 1 and stdout.count("step     4/4 | rkl") == 1
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


# ---------------------------------------------------------------------------------------------------
# Loading: 1/K of the model per rank from the first byte, the checkpoint read by rank 0 alone

def checkpoints(root):
    """A tiny model of every family (rotary buffers: Llama, Qwen2, Gemma 2; tied head: GPT-2; Qwen2's padded head
    sliced to the tokenizer's 300 rows), GPT-2 saved as the hub's gpt2 is (no 'transformer.' prefix), and one
    pytorch_model.bin (no safetensors: rank 0 falls back to from_pretrained). name -> (folder, vocab_size)."""
    from test_families import family
    out = {}
    for name in ["gpt2", "opt", "llama", "qwen2", "gemma2"]:
        family(name, 304 if name == "qwen2" else 300, seed=3).save_pretrained(root / name)
        out[name] = (str(root / name), 300)
    family("gpt2", 300, seed=4).transformer.save_pretrained(root / "gpt2-base")  # keys h.0.attn..., as on the hub
    out["gpt2-base"] = (str(root / "gpt2-base"), None)
    family("llama", 300, seed=5).save_pretrained(root / "llama-bin", safe_serialization=False)
    out["llama-bin"] = (str(root / "llama-bin"), None)
    return out


def load_worker(rank, port, ckpts, out):
    """Both ranks load every checkpoint sharded and run one forward; on rank 1 anything that reads weights raises."""
    from argparse import Namespace
    from torch.distributed.tensor import DTensor
    import safetensors
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 1:
        def no(*a, **k):
            raise AssertionError("rank 1 read the checkpoint")
        M.checkpoint_reader = M.load_model = safetensors.safe_open = no
        AutoModelForCausalLM.from_pretrained = no
    x = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    logits, report = {}, {}
    for name, (path, vocab) in ckpts.items():
        for frozen in [False, True]:
            model = M.load_sharded(path, Namespace(device="cpu", trust_remote_code=False), torch.float32, torch.float32,
                                   vocab, frozen=frozen)
            with torch.no_grad():
                logits[name, frozen] = model(input_ids=x).logits
            head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
            report[name, frozen] = dict(tied=head is emb, root_sharded=isinstance(emb, DTensor), training=model.training,
                                        grad=any(p.requires_grad for p in model.parameters()))
    torch.save(dict(logits=logits, report=report), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_sharded_load_reads_the_checkpoint_on_rank_0_only_and_equals_from_pretrained(tmp_path):
    """--fsdp loading (load_sharded): built on the meta device, the checkpoint read by rank 0 alone (rank 1 cannot
    read: its readers raise), each tensor broadcast and cut into shards. Every family's sharded logits equal the
    whole model's from from_pretrained (so the rotary buffers rebuilt after meta init are right), GPT-2's head stays
    tied, the hub's prefix-less GPT-2 keys and a .bin checkpoint load too, and a frozen teacher's root unit is
    resharded after its forward (a trained model's, as FSDP2 does, is not: its backward follows)."""
    ckpts = checkpoints(tmp_path)
    torch.multiprocessing.start_processes(load_worker, args=(free_port(), ckpts, str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    x = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    for name, (path, vocab) in ckpts.items():
        whole = M.load_model(path, "cpu", vocab_size=vocab).eval()
        tied = whole.get_output_embeddings().weight is whole.get_input_embeddings().weight  # GPT-2, OPT, Gemma 2
        with torch.no_grad():
            ref = whole(input_ids=x).logits
        for frozen in [False, True]:
            for r in (r0, r1):
                assert torch.allclose(r["logits"][name, frozen], ref, atol=1e-5, rtol=0), (name, frozen)
            assert r0["report"][name, frozen] == r1["report"][name, frozen] == dict(
                tied=tied, root_sharded=frozen, training=False, grad=not frozen), (name, frozen)


MMAP_PROBE = """import ctypes, sys
import minillm as M
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):  # glibc's struct mallinfo2; hblks: blocks that came from mmap
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
def mmapped(n):
    libc.free(libc.malloc(8 << 20))  # a large free: glibc's dynamic threshold rises to 8 MB
    before = libc.mallinfo2().hblks
    p = libc.malloc(n)
    after = libc.mallinfo2().hblks
    libc.free(p)
    return after - before
M.init_distributed(M.parse_args(sys.argv[1:]))
print(mmapped(1 << 20))
"""


def glibc_mallinfo2():
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not glibc_mallinfo2(), reason="glibc's malloc (2.33 or later, for mallinfo2) only")
@pytest.mark.parametrize("flags, after", [(["--fsdp"], 1), ([], 0)])
def test_fsdp_on_the_cpu_gives_freed_buffers_back_with_no_environment_variable(flags, after):
    """After a large free glibc serves a 1 MB block from its heap, where freed memory stays in the process (each
    rank then held 0.96-1.11x of one process's memory); --fsdp on the CPU fixes the mmap threshold itself, so the
    block is mmapped and given back when freed. A run without --fsdp keeps glibc's default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run([sys.executable, "-c", MMAP_PROBE, "--device", "cpu", *flags], env=dict(env, PYTHONPATH=str(HERE)),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(after)]
