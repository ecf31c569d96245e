"""PyTorch datasets over the HDF5 cache: sub-cases for segmentation, ROIs for classification.

Both read lazily through :class:`lungseg.cache.Cache` (one HDF5 handle per
DataLoader worker) and take a list of scans, usually those of one split of a
patient-level split file (:mod:`lungseg.splits`).

Augmentation (random flips along each axis and in-plane 90-degree rotations,
the same for image and mask) draws from a generator seeded by
``(seed, epoch, index)``, and the samplers draw their order from
``(seed, epoch)``. A run therefore sees the same batches whatever the number
of workers and whether or not it was interrupted and resumed.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .cache import Cache

def augment(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flips (z, y, x) and in-plane quarter turn for every (z, y, x) array."""
    flips = rng.random(3) < 0.5
    turns = int(rng.integers(4))
    out = []
    for a in arrays:
        for axis in np.flatnonzero(flips):
            a = np.flip(a, axis=int(axis))
        a = np.rot90(a, k=turns, axes=(1, 2))
        out.append(np.ascontiguousarray(a))
    return out


class _CacheDataset(Dataset):
    """Items are addressed as (index, epoch) so augmentation is reproducible."""

    def __init__(self, cache: Cache | str | os.PathLike, series_uids: Sequence[str], *,
                 augment: bool = False, seed: int = 0):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.series_uids = list(series_uids)
        self.augment = augment
        self.seed = seed
        self.items = self._index()

    def _index(self) -> list[tuple]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def _rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def _unpack(self, key) -> tuple[int, int]:
        return (key, 0) if isinstance(key, (int, np.integer)) else (int(key[0]), int(key[1]))


class SubcaseDataset(_CacheDataset):
    """(image, mask) pairs of 1 x D x H x W float32 sub-cases for the segmentation network."""

    def _index(self):
        return [(uid, i) for uid in self.series_uids
                for i in range(self.cache.scan(uid)["subcases/image"].shape[0])]

    def __getitem__(self, key):
        index, epoch = self._unpack(key)
        uid, i = self.items[index]
        g = self.cache.scan(uid)
        image = g["subcases/image"][i].astype(np.float32)
        mask = g["subcases/mask"][i].astype(np.float32)
        if self.augment:
            image, mask = augment([image, mask], self._rng(index, epoch))
        return torch.from_numpy(image)[None], torch.from_numpy(mask)[None]


class RoiDataset(_CacheDataset):
    """(image, label) pairs: 1 x 16 x 48 x 48 float32 ROIs and 0 benign / 1 malignant.

    Nodules labelled excluded (-1: median malignancy 3) are left out. With
    ``mask_channel`` the nodule's ROI mask is a second channel; with
    ``ratings`` every nodule is an item and the target is the row
    [label (-1: none), the readers' majority ratings (-1: none)]
    (:func:`lungseg.malignancy.majority_ratings`, :func:`lungseg.malignancy.cls_loss`).
    """

    def __init__(self, cache, series_uids, *, augment: bool = False, seed: int = 0, mask_channel: bool = False,
                 ratings: bool = False):
        self.mask_channel, self.ratings = mask_channel, ratings
        super().__init__(cache, series_uids, augment=augment, seed=seed)

    def _index(self):
        from .malignancy import majority_ratings

        items = []
        for uid in self.series_uids:
            table = self.cache.nodule_table(uid)
            for i, lab in enumerate(table.get("label", np.zeros(0))):
                if lab >= 0 or self.ratings:
                    items.append((uid, i, int(lab), majority_ratings(table, i) if self.ratings else None))
        return items

    @property
    def labels(self) -> np.ndarray:
        return np.array([item[2] for item in self.items], dtype=np.int64)

    def __getitem__(self, key):
        index, epoch = self._unpack(key)
        uid, i, label, ratings = self.items[index]
        g = self.cache.scan(uid)
        arrays = [g["rois/image"][i].astype(np.float32)]
        if self.mask_channel:
            arrays.append(g["rois/mask"][i].astype(np.float32))
        if self.augment:
            arrays = augment(arrays, self._rng(index, epoch))
        x = torch.from_numpy(np.stack(arrays))
        if self.ratings:
            return x, torch.from_numpy(np.r_[np.float32(label), ratings].astype(np.float32))
        return x, torch.tensor(label, dtype=torch.long)


