"""The UNet's linear layers with their weights prepacked for oneDNN, in eager mode (no compile).

Eager `nn.Linear` on CPU hands oneDNN a plain transposed weight at every call; oneDNN's AMX kernels want
it in their blocked layout. `mkldnn._reorder_linear_weight` does that once, `mkldnn._linear_pointwise`
then runs on it (the same two ops inductor's freezing emits). Measured with bench.gemm_shapes and the
`turbo+prepack` row of bench.speed on a 2-vCPU AMX Xeon. A weight packed for one row count is correct
for every row count (and faster than eager at all those measured: 256..4096 rows), so one pack per layer
serves every size; the hint is the row count of the preset's default size.
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)


class PackedLinear(torch.nn.Module):
    """nn.Linear's interface (in_features, out_features, bias; diffusers reads in_features) over a
    weight in oneDNN's layout. The plain weight is dropped, so memory stays the same."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked for oneDNN"


def can_prepack(device: str, dtype: torch.dtype) -> str | None:
    """None when prepacking applies here, else why not."""
    if device != "cpu":
        return f"on {device} the GPU kernels need no prepacking"
    if dtype != torch.bfloat16:
        return f"only for bfloat16 weights (here {str(dtype).removeprefix('torch.')})"
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no oneDNN bf16 support"
    return None


def prepack_linears(module: torch.nn.Module, rows_hint: int) -> int:
    """Replaces every nn.Linear under module by a PackedLinear; returns how many."""
    replaced = 0
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:
            setattr(module, name, PackedLinear(child, rows_hint))
            replaced += 1
        else:
            replaced += prepack_linears(child, rows_hint)
    return replaced


def release_mapped_weights(module: torch.nn.Module) -> None:
    """Weights loaded from safetensors are views of the memory-mapped file, which stays mapped (and its
    pages resident) while any tensor of it lives. Once the linears hold packed copies, the rest (convs,
    norms: about a tenth) is copied out so the file can go: measured on the full UNet, resident memory
    after packing 9.3 GB without this, 5.5 GB with it (eager after its first step: about 5 GB)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()


def prepack_unet(unet: torch.nn.Module, latent_size: tuple[int, int]) -> str:
    """Prepacks the UNet's linears for the rows of its first transformer stage at latent_size (what
    dominates the step); returns a line for /healthz."""
    started = time.perf_counter()
    rows_hint = max(1, (latent_size[0] // 2) * (latent_size[1] // 2))
    with torch.no_grad():  # not inference_mode: its tensors could not be used outside it later
        count = prepack_linears(unet, rows_hint)
        release_mapped_weights(unet)
    detail = f"{count} linear layers prepacked for oneDNN in {time.perf_counter() - started:.1f} s"
    logger.info("%s", detail)
    return detail
