// Kernel registry and launch entry point of the CUDA shim (see cuda_shim.h).
#include <map>
#include <mutex>
#include <string>

#include "cuda_shim.h"

namespace emu_cuda {
namespace {
struct Entry { Launcher fn; size_t params_size; };
std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> r;
    return r;
}
std::mutex& registry_lock() {
    static std::mutex m;
    return m;
}
}  // namespace

void register_kernel(const char* name, Launcher fn, size_t params_size) {
    std::lock_guard<std::mutex> g(registry_lock());
    registry()[name] = Entry{fn, params_size};
}
}  // namespace emu_cuda

extern "C" int emu_cuda_launch(const char* name, const unsigned grid[3], const unsigned block[3],
                               size_t smem, const void* params, size_t params_size) {
    emu_cuda::Entry e;
    {
        std::lock_guard<std::mutex> g(emu_cuda::registry_lock());
        auto it = emu_cuda::registry().find(name);
        if (it == emu_cuda::registry().end()) return 1;
        e = it->second;
    }
    if (e.params_size != params_size) return 2;
    simt::launch({grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]}, smem,
                 [&] { e.fn(params); });
    return 0;
}
