"""Datasets (image folders, the embedded digits set) and transforms (PIL in workers, kornia on device).

Needs the `train` extra (pillow, kornia, scikit-learn); import the submodules directly.
"""
