"""The UNet's linear layers and convolutions with their weights prepacked for oneDNN, in eager mode (no compile).

Eager `nn.Linear` on CPU hands oneDNN a plain transposed weight at every call; oneDNN's AMX kernels want
it in their blocked layout. `mkldnn._reorder_linear_weight` does that once, `mkldnn._linear_pointwise`
then runs on it (the same two ops inductor's freezing emits). Measured with bench.gemm_shapes and the
`turbo+prepack` row of bench.speed on a 2-vCPU AMX Xeon. A weight packed for one row count is correct
for every row count (and faster than eager at all those measured: 256..4096 rows), so one pack per layer
serves every size; the hint is the row count of the preset's default size.

Convolutions are packed too (bf16 and float32), but a packed convolution weight is not portable across
sizes: oneDNN picks its blocking for one input shape, and one packed for 16x16 inputs ran 3-6x slower than
eager at 32x32 (it is reordered back at every call). So each convolution is packed for the input it gets
at the preset's default size (found by running the UNet on the meta device: no memory, about 2 s),
keeps its plain weight, and runs eager for any other size (+13% of the UNet's weights).
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


class PackedConv2d(torch.nn.Module):
    """nn.Conv2d on a weight packed by oneDNN for one input shape (channels, height, width; any batch),
    in channels-last as oneDNN's kernels want it; inputs of any other shape run the original layer."""

    def __init__(self, conv: torch.nn.Conv2d, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = conv  # the plain weight stays for other sizes; diffusers reads in_channels etc. here
        self.packed_for = tuple(input_shape[1:])
        self.settings = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight.detach(), *self.settings, list(input_shape))
        self.use_packed = True  # bench.prepack_ab switches it to time both paths on one model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # in_channels, out_channels, kernel_size... as nn.Conv2d has them
            return getattr(super().__getattr__("conv"), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_packed or tuple(x.shape[1:]) != self.packed_for:
            return self.conv(x)
        return torch.ops.mkldnn._convolution_pointwise(x.contiguous(memory_format=torch.channels_last),
                                                       self.packed_weight, self.conv.bias, *self.settings,
                                                       "none", [], "")

    def extra_repr(self) -> str:
        return f"prepacked for oneDNN for inputs of shape (*, {', '.join(map(str, self.packed_for))})"


def can_prepack(device: str, dtype: torch.dtype) -> str | None:
    """None when prepacking applies here, else why not."""
    if device != "cpu":
        return f"on {device} the GPU kernels need no prepacking"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"only for bfloat16 or float32 weights (here {str(dtype).removeprefix('torch.')})"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
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


def convolution_inputs(unet: torch.nn.Module, batch: int, latent_size: tuple[int, int]) -> dict[str, tuple]:
    """The input shape of every nn.Conv2d of one UNet call at latent_size, by module name: a copy of
    the UNet's architecture runs on the meta device (shapes only: no memory, about 2 s for SDXL's)."""
    from inference.compiled import unet_template

    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(_module: torch.nn.Module, inputs: tuple) -> None:  # returns None: the inputs go on as they are
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    with torch.device("meta"):
        shadow = type(unet).from_config(unet.config)
        args, kwargs = unet_template(shadow, batch, latent_size, torch.float32)
        for name, module in shadow.named_modules():
            if type(module) is torch.nn.Conv2d:
                module.register_forward_pre_hook(record(name))
        with torch.no_grad():
            shadow(*args, **kwargs)
    return shapes


def prepack_convolutions(unet: torch.nn.Module, batch: int, latent_size: tuple[int, int]) -> int:
    """Replaces every plain nn.Conv2d the UNet calls at latent_size by a PackedConv2d; returns how many."""
    shapes = convolution_inputs(unet, batch, latent_size)
    modules = dict(unet.named_modules())
    replaced = 0
    for name, shape in shapes.items():
        conv = modules[name]
        if type(conv) is not torch.nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else unet, child, PackedConv2d(conv, shape))
        replaced += 1
    return replaced


def release_mapped_weights(module: torch.nn.Module) -> None:
    """Weights loaded from safetensors are views of the memory-mapped file, which stays mapped (and its
    pages resident) while any tensor of it lives. Once the linears hold packed copies, the rest (convs,
    norms: about a tenth) is copied out so the file can go: measured on the full UNet, resident memory
    after packing 9.3 GB without this, 5.5 GB with it (eager after its first step: about 5 GB).
    Only views of a buffer torch does not own (its storage cannot be resized: the mapped file) are
    copied: weights cast on load (fp16 files in bf16 or float32) are torch's already, and copying 10 GB
    of float32 for nothing took 4 s."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if not tensor.untyped_storage().resizable():
            tensor.data = tensor.data.clone()


def prepack_unet(unet: torch.nn.Module, latent_size: tuple[int, int], batch: int = 1,
                 dtype: torch.dtype = torch.bfloat16) -> str:
    """Prepacks the UNet's convolutions for latent_size and, in bf16, its linears for the rows of its
    first transformer stage there (what dominates the step); returns a line for /healthz. float32
    linears stay plain: MKL's sgemm already runs them at the float32 ceiling (UNet shapes at 134-184
    GFLOP/s against 170-180 on an AVX2 EPYC)."""
    started = time.perf_counter()
    rows_hint = max(1, (latent_size[0] // 2) * (latent_size[1] // 2))
    with torch.no_grad():  # not inference_mode: its tensors could not be used outside it later
        convolutions = prepack_convolutions(unet, batch, latent_size)
        linears = prepack_linears(unet, rows_hint) if dtype == torch.bfloat16 else 0
        release_mapped_weights(unet)
    detail = (f"{linears} linear layers and {convolutions} convolutions (for {latent_size[1] * 8}x"
              f"{latent_size[0] * 8}) prepacked for oneDNN in {time.perf_counter() - started:.1f} s")
    logger.info("%s", detail)
    return detail
