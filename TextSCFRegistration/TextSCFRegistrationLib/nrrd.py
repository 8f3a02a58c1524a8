"""Raw (uncompressed) NRRD files, the format the module and its engine process exchange images in.

The voxels of a raw NRRD file are the C-order array ``[k, j, i(, component)]``, which is also the memory layout of a
``vtkImageData``'s scalars. So a volume node is written from its own buffer and an output is read straight into the
buffer of the node that shows it: no intermediate copy, whatever the size. SimpleITK (in the engine process) reads
and writes the same files. Geometry is ITK's: LPS origin, spacing, direction columns (docs/ARCHITECTURE.md).
"""

import os
import re
from dataclasses import dataclass

import numpy as np

_NRRD_TYPES = {
    np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8", np.dtype(np.int16): "short",
    np.dtype(np.uint16): "ushort", np.dtype(np.int32): "int", np.dtype(np.uint32): "uint",
    np.dtype(np.int64): "longlong", np.dtype(np.uint64): "ulonglong", np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
_DTYPES = {name: dtype for dtype, name in _NRRD_TYPES.items()}
_DTYPES.update({"signed char": np.dtype(np.int8), "unsigned char": np.dtype(np.uint8), "int16": np.dtype(np.int16),
                "uint16": np.dtype(np.uint16), "int32": np.dtype(np.int32), "uint32": np.dtype(np.uint32),
                "int64": np.dtype(np.int64), "uint64": np.dtype(np.uint64), "unsigned short": np.dtype(np.uint16),
                "unsigned int": np.dtype(np.uint32)})


@dataclass
class NrrdFile:
    """A raw NRRD file's header: where its voxels start and what they are (geometry in LPS)."""

    path: str
    size: tuple          # (I, J, K)
    components: int
    dtype: np.dtype
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray  # 3x3, columns = axes
    dataOffset: int

    @property
    def shape(self):
        """Shape of the numpy array ``[k, j, i(, component)]`` of the voxels."""
        shape = tuple(reversed(self.size))
        return shape + (self.components,) if self.components > 1 else shape

    def readInto(self, out):
        """Read the voxels into ``out`` (a C-contiguous array of ``shape`` and ``dtype``, e.g. a VTK buffer)."""
        if out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"{self.path}: cannot read {self.shape} {self.dtype} voxels into {out.shape} {out.dtype}")
        view = memoryview(out.reshape(-1)).cast("B")
        with open(self.path, "rb") as f:
            f.seek(self.dataOffset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{self.path} is truncated: {done} of {len(view)} bytes of voxels")
                done += n


def write(path, array, origin, spacing, direction):
    """Write ``array`` (``[k, j, i]`` or ``[k, j, i, c]``, C-contiguous) as a raw NRRD file with LPS geometry."""
    array = np.asarray(array)
    if not array.flags.c_contiguous:
        raise ValueError("the voxels must be C-contiguous (a volume node's buffer is)")
    components = array.shape[3] if array.ndim == 4 else 1
    size = list(reversed(array.shape[:3]))
    axes = np.asarray(direction, float).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    vectors = " ".join("(" + ",".join(repr(float(v)) for v in axes[:, a]) + ")" for a in range(3))
    header = ["NRRD0004", f"type: {_NRRD_TYPES[array.dtype]}", f"dimension: {3 if components == 1 else 4}",
              "space: left-posterior-superior",
              "sizes: " + " ".join(str(s) for s in ([components] if components > 1 else []) + size),
              "space directions: " + ("none " if components > 1 else "") + vectors,
              "kinds: " + ("vector " if components > 1 else "") + "domain domain domain",
              f"endian: {'little' if _littleEndian(array.dtype) else 'big'}", "encoding: raw",
              "space origin: (" + ",".join(repr(float(v)) for v in origin) + ")"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n\n").encode("ascii"))
        f.write(memoryview(array.reshape(-1)).cast("B"))


def read_header(path):
    """The header of a raw NRRD file (as written by ``write`` or by ITK without compression)."""
    fields = {}
    with open(path, "rb") as f:
        magic = f.readline()
        if not magic.startswith(b"NRRD"):
            raise ValueError(f"{path} is not a NRRD file")
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: the NRRD header does not end")
            line = line.decode("ascii", "replace").rstrip("\r\n")
            if not line:
                break
            if line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.lstrip("=").strip()
        offset = f.tell()
    if fields.get("encoding", "raw") != "raw" or "data file" in fields or "datafile" in fields:
        raise ValueError(f"{path}: only raw NRRD with attached data is read here")
    sizes = [int(s) for s in fields["sizes"].split()]
    components = sizes[0] if len(sizes) == 4 else 1
    dtype = _DTYPES[fields["type"].lower()]
    dtype = dtype.newbyteorder("<" if fields.get("endian", "little") == "little" else ">")
    vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])  # "none" (the vector axis) has none
    axes = np.array([[float(x) for x in v.split(",")] for v in vectors]).T
    spacing = np.linalg.norm(axes, axis=0)
    origin = np.array([float(x) for x in fields.get("space origin", "(0,0,0)").strip("()").split(",")])
    nrrdFile = NrrdFile(path=os.fspath(path), size=tuple(sizes[-3:]), components=components,
                        dtype=dtype.newbyteorder("=") if _native(dtype) else dtype, origin=origin, spacing=spacing,
                        direction=axes / spacing, dataOffset=offset)
    expected = int(np.prod(nrrdFile.shape)) * dtype.itemsize
    if os.path.getsize(path) - offset < expected:
        raise ValueError(f"{path} is truncated: {os.path.getsize(path) - offset} of {expected} bytes of voxels")
    return nrrdFile


def _littleEndian(dtype):
    return dtype.byteorder == "<" or (dtype.byteorder in "=|" and np.little_endian)


def _native(dtype):
    return dtype.itemsize == 1 or _littleEndian(dtype) == np.little_endian
