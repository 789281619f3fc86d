#include "capture_lock.hpp"

namespace eaas::runtime::gpu {

std::mutex& capture_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace eaas::runtime::gpu
