"""``python -m benchmarks.harness --memory-worker``: the CPU memory worker, started by
``benchmarks.harness.memory.MemoryWorker`` (reports are run with ``python -m benchmarks.report``).
"""

import sys

from benchmarks.harness.memory import worker_main

if sys.argv[1:] == ["--memory-worker"]:
    sys.exit(worker_main())
sys.exit("usage: python -m benchmarks.harness --memory-worker "
         "(internal; run reports with python -m benchmarks.report)")
