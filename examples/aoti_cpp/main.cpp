// Runs an AOTInductor package (.pt2) that may call torch.ops.leet.decay_attn.
//
//   aoti_runner MODEL.pt2 OPLIB.so INPUTS.pt OUTPUTS.pt
//
// OPLIB.so: the operator library, printed by
//   python -c "import leet_compile; print(leet_compile.library_path())"
// or "-" to load none (fine for packages that contain all their kernels; otherwise
// the runner says what to load).
// INPUTS.pt: a list of tensors written with Python's torch.save.
// OUTPUTS.pt: receives the tuple of outputs, as CPU tensors (read it with torch.load).
#include <dlfcn.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr const char* kHowToLoad =
    "pass the leet_compile operator library as OPLIB.so; its path is printed by\n"
    "  python -c \"import leet_compile; print(leet_compile.library_path())\"";

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<char>& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 OPLIB.so|- INPUTS.pt OUTPUTS.pt\n";
    return 2;
  }
  const std::string package = argv[1], oplib = argv[2], inputs_path = argv[3], outputs_path = argv[4];

  // Loading the library runs its TORCH_LIBRARY(leet, ...) registrations: the schema
  // and the CPU kernels that the package's proxy executor calls by name.
  if (oplib != "-" && dlopen(oplib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::cerr << "error: cannot load the operator library " << oplib << ": " << dlerror() << "\n";
    return 1;
  }
  try {
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
    try {
      loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package);
    } catch (const c10::Error& e) {
      // Loading fails with "Could not find schema for leet::decay_attn" when the package
      // calls the operator (CPU packages do; GPU packages built on the Triton path
      // contain the kernels) and the library is not loaded. Say where it comes from.
      const std::string what = e.what_without_backtrace();
      if (what.find("Could not find schema for leet::") == std::string::npos) throw;
      std::cerr << "error: " << what << "\n"
                << "the package calls a leet operator that is not registered; " << kHowToLoad << "\n";
      return 1;
    }
    // Inputs arrive on the CPU; move them to the device the package was compiled for.
    const std::string device = loader->get_metadata()["AOTI_DEVICE_KEY"];
    auto inputs = torch::jit::pickle_load(read_file(inputs_path)).toList();
    std::vector<at::Tensor> args;
    const c10::Device target(device.empty() ? "cpu" : device);
    for (const auto& x : inputs) args.push_back(x.get().toTensor().to(target));

    std::vector<at::Tensor> outputs = loader->run(args);

    // A tuple of CPU tensors: a plain Python tuple for torch.load (weights_only is fine).
    std::vector<c10::IValue> result;
    for (const auto& t : outputs) result.emplace_back(t.cpu());
    write_file(outputs_path, torch::jit::pickle_save(c10::ivalue::Tuple::create(std::move(result))));
    std::cout << "ran " << package << ": " << outputs.size() << " output(s), first of shape "
              << outputs.at(0).sizes() << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
