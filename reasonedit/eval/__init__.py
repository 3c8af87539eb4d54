"""The eval harness: benchmark readers (`benchmarks/`), their interface (`benchmark.py`), official scoring and reports."""
