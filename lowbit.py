"""
Inference from int8 and ternary weights: the storage, the kernels and the packing behind quantize.py, bench.py's
+int8 / +ternary and the quantized checkpoints that ScBERT.from_checkpoint loads. Not an architecture: model.py holds
those, BitNet b1.58's quantization-aware training (BitLinear) included; this file only imports it.

    quantize(model, 'int8' | 'ternary')  swaps every attention and feed-forward linear (experts included) for a
                                         QuantLinear, in place: int8 absmax weights per row, or BitNet's ternary
    QuantLinear                          int8 weights times int8 activations per token; PyTorch's int8 GEMM on CPU
    QuantExperts                         a MoE layer's experts, one QuantLinear each (MoE.expert_matmul calls it)
    packed_state_dict / unpack_state_dict  a ternary model's weights stored five to a byte (pack_ternary)
"""
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import RMSNorm, absmax_int8, absmean_ternary


class QuantLinear(nn.Module):
    """Inference with int8 weights, one scale per output row (int8: absmax per row) or per matrix (ternary: γ), times
    int8 activations with one scale per token (absmax): y = (q_x · s_x)(q_w · s_w)ᵀ + b, after BitLinear's norm if any.

    kernel 'auto' on CPU runs PyTorch's int8 GEMM (the x86/fbgemm engine's quantized::linear_dynamic). That kernel
    quantizes its input per tensor, so each token is first divided by its own absmax: every token then spans [-1, 1],
    and the per-tensor grid is a per-token one; the output is multiplied back. The kernel's grid is asymmetric (uint8
    with a zero point), and int8 weights need reduce_range, which halves it to 128 levels (its u8·s8 pair sums overflow
    int16 otherwise): a step of 2·absmax/127, twice the reference's. Ternary weights cannot overflow: 255 levels.
    Elsewhere (GPU, or a PyTorch without that engine) 'auto' is weight-only int8: the weights dequantized to the input's
    dtype and the activations left as they are (the lowest error; it saves memory, not time). kernel='reference' runs
    the W8A8 arithmetic in fp32, symmetric ±127 per token: integer-valued operands, exact products."""
    def __init__(self, in_features, out_features, bias=True, ternary=False, norm=False):
        super().__init__()
        self.ternary, self.kernel, self._packed = ternary, 'auto', None
        self.register_buffer('weight_int8', torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer('weight_scale', torch.ones(1 if ternary else out_features))
        self.register_buffer('bias', torch.zeros(out_features) if bias else None)
        self.norm = RMSNorm(in_features) if norm else None

    @classmethod
    def from_float(cls, weight, bias=None, ternary=False, norm=None):
        """From a float weight (out, in): absmax int8 per row, or BitNet's absmean ternary; norm: BitLinear's norm."""
        q = cls(weight.shape[1], weight.shape[0], bias is not None, ternary, norm is not None)
        w_q, scale = absmean_ternary(weight.detach()) if ternary else absmax_int8(weight.detach())
        q.weight_int8.copy_(w_q)
        q.weight_scale.copy_(scale.flatten())
        if bias is not None:
            q.bias.copy_(bias.detach())
        if norm is not None:
            q.norm.load_state_dict(norm.state_dict())
        return q

    def int8_gemm_weight(self):
        """The weight packed for PyTorch's int8 GEMM (made once), or None where that kernel cannot run."""
        if self._packed is None and int8_gemm_available():
            try:
                self._packed = pack_for_int8_gemm(self.weight_int8, self.weight_scale)
            except (RuntimeError, AttributeError):            # quantized tensors removed from this PyTorch
                self._packed = False
        return None if self._packed is False else self._packed

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None                                   # new weights: pack them again for the int8 kernel
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x):                                     # x (..., in) -> (..., out)
        if self.norm is not None:
            x = self.norm(x)
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        cpu_fp32 = x.device.type == 'cpu' and x.dtype == torch.float32
        packed = self.int8_gemm_weight() if self.kernel == 'auto' and cpu_fp32 else None
        if packed is not None:                                # PyTorch's int8 GEMM, a grid per token (see above)
            s = token_absmax(x)
            y = torch.ops.quantized.linear_dynamic(x / s, packed, not self.ternary).mul_(s)
            if self.bias is not None:
                y.add_(self.bias)
        elif self.kernel == 'auto':                           # weight-only int8
            w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        else:                   # in fp32 whatever the autocast: 127² · in_features overflows fp16
            with torch.autocast(x.device.type, enabled=False):
                x32 = x.float()
                s32 = token_absmax(x32)
                q = torch.round(x32 * (127 / s32)).clamp(-127, 127)   # the token's int8 values, held as floats
                y = F.linear(q, self.weight_int8.float()) * (s32 / 127) * self.weight_scale
                y = (y if self.bias is None else y + self.bias).to(x.dtype)
        return y.view(*shape[:-1], len(self.weight_int8))    # (an expert may get no tokens: 0 rows)


