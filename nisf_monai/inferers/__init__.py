from nisf_monai.inferers.latent_optimisation import LatentOptimisationInferer, target_grid

__all__ = ["LatentOptimisationInferer", "target_grid"]
