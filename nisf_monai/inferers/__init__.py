from nisf_monai.inferers.heart_locator import HeartLocator
from nisf_monai.inferers.latent_optimisation import LatentOptimisationInferer, target_grid

__all__ = ["HeartLocator", "LatentOptimisationInferer", "target_grid"]
