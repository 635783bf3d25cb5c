// fastpeft._C.HeldCall: a layer's inference call on its op plan, in one C++ call: the test that the
// layer still holds what the plan was made from, the tests of x, the reshape of a [..., K] x, and
// the kernel.
//
// Written in Python (source per layer), the same call cost SmolLM2-135M's NF4 greedy generation
// 1.5 ms of each token's 23 (210 layer calls, one thread, AMD EPYC Zen 4 capped at AVX2): each
// layer's Python objects are cold by the time the next token comes back to it. What a call reads
// is given by the Python side as data (terms, conditions); this file knows nothing of layers, ops
// or backends. The Python side (fastpeft/nn/op_plans.py) reads the same terms itself where the
// extension is not built.
//
// Read-ahead: a decode step calls its layers in the same order every token, and each layer's
// objects (its dicts, its tensors' TensorImpls and first bytes) have left the caches since the last
// token (the weights stream through them). So each call prefetches what the layer called after it
// last time reads (addresses only, taken while that layer's objects were alive; a prefetch of a
// stale address is harmless), and the misses overlap its own kernel. SmolLM2-135M NF4 greedy
// generation, AMD EPYC Zen 4 capped at AVX2, one thread, 32 tokens, read-ahead on and off in
// alternating rounds in one process (16 each, two runs): medians 21.68 -> 21.32 and 21.53 -> 21.01
// ms a token, minima 21.03 -> 20.35 and 20.87 -> 20.37. Which reads are taken and how many data
// bytes (1, 2 or 4 KiB) moved it by less than the rounds' spread. The same prefetches are issued
// again once the kernel has run: its weight stream (up to 0.44 MB a layer there) evicts part of
// what was prefetched before it, and the second round overlaps what runs between the calls. Same
// model and machine, 16 tokens, 60-80 alternating rounds, medians of the rounds' differences from
// before-and-after: before only +0.16 and +0.18 ms a token (two runs), after only +0.13, none
// +0.64. Prefetching the tensors' version counters as well: +0.02 and -0.02 (not done).
#include "held_call.h"

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <typeinfo>
#include <vector>

