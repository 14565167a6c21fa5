"""NumPy references, in float64, of the softmax, cross-entropy and distillation KL that the loss
tests check the JAX losses against."""

from __future__ import annotations

import numpy as np


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(z):
    return np.exp(log_softmax(z))


def cross_entropy(z, y) -> float:
    """The batch mean of -log softmax(z)[y]."""
    return float(np.mean(-log_softmax(z)[np.arange(len(y)), y]))


def kl(student, target, tau) -> float:
    """tau^2 * mean over the batch of sum over classes q (log q - log p), with q the target's and
    p the student's softmax at temperature tau."""
    log_q, log_p = log_softmax(target / tau), log_softmax(student / tau)
    return float(tau**2 * np.mean(np.sum(np.exp(log_q) * (log_q - log_p), axis=-1)))
