"""Import TensorFlow-1 checkpoints of RCN and LDR_ALDK into self-describing checkpoints.

Both TF codes name a model's variables ``gaffdfrm/<stem>/<layer>/W`` (and ``/b``), built by
tflearn: ``W`` is ``(kx, ky, kz, in, out)`` for convolutions and ``(kx, ky, kz, out, in)`` for
transposed ones, so both become PyTorch's layout by the same axis permutation ``(4, 3, 0, 1, 2)``.
Array axes and flow channels keep their order (flow channel ``c`` moves axis ``c`` in both codes).
Stems:

* ``affine_stem``: RCN's VTN affine stem (preset ``rcn``);
* ``ldr_util``: LDR_ALDK's light affine stem on brain data (preset ``ldr-brain``), or, on liver
  data, the first of the two LDR nets of the cascade (preset ``ldr-liver``);
* ``deform_stem_<i>``: deformable cascade ``i`` (VTN, VoxelMorph or LDR, told apart by its layers).

The imported model uses TF's "SAME" padding (``padding="tf"`` in the model config), which places
the odd padding voxel of a stride-2 convolution after the data; PyTorch's symmetric padding would
shift every stride-2 sampling grid by a voxel. Optimiser slots (``.../Adam``, ``beta1_power``,
...), step counters and LDR_ALDK's critic (``d_/...``, training only) are skipped and counted.
Any other variable, a missing one or a wrong shape is refused with one line.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from .recursive_cascaded_networks import ModelConfig, build_model
from .tf_bundle import TFCheckpoint, TFCheckpointError

_MODEL_VAR = re.compile(r"^(?:(?P<scope>.+)/)?(?P<stem>affine_stem|ldr_util|deform_stem_(?P<i>\d+))/"
                        r"(?P<layer>[A-Za-z0-9_]+)/(?P<kind>W|b)$")
_OPTIMISER = re.compile(r"(^|/)(beta[12]_power(_\d+)?|global_step|is_training|Global_Step|Training_step)(:0)?$"
                        r"|/(Adam|Adam_\d+|Momentum|RMSProp(_\d+)?)$")
_CRITIC = re.compile(r"(^|/)d_/")

_UNET_LAYERS = {name: f"{name}.0" for name in
                ("conv1", "conv2", "conv3", "conv4", "decode4", "decode3", "decode2", "decode1", "decode1_1",
                 "decode0")}
_UNET_LAYERS.update({"decode0_1": "decode_1.0", "flow": "flow"})
_VTN_ENCODER = ("conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1", "conv5", "conv5_1", "conv6", "conv6_1")
_VTN_LAYERS = {name: f"encoder.{name}.0" for name in _VTN_ENCODER}
for _k, _level in enumerate((6, 5, 4, 3, 2)):
    _VTN_LAYERS[f"pred{_level}"] = f"pred.{_k}"
    _VTN_LAYERS[f"upsamp{_level}to{_level - 1}"] = f"upsamp.{_k}"
    _VTN_LAYERS[f"deconv{_level - 1}"] = f"deconv.{_k}.0"
_VTN_LAYERS["upsamp1to0"] = "final"
_VTN_AFFINE_LAYERS = {name: f"encoder.{name}.0" for name in _VTN_ENCODER}
_VTN_AFFINE_LAYERS.update({"conv7_W": "head.conv_W", "conv7_b": "head.conv_b"})
_LDR_AFFINE_LAYERS = {f"conv{k + 1}": f"convs.{k}.0" for k in range(4)}
_LDR_AFFINE_LAYERS.update({"conv7_W": "head.conv_W", "conv7_b": "head.conv_b"})
# our class -> TF layer name -> our module path inside the stem
LAYER_MAPS = {"VTN": _VTN_LAYERS, "VoxelMorph": _UNET_LAYERS, "LDR": _UNET_LAYERS,
              "VTNAffine": _VTN_AFFINE_LAYERS, "LDRAffine": _LDR_AFFINE_LAYERS}
TF_TO_TORCH = (4, 3, 0, 1, 2)         # W of conv (kx,ky,kz,in,out) and transposed conv (kx,ky,kz,out,in)


def torch_layout(value: np.ndarray) -> np.ndarray:
    """A tflearn ``W`` (5-D) in PyTorch's layout; biases unchanged."""
    return np.ascontiguousarray(value.transpose(TF_TO_TORCH)) if value.ndim == 5 else value


