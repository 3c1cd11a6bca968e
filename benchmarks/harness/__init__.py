"""The one benchmark harness, one module per job:

* ``registry``: op families, their providers and shape sets; ``discover`` finds the families.
* ``shapes``: how a family writes shapes on the command line and labels them in tables.
* ``dtypes``: dtype modes ("float32", "tf32", ...) and the matmul precision each sets.
* ``machine``: the machine line, versions, load average, the default memory budget.
* ``timing``: wall-clock median / p20 / p80 of one case after warm-up; the providers of a
  case interleaved.
* ``memory``: peak extra memory of one call (CUDA in-process, CPU in a worker process).
* ``rows``: result rows, their formatting and the CSV file.
* ``targets``: performance targets judged from the rows (MET / NOT MET / NOT MEASURED).
* ``runner``: runs provider x shape x dtype cases into rows; the pytest-benchmark body.

Op families and the report use the names below as ``harness.<name>``. docs/benchmarks.md
describes the method, the shapes that matter and the targets.
"""

from benchmarks.harness.dtypes import (
    DTYPES,
    dtype_reason,
    element_size,
    matmul_precision,
    precision,
    torch_dtype,
)
from benchmarks.harness.machine import (
    GiB,
    MiB,
    cpu_model,
    default_memory_budget,
    describe_device,
    load_average,
    versions,
)
from benchmarks.harness.memory import MemoryWorker, measure_peak_cpu, measure_peak_cuda
from benchmarks.harness.registry import (
    FAMILIES,
    REPO_ROOT,
    OpFamily,
    Provider,
    discover,
    get_family,
    importable,
    lgvq_backend_available,
    register,
)
from benchmarks.harness.rows import (
    ROW_FIELDS,
    Row,
    RunInfo,
    append_csv,
    error_text,
    format_mib,
    format_seconds,
    new_run_info,
    read_csv,
)
from benchmarks.harness.runner import (
    case_skip_reason,
    provider_unavailable_reason,
    run_cases,
    run_pytest_benchmark,
)
from benchmarks.harness.shapes import ShapeFormat, parse_key_values
from benchmarks.harness.targets import Target, every_shape_target, ratio_target, rows_by_case
from benchmarks.harness.timing import (
    Timing,
    TimingConfig,
    percentile,
    time_function,
    time_functions,
)

__all__ = [
    "DTYPES", "FAMILIES", "GiB", "MiB", "REPO_ROOT", "ROW_FIELDS", "MemoryWorker", "OpFamily",
    "Provider", "Row", "RunInfo", "ShapeFormat", "Target", "Timing", "TimingConfig",
    "append_csv", "case_skip_reason", "cpu_model", "default_memory_budget", "describe_device",
    "discover", "dtype_reason", "element_size", "error_text", "every_shape_target",
    "format_mib", "format_seconds",
    "get_family", "importable", "lgvq_backend_available", "load_average", "matmul_precision",
    "measure_peak_cpu", "measure_peak_cuda", "new_run_info", "parse_key_values", "percentile",
    "precision", "provider_unavailable_reason", "ratio_target", "read_csv", "register",
    "rows_by_case", "run_cases", "run_pytest_benchmark", "time_function", "time_functions",
    "torch_dtype",
    "versions",
]