class QuantExperts(nn.ModuleList):
    """A MoE layer's stacked experts (E, out, in) as one QuantLinear per expert (the MoE keeps BitLinear's norms,
    shared by the experts, and applies them before the call). MoE.expert_matmul calls it for any expert weight that
    is a module: x (N, in), rows grouped by expert with counts (E,) -> (N, out)."""
    def forward(self, x, counts):
        return torch.cat([self[e](xe) for e, xe in enumerate(x.split(counts.tolist()))])


def token_absmax(x):
    """(N, C) -> (N, 1): each token's max |x| (max and -min: two reductions and no |x| copy, which costs more)."""
    return torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True)).float().clamp(min=1e-8)


def int8_gemm_available():
    return torch.backends.quantized.engine in ('x86', 'fbgemm') and hasattr(torch.ops.quantized, 'linear_dynamic')


def pack_for_int8_gemm(weight_int8, scale):
    """The int8 kernel's packed weight (a per-channel qint8 tensor). PyTorch warns that quantized tensors are
    deprecated; if they go, QuantLinear falls back to weight-only int8 (see int8_gemm_weight)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        q = torch._make_per_channel_quantized_tensor(weight_int8, scale.double().expand(len(weight_int8)).contiguous(),
                                                     torch.zeros(len(weight_int8), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, None)


def quantize(model, scheme):
    """Replace, in place, every attention and feed-forward linear (experts included) with a QuantLinear: 'int8' (any
    float model) or 'ternary' (a bitlinear model: its BitLinear norms go with the weights; see model.as_bitlinear for a
    float one). Returns the model, now for inference only."""
    assert scheme in ('int8', 'ternary'), scheme
    if scheme == 'ternary' and not model.config.bitlinear:
        raise ValueError('ternary quantization needs a bitlinear model: as_bitlinear(model) converts a float one')
    ternary = scheme == 'ternary'
    for block in model.blocks:
        for layer, names in ((block.attn, ('to_q', 'to_k', 'to_v', 'to_out', 'pos_q', 'pos_k')),
                             (block.mlp, ('w1', 'w3', 'w2'))):
            for name in names:
                w = getattr(layer, name, None)
                if isinstance(w, nn.Linear):
                    setattr(layer, name, QuantLinear.from_float(w.weight, w.bias, ternary, getattr(w, 'norm', None)))
                elif isinstance(w, nn.Parameter):             # stacked experts (E, out, in) -> one QuantLinear each
                    delattr(layer, name)
                    setattr(layer, name, QuantExperts(QuantLinear.from_float(we, None, ternary) for we in w))
    model.quantization = scheme
    return model.eval().requires_grad_(False)


def pack_ternary(q):
    """{-1, 0, +1} int8 tensor -> uint8, five weights per byte in base 3 (3⁵ = 243 ≤ 256): 1.6 bits per weight."""
    digits = (q.flatten().to(torch.int16) + 1).to(torch.uint8)               # {0, 1, 2}
    digits = torch.cat([digits, digits.new_zeros(-len(digits) % 5)]).view(-1, 5)
    return (digits * torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_ternary(packed, shape):
    """pack_ternary's inverse: uint8 (ceil(n / 5),) -> int8 tensor of `shape`, exactly."""
    n = math.prod(shape)
    digits = (packed.to(torch.int16)[:, None] // torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)) % 3
    return (digits.flatten()[:n] - 1).to(torch.int8).view(shape)


def packed_state_dict(model):
    """A quantized model's state dict for the checkpoint file: a ternary model's weights packed 5 to a byte."""
    state = model.state_dict()
    if model.quantization == 'ternary':
        for name in [k for k in state if k.endswith('.weight_int8')]:
            state[name.replace('.weight_int8', '.weight_packed')] = pack_ternary(state.pop(name))
    return state


def unpack_state_dict(state, model):
    """packed_state_dict's inverse, given the quantized model whose weight shapes it fills."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    out = {}
    for k, v in state.items():
        if k.endswith('.weight_packed'):
            k = k.replace('.weight_packed', '.weight_int8')
            v = unpack_ternary(v, shapes[k])
        out[k] = v
    return out
