"""Engine layer: configuration, the reference trainer, evaluation, inference and figures."""

from ecaseg.engine.config import Config, apply_overrides, available_configs, load_config
from ecaseg.engine.evaluation import evaluate_segmentation, evaluate_wsss
from ecaseg.engine.inference import predict_labels, predict_probs
from ecaseg.engine.pseudo import PseudoLabelPipeline, PseudoLabels
from ecaseg.engine.trainer import ECATrainer, load_checkpoint

__all__ = [
    "Config",
    "ECATrainer",
    "PseudoLabelPipeline",
    "PseudoLabels",
    "apply_overrides",
    "available_configs",
    "evaluate_segmentation",
    "evaluate_wsss",
    "load_checkpoint",
    "load_config",
    "predict_labels",
    "predict_probs",
]
