"""psctl: a parameter server for machine learning in one Python program."""

__version__ = "0.1.0"
