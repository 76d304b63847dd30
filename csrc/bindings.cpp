// The only file that knows pybind11: exposes the pure C++ core as antdiff._C.
// std::invalid_argument from the core becomes ValueError (pybind11's default translation).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "graddrop.h"
#include "interval_dp.h"
#include "mtl_solvers.h"
#include "philox.h"
#include "step_ops.h"

namespace py = pybind11;

namespace {

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

py::tuple SolveIntervals(const std::string& cost, const DoubleArray& data, int64_t k,
                         std::optional<int64_t> min_size, std::optional<int64_t> max_size,
                         const std::string& algorithm) {
  const ant::CostKind kind = ant::ParseCostKind(cost);
  const ant::Algorithm algo = ant::ParseAlgorithm(algorithm);
  std::vector<int64_t> shape(data.shape(), data.shape() + data.ndim());
  const ant::CostInput input{kind, data.data(), std::move(shape)};
  ant::IntervalSplit split;
  {
    // `data` keeps the buffer alive; the solve touches no Python object.
    py::gil_scoped_release release;
    split = ant::SolveIntervals(input, k, min_size, max_size, algo);
  }
  py::array_t<int64_t> bounds(static_cast<py::ssize_t>(split.bounds.size()));
  std::copy(split.bounds.begin(), split.bounds.end(), bounds.mutable_data());
  return py::make_tuple(bounds, split.cost);
}

// The solvers take the addresses of C-contiguous host buffers (torch's data_ptr()): the caller
// (antdiff.mtl.native) checks device, dtype, shape and contiguity and keeps the tensors alive.
// Their Python names are private (_..._at): an address is not checkable here beyond null.
// `n`: the buffer's element count (an empty tensor's address may be null).
template <typename T>
T* Address(uintptr_t ptr, int64_t n = 1) {
  if (ptr == 0 && n > 0) {
    throw std::invalid_argument(
        "null buffer address: the _..._at functions are antdiff.mtl.native's; call those");
  }
  return reinterpret_cast<T*>(ptr);
}

void PcgradWeightsAt(uintptr_t gram, uintptr_t orders, int64_t k, uintptr_t weights) {
  ant::PcgradWeights(Address<const double>(gram, k), Address<const int64_t>(orders, k), k,
                     Address<double>(weights, k));
}

void NashWeightsAt(uintptr_t gram, int64_t k, int64_t iters, bool normalize, uintptr_t alpha) {
  ant::NashWeights(Address<const double>(gram, k), k, iters, normalize,
                   Address<double>(alpha, k));
}

void UwForwardAt(uintptr_t per, uintptr_t cid, int64_t B, uintptr_t inv, uintptr_t present,
                 uintptr_t s, int64_t k, uintptr_t total, uintptr_t lc, uintptr_t saved) {
  // lc: float32 [2k] = L, c; saved: float32 [2k] = coef, ds
  float* l_c = Address<float>(lc, k);
  float* coef_ds = Address<float>(saved, k);
  ant::UwForward(Address<const float>(per, B), Address<const int64_t>(cid, B), B,
                 Address<const float>(inv, k), Address<const float>(present, k),
                 Address<const float>(s, k), k, Address<float>(total), l_c, l_c + k, coef_ds,
                 coef_ds + k);
}

void UwBackwardAt(uintptr_t g, uintptr_t coef, int64_t k, uintptr_t cid, int64_t B,
                  uintptr_t d_per) {
  ant::UwBackward(Address<const float>(g), Address<const float>(coef, k), k,
                  Address<const int64_t>(cid, B), B, Address<float>(d_per, B));
}

void PhiloxUniformAt(uint64_t seed, uintptr_t step, int64_t offset, int64_t count,
                     uintptr_t out) {
  if (count < 0 || offset < 0) {
    throw std::invalid_argument("philox_uniform: offset and count must be >= 0");
  }
  // the step is read here, from host memory, so the caller never brings it to Python
  const uint64_t s = static_cast<uint64_t>(*Address<const int64_t>(step));
  py::gil_scoped_release release;
  ant::PhiloxUniform(seed, s, offset, count, Address<float>(out, count));
}

void GradDropAt(uintptr_t J, int64_t k, int64_t P, int64_t row_stride, uintptr_t keep,
                uint64_t seed, uintptr_t step, float leak, uintptr_t divisor, uintptr_t out) {
  if (k < 1 || P < 0 || row_stride < P) {
    throw std::invalid_argument("graddrop: needs k >= 1, P >= 0 and row_stride >= P");
  }
  const uint64_t s = static_cast<uint64_t>(*Address<const int64_t>(step));
  const float div = *Address<const float>(divisor);
  py::gil_scoped_release release;
  ant::GradDrop(Address<const float>(J, P), k, P, row_stride, Address<const float>(keep, k), seed,
                s, leak, div, Address<float>(out, P));
}

std::vector<uint32_t> Philox4x32Words(const std::vector<uint32_t>& ctr,
                                      const std::vector<uint32_t>& key) {
  if (ctr.size() != 4 || key.size() != 2) {
    throw std::invalid_argument("philox4x32: needs 4 counter words and 2 key words");
  }
  std::vector<uint32_t> out(4);
  ant::Philox4x32(ctr.data(), key.data(), out.data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "antdiff C++ core: exact constrained interval clustering (see csrc/interval_dp.h).";
  m.attr("AUTO_DC_MIN_T") = ant::kAutoDcMinT;
  // The Python side (antdiff.interval_dp.ABI_VERSION) refuses a build of another version: bump
  // both whenever a binding's name, arguments or meaning changes.
  // 2: NaN from nash_weights without a solution and from pcgrad_weights of a non-finite G
  // 3: the address-taking solvers are private (_pcgrad_weights_at, ...) and refuse null
  // 4: solve_intervals refuses costs that overflow float64 (the Python side relies on it)
  // 5: _nash_weights_at solves every scale (no norm overflow); normalize=False gives the
  //    weights of G itself
  m.attr("ABI_VERSION") = 5;
  m.def("solve_intervals", &SolveIntervals, py::arg("cost"), py::arg("data"), py::arg("k"),
        py::arg("min_size") = py::none(), py::arg("max_size") = py::none(),
        py::arg("algorithm") = "auto",
        R"doc(Split T timesteps into k contiguous clusters minimising the summed interval cost.

Args:
    cost: "l1" | "l2" (data: values [T]) or "affinity" | "matrix" (data: [T, T]).
    data: float64 array (other dtypes are cast; a C-contiguous float64 array is not copied).
    k: number of clusters, 1 <= k <= T.
    min_size, max_size: cluster-size limits, None = no limit.
    algorithm: "auto" | "quadratic" | "dc".

Returns:
    (bounds int64 [k + 1], total cost). Ties go to the smallest split index. Releases the GIL.

Raises:
    ValueError: naming the bad argument, its value and what is valid.
)doc");
  m.def("_pcgrad_weights_at", &PcgradWeightsAt, py::arg("gram"), py::arg("orders"), py::arg("k"),
        py::arg("weights"),
        "PCGrad weights in Gram space (see csrc/mtl_solvers.h). Arguments are addresses of "
        "C-contiguous host buffers: gram float64 [k, k], orders int64 [k, k], weights float64 "
        "[k] (written). Use antdiff.mtl.native, which checks the tensors.");
  m.def("_nash_weights_at", &NashWeightsAt, py::arg("gram"), py::arg("k"), py::arg("iters"),
        py::arg("normalize"), py::arg("alpha"),
        "Nash-MTL weights by damped Newton (see csrc/mtl_solvers.h). Arguments are addresses of "
        "C-contiguous host buffers: gram float64 [k, k], alpha float64 [k] (written). Use "
        "antdiff.mtl.native, which checks the tensors.");
  m.def("_uw_forward_at", &UwForwardAt, py::arg("per"), py::arg("cid"), py::arg("B"),
        py::arg("inv"), py::arg("present"), py::arg("s"), py::arg("k"), py::arg("total"),
        py::arg("lc"), py::arg("saved"),
        "Uncertainty weighting's reduction (see csrc/step_ops.h). Addresses of C-contiguous "
        "host buffers: per float32 [B], cid int64 [B], inv, present, s float32 [k]; written: "
        "total float32 0-d, lc float32 [2k] (L, c), saved float32 [2k] (coef, ds). Use "
        "antdiff.mtl.native.");
  m.def("_uw_backward_at", &UwBackwardAt, py::arg("g"), py::arg("coef"), py::arg("k"),
        py::arg("cid"), py::arg("B"), py::arg("d_per"),
        "d_per[n] = g * coef[cid[n]] (float32 g 0-d, coef [k], int64 cid [B] in [0, k), d_per [B] "
        "written). Use antdiff.mtl.native.");
  m.def("_philox_uniform_at", &PhiloxUniformAt, py::arg("seed"), py::arg("step"),
        py::arg("offset"), py::arg("count"), py::arg("out"),
        "Values offset .. offset + count - 1 of the counter-based uniform stream (seed, step) (see "
        "csrc/philox.h). step: address of a host int64; out: address of a float32 [count] buffer "
        "(written). Use antdiff.mtl.native.");
  m.def("philox4x32", &Philox4x32Words, py::arg("counter"), py::arg("key"),
        "The 4 output words of Philox4x32-10 on 4 counter words under 2 key words.");
  m.def("_graddrop_at", &GradDropAt, py::arg("J"), py::arg("k"), py::arg("P"),
        py::arg("row_stride"), py::arg("keep"), py::arg("seed"), py::arg("step"), py::arg("leak"),
        py::arg("divisor"), py::arg("out"),
        "GradDrop's update (see csrc/graddrop.h). Addresses of host buffers: J float32 [k, P] "
        "(rows row_stride apart, columns contiguous), keep float32 [k], step int64, divisor "
        "float32, out float32 [P] (written; may be J's row 0). Use antdiff.mtl.native.");
}
