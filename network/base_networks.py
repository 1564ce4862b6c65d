"""Base registration networks: deformable cascades (LDR, VTN, VoxelMorph) and affine stems.

Every network takes ``fixed`` and ``moving`` images ``(B, 1, X, Y, Z)`` (intensities in [0, 1]) and
returns a dict with ``"flow"``: a displacement ``(B, 3, X, Y, Z)`` in voxels (docs/conventions.md).
Affine stems also return ``"W"`` ``(B, 3, 3)``, ``"b"`` ``(B, 3)`` and ``"A" = I + W``.
Parameter counts at ``channels=16`` match the TensorFlow references (docs/conventions.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ToolkitError
from .layers import Conv3d, float32_math, integrate_spatial_gradient, same_conv3d, upsample_flow


class SizeError(ToolkitError, ValueError):
    """An input size a network cannot process (not divisible by its stride, or too small)."""


def check_size(shape, stride: int, name: str, minimum: int | None = None) -> None:
    """Raise :class:`SizeError` unless every spatial size is divisible by ``stride`` (and >= ``minimum``)."""
    shape = tuple(int(s) for s in shape)
    bad = [s for s in shape if s % stride != 0]
    if bad:
        raise SizeError(f"{name} needs every image size divisible by {stride}; got {shape}")
    if minimum is not None and min(shape) < minimum:
        raise SizeError(f"{name} needs every image size >= {minimum}; got {shape}")


def conv_lrelu(cin: int, cout: int, stride: int = 1, kernel: int = 3, padding: str = "symmetric") -> nn.Sequential:
    """3D convolution (same size: ``padding`` "symmetric" or TF's "tf", see
    :func:`~network.layers.same_conv3d`) followed by LeakyReLU(0.1), as in the TF references."""
    return nn.Sequential(same_conv3d(cin, cout, kernel, stride, padding=padding),
                         nn.LeakyReLU(0.1, inplace=True))


def flow_conv(cin: int) -> Conv3d:
    """Final 3x3x3 convolution to a 3-channel flow, initialised N(0, 1e-5) so training starts near identity."""
    conv = Conv3d(cin, 3, 3, padding=1)
    nn.init.normal_(conv.weight, 0.0, 1e-5)
    nn.init.zeros_(conv.bias)
    return conv


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling (Keras ``UpSampling3D``)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


class UNetFlow(nn.Module):
    """Shared structure of ``VoxelMorph`` and ``LDR``: 4 stride-2 encoders, nearest-upsampling decoder.

    ``encoders``: 4 widths; ``decoders``: 7 widths ``[d4, d3, d2, d1, d1_1, d0, d_1]`` (RCN's layout).
    ``padding="tf"`` pads the stride-2 convolutions the TensorFlow way (imported TF-1 weights).
    """

    stride = 16

    def __init__(self, encoders, decoders, flow_multiplier: float = 1.0, padding: str = "symmetric"):
        super().__init__()
        e, d = list(encoders), list(decoders)
        if len(e) != 4 or len(d) != 7:
            raise ValueError("UNetFlow needs 4 encoder widths and 7 decoder widths")
        self.flow_multiplier = flow_multiplier
        self.conv1 = conv_lrelu(2, e[0], 2, padding=padding)
        self.conv2 = conv_lrelu(e[0], e[1], 2, padding=padding)
        self.conv3 = conv_lrelu(e[1], e[2], 2, padding=padding)
        self.conv4 = conv_lrelu(e[2], e[3], 2, padding=padding)
        self.decode4 = conv_lrelu(e[3], d[0])
        self.decode3 = conv_lrelu(d[0] + e[2], d[1])
        self.decode2 = conv_lrelu(d[1] + e[1], d[2])
        self.decode1 = conv_lrelu(d[2] + e[0], d[3])
        self.decode1_1 = conv_lrelu(d[3], d[4])
        self.decode0 = conv_lrelu(d[4] + 2, d[5])
        self.decode_1 = conv_lrelu(d[5], d[6])
        self.flow = flow_conv(d[6])

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        check_size(fixed.shape[2:], self.stride, type(self).__name__)
        x = torch.cat([fixed, moving], dim=1)
        c1 = self.conv1(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        net = self.decode4(c4)
        net = self.decode3(torch.cat([upsample2(net), c3], 1))
        net = self.decode2(torch.cat([upsample2(net), c2], 1))
        net = self.decode1(torch.cat([upsample2(net), c1], 1))
        net = self.decode1_1(net)
        net = self.decode0(torch.cat([upsample2(net), x], 1))
        net = self.decode_1(net)
        return {"flow": self.flow(net) * self.flow_multiplier}


class VoxelMorph(UNetFlow):
    """RCN's VoxelMorph cascade: encoder c,2c,2c,2c; decoder 2c x5, c, c (300,547 params at c=16)."""

    def __init__(self, channels: int = 16, flow_multiplier: float = 1.0, padding: str = "symmetric"):
        c = channels
        super().__init__([c, 2 * c, 2 * c, 2 * c], [2 * c] * 5 + [c, c], flow_multiplier, padding)


class LDR(UNetFlow):
    """LDR student cascade (LDR_ALDK code): encoder 2c,2c,2c,c; decoder 2c x4, c x3 (280,659 params at c=16)."""

    def __init__(self, channels: int = 16, flow_multiplier: float = 1.0, padding: str = "symmetric"):
        c = channels
        super().__init__([2 * c, 2 * c, 2 * c, c], [2 * c] * 4 + [c, c, c], flow_multiplier, padding)


class Lite(nn.Module):
    """CPU-first student (ours): downsample at once, stay narrow, predict the flow at 1/``2**flow_level``
    resolution and upsample it trilinearly (:func:`~network.layers.upsample_flow`).

    Widths at ``channels=c`` (c=16: 157,435 params; 3.5 GFLOP at 128^3 vs 110 for one LDR cascade):

    ======  ==========================  =========  =====================
    layer   op                          size       channels in -> out
    ======  ==========================  =========  =====================
    enc1    3^3 conv, stride 2, LReLU   1/2        2 -> c/2
    enc2    3^3 conv, stride 2, LReLU   1/4        c/2 -> c
    enc3    3^3 conv, stride 2, LReLU   1/8        c -> 2c
    enc4    3^3 conv, stride 2, LReLU   1/16       2c -> 2c
    dec4    3^3 conv, LReLU             1/16       2c -> 2c
    dec3    up x2, concat enc3, conv    1/8        4c -> 2c
    dec2    up x2, concat enc2, conv    1/4        3c -> c
    dec2_1  3^3 conv, LReLU             1/4        c -> c
    flow    3^3 conv (N(0, 1e-5) init)  1/4        c -> 3
    (up)    trilinear x4, x4 voxels     1          3
    ======  ==========================  =========  =====================

    With ``flow_level=1`` two more decoder convs (up x2, concat enc1: 1.5c -> c/2, then c/2 -> c/2)
    predict the flow at 1/2 resolution.
    """

    stride = 16

    def __init__(self, channels: int = 16, flow_multiplier: float = 1.0, flow_level: int = 2):
        super().__init__()
        if flow_level not in (1, 2):
            raise ValueError("Lite flow_level must be 1 (half resolution) or 2 (quarter resolution)")
        c, h = channels, max(channels // 2, 1)
        self.flow_multiplier = flow_multiplier
        self.flow_level = flow_level
        self.enc1 = conv_lrelu(2, h, 2)
        self.enc2 = conv_lrelu(h, c, 2)
        self.enc3 = conv_lrelu(c, 2 * c, 2)
        self.enc4 = conv_lrelu(2 * c, 2 * c, 2)
        self.dec4 = conv_lrelu(2 * c, 2 * c)
        self.dec3 = conv_lrelu(4 * c, 2 * c)
        self.dec2 = conv_lrelu(3 * c, c)
        self.dec2_1 = conv_lrelu(c, c)
        if flow_level == 1:
            self.dec1 = conv_lrelu(c + h, h)
            self.dec1_1 = conv_lrelu(h, h)
        self.flow = flow_conv(h if flow_level == 1 else c)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        check_size(fixed.shape[2:], self.stride, "Lite")
        e1 = self.enc1(torch.cat([fixed, moving], dim=1))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        net = self.dec4(self.enc4(e3))
        net = self.dec3(torch.cat([upsample2(net), e3], 1))
        net = self.dec2_1(self.dec2(torch.cat([upsample2(net), e2], 1)))
        if self.flow_level == 1:
            net = self.dec1_1(self.dec1(torch.cat([upsample2(net), e1], 1)))
        flow = self.flow(net) * self.flow_multiplier
        return {"flow": upsample_flow(flow, 2 ** self.flow_level)}


def vtn_encoder(c: int, padding: str = "symmetric") -> nn.ModuleDict:
    """VTN encoder conv1..conv6_1, widths c..32c, total stride 64."""
    widths = [("conv1", 2, c, 2), ("conv2", c, 2 * c, 2),
              ("conv3", 2 * c, 4 * c, 2), ("conv3_1", 4 * c, 4 * c, 1),
              ("conv4", 4 * c, 8 * c, 2), ("conv4_1", 8 * c, 8 * c, 1),
              ("conv5", 8 * c, 16 * c, 2), ("conv5_1", 16 * c, 16 * c, 1),
              ("conv6", 16 * c, 32 * c, 2), ("conv6_1", 32 * c, 32 * c, 1)]
    return nn.ModuleDict({name: conv_lrelu(cin, cout, s, padding=padding) for name, cin, cout, s in widths})


def up4(cin: int, cout: int) -> nn.ConvTranspose3d:
    """4x4x4 stride-2 transposed convolution without bias (doubles the size)."""
    return nn.ConvTranspose3d(cin, cout, 4, 2, padding=1, bias=False)


class VTN(nn.Module):
    """RCN's VTN deformable cascade (28,252,203 params at c=16); output x20 x flow multiplier."""

    stride = 64

    def __init__(self, channels: int = 16, flow_multiplier: float = 1.0, padding: str = "symmetric"):
        super().__init__()
        c = channels
        self.flow_multiplier = flow_multiplier
        self.encoder = vtn_encoder(c, padding)
        # decoder level k: pred_k (3^3 conv -> 3), upsamp (4^3 transposed 3 -> 3), deconv (4^3 transposed + LReLU)
        skips = [16 * c, 8 * c, 4 * c, 2 * c, c]        # conv5_1, conv4_1, conv3_1, conv2, conv1
        cin = 32 * c
        self.pred = nn.ModuleList()
        self.upsamp = nn.ModuleList()
        self.deconv = nn.ModuleList()
        for skip in skips:
            self.pred.append(Conv3d(cin, 3, 3, padding=1))
            self.upsamp.append(up4(3, 3))
            self.deconv.append(nn.Sequential(up4(cin, skip), nn.LeakyReLU(0.1, inplace=True)))
            cin = 2 * skip + 3
        self.final = up4(cin, 3)
        nn.init.normal_(self.final.weight, 0.0, 1e-5)    # start near the identity, like the flow convs

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        check_size(fixed.shape[2:], self.stride, "VTN")
        x = torch.cat([fixed, moving], dim=1)
        feats = {}
        for name, layer in self.encoder.items():
            x = layer(x)
            feats[name] = x
        skips = [feats["conv5_1"], feats["conv4_1"], feats["conv3_1"], feats["conv2"], feats["conv1"]]
        net = feats["conv6_1"]
        for pred, upsamp, deconv, skip in zip(self.pred, self.upsamp, self.deconv, skips):
            net = torch.cat([skip, deconv(net), upsamp(pred(net))], dim=1)
        return {"flow": self.final(net) * (20.0 * self.flow_multiplier)}


@float32_math
def affine_flow(W: torch.Tensor, b: torch.Tensor, shape) -> torch.Tensor:
    """Displacement ``u(x) = W x + b`` on voxel coordinates centred on the volume: ``(B, 3, X, Y, Z)``."""
    axes = [torch.arange(s, device=W.device, dtype=W.dtype) - (s - 1) / 2.0 for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)          # (3, X, Y, Z)
    return torch.einsum("bij,j...->bi...", W, grid) + b.view(-1, 3, 1, 1, 1)


class _AffineHead(nn.Module):
    """Two bias-free "valid" convolutions spanning the remaining grid: W (9 values) and b (3 values)."""

    def __init__(self, cin: int, kernel, flow_multiplier: float):
        super().__init__()
        self.flow_multiplier = flow_multiplier
        self.conv_W = Conv3d(cin, 9, tuple(kernel), bias=False)
        self.conv_b = Conv3d(cin, 3, tuple(kernel), bias=False)
        for conv in (self.conv_W, self.conv_b):
            nn.init.normal_(conv.weight, 0.0, 1e-5)

    def forward(self, features: torch.Tensor, shape) -> dict:
        W = self.conv_W(features).view(-1, 3, 3) * self.flow_multiplier
        b = self.conv_b(features).view(-1, 3) * self.flow_multiplier
        eye = torch.eye(3, device=W.device, dtype=W.dtype)
        return {"flow": affine_flow(W, b, shape), "W": W, "b": b, "A": W + eye}


class VTNAffine(nn.Module):
    """RCN's VTN affine stem: VTN encoder to 1/64, then W and b (~14.17M params at 128^3, c=16).

    ``image_size`` fixes the valid-convolution kernel (size / 64), so it is part of the model config.
    """

    stride = 64

    def __init__(self, image_size, channels: int = 16, flow_multiplier: float = 1.0, padding: str = "symmetric"):
        super().__init__()
        self.image_size = tuple(int(s) for s in image_size)
        check_size(self.image_size, self.stride, "VTNAffine", minimum=self.stride)
        self.encoder = vtn_encoder(channels, padding)
        self.head = _AffineHead(32 * channels, [s // 64 for s in self.image_size], flow_multiplier)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        shape = tuple(fixed.shape[2:])
        if shape != self.image_size:
            raise SizeError(f"VTNAffine was built for size {self.image_size}; got {shape}")
        x = torch.cat([fixed, moving], dim=1)
        for layer in self.encoder.values():
            x = layer(x)
        return self.head(x, shape)


class LDRAffine(nn.Module):
    """LDR_ALDK's light affine stem: convs c,2c,4c,8c stride 2, avg-pool 3 stride 2, W and b.

    332,880 params at 128^3, c=16. Needs sizes divisible by 16 and >= 48 (pooling needs 3 cells).
    """

    stride = 16

    def __init__(self, image_size, channels: int = 16, flow_multiplier: float = 1.0, padding: str = "symmetric"):
        super().__init__()
        self.image_size = tuple(int(s) for s in image_size)
        check_size(self.image_size, self.stride, "LDRAffine", minimum=48)
        c = channels
        self.convs = nn.Sequential(*(conv_lrelu(cin, cout, 2, padding=padding)
                                     for cin, cout in ((2, c), (c, 2 * c), (2 * c, 4 * c), (4 * c, 8 * c))))
        pooled = [(s // 16 - 3) // 2 + 1 for s in self.image_size]
        self.head = _AffineHead(8 * c, pooled, flow_multiplier)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        shape = tuple(fixed.shape[2:])
        if shape != self.image_size:
            raise SizeError(f"LDRAffine was built for size {self.image_size}; got {shape}")
        x = self.convs(torch.cat([fixed, moving], dim=1))
        x = F.avg_pool3d(x, 3, stride=2)
        return self.head(x, shape)


# ----------------------------------------------------------------------------------------------
# Siamese spatial-gradient network (Learn2Reg 2020 hippocampus recipe, Estienne et al.)
# ----------------------------------------------------------------------------------------------

def norm_lrelu(conv: nn.Module, cout: int) -> nn.Sequential:
    """``conv`` -> InstanceNorm3d -> LeakyReLU(0.01) (the recipe's block)."""
    return nn.Sequential(conv, nn.InstanceNorm3d(cout), nn.LeakyReLU(0.01, inplace=True))


class SpatialGradientNet(nn.Module):
    """Siamese encoder, difference skips, positive spatial-gradient decoder (``FrontiersNet`` of
    Estienne et al., Learn2Reg 2020 task 4, run with ``--classic-vnet --instance-norm --zeros-init``).

    ``channels`` is the width multiplier ``m``: levels have ``[4, 8, 16, 32, 64] * m`` channels
    (the recipe's ``m = 8``: 32..512, 30.75M parameters). Layout (``L_k`` = level ``k``, size ``1/2^k``):

    * encoder, shared by both images: input block (3^3 conv 1 -> 4m, 3^3 conv, residual add), then
      4 blocks of [2^3 stride-2 conv + IN + LReLU, 3^3 conv + IN + LReLU];
    * skips: ``enc(moving)_k - enc(fixed)_k`` at every level (the bottleneck too);
    * decoder: 4 blocks of [2^3 stride-2 transposed conv + IN + LReLU, concat skip, 3^3 conv + IN +
      LReLU, residual add of the upsampled tensor]; last 3^3 conv to 3 channels, zero-initialised,
      sigmoid: ``g = 0.5`` at start, i.e. the identity;
    * ``g`` is integrated per axis (:func:`integrate_spatial_gradient`) into the displacement.
    * ``deep_supervision``: a 3^3 conv head on each decoder block's input (``L_4`` .. ``L_1``) gives
      a gradient field, nearest-upsampled to full size, sigmoid, integrated; in training mode their
      flows are returned as ``deep_flows`` (coarsest first) for a multi-scale similarity loss.

    ``forward(fixed, moving)`` -> ``{"flow": (B, 3, X, Y, Z) voxels, "gradient": g}`` (+ ``deep_flows``).
    """

    stride = 16
    min_size = 32          # instance norm needs more than one voxel at the 1/16 bottleneck
    levels = 4

    def __init__(self, channels: int = 8, flow_multiplier: float = 1.0, deep_supervision: bool = False):
        super().__init__()
        ch = [w * channels for w in (4, 8, 16, 32, 64)]
        self.flow_multiplier = flow_multiplier
        self.deep_supervision = deep_supervision
        self.input_conv1 = Conv3d(1, ch[0], 3, padding=1)
        self.input_conv2 = Conv3d(ch[0], ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(norm_lrelu(Conv3d(ch[k], ch[k + 1], 2, stride=2), ch[k + 1]),
                          norm_lrelu(Conv3d(ch[k + 1], ch[k + 1], 3, padding=1), ch[k + 1]))
            for k in range(self.levels))
        self.up = nn.ModuleList(
            norm_lrelu(nn.ConvTranspose3d(ch[k + 1], ch[k], 2, stride=2), ch[k])
            for k in reversed(range(self.levels)))
        self.fuse = nn.ModuleList(
            norm_lrelu(Conv3d(2 * ch[k], ch[k], 3, padding=1), ch[k]) for k in reversed(range(self.levels)))
        self.head = Conv3d(ch[0], 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if deep_supervision:
            self.deep_heads = nn.ModuleList(Conv3d(ch[k + 1], 3, 3, padding=1)
                                            for k in reversed(range(self.levels)))

    def encode(self, image: torch.Tensor) -> list:
        """Features of one image at levels 0..4 (full size to 1/16)."""
        x = F.leaky_relu(self.input_conv1(image), 0.01)
        x = x + F.leaky_relu(self.input_conv2(x), 0.01)
        features = [x]
        for block in self.down:
            features.append(block(features[-1]))
        return features

    def decode(self, skips: list) -> tuple:
        """``(gradient, deep_gradients)`` from the merged features (levels 0..4)."""
        x = skips[-1]
        deep = []
        for i, (up, fuse) in enumerate(zip(self.up, self.fuse)):
            if self.deep_supervision and self.training:
                factor = 2 ** (self.levels - i)
                deep.append(torch.sigmoid(F.interpolate(self.deep_heads[i](x), scale_factor=factor, mode="nearest")))
            x = up(x)
            x = x + fuse(torch.cat([x, skips[self.levels - 1 - i]], dim=1))
        return torch.sigmoid(self.head(x)), deep

    def to_flow(self, gradient: torch.Tensor) -> torch.Tensor:
        return integrate_spatial_gradient(gradient) * self.flow_multiplier

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict:
        check_size(fixed.shape[2:], self.stride, "SpatialGradient", minimum=self.min_size)
        merged = [m - f for m, f in zip(self.encode(moving), self.encode(fixed))]
        gradient, deep = self.decode(merged)
        out = {"flow": self.to_flow(gradient), "gradient": gradient}
        if deep:
            out["deep_flows"] = [self.to_flow(g) for g in deep]
        return out


DEFORMABLE_NETWORKS = {"LDR": LDR, "VTN": VTN, "VoxelMorph": VoxelMorph, "Lite": Lite,
                       "SpatialGradient": SpatialGradientNet}
AFFINE_NETWORKS = {"VTNAffine": VTNAffine, "LDRAffine": LDRAffine}
# networks that take ``padding="tf"`` (the TF-1 references' layers, for imported weights)
TF_PADDING_NETWORKS = ("LDR", "VTN", "VoxelMorph", "VTNAffine", "LDRAffine")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