def tf_shape(shape) -> tuple:
    """The TF shape of a PyTorch weight (inverse of :func:`torch_layout`)."""
    shape = tuple(shape)
    if len(shape) != 5:
        return shape
    inverse = np.argsort(TF_TO_TORCH)
    return tuple(shape[i] for i in inverse)


def classify(names) -> tuple:
    """``(model, skipped, unknown)``: model variables ``{name: match}``, skipped ``{reason: count}``,
    and the names that are neither."""
    model, skipped, unknown = {}, {}, []
    for name in sorted(names):
        if _OPTIMISER.search(name):
            skipped["optimiser state and counters"] = skipped.get("optimiser state and counters", 0) + 1
        elif _CRITIC.search(name):
            skipped["critic (training only)"] = skipped.get("critic (training only)", 0) + 1
        else:
            m = _MODEL_VAR.match(name)
            if m:
                model[name] = m
            else:
                unknown.append(name)
    return model, skipped, unknown


def _layers(model_vars: dict, stem: str) -> dict:
    return {m.group("layer"): name for name, m in model_vars.items() if m.group("stem") == stem}


def deformable_kind(ckpt: TFCheckpoint, layers: dict, where: str) -> tuple:
    """``(base network, channels)`` of one deformable stem from its layer names (``{layer: W name}``)
    and widths."""
    if "pred6" in layers and "conv1" in layers:
        return "VTN", int(ckpt.shapes[layers["conv1"]][-1])
    if all(k in layers for k in ("conv1", "conv4", "decode4")):
        first = int(ckpt.shapes[layers["conv1"]][-1])
        fourth = int(ckpt.shapes[layers["conv4"]][-1])
        if fourth == 2 * first:
            return "VoxelMorph", first
        if first == 2 * fourth:
            return "LDR", fourth
        raise TFCheckpointError(f"{ckpt.prefix}: {where} has encoder widths {first}..{fourth}, neither "
                                f"VoxelMorph (c, 2c, 2c, 2c) nor LDR (2c, 2c, 2c, c)")
    raise TFCheckpointError(f"{ckpt.prefix}: {where} is not a VTN, VoxelMorph or LDR network "
                            f"(layers {sorted(layers)[:6]})")


