"""robustmatrix's harness: registry, data, models, runner, store and command line."""

__version__ = "0.1.0"
