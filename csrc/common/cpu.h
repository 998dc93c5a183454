// CPU facts shared by the kernels (csrc/knn, csrc/resize).
#pragma once

namespace ifseg {

// Cores this process may run on: its CPU affinity (containers, taskset), not the machine's count.
int available_cores();

}  // namespace ifseg
