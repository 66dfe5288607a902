"""Loaded by benchmark subprocesses (bench/ is on their PYTHONPATH): with RECSIFT_BENCH_PURE_PYTHON_CRC=1,
hide the native crc32c module so kafka-python uses its pure-Python CRC, in every process of the worker."""

import os
import sys

if os.environ.get("RECSIFT_BENCH_PURE_PYTHON_CRC") == "1":
    sys.modules["crc32c"] = None  # type: ignore[assignment]
