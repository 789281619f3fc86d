#include "wire.hpp"

#include <atomic>
#include <cstring>

#include "fail.hpp"

namespace eaas::runtime {
namespace {

const unsigned char* at(const memory_region& r, std::uint64_t offset) {
  return static_cast<const unsigned char*>(r.data()) + offset;
}

bool inside(const memory_region& r, std::uint64_t offset, std::uint64_t bytes) {
  return offset <= r.size() && bytes <= r.size() - offset;
}

class host_wire final : public wire {
 public:
  memory_kind kind() const noexcept override { return memory_kind::host; }
  int device() const noexcept override { return -1; }
  transport_kind transport() const noexcept override { return transport_kind::shm; }

  status read(const memory_region& r, std::uint64_t offset, void* dst, std::size_t bytes) override {
    if (!inside(r, offset, bytes))
      return EAAS_RT_FAIL(status::invalid_argument, "read of {} bytes at {} outside a region of {}", bytes, offset,
                          r.size());
    if (bytes) std::memcpy(dst, at(r, offset), bytes);
    return status::ok;
  }

  status load_words(const memory_region& r, std::uint64_t offset, std::uint64_t stride, std::uint32_t count,
                    std::uint64_t* out) override {
    if (count == 0) return status::ok;
    if (offset % 8 != 0 || stride % 8 != 0 || !inside(r, offset, stride * (count - 1) + 8))
      return EAAS_RT_FAIL(status::invalid_argument, "{} words from {} (stride {}) outside a region of {}", count,
                          offset, stride, r.size());
    for (std::uint32_t i = 0; i < count; ++i)
      out[i] = std::atomic_ref<const std::uint64_t>(
                   *reinterpret_cast<const std::uint64_t*>(at(r, offset + std::uint64_t{i} * stride)))
                   .load(std::memory_order_acquire);
    return status::ok;
  }

  status read_after_acquire(const memory_region& r, std::uint64_t word_offset, std::uint64_t offset, void* dst,
                            std::size_t bytes, std::uint64_t* word) override {
    if (word_offset % 8 != 0 || !inside(r, word_offset, 8) || !inside(r, offset, bytes))
      return EAAS_RT_FAIL(status::invalid_argument, "word at {} and {} bytes at {}: outside a region of {}",
                          word_offset, bytes, offset, r.size());
    *word = std::atomic_ref<const std::uint64_t>(*reinterpret_cast<const std::uint64_t*>(at(r, word_offset)))
                .load(std::memory_order_acquire);
    if (bytes) std::memcpy(dst, at(r, offset), bytes);
    return status::ok;
  }

  status store_word(memory_region& r, std::uint64_t offset, std::uint64_t value) override {
    if (offset % 8 != 0 || !inside(r, offset, 8))
      return EAAS_RT_FAIL(status::invalid_argument, "word at {} outside a region of {}", offset, r.size());
    std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(static_cast<unsigned char*>(r.data()) + offset))
        .store(value, std::memory_order_release);
    return status::ok;
  }

  status put_signal(const endpoint& ep, const remote_view& dst, std::uint64_t dst_offset, const void* src,
                    std::size_t bytes, const remote_view& sig, std::uint64_t sig_offset, std::uint64_t value,
                    std::size_t head) override {
    const device_endpoint v = ep.view();
    if (head == 0) {
      status st =
          eaas::put_signal(coop_thread{}, v, dst, dst_offset, src, bytes, sig, sig_offset, value, signal_op::set);
      return st == status::ok ? quiet(coop_thread{}, v) : st;
    }
    if (head % 8 != 0 || head > bytes || dst_offset % 8 != 0)
      return EAAS_RT_FAIL(status::invalid_argument, "a head of {} bytes in a put of {} at {}", head, bytes, dst_offset);
    // The bytes after the head; then the head, its last word as the signal of a put_signal; then the signal.
    const auto* s = static_cast<const unsigned char*>(src);
    std::uint64_t commit;
    std::memcpy(&commit, s + head - 8, 8);
    status st = eaas::put(coop_thread{}, v, dst, dst_offset + head, s + head, bytes - head);
    if (st == status::ok) st = eaas::fence(coop_thread{}, v);
    if (st == status::ok)
      st = eaas::put_signal(coop_thread{}, v, dst, dst_offset, s, head - 8, dst, dst_offset + head - 8, commit,
                            signal_op::set);
    if (st == status::ok) st = eaas::fence(coop_thread{}, v);
    if (st == status::ok) st = eaas::signal(coop_thread{}, v, sig, sig_offset, value, signal_op::set);
    return st == status::ok ? quiet(coop_thread{}, v) : st;
  }

  status signal(const endpoint& ep, const remote_view& sig, std::uint64_t sig_offset, std::uint64_t value) override {
    const device_endpoint v = ep.view();
    status st = eaas::signal(coop_thread{}, v, sig, sig_offset, value, signal_op::set);
    return st == status::ok ? quiet(coop_thread{}, v) : st;
  }

  status wait(const endpoint& ep, const memory_region& r, std::uint64_t offset, cmp_op cmp, std::uint64_t value,
              std::uint64_t until_ns, std::uint64_t* seen) override {
    if (offset % 8 != 0 || !inside(r, offset, 8))
      return EAAS_RT_FAIL(status::invalid_argument, "word at {} outside a region of {}", offset, r.size());
    return wait_signal(ep.view(), reinterpret_cast<const std::uint64_t*>(at(r, offset)), cmp, value, deadline{until_ns},
                       seen);
  }
};

}  // namespace

std::unique_ptr<wire> make_host_wire() { return std::make_unique<host_wire>(); }

#if !EAAS_MOE_WITH_GPU
status make_gpu_wire(int cuda_device, std::unique_ptr<wire>&) {
  return EAAS_RT_FAIL(status::unsupported, "GPU {} asked for, but this eaas was built without CUDA", cuda_device);
}

int cuda_device_count() noexcept { return 0; }
#endif

}  // namespace eaas::runtime
