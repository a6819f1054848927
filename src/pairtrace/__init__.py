"""pairtrace: trace behaviours learned in preference training back to the pairs that taught them."""

__version__ = "0.1.0"
