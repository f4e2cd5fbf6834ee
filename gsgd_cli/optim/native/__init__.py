"""The fused CPU kernels: `build.py` compiles, caches and loads them (once, for all), and each
optimizer has one interface module and one C++ source: `gsgd.py` + `gsgd_step.cpp`,
`path_sgd.py` + `path_sgd_step.cpp` (`parallel.h`: their shared threading helpers)."""