class CandidateDataset(_CacheDataset):
    """(image, label) pairs for the detector's false-positive reduction: 1 x 16 x 48 x 48 ROIs, 1 nodule / 0 not.

    Every candidate of a scan (:mod:`lungseg.detect`) that hits a relevant nodule
    (label 1) or none (0), and each relevant nodule's own ROI (1); candidates on
    nodules of fewer readers are left out.
    """

    def _index(self):
        items = []
        for uid in self.series_uids:
            labels = self.cache.candidates(uid)["label"][:]
            items.extend(("candidates", uid, i, int(lab)) for i, lab in enumerate(labels) if lab >= 0)
            items.extend(("rois", uid, i, 1) for i in range(self.cache.scan(uid)["rois/image"].shape[0]))
        return items

    @property
    def labels(self) -> np.ndarray:
        return np.array([item[-1] for item in self.items], dtype=np.int64)

    def _roi(self, group: str, uid: str, i: int, *, mask: bool = False) -> tuple[np.ndarray, ...]:
        """Item ``i`` of ``group`` ("candidates" or "rois"): its (16, 48, 48) image, with ``mask`` its nodule mask."""
        if group == "candidates":
            return self.cache.candidate_rois(uid, i, masks=True) if mask else (self.cache.candidate_rois(uid, i),)
        g = self.cache.scan(uid)
        return (g["rois/image"][i], g["rois/mask"][i]) if mask else (g["rois/image"][i],)

    def __getitem__(self, key):
        index, epoch = self._unpack(key)
        group, uid, i, label = self.items[index]
        image = self._roi(group, uid, i)[0].astype(np.float32)
        if self.augment:
            (image,) = augment([image], self._rng(index, epoch))
        return torch.from_numpy(image)[None], torch.tensor(label, dtype=torch.long)


class CandidateSegDataset(CandidateDataset):
    """(image, mask) pairs for a segmenter that sees nodules in their real surroundings.

    The ROIs of the candidates on relevant nodules (centred where the detector
    puts them, not on the nodule) and each nodule's own ROI; the mask is that
    of every relevant nodule in the ROI (of the nodule alone in its own ROI).
    Candidates off the nodules are left out: rejecting them is the
    detector's job, and with empty masks in half the batches the Dice loss
    teaches a segmenter to mark nothing.
    """

    def _index(self):
        return [item for item in super()._index() if item[-1] == 1]

    def __getitem__(self, key):
        index, epoch = self._unpack(key)
        group, uid, i, label = self.items[index]
        image, mask = (a.astype(np.float32) for a in self._roi(group, uid, i, mask=True))
        if self.augment:
            image, mask = augment([image, mask], self._rng(index, epoch))
        return torch.from_numpy(image)[None], torch.from_numpy(mask)[None]


class EpochSampler(Sampler):
    """Yields (index, epoch) in an order drawn from (seed, epoch).

    ``balanced`` draws with replacement so that each class is equally likely
    (``labels`` needed); otherwise a permutation (``shuffle``) or the identity.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, labels: np.ndarray | None = None,
                 balanced: bool = False):
        if balanced and labels is None:
            raise ValueError("balanced sampling needs labels")
        self.n, self.seed, self.shuffle, self.balanced = n, seed, shuffle, balanced
        self.labels = labels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.balanced:
            counts = np.maximum(np.bincount(self.labels, minlength=2), 1).astype(float)
            weights = torch.as_tensor(1.0 / counts[self.labels], dtype=torch.double)
            order = torch.multinomial(weights, self.n, replacement=True, generator=gen).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = range(self.n)
        return iter([(i, self.epoch) for i in order])