def infer_config(ckpt: TFCheckpoint, model_vars: dict, image_size=None, rep: int = 1) -> ModelConfig:
    """The :class:`ModelConfig` a TF-1 checkpoint's variables describe (``padding="tf"``).

    ``image_size`` defaults to 128^3 (the published data); an affine stem's head must agree with it.
    """
    by_stem = {}
    for name, m in model_vars.items():
        if m.group("kind") == "W":
            by_stem.setdefault(m.group("stem"), {})[m.group("layer")] = name
    deform = sorted((int(s.rsplit("_", 1)[1]) for s in by_stem if s.startswith("deform_stem_")))
    if not deform:
        raise TFCheckpointError(f"{ckpt.prefix}: no deformable stem (deform_stem_<i>/...) in the checkpoint")
    if deform != list(range(len(deform))):
        raise TFCheckpointError(f"{ckpt.prefix}: deformable stems {deform} are not numbered 0..{len(deform) - 1}")
    kinds = {deformable_kind(ckpt, by_stem[f"deform_stem_{i}"], f"deform_stem_{i}") for i in deform}
    if len(kinds) != 1:
        raise TFCheckpointError(f"{ckpt.prefix}: deformable stems mix networks {sorted(kinds)}")
    base, channels = kinds.pop()
    size = tuple(int(s) for s in (image_size or (128, 128, 128)))
    if "affine_stem" in by_stem:
        preset = "rcn"
        head = ckpt.shapes.get(by_stem["affine_stem"].get("conv7_W"))
        expect = tuple(s // 64 for s in size)
    elif "ldr_util" in by_stem and "conv7_W" in by_stem["ldr_util"]:
        preset = "ldr-brain"
        head = ckpt.shapes[by_stem["ldr_util"]["conv7_W"]]
        expect = tuple((s // 16 - 3) // 2 + 1 for s in size)
    elif "ldr_util" in by_stem:
        preset = "ldr-liver"
        head = expect = None
        if base != "LDR" or deformable_kind(ckpt, by_stem["ldr_util"], "ldr_util") != ("LDR", channels):
            raise TFCheckpointError(f"{ckpt.prefix}: ldr_util is an LDR net of another width than the cascades")
        if len(deform) != 1:
            raise TFCheckpointError(f"{ckpt.prefix}: an LDR_ALDK liver model is ldr_util + deform_stem_0 (its code "
                                    f"builds one cascade), but this checkpoint has {len(deform)} deformable stems")
    else:
        preset = "plain"
        head = expect = None
    if preset == "rcn" and head is None:
        raise TFCheckpointError(f"{ckpt.prefix}: affine_stem has no conv7_W head")
    if head is not None and tuple(head[:3]) != expect:
        raise TFCheckpointError(f"{ckpt.prefix}: the affine head's kernel {tuple(head[:3])} does not fit image size "
                                f"{size} (expects {expect}); pass the training image size (--image_size)")
    if head is not None and channels != 16:
        raise TFCheckpointError(f"{ckpt.prefix}: cascades {channels} channels wide after an affine stem: the TF "
                                f"affine stems are always 16 wide and a model config has one width")
    n = len(deform)
    try:
        return ModelConfig(base_network=base, n_cascades=n, preset=preset, image_size=size, channels=channels,
                           rep=rep, padding="tf")
    except ValueError as e:
        raise TFCheckpointError(f"{ckpt.prefix}: {e}") from None


def stem_modules(model) -> list:
    """``[(tf stem name, our module prefix, our class name)]`` of a model built from a TF config."""
    c = model.config
    out = []
    if c.affine:
        out.append(("affine_stem" if c.preset == "rcn" else "ldr_util", "affine", c.affine))
    if c.preset == "ldr-liver":
        out.append(("ldr_util", "cascades.0", c.base_network))
        out.extend((f"deform_stem_{i}", f"cascades.{i + 1}", c.base_network) for i in range(c.n_cascades))
    else:
        out.extend((f"deform_stem_{i}", f"cascades.{i}", c.base_network) for i in range(c.n_cascades))
    return out


def convert(ckpt: TFCheckpoint, model, model_vars: dict) -> dict:
    """The model's state dict filled from the checkpoint; every tensor's shape checked, every model
    variable used, every parameter set."""
    own = model.state_dict()
    state, used = {}, set()
    for stem, prefix, kind in stem_modules(model):
        layers = LAYER_MAPS[kind]
        for name, m in model_vars.items():
            if m.group("stem") != stem:
                continue
            layer = m.group("layer")
            if layer not in layers:
                raise TFCheckpointError(f"{ckpt.prefix}: unknown variable {name} (no layer '{layer}' in a {kind} stem)")
            key = f"{prefix}.{layers[layer]}.{'weight' if m.group('kind') == 'W' else 'bias'}"
            if key not in own:
                raise TFCheckpointError(f"{ckpt.prefix}: unknown variable {name} ({kind} has no {key})")
            want = tf_shape(own[key].shape)
            if tuple(ckpt.shapes[name]) != want:
                raise TFCheckpointError(f"{ckpt.prefix}: variable {name} has shape {tuple(ckpt.shapes[name])}, "
                                        f"a {kind} stem of this config needs {want}")
            state[key] = torch.from_numpy(torch_layout(ckpt.read(name)).astype(np.float32, copy=False))
            used.add(name)
    extra = sorted(set(model_vars) - used)
    if extra:
        raise TFCheckpointError(f"{ckpt.prefix}: unknown variable {extra[0]} ({len(extra)} not used by the model)")
    missing = [k for k in own if k not in state]
    if missing:
        raise TFCheckpointError(f"{ckpt.prefix}: missing variables for {len(missing)} parameters "
                                f"(e.g. {missing[0]})")
    return state


def import_tf_checkpoint(prefix: str, image_size=None, rep: int = 1) -> tuple:
    """``(model, report)`` from a TF-1 checkpoint prefix: the model (``padding="tf"``) with the
    imported weights, and ``{"variables", "imported", "skipped"}`` counts."""
    ckpt = TFCheckpoint(prefix)
    model_vars, skipped, unknown = classify(ckpt.shapes)
    if unknown:
        raise TFCheckpointError(f"{prefix}: unknown variable {unknown[0]} ({len(unknown)} variables are neither "
                                f"RCN/LDR_ALDK model layers nor optimiser state)")
    if not model_vars:
        raise TFCheckpointError(f"{prefix}: no RCN or LDR_ALDK model variables (<stem>/<layer>/W)")
    config = infer_config(ckpt, model_vars, image_size, rep)
    model = build_model(config)
    model.load_state_dict(convert(ckpt, model, model_vars))
    return model, {"variables": len(ckpt.shapes), "imported": len(model_vars), "skipped": skipped}


__all__ = ["import_tf_checkpoint", "infer_config", "convert", "classify", "stem_modules", "torch_layout",
           "tf_shape", "LAYER_MAPS", "TFCheckpointError"]
