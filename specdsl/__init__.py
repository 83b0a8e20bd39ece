"""specdsl: a declarative YAML spec compiler for designed fine-tuning data."""

__version__ = "0.1.0"
