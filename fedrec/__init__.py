"""fedrec: privacy-first recommendation models; central, federated and deployed training."""

__version__ = "0.1.0"
