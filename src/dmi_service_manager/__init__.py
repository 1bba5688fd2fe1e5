"""DMI Service Manager: runs Docker containers as jobs for 4CAT and manages the files they use."""

__version__ = "0.1.0"
