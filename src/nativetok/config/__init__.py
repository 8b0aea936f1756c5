"""Experiment configs: the typed schema and the loader that composes, overrides and checks them."""

from nativetok.config.checks import ConfigError
from nativetok.config.loading import load_config, to_yaml
from nativetok.config.schema import ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "to_yaml"]
