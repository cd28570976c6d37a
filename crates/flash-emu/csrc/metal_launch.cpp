// Kernel registry and launch entry point of the MSL shim (see msl_shim.h).
#include "registry.h"  // first: the MSL shim's address-space macros must not reach <mutex>
#include "flash_metal.h"

namespace emu_metal {
void register_kernel(const char* name, Entry e) { simt::registry<Entry>().add(name, std::move(e)); }
}  // namespace emu_metal

extern "C" int emu_metal_launch(const char* name, const unsigned grid[3], unsigned threads, size_t smem,
                                void* const* args, size_t nargs) {
    emu_metal::Entry e;
    if (!simt::registry<emu_metal::Entry>().find(name, e)) return 1;
    if (e.nargs != nargs) return 2;
    simt::launch({grid[0], grid[1], grid[2]}, {threads, 1, 1}, smem, [&] {
        const simt::Dim3 t = simt::thread_idx(), g = simt::block_idx();
        const uint tid = t.x;
        e.fn(args, reinterpret_cast<float*>(simt::shared_mem()), uint3{g.x, g.y, g.z}, tid, tid / 32,
             tid % 32);
    });
    return 0;
}
