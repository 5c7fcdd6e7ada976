"""pytest-benchmark's storage for bench/regression: beside these files, whatever the working
directory (pytest_benchmark reads it from the option, here defaulted)."""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_storage", None) in (None, "file://./.benchmarks"):
        config.option.benchmark_storage = "file://" + os.path.join(HERE, ".benchmarks")
