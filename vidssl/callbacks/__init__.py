"""Lightning callbacks: pseudo-labels for cluster-guided methods, online retrieval monitor."""

from vidssl.callbacks.pseudo_labels import PseudoLabels
from vidssl.callbacks.retrieval_monitor import RetrievalMonitor

__all__ = ["PseudoLabels", "RetrievalMonitor"]
