"""CTFMLib: the Slicer-free core of the CT-FM extension.

Arrays, geometry and files in; arrays and files out. Nothing here imports
``slicer``, ``qt``, ``ctk`` or ``vtk``, so the same code runs inside 3D Slicer,
on a cluster and in CI.
"""

__version__ = "0.1.0"
