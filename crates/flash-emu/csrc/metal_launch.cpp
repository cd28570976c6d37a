// Kernel registry and launch entry point of the MSL shim (see kernels/emu/msl_shim.h).
#include <map>
#include <mutex>
#include <string>

#include "flash_metal.h"

namespace emu_metal {
namespace {
std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> r;
    return r;
}
std::mutex& registry_lock() {
    static std::mutex m;
    return m;
}
}  // namespace

void register_kernel(const char* name, Entry e) {
    std::lock_guard<std::mutex> g(registry_lock());
    registry()[name] = std::move(e);
}
}  // namespace emu_metal

extern "C" int emu_metal_launch(const char* name, const unsigned grid[3], unsigned threads, size_t smem,
                                void* const* args, size_t nargs) {
    emu_metal::Entry e;
    {
        std::lock_guard<std::mutex> g(emu_metal::registry_lock());
        auto it = emu_metal::registry().find(name);
        if (it == emu_metal::registry().end()) return 1;
        e = it->second;
    }
    if (e.nargs != nargs) return 2;
    simt::launch({grid[0], grid[1], grid[2]}, {threads, 1, 1}, smem, [&] {
        const simt::Dim3 t = simt::thread_idx(), g = simt::block_idx();
        const uint tid = t.x;
        e.fn(args, reinterpret_cast<float*>(simt::shared_mem()), uint3{g.x, g.y, g.z}, tid, tid / 32,
             tid % 32);
    });
    return 0;
}
