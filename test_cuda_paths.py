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