namespace fastpeft {
namespace {

namespace py = pybind11;

// How a term reads its object from its source (the layer, or an object an earlier term checked).
enum class Read : int {
  kTable = 0,      // source.__dict__[table].get(key): a module's parameter, buffer or submodule
  kInstance = 1,   // source.__dict__[key]: a module's plain attribute (missing: the test fails)
  kNowhere = 2,    // key in none of source's _parameters, _buffers, _modules, __dict__
  kAttribute = 3,  // getattr(source, key): a class attribute or a property
  kItem = 4,       // source.get(key): a dict's entry
};

// How a term or condition compares what it read with what the plan was made with.
enum class Compare : int {
  kIdentity = 0,  // the same object
  kVersion = 1,   // the same tensor, at the same version (in-place writes bump it)
  kEqual = 2,     // the same object or an equal value
  kMissing = 3,   // (conditions only) key not in the dict
};

struct Term {
  int source;  // -1: the layer, else the index of the term whose (expected) object is read from
  Read read;
  py::object table, key, expected;
  Compare compare;
  int64_t version;
};

// A condition on a plain dict (a module's globals, an object's __dict__) under which the plan's
// kernel may be called directly.
struct Condition {
  py::dict dict;
  py::object key, expected;
  Compare compare;
};

// torch._C._is_any_autocast_enabled, looked up once as the module loads (the device types it asks
// about are torch's to list)
PyObject* any_autocast_enabled = nullptr;

bool any_autocast() {
  PyObject* on = PyObject_CallNoArgs(any_autocast_enabled);
  if (on == nullptr) throw py::error_already_set();
  Py_DECREF(on);
  return on == Py_True;
}

// The instance dict of `object` (a new reference); throws where it has none.
py::object instance_dict(PyObject* object) {
  PyObject* dict = PyObject_GenericGetDict(object, nullptr);
  if (dict == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(dict);
}

// dict[key] as a borrowed reference, null when absent (or `dict` is not a dict).
PyObject* dict_get(PyObject* dict, PyObject* key) {
  if (dict == nullptr || !PyDict_Check(dict)) return nullptr;
  PyObject* value = PyDict_GetItemWithError(dict, key);
  if (value == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

// Whether `value` is `expected` or equals it (the same object counts as equal even where == says
// otherwise, a nan: it has not changed).
bool same_or_equal(const py::object& value, const py::object& expected) {
  if (value.ptr() == expected.ptr()) return true;
  const int equal = PyObject_RichCompareBool(value.ptr(), expected.ptr(), Py_EQ);
  if (equal < 0) throw py::error_already_set();
  return equal == 1;
}

// Memory a call reads, as plain addresses (never dereferenced): what the call before it prefetches.
struct Span {
  uintptr_t address;
  int64_t bytes;
  bool operator==(const Span& other) const { return address == other.address && bytes == other.bytes; }
};

// Of each tensor's data, the first bytes: the hardware prefetcher takes the stream from there
// (separate processes, fewer rounds: 0-8 KiB within the spread of each other, 32 KiB slower than none).
constexpr int64_t kDataBytesAhead = 2048;

// The spans of an object a call reads: its header; a dict's key and value tables; a tensor's
// TensorImpl, StorageImpl and the first bytes of its data (in CPU memory).
void add_spans_of(PyObject* object, std::vector<Span>& spans) {
  auto add = [&](const void* address, int64_t bytes) {
    const Span span{reinterpret_cast<uintptr_t>(address), bytes};
    if (address != nullptr && bytes > 0 && std::find(spans.begin(), spans.end(), span) == spans.end())
      spans.push_back(span);
  };
  if (object == nullptr) return;
  add(object, 64);
  if (PyDict_Check(object)) {
    const auto* dict = reinterpret_cast<const PyDictObject*>(object);
    add(dict->ma_keys, 256);
    add(dict->ma_values, 128);
  } else if (THPVariable_Check(object)) {
    const at::Tensor& tensor = THPVariable_Unpack(object);
    add(tensor.unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
    if (tensor.has_storage()) {
      add(tensor.storage().unsafeGetStorageImpl(), sizeof(c10::StorageImpl));
      if (tensor.is_cpu() && tensor.numel() > 0)
        add(tensor.const_data_ptr(), std::min<int64_t>(tensor.nbytes(), kDataBytesAhead));
    }
  }
}

// Prefetching never faults (GCC and Clang's __builtin_prefetch on x86 and AArch64), so a span of
// an object freed since it was recorded costs a wasted prefetch and nothing else.
void prefetch(const std::vector<Span>& spans) {
  for (const Span& span : spans)
    for (int64_t at = 0; at < span.bytes; at += 64) __builtin_prefetch(reinterpret_cast<const char*>(span.address + at));
}

class HeldCall;
// The HeldCall that ran last, and the count of HeldCalls made (each one's serial number): read and
// written with the GIL held. Free-threaded Python has no GIL to guard them: read-ahead is off there.
HeldCall* last_called = nullptr;
uint64_t held_calls_made = 0;
#ifdef Py_GIL_DISABLED
constexpr bool kReadAhead = false;
#else
constexpr bool kReadAhead = true;
#endif

class HeldCall {
 public:
  HeldCall(const py::list& terms, const py::list& conditions, py::object kernel, py::tuple rest, py::object runner,
           py::object dtype, py::object device, int64_t in_features, int64_t out_features, int64_t output,
           py::tuple read_keys)
      : serial_(++held_calls_made),
        read_keys_(std::move(read_keys)),
        bound_(py::isinstance<BoundKernel>(kernel) ? kernel.cast<std::shared_ptr<BoundKernel>>() : nullptr),
        kernel_(std::move(kernel)),
        rest_(std::move(rest)),
        runner_(std::move(runner)),
        dtype_(py::cast<at::ScalarType>(dtype)),
        device_(py::cast<at::Device>(device)),
        in_features_(in_features),
        out_features_(out_features),
        output_(output) {
    for (const auto& item : terms) {
      const auto t = item.cast<py::tuple>();
      terms_.push_back(Term{t[0].cast<int>(), static_cast<Read>(t[1].cast<int>()), t[2], t[3], t[4],
                            static_cast<Compare>(t[5].cast<int>()), t[6].cast<int64_t>()});
    }
    for (const auto& item : conditions) {
      const auto c = item.cast<py::tuple>();
      const auto compare = static_cast<Compare>(c[3].cast<int>());
      if (compare != Compare::kIdentity && compare != Compare::kEqual && compare != Compare::kMissing)
        throw py::value_error("a held call's condition compares by identity, equality or a missing key");
      conditions_.push_back(Condition{c[0].cast<py::dict>(), c[1], c[2], compare});
    }
  }

  ~HeldCall() {
    if (last_called == this) last_called = nullptr;
  }
  HeldCall(const HeldCall&) = delete;  // one object per serial number, as last_called knows it
  HeldCall& operator=(const HeldCall&) = delete;

  uint64_t serial() const { return serial_; }
  static py::object last_called_serial() {
    return last_called == nullptr ? py::none() : py::object(py::int_(last_called->serial_));
  }

  // Whether `layer` holds what the plan was made from: every term, in order.
  bool holds(py::handle layer) const {
    if (cleared_) return false;
    // a source's instance dict fetched once for its terms in a row
    PyObject* dict_of = nullptr;
    py::object dict;
    for (const Term& term : terms_) {
      PyObject* source = source_of(term, layer);
      if (reads_instance_dict(term.read) && source != dict_of) {
        dict = instance_dict(source);
        dict_of = source;
      }
      if (!term_holds(term, source, dict.ptr())) return false;
    }
    return true;
  }

  // The layer's output for x on the plan, or None where the plan does not take the call (the
  // layer then takes its own path): another x than the plan's (not a plain Tensor, another dtype
  // or device, a [..., features] x of other features, one that needs a gradient), a dispatch mode
  // or autocast on, or a layer that no longer holds what the plan was made from. torch.compile is
  // the caller's to rule out (it cannot trace this call).
  py::object call(py::handle layer, py::handle x) {
    read_ahead(layer);
    py::object y = call_on_plan(layer, x);
    if (kReadAhead) prefetch(ahead_);  // again: see the top of the file
    return y;
  }

  // call() without the read-ahead
  py::object call_on_plan(py::handle layer, py::handle x) {
    PyObject* xo = x.ptr();
    if (Py_TYPE(xo) != reinterpret_cast<PyTypeObject*>(THPVariableClass) || !holds(layer) || any_autocast())
      return py::none();
    const at::Tensor& t = THPVariable_Unpack(xo);
    if (t.dim() != 2 && (t.dim() == 0 || t.size(-1) != in_features_)) return py::none();
    // x2 a view made here for the bound kernel where x is a plain contiguous tensor (rows_of)
    const bool rows_view = bound_ && t.dim() != 2 && in_features_ > 0 && t.is_contiguous() && plain(t);
    const at::Tensor x2 = t.dim() == 2 ? t : rows_view ? rows_of(t) : t.reshape({-1, in_features_});
    const bool direct_call = !kernel_.is_none() && fits(x2, t) && direct();
    if (direct_call && bound_) {
      std::vector<at::Tensor> outs = bound_->run(x2, rest_.ptr());
      at::Tensor y = std::move(outs.at(output_ < 0 ? 0 : output_));
      if (t.dim() != 2) y = shaped_as_output(std::move(y), t);
      return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y)));
    }
    // x as a Python object for a Python callee, its rows as a view autograd knows of
    const py::object x2_object =
        t.dim() == 2 ? py::reinterpret_borrow<py::object>(x)
                     : py::reinterpret_steal<py::object>(THPVariable_Wrap(rows_view ? t.reshape({-1, in_features_}) : x2));
    py::object out;
    if (direct_call) {
      out = call_kernel(x2_object);
    } else {
      out = runner_(x2_object);  // the plan's own test of x and its face (a forced one, a Triton one...)
      if (out.is_none()) return py::none();
    }
    py::object y = output_ < 0 ? out : py::reinterpret_steal<py::object>(PySequence_GetItem(out.ptr(), output_));
    if (!y) throw py::error_already_set();
    if (!THPVariable_Check(y.ptr()))
      throw py::type_error("a held call's kernel returned something other than a tensor");
    if (t.dim() == 2) return y;
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(THPVariable_Unpack(y.ptr()).reshape(output_shape(t))));
  }

  // The kernel the call runs directly: a BoundKernel, or a Python callable, or None.
  py::object kernel() const { return kernel_; }

  // (address, bytes) of what a call reads (`reads`), and of what it prefetches (`reads_ahead`:
  // the reads of the HeldCall that ran after it last), for the tests.
  static py::list spans_list(const std::vector<Span>& spans) {
    py::list out;
    for (const Span& span : spans) out.append(py::make_tuple(span.address, span.bytes));
    return out;
  }
  py::list reads() const { return spans_list(reads_); }
  py::list reads_ahead() const { return spans_list(ahead_); }

  // Python's garbage collector: every object held, so that a cycle through a layer's plan (a hook
  // on a checked submodule that refers back to the layer) is collected.
  int traverse(visitproc visit, void* arg) const {
    for (const Term& term : terms_)
      for (const py::object* o : {&term.table, &term.key, &term.expected}) Py_VISIT(o->ptr());
    for (const Condition& c : conditions_)
      for (const py::object* o : {static_cast<const py::object*>(&c.dict), &c.key, &c.expected}) Py_VISIT(o->ptr());
    for (const py::object* o : {&kernel_, static_cast<const py::object*>(&rest_), &runner_,
                                static_cast<const py::object*>(&read_keys_)})
      Py_VISIT(o->ptr());
    return 0;
  }

  // Drops every object held (the collector breaking a cycle); the call then never takes a plan.
  void clear() {
    cleared_ = true;
    reads_.clear();
    ahead_.clear();
    terms_.clear();
    conditions_.clear();
    bound_.reset();
    kernel_ = py::none();
    rest_ = py::tuple();
    read_keys_ = py::tuple();
    runner_ = py::none();
  }

 private:
  // The object a term reads from: the layer, or the object an earlier term checked.
  PyObject* source_of(const Term& term, py::handle layer) const {
    return term.source < 0 ? layer.ptr() : terms_[term.source].expected.ptr();
  }

  // Whether a term's read goes through its source's instance dict (all but a getattr and a dict's get).
  static bool reads_instance_dict(Read read) { return read != Read::kAttribute && read != Read::kItem; }

  // Whether x is a TensorImpl itself (not a wrapper: functionalization, functorch, sparse...) with
  // no negation or conjugation pending, so a TensorImpl on its storage reads what x holds.
  static bool plain(const at::Tensor& x) {
    return typeid(*x.unsafeGetTensorImpl()) == typeid(c10::TensorImpl) && !x.is_neg() && !x.is_conj();
  }

  // The rows of a contiguous plain x, [M, in_features], as a TensorImpl on x's storage made here:
  // through the dispatcher (reshape), this and the output's reshape cost 0.75 us of a 64 x 64 NF4
  // layer's 3.35 us held call of a [1, 1, 64] x (AMD EPYC Zen 4 capped at AVX2, one thread), and a
  // decode step makes a call per layer. For the kernel alone: autograd does not know it as x's view
  // (fits() reads requires_grad from x), and it shares no version counter with x.
  at::Tensor rows_of(const at::Tensor& x) const {
    at::Tensor rows = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(x.storage()),
                                                                x.key_set(), x.dtype());
    const int64_t sizes[2] = {x.numel() / in_features_, in_features_}, strides[2] = {in_features_, 1};
    rows.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides, x.storage_offset());
    return rows;
  }

