"""The peer benchmark: ``python -m benchmarks.run --quick`` (or ``nox -s bench -- --quick``)."""
