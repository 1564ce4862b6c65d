"""The engine the scripts run on: training (:mod:`engine.trainer`) and its distillation set-up
(:mod:`engine.distillation`). It wires :mod:`network` (models, losses, checkpoints) to
:mod:`data_util` (datasets); the scripts only parse flags and call it."""