  // The kernel's [M, out_features] y as [..., out_features]: its own sizes changed where nothing
  // else holds it (a new output), else a reshape (which also refuses a y of another size).
  at::Tensor shaped_as_output(at::Tensor y, const at::Tensor& x) const {
    c10::TensorImpl* impl = y.unsafeGetTensorImpl();
    const bool rows_of_x = y.dim() == 2 && y.size(1) == out_features_ && y.size(0) * in_features_ == x.numel();
    if (rows_of_x && y.use_count() == 1 && y.is_contiguous() && impl->allow_tensor_metadata_change()) {
      impl->set_sizes_contiguous(output_shape(x));
      return y;
    }
    return y.reshape(output_shape(x));
  }

  // [..., out_features] for an x of [..., in_features]
  std::vector<int64_t> output_shape(const at::Tensor& x) const {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(out_features_);
    return shape;
  }

  // dict: source's instance dict (for the reads of a module's entries)
  bool term_holds(const Term& term, PyObject* source, PyObject* dict) const {
    py::object value;
    switch (term.read) {
      case Read::kTable: {
        PyObject* found = dict_get(dict_get(dict, term.table.ptr()), term.key.ptr());
        value = py::reinterpret_borrow<py::object>(found ? found : Py_None);
        break;
      }
      case Read::kInstance: {
        PyObject* found = dict_get(dict, term.key.ptr());
        if (found == nullptr) return false;
        value = py::reinterpret_borrow<py::object>(found);
        break;
      }
      case Read::kNowhere:
        if (dict_get(dict, term.key.ptr()) != nullptr) return false;
        for (const char* name : {"_parameters", "_buffers", "_modules"})
          if (dict_get(PyDict_GetItemString(dict, name), term.key.ptr()) != nullptr) return false;
        return true;
      case Read::kAttribute:
        value = py::reinterpret_steal<py::object>(PyObject_GetAttr(source, term.key.ptr()));
        if (!value) throw py::error_already_set();
        break;
      case Read::kItem:
        if (PyDict_CheckExact(source)) {
          PyObject* found = dict_get(source, term.key.ptr());
          value = py::reinterpret_borrow<py::object>(found ? found : Py_None);
        } else {  // a dict subclass: its own get()
          value = py::reinterpret_borrow<py::object>(source).attr("get")(term.key);
        }
        break;
    }
    switch (term.compare) {
      case Compare::kIdentity: return value.ptr() == term.expected.ptr();
      case Compare::kVersion: {
        if (value.ptr() != term.expected.ptr()) return false;
        // the counter Tensor::_version() reads, without its call through the autograd hooks
        const c10::TensorImpl* impl = THPVariable_Unpack(value.ptr()).unsafeGetTensorImpl();
        return impl->version_counter().current_version() == term.version;
      }
      case Compare::kEqual: return same_or_equal(value, term.expected);
      default: return false;
    }
  }

