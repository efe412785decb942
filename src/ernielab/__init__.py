"""ernielab: training and research stack for the ERNIE model line."""

__version__ = "0.1.0"
