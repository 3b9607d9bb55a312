"""Tensor quantizers and the fake-quantized layers of quantization-aware training.

`quantize_tensor` puts a tensor on a k-bit grid (affine `uniform` or powers of two `log`),
`fp16_round` on float16 values; `ActivationFakeQuant` and the `FakeQuant*` layers simulate
that rounding in the forward pass while gradients pass straight through (Jacob et al.,
2018). Exact zeros stay exact zeros, so pruning survives a later quantize step.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("uniform", "log")
ACTIVATION_BITS = 8  # qat: activations as uint8, as ONNX Runtime's int8 kernels take them
EMA_MOMENTUM = 0.01  # qat: weight of each batch in the activation min/max running average
FP16_MAX = 65504.0  # the largest finite float16


def quantize_tensor(w: torch.Tensor, bits: int, scheme: str = "uniform",
                    per_channel: bool = True) -> torch.Tensor:
    """`w` with every value on a `bits`-bit grid, as a new tensor (`w` is unchanged).

    `uniform`: affine min/max grid, scale * (q - zero_point) with integer q in
    [0, 2^bits - 1]; the range always includes 0 and the zero point is an integer, so
    zeros map back to exactly 0. `log`: sign(w) * 2^e with e the nearest power of two,
    clipped to the 2^(bits-1) - 1 largest exponents in use; zeros stay zero. Either way at
    most 2^bits distinct values per channel (dim 0) or per tensor. Quantization has no
    useful gradient, so the result is detached (a straight-through estimator adds one)."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 2 to 16, got {bits!r}.")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}.")
    if w.numel() == 0:
        return w.detach().clone()
    x = w.detach().float()
    rows = x.reshape(x.shape[0], -1) if per_channel and x.ndim >= 1 else x.reshape(1, -1)
    out = _uniform(rows, bits) if scheme == "uniform" else _log(rows, bits)
    return out.reshape(w.shape).to(w.dtype)


def _uniform(rows: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** bits - 1
    lo = rows.amin(1, keepdim=True).clamp(max=0.0)  # 0 inside the range: zeros representable
    hi = rows.amax(1, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
    zero_point = torch.round(-lo / scale).clamp(0, levels)
    q = torch.clamp(torch.round(rows / scale) + zero_point, 0, levels)
    return (q - zero_point) * scale


def _log(rows: torch.Tensor, bits: int) -> torch.Tensor:
    exponents = 2 ** (bits - 1) - 1  # with the sign and zero: at most 2^bits values
    mag = rows.abs()
    nonzero = mag > 0
    # floor(log2(|w| * 4/3)) is the exponent of the nearest power of two (ties upwards)
    e = torch.floor(torch.log2(torch.where(nonzero, mag, torch.ones_like(mag)) * (4 / 3)))
    e_max = torch.where(nonzero, e, torch.full_like(e, -torch.inf)).amax(1, keepdim=True)
    e_max = torch.where(torch.isfinite(e_max), e_max, torch.zeros_like(e_max))
    e = torch.minimum(torch.maximum(e, e_max - (exponents - 1)), e_max)
    return torch.where(nonzero, torch.sign(rows) * torch.exp2(e), torch.zeros_like(rows))


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded to the nearest float16 value (saturating at ±65504), in `t`'s dtype."""
    return t.detach().clamp(-FP16_MAX, FP16_MAX).half().to(t.dtype)


class ActivationFakeQuant(nn.Module):
    """8-bit per-tensor affine fake quantization of a layer's input.

    While training (and not frozen) the range is a running average of each batch's min and
    max; frozen, the scale and zero point are constants and the module is three arithmetic
    operations that torch.export and ONNX export as they are. The gradient passes straight
    through (straight-through estimator)."""

    def __init__(self, bits: int = ACTIVATION_BITS, momentum: float = EMA_MOMENTUM) -> None:
        super().__init__()
        self.levels = 2 ** bits - 1
        self.momentum = momentum
        self.frozen = False
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        if not bool(self.observed):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.observed.fill_(True)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)
        low, high = self.min_val.clamp(max=0.0), self.max_val.clamp(min=0.0)
        self.scale.copy_(((high - low) / self.levels).clamp(min=1e-8))
        self.zero_point.copy_(torch.round(-low / self.scale).clamp(0, self.levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen:
            self.observe(x.detach())
        grid = x.detach() if self.training else x  # the rounding records nothing for the
        q = torch.clamp(torch.round(grid / self.scale) + self.zero_point, 0, self.levels)
        y = (q - self.zero_point) * self.scale  # backward: it saved copies of every input
        return x + (y - grid) if self.training else y

    def extra_repr(self) -> str:
        return (f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}, "
                f"frozen={self.frozen}")


class _FakeQuantWeight:
    """Mixin for Linear/Conv: the forward uses the fake-quantized weight; the gradient goes
    straight through to the float weight, which the optimizer keeps updating."""

    qat_bits: int
    qat_scheme: str
    qat_per_channel: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "input_quant" in self._modules:  # a QuantInput layer while it fine-tunes
            x = self.input_quant(x)
        w = self.weight
        grid = w.detach()
        wq = w + (quantize_tensor(grid, self.qat_bits, self.qat_scheme,
                                  self.qat_per_channel) - grid)
        if isinstance(self, nn.Linear):
            return nn.functional.linear(x, wq, self.bias)
        return self._conv_forward(x, wq, self.bias)


class FakeQuantLinear(_FakeQuantWeight, nn.Linear):
    pass


class FakeQuantConv1d(_FakeQuantWeight, nn.Conv1d):
    pass


class FakeQuantConv2d(_FakeQuantWeight, nn.Conv2d):
    pass


FAKE_QUANT = {nn.Linear: FakeQuantLinear, nn.Conv1d: FakeQuantConv1d,
               nn.Conv2d: FakeQuantConv2d}


class _QuantInput:
    """Mixin for Linear/Conv: the layer's own input passes its child `input_quant` (an
    ActivationFakeQuant) first. QAT uses it where the layer's parent is not a Sequential
    to insert the quantizer into (a transformers block), so the layer keeps its name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_quant(x))


class QuantInputLinear(_QuantInput, nn.Linear):
    pass


class QuantInputConv1d(_QuantInput, nn.Conv1d):
    pass


class QuantInputConv2d(_QuantInput, nn.Conv2d):
    pass


QUANT_INPUT = {nn.Linear: QuantInputLinear, nn.Conv1d: QuantInputConv1d,
               nn.Conv2d: QuantInputConv2d}