  // Whether x's rows x2 run on the plan's kernel as they are: what the plan checked x with
  // (Plan.fits); requires_grad read from x itself.
  bool fits(const at::Tensor& x2, const at::Tensor& x) const {
    if (x2.scalar_type() != dtype_ || !x2.is_contiguous() || x2.device() != device_ || x2.size(1) != in_features_ ||
        x2.is_neg() || x2.is_conj())  // a kernel reads the stored values; the dispatcher resolves these first
      return false;
    if (at::GradMode::is_enabled()) {
      if (x.requires_grad()) return false;
      for (const auto& arg : rest_)  // read now: requires_grad_() changes no version
        if (THPVariable_Check(arg.ptr()) && THPVariable_Unpack(arg.ptr()).requires_grad()) return false;
    }
    return c10::impl::TorchDispatchModeTLS::stack_len() == 0;
  }

  // Whether the kernel may be called directly now (no forced backend, no recording of faces...).
  bool direct() const {
    for (const Condition& c : conditions_) {
      PyObject* found = dict_get(c.dict.ptr(), c.key.ptr());
      if (c.compare == Compare::kMissing) {
        if (found != nullptr) return false;
        continue;
      }
      const py::object value = py::reinterpret_borrow<py::object>(found ? found : Py_None);
      if (c.compare == Compare::kIdentity ? value.ptr() != c.expected.ptr() : !same_or_equal(value, c.expected))
        return false;
    }
    return true;
  }

