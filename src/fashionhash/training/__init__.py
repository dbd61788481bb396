"""Training: :func:`train` a configured method into a run directory."""
from fashionhash.training.trainer import Callbacks, TrainingDiverged, resume_config, train

__all__ = ["Callbacks", "TrainingDiverged", "resume_config", "train"]
