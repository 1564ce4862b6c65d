"""Networks, warp, losses, metrics and checkpoints for recursive cascaded registration."""
from .base_networks import (AFFINE_NETWORKS, DEFORMABLE_NETWORKS, LDR, VTN, LDRAffine, Lite, SizeError, VoxelMorph,
                            VTNAffine, SpatialGradientNet, count_parameters)
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .layers import (SpatialTransformer, compose_flows, identity_grid, integrate_spatial_gradient,
                     sample_flow_at_points, spatial_gradient_of, warp)
from .losses import RegistrationLoss
from .recursive_cascaded_networks import DEFAULT_CHANNELS, DEFAULT_PRESET, PRESETS, ModelConfig, RecursiveCascadeNetwork, build_model

__all__ = ["AFFINE_NETWORKS", "DEFORMABLE_NETWORKS", "LDR", "Lite", "VTN", "VoxelMorph", "VTNAffine", "LDRAffine", "SpatialGradientNet", "SizeError", "count_parameters",
           "CheckpointError", "load_checkpoint", "save_checkpoint", "SpatialTransformer", "compose_flows",
           "identity_grid", "integrate_spatial_gradient", "spatial_gradient_of", "sample_flow_at_points", "warp", "RegistrationLoss", "DEFAULT_CHANNELS", "DEFAULT_PRESET", "PRESETS",
           "ModelConfig", "RecursiveCascadeNetwork", "build_model"]
