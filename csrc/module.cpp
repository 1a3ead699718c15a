// The Python module torchcnn._C of the ahead-of-time build (setup.py). Importing it loads this
// library, whose static initialisers register the kernels of csrc/cpu and csrc/cuda for the ops
// that torchcnn/_ops/schemas.py defines; the module itself is empty. The just-in-time build loads
// the same library with torch.ops.load_library instead.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
