// The Python module diffsampler._C and the torch.library schema of every op. The CPU kernels register here;
// the CUDA kernels register from multistep_update_cuda.cpp (built into this module, or JIT-compiled).
#include <torch/extension.h>

#include "multistep_update.h"

namespace diffsampler {
at::Tensor multistep_update_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                const c10::optional<at::Tensor>& history, int64_t write_slot,
                                at::IntArrayRef read_slots, at::ArrayRef<double> coeffs,
                                const c10::optional<at::Tensor>& noise, double clip, bool thresholding,
                                const c10::optional<at::Tensor>& state, const c10::optional<at::Tensor>& dirs,
                                int64_t dir_slot, at::ArrayRef<double> dir_coeffs,
                                const c10::optional<at::Tensor>& dir_weights, const c10::optional<at::Tensor>& guide);
at::Tensor multistep_update_indexed_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                        const c10::optional<at::Tensor>& history, const at::Tensor& table,
                                        const at::Tensor& slots, const at::Tensor& step, int64_t n_reads,
                                        const c10::optional<at::Tensor>& noise, double clip,
                                        const c10::optional<at::Tensor>& state,
                                        const c10::optional<at::Tensor>& status,
                                        const c10::optional<at::Tensor>& guide);
at::Tensor lml_gram_cpu(const at::Tensor& x, const at::Tensor& model_out, const c10::optional<at::Tensor>& history,
                        at::IntArrayRef read_slots, at::ArrayRef<double> coeffs, double clip, const at::Tensor& dirs,
                        at::ArrayRef<double> dir_coeffs, const c10::optional<at::Tensor>& guide);
at::Tensor multistep_update_functional_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                           at::ArrayRef<double> coeffs, const c10::optional<at::Tensor>& noise,
                                           double clip, bool thresholding,
                                           const c10::optional<at::Tensor>& guide);
}

TORCH_LIBRARY(diffsampler, m) {
  m.def(diffsampler::kMultistepUpdateSchema);
  m.def(diffsampler::kMultistepUpdateFunctionalSchema);
  m.def(diffsampler::kLmlGramSchema);
  m.def(diffsampler::kMultistepUpdateIndexedSchema);
}

TORCH_LIBRARY_IMPL(diffsampler, CPU, m) {
  m.impl("multistep_update", &diffsampler::multistep_update_cpu);
  m.impl("multistep_update_functional", &diffsampler::multistep_update_functional_cpu);
  m.impl("lml_gram", &diffsampler::lml_gram_cpu);
  m.impl("multistep_update_indexed", &diffsampler::multistep_update_indexed_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "diffsampler C++ kernels (ops are registered under torch.ops.diffsampler)";
  m.def("built_with_cuda", [] {
#ifdef DIFFSAMPLER_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.attr("MAX_HISTORY_READS") = DS_MAX_READS;
  m.attr("MAX_DIRECTIONS") = DS_MAX_DIRS;
  m.attr("ERROR_BITS") = pybind11::dict(pybind11::arg("step") = DS_ERR_STEP, pybind11::arg("slot") = DS_ERR_SLOT,
                                        pybind11::arg("ancestor") = DS_ERR_ANCESTOR,
                                        pybind11::arg("uniform") = DS_ERR_UNIFORM);
  // The step row's offsets (update_params.h), checked against python/diffsampler/step_row.py by the tests.
  pybind11::dict row;
  const std::pair<const char*, int> fields[] = {
      {"P", DS_ROW_P}, {"Q", DS_ROW_Q}, {"A", DS_ROW_A}, {"E", DS_ROW_E}, {"C", DS_ROW_C}, {"B", DS_ROW_B},
      {"R", DS_ROW_R}, {"G", DS_ROW_G}, {"SA", DS_ROW_SA}, {"SE", DS_ROW_SE}, {"SC", DS_ROW_SC},
      {"SG", DS_ROW_SG}, {"SB", DS_ROW_SB}, {"WRITES_STATE", DS_ROW_WRITES_STATE},
      {"THR_RATIO", DS_ROW_THR_RATIO}, {"THR_MAX", DS_ROW_THR_MAX}, {"THR_HX", DS_ROW_THR_HX},
      {"THR_HM", DS_ROW_THR_HM}, {"GUIDE", DS_ROW_GUIDE}, {"WIDTH", DS_ROW_WIDTH}};
  for (const auto& [name, offset] : fields) row[name] = offset;
  m.attr("ROW_LAYOUT") = row;
  m.attr("SLOTS_WIDTH") = DS_SLOTS_WIDTH;
}
