"""The lines that only run on a GPU, run on the CPU wherever torch allows it: torch's own validators and parsers are
called, the same objects are built, the same context managers entered twice. No test replaces the torch function
whose contract it claims; a spy records its argument and then calls torch's real code. What cannot run without CUDA
(cudaHostRegister, setting the current device itself, NCCL) is listed in the closing note of the change."""

import os
from argparse import Namespace

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch.cuda._utils import _get_device_index

import eval as E
import minillm as M


@pytest.fixture
def set_device(monkeypatch):
    """torch.cuda.set_device on a CPU machine: its first line, torch's parser _get_device_index, runs for real (it
    raises what an H200 raised for a bare `cuda`); the CUDA call after it cannot. Returns the indices it bound."""
    bound = []

    def spy(device):
        bound.append(_get_device_index(device))  # what set_device does before it calls into CUDA

    monkeypatch.setattr(torch.cuda, "set_device", spy)
    for var in ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: bound.append(backend))
    return bound


@pytest.mark.parametrize("device, fsdp, env, index", [
    ("cuda", False, {}, 0),  # the default of --device on a GPU machine: cuda:0
    ("cuda:1", False, {}, 1),
    ("cuda:1", True, {}, 1),  # --fsdp alone: a group of one on the GPU asked for
    ("cuda", False, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x"}, 0),  # torchrun, one process
    ("cuda", False, {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "x"}, 1),  # torchrun: LOCAL_RANK's GPU
])
def test_every_form_of_cuda_binds_a_device_torch_accepts(set_device, monkeypatch, device, fsdp, env, index):
    """torch.cuda.set_device refuses a device without an index; every --device a user can give reaches it indexed,
    and args.device keeps the index for DDP's device_ids (wrap_ddp: torch.device(device).index)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = Namespace(device=device, fsdp=fsdp, dist_timeout=60.0)
    M.init_distributed(args)
    assert set_device[0] == index and args.device == f"cuda:{index}" and torch.device(args.device).index == index
    several = fsdp or int(env.get("WORLD_SIZE", 1)) > 1
    assert set_device[1:] == (["nccl"] if several else [])  # a GPU group is NCCL's


def test_the_cpu_binds_nothing(set_device):
    args = Namespace(device="cpu", fsdp=False, dist_timeout=60.0)
    M.init_distributed(args)
    assert set_device == [] and args.device == "cpu"


class Bound(Exception):
    """Stops eval.main once the device is bound: nothing after it can run without a GPU."""


def test_eval_binds_an_indexed_device(set_device, monkeypatch, tmp_path):
    """eval.py --device cuda (its default on a GPU machine) went to torch.cuda.set_device without an index too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # check_device: a GPU is present
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def stop(device):
        set_device.append(_get_device_index(device))
        raise Bound

    monkeypatch.setattr(torch.cuda, "set_device", stop)
    with pytest.raises(Bound):
        E.main(["--model", "m", "--device", "cuda", "--out", str(tmp_path)])
    assert set_device == [0]


# ----------------------------------------------------------------------------------------------------
# Context managers entered more than once

def test_autocast_may_be_entered_again_as_bench_trl_peer_does():
    """bench.py's TRL peer makes one M.autocast and enters it once per micro-batch; a @contextmanager one is spent
    after its first `with` (on CUDA: AttributeError '_GeneratorContextManager' object has no attribute 'args').
    bf16 on the CPU takes the same path: a real torch.autocast each time, the head casts' region opened and closed."""
    amp = M.autocast("cpu", torch.bfloat16)
    for _ in range(2):
        with amp:
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16 and M._head_casts == {}
        assert not torch.is_autocast_enabled("cpu") and M._head_casts is None


def test_autocast_nested_in_itself_closes_the_casts_region_at_the_outer_exit():
    amp = M.autocast("cpu", torch.bfloat16)
    with amp:
        casts = M._head_casts
        with amp:
            assert M._head_casts is casts  # one region: a head is cast once
        assert M._head_casts is casts and torch.is_autocast_enabled("cpu")
    assert M._head_casts is None and not torch.is_autocast_enabled("cpu")


def test_autocast_closes_the_region_when_the_block_raises():
    with pytest.raises(KeyError), M.autocast("cpu", torch.bfloat16):
        raise KeyError
    assert M._head_casts is None and not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------------------------------------
# The LM head on tensor cores: torch.mm(out_dtype=) has no CPU kernel in torch 2.13, but its meta kernel checks the
# same contract (shapes, out_dtype allowed for bf16 inputs), and autograd runs on meta tensors.

def test_tensor_core_matmul_meets_mm_out_dtype_contract_forward_and_backward():
    h = torch.empty(6, 8, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(5, 8, dtype=torch.bfloat16, device="meta", requires_grad=True)
    z = M.TensorCoreMatmul.apply(h, w)
    assert (z.shape, z.dtype) == ((6, 5), torch.float32)  # fp32 logits from bf16 operands
    z.sum().backward()
    assert (h.grad.shape, h.grad.dtype, w.grad.shape, w.grad.dtype) == (h.shape, torch.bfloat16, w.shape, torch.bfloat16)


def test_head_matmul_cuda_branch_gives_fp32_logits_of_the_batch_shape():
    """head_matmul's CUDA branch (bf16 parts from head_weight on a GPU): the (B, T, d) hidden states flattened for
    mm and the logits viewed back as (B, T, n), each of the 2 (fp32 h) x 2 (fp32 w) parts but lo·lo multiplied."""
    h = torch.empty(2, 3, 8, device="meta", requires_grad=True)  # GPT-2's LayerNorm output under autocast: fp32
    parts = [torch.empty(5, 8, dtype=torch.bfloat16, device="meta", requires_grad=True) for _ in range(2)]  # hi, lo
    z = M.head_matmul(h, parts)
    assert (z.shape, z.dtype) == ((2, 3, 5), torch.float32)
    z.sum().backward()
    assert h.grad.shape == h.shape and all(p.grad.shape == p.shape for p in parts)


def test_tensor_core_matmul_backward_is_a_bf16_layers_gradient():
    """dL/dh = g·w and dL/dw = gᵀ·h in bf16 (the CPU runs the backward's matmuls; the forward needs CUDA)."""
    g = torch.Generator().manual_seed(0)
    h, w, grad = (torch.randn(*s, generator=g) for s in [(6, 8), (5, 8), (6, 5)])
    ctx = Namespace(saved_tensors=(h.bfloat16(), w.bfloat16()))
    dh, dw = M.TensorCoreMatmul.backward(ctx, grad)
    assert dh.dtype == dw.dtype == torch.bfloat16
    hb, wb, gb = (x.bfloat16().float() for x in (h, w, grad))  # the values the bf16 matmuls read
    torch.testing.assert_close(dh.float(), gb @ wb, rtol=1e-2, atol=1e-2)  # to bf16's rounding of the result
    torch.testing.assert_close(dw.float(), gb.t() @ hb, rtol=1e-2, atol=1e-2)
