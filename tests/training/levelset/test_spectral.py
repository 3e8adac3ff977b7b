"""The DFT-matrix spectral convolution equals the torch.fft formulation and exports."""

import pytest
import torch

from export.parity import compare
from training.levelset.spectral import SpectralConv2d, spectral_conv_fft
from wsss.tensors import ModelSpec, TensorSpec


@pytest.mark.parametrize("size", [(24, 24), (32, 20), (25, 31)])
@pytest.mark.parametrize("modes", [(1, 1), (4, 6), (12, 10)])
def test_matrix_form_equals_fft_form(size, modes):
    h, w = size
    mh, mw = min(modes[0], h // 2), min(modes[1], w // 2)
    torch.manual_seed(0)
    layer = SpectralConv2d(3, 5, mh, mw).double()
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    want = spectral_conv_fft(x, *layer.complex_weights(), mh, mw)
    got = layer(x)
    assert got.shape == (2, 5, h, w)
    assert torch.allclose(got, want, atol=1e-5)
    # float32 as served: same bound
    layer32 = SpectralConv2d(3, 5, mh, mw)
    layer32.weight.data = layer.weight.data.float()
    assert torch.allclose(layer32(x.float()).double(), want, atol=1e-5)


def test_gradients_flow_like_the_fft_form():
    torch.manual_seed(1)
    layer = SpectralConv2d(2, 2, 4, 4).double()
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    g_matrix = (x.grad.clone(), layer.weight.grad.clone())
    x.grad = None
    layer.weight.grad = None
    spectral_conv_fft(x, *layer.complex_weights(), 4, 4).square().sum().backward()
    assert torch.allclose(g_matrix[0], x.grad, atol=1e-8)
    assert torch.allclose(g_matrix[1], layer.weight.grad, atol=1e-8)


def test_modes_beyond_half_the_size_are_refused():
    with pytest.raises(ValueError, match="modes"):
        SpectralConv2d(1, 1, 9, 4)(torch.randn(1, 1, 16, 16))


def test_exports_to_onnx_opset_17_with_parity(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(2)
    layer = SpectralConv2d(4, 4, 12, 12).eval()
    x = torch.randn(2, 4, 48, 48)
    path = tmp_path / "spectral.onnx"
    torch.onnx.export(
        layer,
        (x,),
        str(path),
        input_names=["X"],
        output_names=["Y"],
        dynamic_axes={"X": {0: "b"}, "Y": {0: "b"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.randn(3, 4, 48, 48)
    spec = ModelSpec(
        "spectral",
        (TensorSpec("X", "float32", (4, 48, 48)),),
        (TensorSpec("Y", "float32", (4, 48, 48)),),
    )
    errors = compare(
        layer, session.run(["Y"], {"X": probe.numpy()}), spec, (probe,), 1e-5, "ONNX Runtime"
    )
    assert errors["Y"] < 1e-5
