from nisf_monai.handlers.training_state import TrainingStateHandler, atomic_save

__all__ = ["TrainingStateHandler", "atomic_save"]
