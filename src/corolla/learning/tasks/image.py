"""Image classification: a small CNN on Fashion-MNIST, trained in full (no LoRA).

It exists so the selection science runs at CPU scale through the same seam as the
LoRA tasks: every parameter is a dense exchanged array (rank 0), so FedAvg and the
selectors work unchanged. The data comes from Debian's `dataset-fashion-mnist`.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from peft import LoraConfig
from torch import nn

from corolla.data import silo as data
from corolla.data.source import DataSource
from corolla.learning.tasks.base import Encoded, Task
from corolla.spec import LoraSpec

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format: a magic number, the dims, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=1)
def fashion_images() -> np.ndarray:
    """All 70k images (train then test), uint8 N × 28 × 28, read once per process."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise data.SiloError(f"Fashion-MNIST is not installed at {FASHION_DIR}; "
                             "run `apt-get install dataset-fashion-mnist` (deploy/setup.sh does when it can).")
    return np.concatenate([_read_idx(FASHION_DIR / f"{p}-images-idx3-ubyte.gz") for p in ("train", "t10k")])


@functools.lru_cache(maxsize=1)
def fashion_split() -> tuple[datasets.Dataset, datasets.Dataset]:
    """Fashion-MNIST train (60k) and test (10k) as Datasets of (`index` into fashion_images(), ClassLabel `label`).

    The pixels stay in one numpy array: partitioners only need the labels, and
    copying 70k images into Arrow costs seconds per process.
    """
    images = fashion_images()
    feats = datasets.Features({"index": datasets.Value("int64"), "label": datasets.ClassLabel(names=list(FASHION_LABELS))})
    y = np.concatenate([_read_idx(FASHION_DIR / f"{p}-labels-idx1-ubyte.gz") for p in ("train", "t10k")]).astype(np.int64)
    n_train = 60_000
    idx = np.arange(len(images))
    return (datasets.Dataset.from_dict({"index": idx[:n_train], "label": y[:n_train]}, features=feats),
            datasets.Dataset.from_dict({"index": idx[n_train:], "label": y[n_train:]}, features=feats))


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers (≈ 100 k parameters)."""

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_labels))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return logits."""
        return self.classifier(self.features(pixel_values))


class ImageClassification(Task):
    """SmallCNN on Fashion-MNIST; the whole model is trained and exchanged."""

    name = "image-classification"

    @property
    def label_names(self) -> tuple[str, ...]:
        """Fashion-MNIST's ten classes."""
        return FASHION_LABELS

    def load_base_model(self, **from_pretrained: Any) -> nn.Module:
        """Build the CNN with a fixed seed (identical on every host)."""
        self._no_load_options(from_pretrained, "the image CNN")
        with torch.random.fork_rng():
            torch.manual_seed(4321)
            return SmallCNN(len(FASHION_LABELS))

    def lora_config(self, rank: int, lora: LoraSpec) -> LoraConfig:
        """The image task trains the full model; there is no adapter."""
        raise NotImplementedError("image-classification trains the full model (rank 0); it has no LoRA adapter")

    def logits(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The CNN returns logits directly."""
        return model(**inputs)

    def encode(self, ds: datasets.Dataset) -> Encoded:
        """Scale pixels to [-1, 1] as a float tensor N × 1 × 28 × 28."""
        index = np.asarray(ds["index"], dtype=np.int64)
        x = fashion_images()[index].astype(np.float32).reshape(-1, 1, 28, 28)
        pixels = torch.from_numpy(x / 127.5 - 1.0)
        return Encoded(inputs={"pixel_values": pixels}, labels=torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long))

    def builtin_partition(self, partition_id: int, num_partitions: int, alpha: float) -> datasets.Dataset:
        """Fashion-MNIST train split, Dirichlet-partitioned by label."""
        return data.partition_dataset(fashion_split()[0], partition_id, num_partitions, alpha, seed=self.spec.seed)

    def builtin_test(self) -> datasets.Dataset:
        """The 10k test split."""
        return fashion_split()[1]

    def load_silo(self, source: DataSource, text_column: str, label_column: str,
                  cache_dir: str | None = None) -> datasets.Dataset:
        """Image silos from files are not supported yet."""
        raise data.SiloError("the image task reads built-in Fashion-MNIST partitions only; omit --data.")
