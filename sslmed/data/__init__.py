"""Packed datasets: random access (`sources.open_dataset`) and the resumable loader (`pipeline.build_loader`).

Import the submodules directly: this package stays import-light so random access needs no torch/MONAI.
"""
