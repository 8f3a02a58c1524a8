"""Helpers of the TextSCF Registration module, kept beside the module file as SlicerElastix keeps ``ElastixLib/``.

- ``nrrd``: raw NRRD files read straight into (and written straight from) the buffers of MRML nodes;
- ``conversions``: MRML nodes <-> images (volume nodes, grid transforms, segmentations, label maps);
- ``scenechanges``: all-or-nothing changes of a scene (what Cancel and failures roll back);
- ``presentation``: the statistics table and the Jacobian colour table;
- ``engineprocess``: the engine (``python -m textscf.worker``) in its own process: job folder, progress, cancel.

Conventions (docs/ARCHITECTURE.md): the engine works in ITK LPS millimetres, Slicer in RAS
(``(x, y, z)_RAS = (-x, -y, z)_LPS``); numpy views of VTK images are ``[k, j, i]``.
"""
