"""ecaseg: weakly supervised semantic segmentation with DINO-derived class-aware affinity (ECA)."""

__version__ = "0.1.0"
