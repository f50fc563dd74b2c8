from nisf_monai.networks.activations import GaborLayer, ReLULayer, SineLayer
from nisf_monai.networks.latent_table import LatentTable
from nisf_monai.networks.nisf_net import NISFNet, saved_coord_dim

__all__ = ["GaborLayer", "LatentTable", "NISFNet", "ReLULayer", "SineLayer", "saved_coord_dim"]
