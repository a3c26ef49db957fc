// The Python module genflow._C. Importing it runs the TORCH_LIBRARY registrations of every
// csrc/ops/*.cpp (each op file adds itself with TORCH_LIBRARY_FRAGMENT); the ops are then
// reached through torch.ops.genflow.*.
#include <Python.h>
#include <torch/library.h>

static bool has_cuda() {
#ifdef GENFLOW_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(genflow, m) {
  m.def("has_cuda() -> bool", &has_cuda);
}

static struct PyModuleDef genflow_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&genflow_module); }
