// The window_conv CPU kernels for the compiler's baseline target (SSE2 on x86-64; any other architecture), compiled with
// no instruction-set flags: the fallback of every CPU.
#define SGDC_CPU_ISA baseline
#include "window_conv_cpu_kernels.h"
