"""device.py: device resolution (auto, explicit, unavailable) and autocast on CPU."""

import contextlib

import pytest
import torch

from lungseg import device as dv
from lungseg.errors import LungsegError


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_is_cpu_without_cuda(no_cuda):
    assert dv.resolve_device() == torch.device("cpu")
    assert dv.resolve_device("AUTO") == torch.device("cpu")
    assert dv.resolve_device("cpu") == dv.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_is_cuda_when_present(two_gpus):
    assert dv.resolve_device("auto") == torch.device("cuda", 0)
    assert dv.resolve_device("cuda") == torch.device("cuda", 0)
    assert dv.resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("name,match", [("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"),
                                        ("gpu", "unknown device"), ("", "unknown device"),
                                        ("meta", "not supported")])
def test_unavailable_or_unknown_device_raises(no_cuda, name, match):
    with pytest.raises(dv.DeviceError, match=match) as info:
        dv.resolve_device(name)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LungsegError)


def test_cuda_index_out_of_range_raises(two_gpus):
    with pytest.raises(dv.DeviceError, match="only 2 CUDA"):
        dv.resolve_device("cuda:2")


def test_autocast_disabled_is_full_precision():
    lin = torch.nn.Linear(4, 4)
    with dv.autocast_context("cpu", enabled=False):
        assert lin(torch.rand(2, 4)).dtype == torch.float32
    assert isinstance(dv.autocast_context("cpu", enabled=False), contextlib.nullcontext)


def test_autocast_on_cpu_follows_native_bf16(monkeypatch):
    lin = torch.nn.Linear(4, 4)
    expected = torch.bfloat16 if dv.cpu_has_native_bf16() else torch.float32
    assert dv.autocast_dtype("cpu") == (torch.bfloat16 if dv.cpu_has_native_bf16() else None)
    with dv.autocast_context(torch.device("cpu")):
        assert lin(torch.rand(2, 4)).dtype == expected
    monkeypatch.setattr(dv, "cpu_has_native_bf16", lambda: True)
    with dv.autocast_context("cpu"):
        assert lin(torch.rand(2, 4)).dtype == torch.bfloat16


def test_explicit_bf16_autocast_on_cpu_and_bad_dtype():
    lin = torch.nn.Linear(4, 4)
    with dv.autocast_context("cpu", dtype=torch.bfloat16):
        assert lin(torch.rand(2, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        dv.autocast_context("cpu", dtype=torch.float32)


@pytest.mark.parametrize("precision, native, expected", [
    ("fp32", True, torch.float32), ("auto", False, torch.float32), ("auto", True, torch.bfloat16),
    ("bf16", False, torch.bfloat16), ("fp16", False, torch.float16),
])
def test_precision_setting_maps_to_one_autocast(monkeypatch, precision, native, expected):
    monkeypatch.setattr(dv, "cpu_has_native_bf16", lambda: native)
    lin = torch.nn.Linear(4, 4)
    with dv.precision_context("cpu", precision):
        assert lin(torch.rand(2, 4)).dtype == expected
    with pytest.raises(ValueError, match="precision must be"):
        dv.precision_context("cpu", "int8")


@pytest.mark.parametrize("arch", ["candidatenet", "resnet3d50"])
def test_inference_ready_network_gives_the_same_outputs_faster_layout(arch):
    from torch import nn

    from lungseg.configs import make_config

    kind = "det" if arch == "candidatenet" else "cls"
    torch.manual_seed(0)
    model = make_config(kind, arch=arch).build_model()
    for m in model.modules():                     # batch norms with statistics other than the identity
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(3, 1, 16, 48, 48)
    with torch.no_grad():
        expected = model(x)
        ready = dv.inference_ready(model, "cpu")
        got = ready(x)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in ready.modules())     # all folded (resnet: block by block)
    assert next(p for p in ready.parameters() if p.dim() == 5).is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
