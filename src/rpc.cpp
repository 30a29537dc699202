// The RPC server a lease runs (`rbee rpc-server`), held to what the lease declared.
//
// llama.cpp's server lends whatever devices it is given, and reports their
// free memory as the machine's. Here it is given this machine's CPU behind a
// device of our own, the lease's: the same backend and buffers, but its
// memory is the lease's budget. Its free memory is what the budget has left
// (never more than the machine has), and a buffer beyond the budget is
// refused (the client sees a failed allocation, as with a full GPU).
//
// A malformed message trips one of llama.cpp's asserts, which abort the
// process. While the server runs, such an abort throws instead: the
// connection that sent the message unwinds (its buffers freed with it), the
// server starts listening again, and the line it prints says why. An assert
// on one of the backend's compute threads still aborts; the lease's process
// is its own, so that ends only this lease (and its hive says so).
//
// `rpc.rs` declares `rbee_rpc_serve` and is the only caller. Built by rbee's
// build.rs against the llama.cpp tree llama-cpp-sys-2 compiled.

#include "ggml-backend-impl.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-rpc.h"
#include "ggml.h"

#include <cstdint>
#include <cstdio>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace {

ggml_backend_dev_t cpu = nullptr;
ggml_backend_buffer_type_t cpu_buft = nullptr;
ggml_backend_device lease_dev;
ggml_backend_buffer_type lease_buft;

std::mutex mu;
size_t budget = 0;
size_t used = 0;
// Each buffer's own free function, called after the budget is given back.
std::unordered_map<ggml_backend_buffer_t, void (*)(ggml_backend_buffer_t)> frees;

// What the budget has left (with `mu` held).
size_t left() {
    return used < budget ? budget - used : 0;
}

void free_buffer(ggml_backend_buffer_t buffer) {
    void (*own)(ggml_backend_buffer_t) = nullptr;
    {
        std::lock_guard<std::mutex> lock(mu);
        auto it = frees.find(buffer);
        if (it != frees.end()) {
            own = it->second;
            frees.erase(it);
        }
        used -= buffer->size <= used ? buffer->size : used;
    }
    if (own != nullptr) {
        own(buffer);
    }
}

ggml_backend_buffer_t alloc_buffer(ggml_backend_buffer_type_t, size_t size) {
    {
        std::lock_guard<std::mutex> lock(mu);
        if (size > left()) {
            printf("lease budget: refused a buffer of %zu bytes (%zu of %zu bytes are in use)\n",
                   size, used, budget);
            fflush(stdout);
            return nullptr;
        }
        used += size;
    }
    ggml_backend_buffer_t buffer = cpu_buft->iface.alloc_buffer(cpu_buft, size);
    std::lock_guard<std::mutex> lock(mu);
    if (buffer == nullptr) {
        used -= size;
        return nullptr;
    }
    // What the budget holds is the buffer's real size.
    used = used - size + buffer->size;
    frees[buffer] = buffer->iface.free_buffer;
    buffer->iface.free_buffer = free_buffer;
    buffer->buft = &lease_buft;
    return buffer;
}

void get_memory(ggml_backend_dev_t, size_t * free, size_t * total) {
    size_t machine_free = 0;
    size_t machine_total = 0;
    cpu->iface.get_memory(cpu, &machine_free, &machine_total);
    std::lock_guard<std::mutex> lock(mu);
    *free = left() < machine_free ? left() : machine_free;
    *total = budget;
}

void get_props(ggml_backend_dev_t dev, ggml_backend_dev_props * props) {
    cpu->iface.get_props(cpu, props);
    get_memory(dev, &props->memory_free, &props->memory_total);
}

ggml_backend_t init_backend(ggml_backend_dev_t, const char * params) {
    ggml_backend_t backend = cpu->iface.init_backend(cpu, params);
    if (backend != nullptr) {
        // The server asks the backend's device for its buffer type and memory.
        backend->device = &lease_dev;
    }
    return backend;
}

ggml_backend_buffer_type_t get_buffer_type(ggml_backend_dev_t) {
    return &lease_buft;
}

bool supports_buft(ggml_backend_dev_t, ggml_backend_buffer_type_t buft) {
    return buft == &lease_buft || cpu->iface.supports_buft(cpu, buft);
}

// The CPU device with the lease's budget as its memory; null without a CPU device.
ggml_backend_dev_t lease_device(uint64_t budget_bytes) {
    cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu == nullptr) {
        return nullptr;
    }
    cpu_buft = cpu->iface.get_buffer_type(cpu);
    budget = budget_bytes;

    lease_buft = *cpu_buft;
    lease_buft.iface.alloc_buffer = alloc_buffer;
    // Every allocation goes through alloc_buffer, so through the budget.
    lease_buft.iface.alloc_buffer_n = nullptr;
    lease_buft.device = &lease_dev;

    lease_dev = *cpu;
    lease_dev.iface.get_memory = get_memory;
    lease_dev.iface.get_props = get_props;
    lease_dev.iface.init_backend = init_backend;
    lease_dev.iface.get_buffer_type = get_buffer_type;
    lease_dev.iface.supports_buft = supports_buft;
    // Lending host memory as is would bypass the budget.
    lease_dev.iface.buffer_from_host_ptr = nullptr;
    return &lease_dev;
}

struct assert_failed : std::runtime_error {
    using std::runtime_error::runtime_error;
};

void throw_instead(const char * message) {
    throw assert_failed(message);
}

}  // namespace

// Serves the lease's device on `endpoint` until the process is killed;
// returns -1 only if the server could not start (llama.cpp said why).
extern "C" int rbee_rpc_serve(const char * endpoint, const char * cache_dir, size_t threads,
                              uint64_t budget_bytes) {
    ggml_backend_dev_t dev = lease_device(budget_bytes);
    if (dev == nullptr) {
        fprintf(stderr, "llama.cpp found no CPU device to lend\n");
        return -1;
    }
    ggml_set_abort_callback(throw_instead);
    for (;;) {
        const char * why = nullptr;
        std::string what;
        try {
            ggml_backend_rpc_start_server(endpoint, cache_dir, threads, 1, &dev);
            return -1;
        } catch (const assert_failed & e) {
            why = "a malformed message";
            what = e.what();
        } catch (const std::bad_alloc &) {
            why = "a message that needs more memory than the lease has";
        } catch (const std::exception & e) {
            why = "a message llama.cpp could not handle";
            what = e.what();
        } catch (...) {
            why = "a message llama.cpp could not handle";
        }
        printf("tunnel ended by %s%s%s\n", why, what.empty() ? "" : ": ", what.c_str());
        fflush(stdout);
    }
}
