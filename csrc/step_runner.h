// torch_fastmlp._C.StepRunner: TrainStep's planned step run from C++ (see step_runner.cpp).
#pragma once
#include <Python.h>

namespace fastmlp {

// Adds the StepRunner class to the extension module; returns false with a Python error set.
bool add_step_runner(PyObject* module);

}  // namespace fastmlp
