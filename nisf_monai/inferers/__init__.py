from nisf_monai.inferers.cases import target_grid
from nisf_monai.inferers.fit_terms import FitTerm, HeartWeighting, IntensityTerm, LocaliserGuide
from nisf_monai.inferers.heart_locator import HeartLocator
from nisf_monai.inferers.latent_optimisation import LatentOptimisationInferer
from nisf_monai.inferers.output_blend import LocaliserBlend
from nisf_monai.inferers.output_region import HeartRegion
from nisf_monai.inferers.probability_volume import ProbabilityVolume
from nisf_monai.inferers.slice_localiser import SliceLocaliser, load_localiser, localiser_network, localiser_stride

__all__ = [
    "FitTerm",
    "HeartLocator",
    "HeartRegion",
    "HeartWeighting",
    "IntensityTerm",
    "LatentOptimisationInferer",
    "LocaliserBlend",
    "LocaliserGuide",
    "ProbabilityVolume",
    "SliceLocaliser",
    "load_localiser",
    "localiser_network",
    "localiser_stride",
    "target_grid",
]
