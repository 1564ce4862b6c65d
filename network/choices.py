"""The names the command lines offer (networks, presets, losses, recipes), importable without torch.

The scripts build their parsers from this module before importing torch, so ``--help`` is fast.
The registries that map the names to code (``DEFORMABLE_NETWORKS`` in
:mod:`network.base_networks`, ``SIMILARITY`` and ``REGULARISERS`` in :mod:`network.losses`) use
the same names; ``tests/test_architecture.py`` checks that they agree.
"""

DEFORMABLE_NETWORK_NAMES = ("LDR", "Lite", "SpatialGradient", "VTN", "VoxelMorph")
SIMILARITY_NAMES = ("corr", "lncc", "mind", "mse")
REGULARISER_NAMES = ("gradient_l1", "smooth")

# preset -> (affine stem or None, deformable networks per cascade, multiplier rule)
PRESETS = {
    # RCN: VTN affine + n cascades of the base network (VTN or VoxelMorph), multiplier 1/n
    "rcn": {"affine": "VTNAffine", "nets_per_cascade": 1, "allowed": ("VTN", "VoxelMorph", "LDR", "SpatialGradient")},
    # LDR_ALDK brain: LDR affine + n LDR cascades, multiplier 1/n
    "ldr-brain": {"affine": "LDRAffine", "nets_per_cascade": 1, "allowed": ("LDR",)},
    # LDR_ALDK liver: no affine, every cascade is two LDR nets, multiplier 1/(n+1)
    "ldr-liver": {"affine": None, "nets_per_cascade": 2, "allowed": ("LDR",)},
    # no affine stem, n cascades of the base network, multiplier 1/n
    # (the Learn2Reg hippocampus recipe is plain + 1 SpatialGradient cascade)
    "plain": {"affine": None, "nets_per_cascade": 1,
              "allowed": ("VTN", "VoxelMorph", "LDR", "Lite", "SpatialGradient")},
    # ours, CPU-first: n Lite cascades, no affine stem (or LDR's light affine stem first), multiplier 1/n
    "lite": {"affine": None, "nets_per_cascade": 1, "allowed": ("Lite",)},
    "lite-affine": {"affine": "LDRAffine", "nets_per_cascade": 1, "allowed": ("Lite",)},
}
DEFAULT_PRESET = {"LDR": "ldr-brain", "VTN": "rcn", "VoxelMorph": "rcn", "Lite": "lite", "SpatialGradient": "plain"}
# base network -> default ``channels`` (SpatialGradient: the width multiplier, 8 in the recipe)
DEFAULT_CHANNELS = {"SpatialGradient": 8}


# Settings each ALDK recipe fills in where the caller gives none (see the module docstring).
ALDK_VARIANTS = {
    "stable": {"adv_loss": "wgan", "gp_mix": "uniform", "lamb": 10.0, "drift": 1e-3, "conditional": True,
               "critic_steps": 2, "critic_channels": 8, "critic_kernel": 3, "gamma": None},
    "paper": {"adv_loss": "paper", "gp_mix": "beta", "lamb": 0.1, "drift": 0.0, "conditional": False,
              "critic_steps": 1, "critic_channels": 16, "critic_kernel": 5, "gamma": 0.3},
}


__all__ = ["DEFORMABLE_NETWORK_NAMES", "SIMILARITY_NAMES", "REGULARISER_NAMES", "PRESETS", "DEFAULT_PRESET",
           "DEFAULT_CHANNELS", "ALDK_VARIANTS"]
