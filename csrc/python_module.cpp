// `import esper_gate._C` loads this shared object, which runs the static
// TORCH_LIBRARY registrars in the other translation units. The module itself
// is empty: the ops live in torch.ops.esper_gate.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "esper_gate native ops (see torch.ops.esper_gate)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
