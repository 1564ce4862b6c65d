"""Networks, warp, losses, metrics and checkpoints for recursive cascaded registration.

Names load lazily (PEP 562), so ``import network.cli`` or ``network.choices`` does not import torch.
"""
import importlib

_WHERE = {
    "base_networks": ["AFFINE_NETWORKS", "DEFORMABLE_NETWORKS", "LDR", "VTN", "LDRAffine", "Lite", "SizeError",
                      "VoxelMorph", "VTNAffine", "SpatialGradientNet", "count_parameters"],
    "checkpoint": ["CheckpointError", "load_checkpoint", "save_checkpoint"],
    "layers": ["SpatialTransformer", "compose_flows", "identity_grid", "integrate_spatial_gradient",
               "sample_flow_at_points", "spatial_gradient_of", "warp"],
    "losses": ["RegistrationLoss"],
    "recursive_cascaded_networks": ["ModelConfig", "RecursiveCascadeNetwork", "build_model"],
    "choices": ["DEFAULT_CHANNELS", "DEFAULT_PRESET", "PRESETS"],
    "errors": ["ToolkitError"],
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"network.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'network' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_MODULE_OF))


__all__ = sorted(_MODULE_OF)
