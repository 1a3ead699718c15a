// The Python module torchcnn._C of the ahead-of-time build (setup.py). Importing it loads this
// library, whose static initialisers register the kernels of csrc/cpu and csrc/cuda for the ops
// that torchcnn/_ops/schemas.py defines; the module itself is empty. The just-in-time build loads
// the same library with torch.ops.load_library instead.
#include <Python.h>

#ifndef TORCHCNN_TORCH_BUILD
#error "TORCHCNN_TORCH_BUILD (torch's version, spelled in hex) is defined by torchcnn/_build.py's flags"
#endif
#define TORCHCNN_STRINGIFY_(x) #x
#define TORCHCNN_STRINGIFY(x) TORCHCNN_STRINGIFY_(x)

// The torch this library is compiled against, as torchcnn/_extension.py reads it from the file
// before loading it: loaded into another torch, the dynamic loader would fail with an "undefined
// symbol" (or worse, not fail), where torchcnn can say which two versions met.
extern "C" const char torchcnn_built_for_torch[] =
    "torchcnn built for torch " TORCHCNN_STRINGIFY(TORCHCNN_TORCH_BUILD);

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
