"""Claims that make minillm.py safe to fork: the fp32 LM head behaves like the stock module (deepcopy, pickling, an
edit through .data, torch.compile), evaluated models are frozen and cast their head once per decode loop, a changed
flag is never ignored by a rerun, one function per quantity, and --help shows every default. CPU, offline."""

import argparse
import copy
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import minillm as M
from test_minillm import tiny_gpt2

HERE = Path(__file__).parent
V = 40


def tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


MODELS = {"gpt2 (tied head)": lambda: M.fp32_head(tiny_gpt2(V, 0, n_layer=1, n_embd=16), V - 2),
          "llama": lambda: M.fp32_head(tiny_llama(), V - 2)}
IDS = torch.tensor([[3, 5, 7, 9]])


def logits(model, dtype=torch.float32):
    with M.autocast("cpu", dtype):
        return M.forward(model, IDS, torch.ones_like(IDS))


# ---------------------------------------------------------------------------------------------------
# 1. The fp32 head is the stock module with another forward.

@pytest.mark.parametrize("name", MODELS)
def test_deepcopy_has_its_own_head(name):
    """Reference models, EMA teachers and PEFT's modules_to_save copy modules: the copy's logits come from the copy's
    head, and backward through the copy fills the copy's gradient."""
    model = MODELS[name]()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight[7, :4] += 100.0  # a row of the copy moves its logit
    assert (logits(twin)[..., 7] - logits(model)[..., 7]).abs().min() > 1.0
    logits(twin).sum().backward()
    assert twin.get_output_embeddings().weight.grad is not None
    assert model.get_output_embeddings().weight.grad is None
    assert M.n_logits(twin) == V - 2 and logits(twin).shape[-1] == V - 2


@pytest.mark.parametrize("name", MODELS)
def test_torch_save_whole_model(name):
    model = MODELS[name]()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert type(loaded.get_output_embeddings()) is M.FP32Head


def test_state_dict_and_tying_unchanged():
    plain, patched = tiny_gpt2(V, 0, n_layer=1, n_embd=16), MODELS["gpt2 (tied head)"]()
    assert list(plain.state_dict()) == list(patched.state_dict())
    assert patched.get_output_embeddings().weight is patched.get_input_embeddings().weight


def test_data_edit_between_regions_is_seen():
    """An EMA update writes through .data (p.data.lerp_), which changes neither data_ptr nor _version: a frozen bf16
    head must still use the new weights in the next region."""
    model = M.fp32_head(tiny_llama(0, torch.bfloat16), V - 2).requires_grad_(False)
    other = tiny_llama(1, torch.bfloat16)
    logits(model, torch.bfloat16)  # a region that casts the head
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.lerp_(q.data, 0.5)
    fresh = M.fp32_head(tiny_llama(2, torch.bfloat16), V - 2)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(model, torch.bfloat16), logits(fresh, torch.bfloat16), rtol=0, atol=0)


def test_frozen_bf16_head_compiles_fullgraph():
    """No data_ptr comparison (or other untraceable Python) in the head: dynamo traces it whole."""
    head = M.fp32_head(tiny_llama(0, torch.bfloat16), V - 2).requires_grad_(False).get_output_embeddings()
    h = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(h), head(h), rtol=0, atol=0)
    assert compiled(h).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# 2. The head at tensor-core precision: bf16 inputs, fp32 accumulation, fp32 output (no bf16 rounding of logits).

