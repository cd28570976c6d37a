// Kernel registry and launch entry point of the CUDA shim (see cuda_shim.h).
#include "registry.h"
#include "cuda_shim.h"

namespace emu_cuda {
namespace {
struct Entry { Launcher fn; size_t params_size; };
}  // namespace

void register_kernel(const char* name, Launcher fn, size_t params_size) {
    simt::registry<Entry>().add(name, Entry{fn, params_size});
}
}  // namespace emu_cuda

extern "C" int emu_cuda_launch(const char* name, const unsigned grid[3], const unsigned block[3],
                               size_t smem, const void* params, size_t params_size) {
    emu_cuda::Entry e;
    if (!simt::registry<emu_cuda::Entry>().find(name, e)) return 1;
    if (e.params_size != params_size) return 2;
    simt::launch({grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}, smem,
                 [&] { e.fn(params); });
    return 0;
}
