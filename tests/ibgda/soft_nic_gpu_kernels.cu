// Kernels that post and poll through the production ibgda code (eaas/detail/ibgda/{qp,cq}.hpp) on
// a GPU, against the software NIC serving QPs in mapped host memory; and their host launchers.

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "eaas/detail/atomic.hpp"
#include "eaas/detail/clock.hpp"
#include "eaas/detail/ibgda/qp.hpp"
#include "mapped_qp.hpp"
#include "soft_nic_gpu_kernels.hpp"

namespace eaas::test {

namespace {

namespace ib = detail::ibgda;

__device__ deadline after_ns(std::uint64_t ns) { return deadline{detail::now_ns() + ns}; }

template <ib::poster P>
__device__ status post_one(ib::qp_state* q, const gpu_op& op, std::uint32_t rkey, deadline dl) {
  switch (op.kind) {
    case gpu_op_kind::write:
      return ib::put<P>(q, op.raddr, rkey, op.laddr, op.bytes, dl);
    case gpu_op_kind::write_inline: {
      // The payload sits on this thread's stack and is overwritten as soon as the post returns: the
      // WQE, not the source, must carry it.
      std::uint8_t buf[sizeof op.inline_data];
      for (std::uint32_t i = 0; i < sizeof buf; ++i) buf[i] = op.inline_data[i];
      const status s = ib::put_inline<P>(q, op.raddr, rkey, buf, op.bytes, dl);
      volatile std::uint8_t* poison = buf;
      for (std::uint32_t i = 0; i < sizeof buf; ++i) poison[i] = 0xee;
      return s;
    }
    case gpu_op_kind::read:
      return ib::get<P>(q, op.raddr, rkey, op.laddr, op.bytes, dl);
    case gpu_op_kind::fetch_add:
      return ib::fetch_add<P>(q, op.raddr, rkey, op.operand, reinterpret_cast<std::uint64_t*>(op.laddr), dl);
    case gpu_op_kind::compare_swap:
      return ib::compare_swap<P>(q, op.raddr, rkey, op.compare, op.operand, reinterpret_cast<std::uint64_t*>(op.laddr),
                                 dl);
  }
  return status::invalid_argument;
}

// Quiets once and records the status for this thread's ops from..to (stride T); atomics' old values
// are read after it, through the system-scope acquire load a consumer would use.
template <ib::poster P>
__device__ void quiet_and_record(ib::qp_state* q, const gpu_op* ops, std::uint32_t from, std::uint32_t to,
                                 std::uint32_t stride, std::uint64_t timeout_ns, gpu_op_result* res) {
  const std::uint64_t t0 = detail::now_ns();
  const status s = ib::quiet<P>(q, deadline{t0 + timeout_ns});
  const std::uint64_t dt = detail::now_ns() - t0;
  for (std::uint32_t j = from; j <= to; j += stride) {
    res[j].quiet = static_cast<std::uint32_t>(s);
    res[j].quiet_ns = dt;
    const gpu_op_kind k = ops[j].kind;
    if (s == status::ok && (k == gpu_op_kind::fetch_add || k == gpu_op_kind::compare_swap))
      res[j].fetched = detail::load_acquire(reinterpret_cast<const std::uint64_t*>(ops[j].laddr));
  }
}

template <ib::poster P>
__global__ void ops_kernel(ib::qp_state* q, const gpu_op* ops, std::uint32_t n, std::uint32_t rkey,
                           std::uint64_t timeout_ns, std::uint32_t quiet_every, gpu_op_result* res) {
  const std::uint32_t stride = gridDim.x * blockDim.x;
  const std::uint32_t g = blockIdx.x * blockDim.x + threadIdx.x;
  std::uint32_t first = g, since = 0;
  for (std::uint32_t i = g; i < n; i += stride) {
    const gpu_op op = ops[i];
    res[i].post = static_cast<std::uint32_t>(post_one<P>(q, op, rkey, after_ns(timeout_ns)));
    if (quiet_every != 0 && ++since == quiet_every) {
      quiet_and_record<P>(q, ops, first, i, stride, timeout_ns, res);
      first = i + stride;
      since = 0;
    }
  }
  if (first < n) quiet_and_record<P>(q, ops, first, n - 1, stride, timeout_ns, res);
}

__global__ void batched_kernel(ib::qp_state* q, const gpu_op* ops, std::uint32_t n, std::uint32_t rkey,
                               std::uint64_t wait_ns, batch_result* out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  constexpr auto P = ib::poster::exclusive;
  constexpr std::uint64_t kTimeout = 5'000'000'000ull;
  batch_result r{};
  std::uint64_t rung = q->rung;
  for (std::uint32_t i = 0; i < n; ++i) {
    if (ib::put<P>(q, ops[i].raddr, rkey, ops[i].laddr, ops[i].bytes, after_ns(kTimeout)) != status::ok)
      ++r.post_errors;
    if (q->rung != rung) {
      ++r.rings;
      rung = q->rung;
    }
  }
  const auto* last = reinterpret_cast<const std::uint64_t*>(ops[n - 1].raddr);
  for (const std::uint64_t until = detail::now_ns() + wait_ns; detail::now_ns() < until;) __nanosleep(1000);
  r.early_word = detail::load_acquire(last);
  r.rung_before_quiet = q->rung;
  r.ready_before_quiet = q->ready;
  r.quiet = static_cast<std::uint32_t>(ib::quiet<P>(q, after_ns(kTimeout)));
  r.late_word = detail::load_acquire(last);
  *out = r;
}

// GPU memory freed on scope exit.
template <class T>
struct device_array {
  T* p = nullptr;
  ~device_array() {
    if (p != nullptr) (void)cudaFree(p);
  }
  status make(std::size_t n, const T* init) {
    if (status s = cuda_check(cudaMalloc(&p, sizeof(T) * (n == 0 ? 1 : n)), "cudaMalloc"); s != status::ok) return s;
    return n == 0 ? status::ok : cuda_check(cudaMemcpy(p, init, sizeof(T) * n, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  status read(std::size_t n, T* out) const {
    return cuda_check(cudaMemcpy(out, p, sizeof(T) * n, cudaMemcpyDeviceToHost), "cudaMemcpy back");
  }
};

struct stream_guard {
  cudaStream_t s = nullptr;
  ~stream_guard() {
    if (s != nullptr) (void)cudaStreamDestroy(s);
  }
  status make() { return cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate"); }
};

}  // namespace

status run_ops(const mapped_qp& qp, const std::vector<gpu_op>& ops, const ops_launch& l,
               std::vector<gpu_op_result>& out) {
  if (ops.empty() || l.blocks == 0 || l.threads == 0 || (l.exclusive && (l.blocks != 1 || l.threads != 1)))
    return status::invalid_argument;
  const auto n = static_cast<std::uint32_t>(ops.size());
  out.assign(n, gpu_op_result{});
  device_array<gpu_op> d_ops;
  device_array<gpu_op_result> d_res;
  stream_guard st;
  if (status s = d_ops.make(n, ops.data()); s != status::ok) return s;
  if (status s = d_res.make(n, out.data()); s != status::ok) return s;
  if (status s = st.make(); s != status::ok) return s;
  if (l.exclusive)
    ops_kernel<ib::poster::exclusive>
        <<<1, 1, 0, st.s>>>(qp.device_state(), d_ops.p, n, l.rkey, l.timeout_ns, l.quiet_every, d_res.p);
  else
    ops_kernel<ib::poster::shared>
        <<<l.blocks, l.threads, 0, st.s>>>(qp.device_state(), d_ops.p, n, l.rkey, l.timeout_ns, l.quiet_every, d_res.p);
  if (status s = cuda_check(cudaGetLastError(), "ops_kernel launch"); s != status::ok) return s;
  if (status s = wait_stream_or_exit(st.s, l.host_limit_s, "ops_kernel"); s != status::ok) return s;
  return d_res.read(n, out.data());
}

status run_batched(const mapped_qp& qp, const std::vector<gpu_op>& ops, std::uint32_t rkey, std::uint64_t wait_ns,
                   batch_result& out) {
  if (ops.empty()) return status::invalid_argument;
  if ((ops.back().raddr & 7u) != 0) return status::invalid_argument;  // the kernel reads it as one word
  for (const gpu_op& op : ops)
    if (op.kind != gpu_op_kind::write) return status::invalid_argument;
  device_array<gpu_op> d_ops;
  device_array<batch_result> d_res;
  stream_guard st;
  if (status s = d_ops.make(ops.size(), ops.data()); s != status::ok) return s;
  if (status s = d_res.make(1, &out); s != status::ok) return s;
  if (status s = st.make(); s != status::ok) return s;
  batched_kernel<<<1, 1, 0, st.s>>>(qp.device_state(), d_ops.p, static_cast<std::uint32_t>(ops.size()), rkey, wait_ns,
                                    d_res.p);
  if (status s = cuda_check(cudaGetLastError(), "batched_kernel launch"); s != status::ok) return s;
  if (status s = wait_stream_or_exit(st.s, 60, "batched_kernel"); s != status::ok) return s;
  return d_res.read(1, &out);
}

}  // namespace eaas::test
