"""Continuous-space uses of a fitted NISF: any plane, smooth surfaces and clinical measures."""

from nisf_monai.geometry.fields import FrameMeasurement, LabelField, NetworkField, measure_frame, structure_meshes
from nisf_monai.geometry.grids import footprint_grid, roi_slices, sub_grid, voxel_sizes, voxel_volume_ml
from nisf_monai.geometry.measures import (
    MEASURES,
    MYOCARDIAL_DENSITY,
    STRUCTURES,
    agreement,
    agreement_table,
    cardiac_measures,
    class_volumes,
    ejection_fraction,
    write_csv,
)
from nisf_monai.geometry.meshes import MESH_FORMATS, Mesh, marching_tetrahedra, mesh_area, mesh_volume, write_mesh
from nisf_monai.geometry.planes import grid_centre, plane_grid, reference_grid, resample_image
from nisf_monai.geometry.runs import MeasureRun, PlaneRun, load_weights

__all__ = [
    "FrameMeasurement",
    "LabelField",
    "NetworkField",
    "measure_frame",
    "structure_meshes",
    "footprint_grid",
    "roi_slices",
    "sub_grid",
    "voxel_sizes",
    "voxel_volume_ml",
    "MEASURES",
    "MYOCARDIAL_DENSITY",
    "STRUCTURES",
    "agreement",
    "agreement_table",
    "cardiac_measures",
    "class_volumes",
    "ejection_fraction",
    "write_csv",
    "MESH_FORMATS",
    "Mesh",
    "marching_tetrahedra",
    "mesh_area",
    "mesh_volume",
    "write_mesh",
    "grid_centre",
    "plane_grid",
    "reference_grid",
    "resample_image",
    "MeasureRun",
    "PlaneRun",
    "load_weights",
]
