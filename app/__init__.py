"""Zeus: a self-hosted chat service for a causal language model."""

__version__ = "0.1.0"