  // kernel(x, *rest), as a vectorcall of the arguments in place
  py::object call_kernel(const py::object& x) const {
    constexpr size_t kMaxArgs = 32;
    PyObject* args[kMaxArgs + 1];
    const size_t n = 1 + rest_.size();
    if (n > kMaxArgs) return kernel_(x, *rest_);
    args[1] = x.ptr();
    for (size_t i = 1; i < n; ++i) args[i + 1] = PyTuple_GET_ITEM(rest_.ptr(), i - 1);
    PyObject* out = PyObject_Vectorcall(kernel_.ptr(), args + 1, n | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
    if (out == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(out);
  }

  // What the next call reads, prefetched; this call's reads handed to the call before it. The
  // layer's reads are taken at its first call (its instance dict as it is once it holds its plan)
  // and kept for the HeldCall's life: what changes after (a dict grown, tensors swapped) is
  // prefetched from where it was, a wasted prefetch. Nothing read here may fail the call: an
  // object whose spans cannot be read (a tensor subclass without storage) ends the list there.
  void read_ahead(py::handle layer) {
    if (!kReadAhead || cleared_) return;
    if (!reads_known_) {
      reads_known_ = true;
      try {
        collect_reads(layer);
      } catch (const py::error_already_set&) {
        PyErr_Clear();
      } catch (const std::exception&) {
      }
    }
    if (last_called != nullptr && last_called != this && last_called->ahead_serial_ != serial_) {
      last_called->ahead_ = reads_;
      last_called->ahead_serial_ = serial_;
    }
    last_called = this;
    prefetch(ahead_);
  }

  // The spans of what a call of `layer` reads, in the order it reads them.
  void collect_reads(py::handle layer) {
    add_spans_of(layer.ptr(), reads_);
    const py::object dict = instance_dict(layer.ptr());
    add_spans_of(dict.ptr(), reads_);
    for (const auto& key : read_keys_) add_spans_of(dict_get(dict.ptr(), key.ptr()), reads_);
    for (const Term& term : terms_) {  // what holds() reads: each source's dicts, then the value
      PyObject* source = source_of(term, layer);
      if (reads_instance_dict(term.read)) {
        const py::object source_dict = instance_dict(source);
        add_spans_of(source_dict.ptr(), reads_);
        if (term.read == Read::kTable) add_spans_of(dict_get(source_dict.ptr(), term.table.ptr()), reads_);
      }
      add_spans_of(term.expected.ptr(), reads_);
    }
    for (const auto& arg : rest_) add_spans_of(arg.ptr(), reads_);
    for (const Span& span : {Span{reinterpret_cast<uintptr_t>(this), sizeof(HeldCall)},
                             Span{reinterpret_cast<uintptr_t>(terms_.data()), int64_t(terms_.size() * sizeof(Term))},
                             Span{reinterpret_cast<uintptr_t>(bound_.get()), bound_ ? 64 : 0}})
      if (span.address != 0 && span.bytes > 0) reads_.push_back(span);
  }

  uint64_t serial_;
  py::tuple read_keys_;
  std::vector<Span> reads_, ahead_;
  uint64_t ahead_serial_ = 0;  // the serial number of the HeldCall whose reads ahead_ holds
  bool reads_known_ = false;
  std::vector<Term> terms_;
  std::vector<Condition> conditions_;
  std::shared_ptr<BoundKernel> bound_;
  py::object kernel_;
  py::tuple rest_;
  py::object runner_;
  at::ScalarType dtype_;
  at::Device device_;
  int64_t in_features_, out_features_, output_;
  bool cleared_ = false;
};

// The HeldCall of a Python object of its class, or null before its __init__ has run.
HeldCall* held_call_of(PyObject* self) {
  auto* instance = reinterpret_cast<py::detail::instance*>(self);
  if (!instance->get_value_and_holder().holder_constructed()) return nullptr;
  return &py::cast<HeldCall&>(py::handle(self));
}

}  // namespace

void def_held_call(py::module_& m) {
  any_autocast_enabled = py::module_::import("torch._C").attr("_is_any_autocast_enabled").ptr();
  Py_INCREF(any_autocast_enabled);  // kept for the process's life
  py::class_<BoundKernel, std::shared_ptr<BoundKernel>>(
      m, "BoundKernel", "A CPU kernel with its arguments after x bound, for a HeldCall to run")
      .def_readonly("runs", &BoundKernel::runs, "How many times it ran");
  py::class_<HeldCall>(
      m, "HeldCall", "A layer's inference call on its op plan (fastpeft.nn.op_plans builds it)",
      py::custom_type_setup([](PyHeapTypeObject* heap_type) {
        PyTypeObject* type = &heap_type->ht_type;
        type->tp_flags |= Py_TPFLAGS_HAVE_GC;
        type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) {
          Py_VISIT(Py_TYPE(self));  // a heap type's instances hold their type
          const HeldCall* held = held_call_of(self);
          return held == nullptr ? 0 : held->traverse(visit, arg);
        };
        type->tp_clear = [](PyObject* self) {
          if (HeldCall* held = held_call_of(self)) held->clear();
          return 0;
        };
      }))
      .def(py::init<const py::list&, const py::list&, py::object, py::tuple, py::object, py::object, py::object,
                    int64_t, int64_t, int64_t, py::tuple>(),
           py::arg("terms"), py::arg("conditions"), py::arg("kernel"), py::arg("rest"), py::arg("runner"),
           py::arg("dtype"), py::arg("device"), py::arg("in_features"), py::arg("out_features"), py::arg("output"),
           py::arg("read_keys"))
      .def("holds", &HeldCall::holds, py::arg("layer"))
      .def("call", &HeldCall::call, py::arg("layer"), py::arg("x"))
      .def_property_readonly("kernel", &HeldCall::kernel)
      .def_property_readonly("reads", &HeldCall::reads)
      .def_property_readonly("reads_ahead", &HeldCall::reads_ahead)
      .def_property_readonly("serial", &HeldCall::serial)
      .def_static("last_called_serial", &HeldCall::last_called_serial,
                  "The serial number of the HeldCall that ran last, or None (none, or it is gone)")
      .def_property_readonly_static("READS", [](py::object) {  // the numbers the Python side writes terms with
        return py::dict(py::arg("TABLE") = static_cast<int>(Read::kTable),
                        py::arg("INSTANCE") = static_cast<int>(Read::kInstance),
                        py::arg("NOWHERE") = static_cast<int>(Read::kNowhere),
                        py::arg("ATTRIBUTE") = static_cast<int>(Read::kAttribute),
                        py::arg("ITEM") = static_cast<int>(Read::kItem));
      })
      .def_property_readonly_static("COMPARES", [](py::object) {
        return py::dict(py::arg("IDENTITY") = static_cast<int>(Compare::kIdentity),
                        py::arg("VERSION") = static_cast<int>(Compare::kVersion),
                        py::arg("EQUAL") = static_cast<int>(Compare::kEqual),
                        py::arg("MISSING") = static_cast<int>(Compare::kMissing));
      });
}

}  // namespace fastpeft
