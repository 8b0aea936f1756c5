"""The package version, in a module of its own: reading it runs no import of the models or of Lightning."""

__version__ = "0.1.0"
