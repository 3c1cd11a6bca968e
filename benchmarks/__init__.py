"""lgvq benchmarks: one harness (benchmarks.harness), one file per op family (e.g.
benchmarks.nearest_code), the report CLI (``python -m benchmarks.report``) and a pytest-benchmark
suite (``python -m pytest benchmarks -q --benchmark-only``). Benchmarks are not tests: nothing
here asserts a speed; the report prints targets as MET / NOT MET from the measured numbers.
"""
