"""AmorLIP reproduction pipeline: amortized partition functions for language-image pretraining."""
__version__ = "0.1.0"
