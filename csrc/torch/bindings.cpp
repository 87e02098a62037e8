// Export table of internlm_kernels._C. Only bindings here: the glue with checks and
// dispatch lives in the other csrc/torch/*.cpp files, the kernels in csrc/include.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include "glue.h"
#ifdef IK_CUDA_EMULATION
#include "internlm_kernels/emulation.h"
#endif

#ifndef IK_TORCH_VERSION
#error "setup.py defines IK_TORCH_VERSION (the torch this extension is built against)"
#endif

namespace {

// What the extension was built against, so the package can refuse a stale build clearly
// instead of failing later with an "undefined symbol".
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = IK_TORCH_VERSION;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  info["cuda_archs"] = IK_CUDA_ARCHS;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace internlm_kernels;
  m.doc() = "internlm_kernels CUDA C++ kernels (launchers mirror internlm_kernels/triton/)";
  m.def("build_info", &build_info, "torch / CUDA versions and GPU archs this extension was built for");
  m.def("rms_norm_fwd", &rms_norm_fwd, "RMSNorm / fused add+RMSNorm forward", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("out"), py::arg("residual_out"), py::arg("rstd"), py::arg("eps"));
  m.def("rms_norm_bwd", &rms_norm_bwd, "RMSNorm / fused add+RMSNorm backward; returns fp32 dweight or None",
        py::arg("dy"), py::arg("normed"), py::arg("dresidual_out"), py::arg("weight"), py::arg("rstd"), py::arg("dx"),
        py::arg("dresidual"), py::arg("compute_dweight"));
  m.def("rotary", &rotary, "rotary embedding of q and k (one launch)", py::arg("q"), py::arg("k"), py::arg("q_out"),
        py::arg("k_out"), py::arg("cos"), py::arg("sin"), py::arg("position_ids"), py::arg("seqlen_offsets"),
        py::arg("seqlen_offset"), py::arg("cu_seqlens"), py::arg("interleaved"), py::arg("conjugate"),
        py::arg("inplace"));
  m.def("attention_fwd", &attention_fwd, "fused attention forward (writes out and lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("softmax_scale"), py::arg("causal"), py::arg("window_size"));
  m.def("attention_bwd", &attention_bwd,
        "fused attention backward (writes dq, dk, dv; dQ by a second kernel, or by fp32 atomics when INTERNLM_KERNELS_CUDA_BWD_ATOMIC_DQ=1 and not deterministic)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("softmax_scale"), py::arg("causal"),
        py::arg("window_size"), py::arg("deterministic"));
  m.def("kvcache_append", &kvcache_append,
        "write new K (rotated when tables are given) and V entries into the caches at cache_seqlens", py::arg("k"),
        py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("rotary_cos"),
        py::arg("rotary_sin"), py::arg("rotary_interleaved"), py::arg("block_table") = py::none(),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("attention_decode", &attention_decode, "split-KV attention over a KV cache (q rotated as it loads)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("out"), py::arg("cache_seqlens"),
        py::arg("new_tokens"), py::arg("softmax_scale"), py::arg("causal"), py::arg("window_size"),
        py::arg("rotary_cos"), py::arg("rotary_sin"), py::arg("rotary_interleaved"), py::arg("block_table") = py::none(),
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
#ifdef IK_CUDA_EMULATION
  m.def("emulated_launches", &emulation::launched_kernels,
        "(library file, kernel symbol, largest block) of every kernel the emulation has launched in this process");
#endif
}
