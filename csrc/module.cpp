// Python module entry so that `import lgvq_kernels._C` loads the library and runs the static
// op registrations. The ops go through torch.ops.lgvq_C; the module itself only answers which
// instruction set the CPU kernels run (a diagnostic, and the check that LGVQ_NO_AVX2 took).
#include <Python.h>

#include "cpu/simd.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(lgvq::cpu_simd::cpu_isa());
}

PyMethodDef lgvq_C_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "cpu_isa() -> str: the instruction set of the CPU kernels here, 'avx2+fma+f16c', "
     "'avx2+fma' or 'baseline' (no AVX2 in this build or CPU, or LGVQ_NO_AVX2=1 set)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef lgvq_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, lgvq_C_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lgvq_C_module); }
