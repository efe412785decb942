"""ERNIE-Sparse: hierarchical sparse transformer (HST) classifiers, BigBird and dense baselines, SAR."""
from ernielab.sparse.config import ATTENTION_MODES, PRESETS, SparseClassifierConfig
from ernielab.sparse.model import PAD_ID, SparseClassifier
from ernielab.sparse.sar import classification_loss, symmetric_kl

__all__ = [
    "ATTENTION_MODES", "PAD_ID", "PRESETS", "SparseClassifier", "SparseClassifierConfig",
    "classification_loss", "symmetric_kl",
]
