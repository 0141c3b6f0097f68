// What the two halves of the CPU stand-in for the CUDA libraries (driver.cpp: libcuda;
// blas.cpp: libcublas and libcublasLt) share: device memory is host memory handed out by the
// driver half, which knows every allocation, so both halves check that what they are asked to
// read or write lies inside one.
#pragma once

#include <cstddef>
#include <cstdint>

namespace model {

// True when [addr, addr + bytes) lies inside one live device allocation; otherwise prints a
// message naming `what` to stderr and returns false.
bool check_range(uint64_t addr, size_t bytes, const char* what);

// True when the calling thread has the context current (and no sticky error is pending);
// otherwise prints a message naming `call` and returns false.
bool has_context(const char* call);

// Serialises every entry point: the execution model keeps its state in globals.
void lock();
void unlock();

struct Guard {
    Guard() { lock(); }
    ~Guard() { unlock(); }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
};

}  // namespace model
