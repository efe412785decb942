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
    model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, sar_alpha: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the sparse run, plus sar_alpha * symmetric KL(sparse, dense) when sar_alpha > 0.

    Returns (loss, parts) where parts holds python floats for logging: ce, sar_kl (if used), accuracy.
    """
    logits = model(tokens, topology="sparse")
    ce = F.cross_entropy(logits.float(), labels)
    parts = {"ce": ce.item(), "accuracy": (logits.argmax(-1) == labels).float().mean().item()}
    if sar_alpha <= 0:
        return ce, parts
    kl = symmetric_kl(logits, model(tokens, topology="dense"))
    parts["sar_kl"] = kl.item()
    return ce + sar_alpha * kl, parts
