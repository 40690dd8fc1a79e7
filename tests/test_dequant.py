"""Dequant4bitLinear: bitsandbytes' 4-bit layer math, one shared buffer."""

from __future__ import annotations

import pytest
import torch

from tunelab.dequant import DequantBuffer, dequantize_into, fuse_4bit
from tunelab.kernels import unfuse


def _layers(quant_type: str, double_quant: bool, bias: bool):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layers = []
    for shape in ((48, 64), (96, 64)):
        layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=bias, compute_dtype=torch.float32,
                                  compress_statistics=double_quant, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(torch.randn(shape) * 0.1, requires_grad=False,
                                         compress_statistics=double_quant,
                                         quant_type=quant_type).to("cpu")
        if bias:
            layer.bias = torch.nn.Parameter(torch.randn(shape[0]) * 0.1, requires_grad=False)
        layers.append(layer)
    return layers


@pytest.mark.parametrize("quant_type,double_quant,bias", [("nf4", True, False),
                                                          ("nf4", False, True),
                                                          ("fp4", True, False)])
def test_same_outputs_and_input_gradients_as_bitsandbytes(quant_type, double_quant, bias):
    import bitsandbytes.functional as bnbf

    layers = _layers(quant_type, double_quant, bias)
    for layer in layers:
        buf = torch.empty(layer.weight.quant_state.shape)
        expected = bnbf.dequantize_4bit(layer.weight, layer.weight.quant_state)
        assert torch.equal(dequantize_into(layer.weight, layer.weight.quant_state, buf),
                           expected)
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), torch.nn.Linear(48, 64),
                                layers[1])
    x = torch.randn(2, 5, 64, requires_grad=True)
    ref = model(x)
    ref.square().sum().backward()
    ref_grad = x.grad.clone()
    x.grad = None
    assert fuse_4bit(model) == 2
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert unfuse(model) == 2 and "forward" not in layers[0].__dict__


def test_layers_share_one_buffer_of_the_largest_weight():
    layers = _layers("nf4", True, False)
    model = torch.nn.Sequential(*layers[:1])
    fuse_4bit(torch.nn.ModuleList(layers))
    buffer = layers[0].forward.args[1]
    assert buffer is layers[1].forward.args[1]
    model(torch.randn(3, 64))
    layers[1](torch.randn(3, 64))
    (flat,) = buffer._flat.values()
    assert flat.numel() == 96 * 64
    layers[0](torch.randn(3, 64))  # the smaller one reuses the same storage
    assert next(iter(buffer._flat.values())) is flat


def test_buffer_grows_and_reuses():
    buf = DequantBuffer()
    a = buf.take(torch.Size([4, 8]), torch.float32, torch.device("cpu"))
    b = buf.take(torch.Size([2, 8]), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr()
    c = buf.take(torch.Size([8, 8]), torch.float32, torch.device("cpu"))
    assert c.shape == (8, 8)
