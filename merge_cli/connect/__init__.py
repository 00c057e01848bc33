"""Mode connectivity: paths between two solutions in weight space.

:mod:`~merge_cli.connect.interpolate` (linear paths and barriers), :mod:`~merge_cli.connect.path`
(Bezier curves and polygonal chains), :mod:`~merge_cli.connect.batchnorm` (statistics per
point), :mod:`~merge_cli.connect.curve` (the ``curve`` fuse method that trains a path).
"""
