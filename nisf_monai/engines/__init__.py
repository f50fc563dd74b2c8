from nisf_monai.engines.evaluator import LatentOptimisationEvaluator
from nisf_monai.engines.trainer import NISFTrainer

__all__ = ["LatentOptimisationEvaluator", "NISFTrainer"]
