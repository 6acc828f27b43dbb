"""Scripts shipped with the package and run as files (``python path/to/script.py``),
such as the demo's robot client."""
