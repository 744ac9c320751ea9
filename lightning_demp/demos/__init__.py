"""Demo models and data that need no download: MNIST-1D (generated offline) and scikit-learn's digits.

Models: `MLPClassifier`, `ResidualCNNClassifier` (the 1-D residual CNN with BatchNorm used in ``feasibility.md``)
and `TransformerClassifier`; the paper's CIFAR-10 ResNet-18 and VGG-16 in `lightning_demp.demos.cifar_models`,
with their data in `lightning_demp.demos.cifar`. Data: `MNIST1DDataModule` (the ``mnist1d`` package's generator,
4000/1000 split) and `DigitsDataModule` (8×8 digits flattened to 64 features).
"""

from lightning_demp.demos.classifier import DemoClassifier, LRScheduleName, OptimizerName
from lightning_demp.demos.data import ArrayDataModule, DigitsDataModule, MNIST1DDataModule, make_mnist1d
from lightning_demp.demos.models import (
    MLPClassifier,
    PreNormBlock,
    ResidualBlock1d,
    ResidualCNNBackbone,
    ResidualCNNClassifier,
    TransformerClassifier,
)
from lightning_demp.demos.quiet import quiet_trainer

__all__ = [
    "ArrayDataModule",
    "DemoClassifier",
    "DigitsDataModule",
    "LRScheduleName",
    "MLPClassifier",
    "MNIST1DDataModule",
    "OptimizerName",
    "PreNormBlock",
    "ResidualBlock1d",
    "ResidualCNNBackbone",
    "ResidualCNNClassifier",
    "TransformerClassifier",
    "make_mnist1d",
    "quiet_trainer",
]
