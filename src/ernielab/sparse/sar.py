"""Self-Attention Regularization (SAR): agree with yourself across attention topologies.

The same weights run once with the sparse (HST) topology and once with the dense topology; the loss is
the task cross-entropy of the sparse run plus alpha times the symmetric KL between the two predicted
class distributions. Only the sparse topology is used at inference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """KL(a||b) + KL(b||a) of the softmax distributions, averaged over the batch."""
    log_a, log_b = F.log_softmax(logits_a.float(), -1), F.log_softmax(logits_b.float(), -1)
    return ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1).mean()


def classification_loss(
    model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, sar_alpha: float = 0.0,
    dense_ce: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the sparse run, plus sar_alpha * symmetric KL(sparse, dense) when sar_alpha > 0.

    dense_ce: the task loss is the mean of the sparse and the dense run's cross-entropies.
    Returns (loss, parts) where parts holds python floats for logging: ce (sparse), sar_kl and dense_ce
    (if used), accuracy (sparse).
    """
    logits = model(tokens, topology="sparse")
    ce = F.cross_entropy(logits.float(), labels)
    parts = {"ce": ce.item(), "accuracy": (logits.argmax(-1) == labels).float().mean().item()}
    if sar_alpha <= 0:
        return ce, parts
    dense_logits = model(tokens, topology="dense")
    kl = symmetric_kl(logits, dense_logits)
    parts["sar_kl"] = kl.item()
    if dense_ce:
        ce_dense = F.cross_entropy(dense_logits.float(), labels)
        parts["dense_ce"] = ce_dense.item()
        ce = 0.5 * (ce + ce_dense)
    return ce + sar_alpha * kl, parts
