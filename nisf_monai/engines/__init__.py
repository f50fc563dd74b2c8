from nisf_monai.engines.evaluator import LatentOptimisationEvaluator
from nisf_monai.engines.sharded_run import run_shard
from nisf_monai.engines.trainer import NISFTrainer

__all__ = ["LatentOptimisationEvaluator", "NISFTrainer", "run_shard"]
