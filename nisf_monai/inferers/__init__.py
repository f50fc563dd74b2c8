from nisf_monai.inferers.heart_locator import HeartLocator
from nisf_monai.inferers.latent_optimisation import LatentOptimisationInferer, target_grid
from nisf_monai.inferers.output_region import HeartRegion
from nisf_monai.inferers.probability_volume import ProbabilityVolume
from nisf_monai.inferers.slice_localiser import SliceLocaliser, load_localiser, localiser_network, localiser_stride

__all__ = [
    "HeartLocator",
    "HeartRegion",
    "LatentOptimisationInferer",
    "ProbabilityVolume",
    "SliceLocaliser",
    "load_localiser",
    "localiser_network",
    "localiser_stride",
    "target_grid",
]
