"""lungseg-maskrcnn: paper B as a lungseg plugin (``lungseg maskrcnn ...``).

Paper B segments lung nodules on 2D axial CT slices with Mask R-CNN: LUNA16
scans (MetaImage + ``annotations.csv``), three slices per nodule with circular
masks, 50 x 50 patches for choosing the backbone (Table I), Mask R-CNN with a
ResNet101-FPN backbone, and a 2D U-Net as the baseline it beats.

Modules, one job each:

- :mod:`.luna16`: the LUNA16 layout: MetaImage series and ``annotations.csv``
  in and out, the reference list derived from the LIDC annotations.
- :mod:`.slices`: slices per nodule, circular masks, lung mask, normalisation,
  augmentation, the 50 x 50 patches; an HDF5 file of them.
- :mod:`.nets`: the patch classifiers of Table I, Mask R-CNN, the 2D U-Net.
- :mod:`.train`: the training loops.
- :mod:`.evaluate`: patch accuracy, box and mask AP (COCO), Dice per size.
- :mod:`.predict`: a series in, 3D findings out, in lungseg's report format.
"""

__version__ = "0.1.0"
