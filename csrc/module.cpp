// Python module entry so that `import lgvq_kernels._C` loads the library and runs the static
// op registrations. No functions are bound here: everything goes through torch.ops.lgvq_C.
#include <Python.h>

static struct PyModuleDef lgvq_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lgvq_C_module); }
