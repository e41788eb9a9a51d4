// Completion times of posted c10d receives, read by a native thread.
//
// A posted push/pull's reply arrives while the training thread computes
// (torchrec_esd/ps/client.py, ReplyClock).  A Python thread that waits for it
// reads the clock only once it holds the GIL again, which can be milliseconds
// after the receive completed; a short reply then reads as near-instant.  This
// waiter is a std::thread that never takes the GIL: it waits for each receive
// in turn (c10d::Work::wait with the transport's timeout) and reads
// CLOCK_MONOTONIC (the clock of Python's time.monotonic / time.perf_counter on
// Linux) right after the last of the `markers` and after the last of the
// `replies`.  join() releases the GIL while it waits for the thread.
//
// Not an operator (it holds c10d Work objects, not tensors): a pybind11 class
// added to the torchrec_esd._C module by register_reply_clock.
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/extension.h>

#include <time.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

double monotonic_s() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

using WorkPtr = c10::intrusive_ptr<c10d::Work>;

struct ClockState {
  std::vector<WorkPtr> works;  // markers first, then replies
  size_t num_markers = 0;
  std::chrono::milliseconds timeout{0};
  double first = 0.0;  // after the last marker (or the start, without markers)
  double end = 0.0;    // after the last reply
  int64_t failed = -1; // index into works of the wait that failed
  std::string error;
};

void run(const std::shared_ptr<ClockState>& s) {
  s->first = monotonic_s();
  for (size_t i = 0; i < s->works.size(); ++i) {
    try {
      if (!s->works[i]->wait(s->timeout)) {
        s->failed = static_cast<int64_t>(i);
        s->error = "the wait timed out";
        return;
      }
    } catch (const std::exception& e) {
      s->failed = static_cast<int64_t>(i);
      s->error = e.what();
      return;
    } catch (...) {
      s->failed = static_cast<int64_t>(i);
      s->error = "unknown error";
      return;
    }
    const double now = monotonic_s();
    if (i + 1 == s->num_markers) s->first = now;
    if (i + 1 == s->works.size()) s->end = now;
  }
}

class NativeReplyClock {
 public:
  NativeReplyClock(std::vector<WorkPtr> markers, const std::vector<WorkPtr>& replies, double timeout_s)
      : state_(std::make_shared<ClockState>()) {
    if (!(timeout_s > 0.0)) throw std::invalid_argument("timeout_s must be positive");
    state_->num_markers = markers.size();
    state_->works = std::move(markers);
    state_->works.insert(state_->works.end(), replies.begin(), replies.end());
    state_->timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1e3));
    auto s = state_;
    thread_ = std::thread([s]() { run(s); });
  }

  ~NativeReplyClock() {
    // every wait of the thread is bounded; a clock dropped unjoined lets it end on its own
    if (thread_.joinable()) thread_.detach();
  }

  // (first, end, failed index or -1, error message), once the thread ended
  std::tuple<double, double, int64_t, std::string> join() {
    if (thread_.joinable()) {
      py::gil_scoped_release no_gil;
      thread_.join();
    }
    return {state_->first, state_->end, state_->failed, state_->error};
  }

 private:
  std::shared_ptr<ClockState> state_;
  std::thread thread_;
};

}  // namespace

void register_reply_clock(PyObject* module) {
  py::module_ m = py::reinterpret_borrow<py::module_>(module);
  py::class_<NativeReplyClock>(m, "NativeReplyClock")
      .def(py::init<std::vector<WorkPtr>, const std::vector<WorkPtr>&, double>(), py::arg("markers"),
           py::arg("replies"), py::arg("timeout_s"))
      .def("join", &NativeReplyClock::join);
}
