// A dialect's kernel registry: the kernels register by name from static constructors
// (FLASH_EMU_REGISTER, FLASH_INSTANCE) before main, the launch entry points look them up.
#pragma once
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace simt {

template <typename Entry> class Registry {
public:
    void add(const char* name, Entry e) {
        std::lock_guard<std::mutex> g(lock_);
        entries_[name] = std::move(e);
    }
    // Copies the entry of `name` to `out`; false for an unknown name.
    bool find(const char* name, Entry& out) {
        std::lock_guard<std::mutex> g(lock_);
        auto it = entries_.find(name);
        if (it == entries_.end()) return false;
        out = it->second;
        return true;
    }

private:
    std::mutex lock_;
    std::map<std::string, Entry> entries_;
};

// The one registry per entry type, built on first use (so registration from any translation
// unit's static constructor finds it constructed).
template <typename Entry> Registry<Entry>& registry() {
    static Registry<Entry> r;
    return r;
}

}  // namespace simt
