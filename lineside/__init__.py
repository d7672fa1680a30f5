"""lineside: from an MLflow Model Registry to models running on shop-floor devices."""

__version__ = "0.1.0"
__all__ = ["__version__"]
