"""The FNO spectral convolution, written as products with fixed DFT matrices.

An FNO layer transforms to Fourier space, keeps the lowest ``modes_h`` x ``modes_w``
frequencies, mixes channels there with learned complex weights, and transforms back
(Li et al. 2021). ``torch.fft.rfft2/irfft2`` do not export with the TorchScript ONNX exporter,
the dynamo exporter fails on the inverse 2-D FFT, and ONNX Runtime's DFT is slow on the CPU
and absent on CUDA. Because only a few modes are kept, the truncated transform is exactly a
pair of small matrix products per direction, which export at opset 17 and run on every
provider. ``spectral_conv_fft`` is the textbook formulation, kept as the reference the
tests hold the matrix form to (within 1e-5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsss.errors import InputError


def _check_modes(h: int, w: int, modes_h: int, modes_w: int) -> None:
    # Beyond these the two kept row blocks overlap (h) or the Nyquist column is reached (w),
    # where the real inverse transform treats bins differently.
    if not (1 <= modes_h <= h // 2 and 1 <= modes_w <= w // 2):
        raise InputError(
            f"modes ({modes_h}, {modes_w}) need 1 <= modes <= size // 2 for a {h}x{w} input"
        )


def spectral_conv_fft(
    x: torch.Tensor, w_low: torch.Tensor, w_high: torch.Tensor, modes_h: int, modes_w: int
) -> torch.Tensor:
    """Reference: rfft2, weights on the kept corners, irfft2 (as in neuraloperator).

    x [B, Cin, H, W] real; w_low / w_high [Cin, Cout, modes_h, modes_w] complex for the
    lowest positive and the highest (negative) row frequencies.
    """
    h, w = x.shape[-2:]
    _check_modes(h, w, modes_h, modes_w)
    x_ft = torch.fft.rfft2(x)  # [B, Cin, H, W//2 + 1], complex
    out = torch.zeros(x.shape[0], w_low.shape[1], h, w // 2 + 1, dtype=x_ft.dtype, device=x.device)
    # Rows 0..mh-1 are frequencies 0..mh-1; rows H-mh..H-1 are -mh..-1. Columns 0..mw-1.
    out[:, :, :modes_h, :modes_w] = torch.einsum(
        "bixy,ioxy->boxy", x_ft[:, :, :modes_h, :modes_w], w_low
    )
    out[:, :, -modes_h:, :modes_w] = torch.einsum(
        "bixy,ioxy->boxy", x_ft[:, :, -modes_h:, :modes_w], w_high
    )
    return torch.fft.irfft2(out, s=(h, w))


def dft_matrices(
    h: int, w: int, modes_h: int, modes_w: int, device=None, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """Real and imaginary parts of the truncated forward and inverse transforms.

    Forward along W: F_w[k, x] = exp(-2 pi i k x / W), k < modes_w.
    Forward along H: F_h[k, y] = exp(-2 pi i f_k y / H) for the kept row frequencies
    f = 0..mh-1, -mh..-1. Inverse along H: conj(F_h)^T / H. Inverse real transform along W:
    y[x] = (1/W) sum_k c_k (Re Y_k cos(2 pi k x / W) - Im Y_k sin(2 pi k x / W)),
    c_0 = 1 and c_k = 2 for k > 0 (the conjugate-symmetric half that rfft drops).
    """
    _check_modes(h, w, modes_h, modes_w)
    kw = torch.arange(modes_w, dtype=torch.float64)
    xs = torch.arange(w, dtype=torch.float64)
    freqs_h = torch.cat([torch.arange(modes_h), torch.arange(h - modes_h, h)]).double()
    ys = torch.arange(h, dtype=torch.float64)
    ang_w = 2 * math.pi * torch.outer(kw, xs) / w  # [mw, W]
    ang_h = 2 * math.pi * torch.outer(freqs_h, ys) / h  # [2mh, H]
    coeff = torch.full((modes_w, 1), 2.0, dtype=torch.float64)
    coeff[0] = 1.0
    mats = {
        "fw_re": torch.cos(ang_w),
        "fw_im": -torch.sin(ang_w),
        "fh_re": torch.cos(ang_h),
        "fh_im": -torch.sin(ang_h),
        "ih_re": torch.cos(ang_h).T / h,
        "ih_im": torch.sin(ang_h).T / h,
        "iw_re": coeff * torch.cos(ang_w) / w,
        "iw_im": -coeff * torch.sin(ang_w) / w,
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in mats.items()}


class SpectralConv2d(nn.Module):
    """FNO spectral convolution by matrix products: exportable, same result as the FFT form.

    Weights are stored as real/imaginary pairs (ONNX has no complex type). The DFT matrices
    depend only on the input size and are cached per size.
    """

    def __init__(self, in_channels: int, out_channels: int, modes_h: int, modes_w: int):
        super().__init__()
        self.modes_h, self.modes_w = modes_h, modes_w
        scale = 1.0 / (in_channels * out_channels)
        # [2 (low/high row block), 2 (re/im), Cin, Cout, mh, mw]
        self.weight = nn.Parameter(
            scale * torch.rand(2, 2, in_channels, out_channels, modes_h, modes_w)
        )
        self._mats: dict[tuple, dict[str, torch.Tensor]] = {}

    def complex_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same weights as complex tensors, for the FFT reference."""
        w = torch.complex(self.weight[:, 0], self.weight[:, 1])
        return w[0], w[1]

    def _matrices(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Inference-mode tensors cannot enter autograd or tracing: cache those apart.
        key = (x.shape[-2], x.shape[-1], x.device, x.dtype, torch.is_inference_mode_enabled())
        if key not in self._mats:
            self._mats[key] = dft_matrices(*key[:2], self.modes_h, self.modes_w, *key[2:4])
        return self._mats[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._matrices(x)
        # Forward along W (real input): [B, C, H, mw]
        a_re = x @ m["fw_re"].T
        a_im = x @ m["fw_im"].T
        # Forward along H (complex): [B, C, 2mh, mw]
        b_re = m["fh_re"] @ a_re - m["fh_im"] @ a_im
        b_im = m["fh_re"] @ a_im + m["fh_im"] @ a_re
        # Channel mixing with complex weights, per kept mode; low rows then high rows.
        w_re = torch.cat([self.weight[0, 0], self.weight[1, 0]], dim=-2)  # [Ci, Co, 2mh, mw]
        w_im = torch.cat([self.weight[0, 1], self.weight[1, 1]], dim=-2)
        c_re = torch.einsum("bixy,ioxy->boxy", b_re, w_re) - torch.einsum(
            "bixy,ioxy->boxy", b_im, w_im
        )
        c_im = torch.einsum("bixy,ioxy->boxy", b_re, w_im) + torch.einsum(
            "bixy,ioxy->boxy", b_im, w_re
        )
        # Inverse along H (complex): [B, Co, H, mw]
        d_re = m["ih_re"] @ c_re - m["ih_im"] @ c_im
        d_im = m["ih_re"] @ c_im + m["ih_im"] @ c_re
        # Inverse real transform along W: [B, Co, H, W]
        return d_re @ m["iw_re"] + d_im @ m["iw_im"]