def test_bf16_head_is_fp32_grade():
    """Under bf16 the head's logits are an fp32 head's, from bf16 GEMMs with an fp32 accumulator (what tensor cores
    do): each fp32 operand (the student's master W; GPT-2's fp32 h) is split into two bf16 parts. Not bf16 numbers;
    the gradient reaches the fp32 master weights."""
    model = MODELS["llama"]()
    head = model.get_output_embeddings()
    w = head.weight[:V - 2].detach().double()
    for dtype in [torch.bfloat16, torch.float32]:
        h = (torch.randn(2, 3, 16) * 30).to(dtype).requires_grad_(True)
        with M.autocast("cpu", torch.bfloat16):
            z = head(h)
        assert z.dtype == torch.float32
        torch.testing.assert_close(z.double(), h.detach().double() @ w.T, rtol=0, atol=1e-4)  # a bf16 step here: ~1e-2
        assert (z != z.bfloat16().float()).any()
        head.weight.grad = None
        z.sum().backward()
        assert head.weight.grad.dtype == torch.float32 and head.weight.grad[:V - 2].abs().sum() > 0
        assert h.grad is not None and h.grad.dtype == dtype


def test_tensor_core_matmul_autograd_shapes():
    """The CUDA path (torch.mm with out_dtype=, which has no gradient of its own) traced on the meta device: fp32
    logits, bf16 gradients of the shapes of h and W."""
    h = torch.empty(6, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(V - 2, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    z = M.TensorCoreMatmul.apply(h, w)
    assert z.dtype == torch.float32 and z.shape == (6, V - 2)
    z.sum().backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape and h.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# 3. Evaluated models are frozen, and a head is cast at most once per decode loop.

class CountHeadCasts(TorchDispatchMode):
    """Counts conversions to fp32 of a tensor shaped like the head's rows."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.n = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout) \
                and tuple(args[0].shape) == self.shape and out.dtype == torch.float32 and args[0].dtype != torch.float32:
            self.n += 1
        return out


@pytest.mark.parametrize("frozen", [True, False])
def test_sample_model_casts_the_head_once_per_loop(frozen):
    model = M.fp32_head(tiny_llama(0, torch.bfloat16), V - 2).requires_grad_(not frozen)
    ids = torch.tensor([[3, 5, 7], [1, 2, 4]])
    with CountHeadCasts((V - 2, 16)) as count:
        out = M.sample_model(model, ids, torch.ones_like(ids), eos_ids=torch.tensor([V + 5]), pad_id=0, max_new_tokens=6,
                             dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert out.shape[1] == 6 and count.n == 1  # counted at all (the op is seen), and once per loop


def test_sample_rollouts_casts_each_head_once_per_loop():
    student = M.fp32_head(tiny_llama(0), V - 2)  # fp32 master weights, trained
    teacher = M.fp32_head(tiny_llama(1, torch.bfloat16), V - 2).requires_grad_(False)
    ids = torch.tensor([[3, 5, 7], [1, 2, 4]])
    counts = []
    for n in [2, 6]:
        with CountHeadCasts((V - 2, 16)) as count:
            roll = M.sample_rollouts(student, teacher, ids, torch.ones_like(ids), torch.tensor([V + 5]), 0, max_new_tokens=n,
                                     dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
        assert roll["tokens"].shape[1] == n
        counts.append(count.n)
    assert 1 <= counts[0] == counts[1] <= 4  # per loop, not per token: the teacher once, the student's split once (4 on the CPU)


def test_evaluated_models_are_frozen():
    """eval.py, demo.py and SeqKD load every model they only evaluate with load_frozen (eval mode, no gradient)."""
    for f in ["eval.py", "demo.py"]:
        src = (HERE / f).read_text()
        assert "load_model(" not in src, f"{f}: use load_frozen for models that are only evaluated"
    assert "teacher = load_frozen(" in (HERE / "minillm.py").read_text().split("def seqkd_data")[1].split("def ")[0]


def test_load_frozen(tmp_path):
    tiny_gpt2(V, 0, n_layer=1, n_embd=16).save_pretrained(tmp_path)
    model = M.load_frozen(str(tmp_path), "cpu", vocab_size=V - 2)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert M.n_logits(model) == V - 2


# ---------------------------------------------------------------------------------------------------
# 4. A changed flag is never silently ignored; a run folder can move.

def settings(out, *flags):
    return M.parse_args(["--device", "cpu", "--out", str(out), *flags])


def test_a_flag_the_old_run_did_not_record_is_compared_with_its_default(tmp_path, capsys):
    """A fork adds a flag (here: an old args.json without "alpha"); a rerun that sets it must not be skipped as done."""
    M.prepare_out(tmp_path, settings(tmp_path))
    old = json.loads((tmp_path / "args.json").read_text())
    del old["alpha"], old["gamma"]  # gamma: a RECIPES flag, whose default is the recipe's
    (tmp_path / "args.json").write_text(json.dumps(old))
    M.prepare_out(tmp_path, settings(tmp_path))  # the default: the same run
    (tmp_path / "args.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit) as e:
        M.prepare_out(tmp_path, settings(tmp_path, "--alpha", "0.5"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--alpha 0.2 -> 0.5" in err and err.count("\n") == 1
    assert "alpha" not in json.loads((tmp_path / "args.json").read_text())  # nothing written


def test_a_copied_run_folder_is_the_same_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "student-sft").mkdir(parents=True)
    M.prepare_out(a, settings(a, "--student", str(a / "student-sft"), "--skip-student-sft"))
    import shutil
    shutil.copytree(a, b)
    M.prepare_out(b, settings(b, "--student", str(b / "student-sft"), "--skip-student-sft"))  # accepted
    assert json.loads((b / "args.json").read_text())["student"] == "$OUT/student-sft"
    with pytest.raises(SystemExit):  # another student is still another run
        M.prepare_out(b, settings(b, "--student", str(a / "student-sft"), "--skip-student-sft"))
    with pytest.raises(SystemExit):
        M.prepare_out(b, settings(b, "--student", "gpt2-medium", "--skip-student-sft"))


# ---------------------------------------------------------------------------------------------------
# 5. One function per quantity; tests' arguments come from the real parser; --help shows the defaults.

def test_a_fork_that_swaps_the_divergence_edits_one_function(monkeypatch):
    """The loss's single-step term and the logged rkl both come from reverse_kl: replace it, and both follow."""
    monkeypatch.setattr(M, "reverse_kl", lambda logq, logp: torch.full(logq.shape[:-1], 7.0))
    student, teacher = M.fp32_head(tiny_llama(0), V - 2), M.fp32_head(tiny_llama(1), V - 2).requires_grad_(False)
    ids = torch.tensor([[3, 5, 7], [1, 2, 4]])
    roll = M.sample_rollouts(student, teacher, ids, torch.ones_like(ids), V + 5, 0, max_new_tokens=3,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(roll["kl"], 7.0 * roll["mask"])
    mb = {**roll, "prompt_ids": ids, "prompt_mask": torch.ones_like(ids), "adv": torch.zeros_like(roll["w"])}
    from test_minillm import loss_args
    _, stats = M.minillm_loss(student, mb, loss_args(), n_norm=1.0)
    assert stats["loss_single"] == pytest.approx(7.0 * roll["mask"].sum().item())
    assert "`single_step_kl`" not in (HERE / "minillm.py").read_text() and not hasattr(M, "single_step_kl")


def test_loss_args_come_from_the_parser():
    from test_minillm import loss_args
    args = loss_args(clip_eps=0.2)
    assert vars(args).keys() == vars(M.parse_args(["--device", "cpu"])).keys() and args.clip_eps == 0.2


def test_help_shows_every_default():
    p = M.build_parser()
    fmt = p._get_formatter()
    for a in p._actions:
        if not a.option_strings or a.default in (None, argparse.SUPPRESS):
            continue
        text = " ".join(fmt._format_action(a).split())
        want = "(default: off)" if a.nargs == 0 else f"(default: {a.default})"
        assert want in text, f"--help of {a.option_strings[0]} does not show its default: {text}"
    assert "Paper: Gu, Dong, Wei, Huang" in p.format_help()  # the description keeps its line breaks
