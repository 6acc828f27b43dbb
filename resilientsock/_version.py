"""The version, written once: setup.cfg reads it (``attr:``) and ``resilientsock.__version__``
re-exports it. Nothing else may import here (setuptools evaluates this file statically)."""

__version__ = "0.1.0"
