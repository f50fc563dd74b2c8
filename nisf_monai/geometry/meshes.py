"""Closed surface meshes of a sampled field (marching tetrahedra), in world millimetres, and mesh files.

The field (e.g. one class's probability sampled on a fine grid) is cut at ``level`` on every grid cube
split into the six tetrahedra of the Kuhn (Freudenthal) subdivision. Neighbouring cubes split their shared
faces along the same diagonal, so the pieces join without cracks; crossing points are keyed by the grid
edge they lie on, so triangles share their vertices and the mesh is a closed 2-manifold (the field is
padded with an outside value, which closes surfaces cut by the grid's border). Each triangle is turned so
that its normal points from inside (``field > level``) to outside after the affine, whatever the axes'
handedness, so the divergence theorem gives the enclosed volume.

Meshes are written as legacy VTK polydata, binary STL or OBJ with world RAS coordinates (the NIfTI/MONAI
space) and ``SPACE=RAS`` in the header, which 3D Slicer reads to place them over the images; ParaView
opens the same files.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nisf_monai.io import atomic_open
from nisf_monai.spatial import index_to_world

__all__ = ["Mesh", "marching_tetrahedra", "mesh_area", "mesh_volume", "write_mesh", "MESH_FORMATS"]

MESH_FORMATS = ("vtk", "stl", "obj")

# the 8 corners of a unit cube as (dx, dy, dz), corner c = dx + 2 dy + 4 dz
_CORNERS = np.array([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=np.int64)


def _kuhn_tetrahedra() -> np.ndarray:
    """Six tetrahedra ``(6, 4)`` of cube corners: the monotone paths from corner 0 to corner 7 that add
    one axis at a time (one per axis order)."""
    tetrahedra = []
    for order in itertools.permutations(range(3)):
        corner, path = 0, [0]
        for axis in order:
            corner |= 1 << axis
            path.append(corner)
        tetrahedra.append(path)
    return np.array(tetrahedra, dtype=np.int64)


def _case_table() -> list[list[tuple[tuple[int, int], ...]]]:
    """Triangles of each of the 16 inside/outside patterns of a tetrahedron, as 3 edges ``(inside vertex,
    outside vertex)`` each: one triangle around a lone inside (or outside) vertex, two for a 2-2 split
    (a quad across the four crossed edges, in cyclic order)."""
    table: list[list[tuple[tuple[int, int], ...]]] = []
    for code in range(16):
        inside = [i for i in range(4) if code >> i & 1]
        outside = [i for i in range(4) if not code >> i & 1]
        if len(inside) in (0, 4):
            table.append([])
        elif len(inside) == 1:
            table.append([tuple((inside[0], o) for o in outside)])
        elif len(inside) == 3:
            table.append([tuple((i, outside[0]) for i in inside)])
        else:
            (a, b), (c, d) = inside, outside
            table.append([((a, c), (a, d), (b, d)), ((a, c), (b, d), (b, c))])
    return table


_TETRAHEDRA = _kuhn_tetrahedra()
_CASES = _case_table()


@dataclass
class Mesh:
    """A triangle mesh: ``vertices`` ``(V, 3)`` float64 world mm, ``faces`` ``(F, 3)`` int64, each
    oriented with its normal pointing outwards (right-hand rule)."""

    vertices: np.ndarray
    faces: np.ndarray

    @property
    def area(self) -> float:
        """Surface area in mm^2."""
        return mesh_area(self.vertices, self.faces)

    @property
    def volume(self) -> float:
        """Enclosed volume in mm^3 (the mesh must be closed)."""
        return mesh_volume(self.vertices, self.faces)

    def __len__(self) -> int:
        return len(self.faces)


def marching_tetrahedra(field: Any, affine: Any | None = None, level: float = 0.5) -> Mesh:
    """The closed surface ``field == level`` of a 3D array, in the world space of ``affine``.

    Args:
        field: values on a grid ``(X, Y, Z)`` (e.g. a class probability); inside is ``field > level``.
        affine: 4 x 4 voxel-to-world matrix of the grid (identity: voxel units).
        level: the iso-value (0.5 for a probability).

    Returns:
        a :class:`Mesh` (empty when nothing is inside, or everything is inside a 1-voxel grid).
    """
    values = np.asarray(field, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"expected a 3D field (X, Y, Z), got shape {values.shape}.")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a 4 x 4 affine, got shape {affine.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError("the field holds NaN or infinite values.")
    outside = min(float(values.min()), float(level)) - 1.0
    padded = np.pad(values, 1, mode="constant", constant_values=outside)  # closes surfaces at the border
    inside = padded > level
    shape = np.array(padded.shape, dtype=np.int64)
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)

    # cubes whose 8 corners are not all on one side
    cells = tuple(int(s) - 1 for s in shape)
    count = np.zeros(cells, dtype=np.uint8)
    for dx, dy, dz in _CORNERS:
        count += inside[dx : dx + cells[0], dy : dy + cells[1], dz : dz + cells[2]]
    cubes = np.argwhere((count > 0) & (count < 8))
    if len(cubes) == 0:
        return Mesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))

    # the six tetrahedra of every such cube: flat indices of their 4 corners (T, 4)
    corner_offsets = _CORNERS @ strides  # (8,)
    base = cubes @ strides  # (K,)
    tetra = base[:, None, None] + corner_offsets[_TETRAHEDRA][None]  # (K, 6, 4)
    tetra = tetra.reshape(-1, 4)
    flat_inside = inside.ravel()
    codes = (flat_inside[tetra] * (1 << np.arange(4))).sum(axis=1)

    edges_in, edges_out = [], []  # (n, 3) flat corner indices of each triangle's three edges
    for code in range(1, 15):
        selected = tetra[codes == code]
        if len(selected) == 0:
            continue
        for triangle in _CASES[code]:
            edges_in.append(np.stack([selected[:, a] for a, _ in triangle], axis=1))
            edges_out.append(np.stack([selected[:, b] for _, b in triangle], axis=1))
    p_in = np.concatenate(edges_in)
    p_out = np.concatenate(edges_out)

    # one vertex per crossed grid edge, shared by all triangles around it
    keys = np.minimum(p_in, p_out) * int(shape.prod()) + np.maximum(p_in, p_out)
    unique, first, faces = np.unique(keys.ravel(), return_index=True, return_inverse=True)
    faces = faces.reshape(-1, 3).astype(np.int64)
    a, b = p_in.ravel()[first], p_out.ravel()[first]
    flat_values = padded.ravel()
    va, vb = flat_values[a], flat_values[b]
    t = (level - va) / (vb - va)  # va > level >= vb, so 0 < t <= 1
    ia = np.stack(np.unravel_index(a, padded.shape), axis=1).astype(np.float64)
    ib = np.stack(np.unravel_index(b, padded.shape), axis=1).astype(np.float64)
    vertices = index_to_world(affine, ia + t[:, None] * (ib - ia) - 1.0)  # -1: undo the padding
    del unique

    # outward normals: each triangle separates its tetrahedron's inside corners from the outside ones, for
    # any crossing positions in (0, 1]; decide with the edge midpoints (never degenerate, unlike vertices that
    # land on a grid point where the field equals the level), in index space, then apply the affine's handedness
    def corner(flat: np.ndarray) -> np.ndarray:
        return np.stack(np.unravel_index(flat, padded.shape), axis=1).astype(np.float64)

    m0, m1, m2 = ((corner(p_in[:, k]) + corner(p_out[:, k])) / 2 for k in range(3))
    side = np.einsum("ij,ij->i", np.cross(m1 - m0, m2 - m0), corner(p_in[:, 0]) - m0)
    inward = side * np.sign(np.linalg.det(affine[:3, :3])) > 0
    faces[inward] = faces[inward][:, [0, 2, 1]]
    return Mesh(vertices, faces)


def mesh_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Sum of the triangle areas (mm^2 for vertices in mm)."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    return float(0.5 * np.linalg.norm(np.cross(v1 - v0, v2 - v0), axis=1).sum())


def mesh_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Volume enclosed by a closed, outward-oriented mesh (divergence theorem; mm^3 for mm)."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->i", v0, np.cross(v1, v2)).sum() / 6.0)


def _face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    normal = np.cross(v1 - v0, v2 - v0)
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    return np.divide(normal, length, out=np.zeros_like(normal), where=length > 0)


def write_mesh(path: str | os.PathLike, mesh: Mesh, name: str = "nisf_monai surface") -> str:
    """Write a mesh by extension: ``.vtk`` (legacy ASCII polydata), ``.stl`` (binary) or ``.obj``, with
    world RAS coordinates in mm and ``SPACE=RAS`` in the header (read by 3D Slicer). Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in MESH_FORMATS:
        raise ValueError(f"mesh format must be one of {MESH_FORMATS} (by file extension), got {path.name!r}.")
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    title = f"{name} SPACE=RAS".replace("\n", " ")
    if suffix == "vtk":
        with atomic_open(path, "w") as f:
            f.write(f"# vtk DataFile Version 4.2\n{title[:255]}\nASCII\nDATASET POLYDATA\n")
            f.write(f"POINTS {len(vertices)} double\n")
            np.savetxt(f, vertices, fmt="%.5f")
            f.write(f"POLYGONS {len(faces)} {4 * len(faces)}\n")
            np.savetxt(f, np.column_stack([np.full(len(faces), 3), faces]), fmt="%d")
    elif suffix == "stl":
        record = np.dtype([("normal", "<f4", 3), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
        data = np.zeros(len(faces), dtype=record)
        data["normal"] = _face_normals(vertices, faces)
        data["vertices"] = vertices[faces]
        header = title.encode("ascii", "replace")[:80].ljust(80, b" ")
        if header.lower().startswith(b"solid"):
            header = b"x" + header[1:]  # a binary STL must not start with "solid"
        with atomic_open(path, "wb") as f:
            f.write(header)
            f.write(np.uint32(len(faces)).tobytes())
            f.write(data.tobytes())
    else:
        with atomic_open(path, "w") as f:
            f.write(f"# {title}\n")
            np.savetxt(f, vertices, fmt="v %.5f %.5f %.5f")
            np.savetxt(f, faces + 1, fmt="f %d %d %d")
    return str(path)
