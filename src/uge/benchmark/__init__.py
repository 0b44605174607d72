"""Experiment grids from config files (``uge benchmark``) and their tables and figures (``uge report``)."""
from .config import BenchmarkConfig, Variant, load_config, parse_config
from .report import write_report
from .runner import read_records, run_benchmark

__all__ = ["BenchmarkConfig", "Variant", "load_config", "parse_config", "read_records", "run_benchmark",
           "write_report"]
