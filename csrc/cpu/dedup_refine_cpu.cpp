// CPU kernel of dedup_refine: local search (swaps, group moves) on the de-duplicated
// transmission cost of one batch (torchrec_esd.cost.DedupCost; the numpy
// search torchrec_esd.dispatch.dedup_refine_reference is the reference
// the tests compare this kernel to).
//
// Cost of a row x with user set U (workers whose samples use it):
//   f_x(U) = sum_{w in U} pull[x, w] + [|U| > 1] sum_{w in U} push[x, w]
//          + [o_x >= 0 and U non-empty and U != {o_x}] owner_push[x]
// and the total is sum_x f_x(U_x).  A swap exchanges the workers of two
// samples s (on x) and t (on y), so the samples per worker never change.
//
// State, kept exact after every accepted swap: the assignment, cnt[x, w]
// (samples of w using row x), every row's user-set sums and cost, and per
// occurrence (distinct (sample, row) pair) o the change D[o, v] of its row's
// cost when its sample alone moves to v.  M[s, v] = sum over s's occurrences
// of D[o, v] is the exact change of moving s alone.  The exact change of the
// swap (s: x -> y, t: y -> x) is M[s, y] + M[t, x] minus the D-terms of the
// rows both samples use (their counts do not change), and since f is monotone
// in U (costs >= 0) those terms are <= 0: M[s, y] + M[t, x] is a lower bound
// of the swap's change, which prunes the pairs.
//
// One pass: every sample s whose best bound M[s, y] + min_t M[t, a[s]] is
// below -tol (over every other worker y) finds its best partner t on y by
// exact change (t in y's samples sorted by M[t, a[s]], scanned while the
// bound beats the best change found); the (s, y) are then taken best change
// first, each re-finding its best partner on the current state and applying
// the swap at once if it lowers the cost by more than `tol`.  A swap updates
// the counts of the rows of one sample only (the rows both use keep theirs)
// and recomputes D for the occurrences of the moved samples, of the rows
// whose user set changed, and of the rows whose "this worker's only user"
// flag changed on x or y (only their occurrences on that worker).  M is
// updated incrementally; a pass that applies no swap on freshly summed M has
// looked at every pair whose bound is below -tol: the assignment is then a
// local optimum of the swap neighbourhood.
//
// There, group moves are tried (group_pass): the g <= group_size users of a
// row on its least-using worker y move to another worker x using the row and
// g samples of x that do not use it move to y (each t of y with the best of
// the 8 best single movers x -> y by exact swap change), so y stops paying
// for the row, which no single swap achieves.  A group move is tried where
// the row's saving plus the single-move changes of the samples is below
// -tol (interactions among the moved samples are not in the estimate), kept
// when its exact change is below -tol and undone otherwise (the row is not
// tried again); after a kept one
// the swap passes resume.  Stops at a swap local optimum where no group move
// is kept, after max_rounds passes or at the deadline (checked before every
// sample and every 64 rows).
//
// Cost: O(N W) per fresh sum of M, O(B W + W^2 (B/W) log(B/W)) per pass for
// the sorted lists, and O(L) per evaluated pair (L = occurrences of the two
// samples); a swap costs O(L W) plus the occurrences of the rows it
// invalidates.  Memory O((N + B + U) W).
#include <torch/library.h>
#include <torch/types.h>

#include "../esd_checks.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

namespace torchrec_esd {

namespace {

constexpr const char* kOp = "dedup_refine";


using Clock = std::chrono::steady_clock;

class SwapSearch {
 public:
  SwapSearch(int64_t B, int64_t W, int64_t U, const at::Tensor& occ_s, const at::Tensor& occ_k,
             const double* pull, const double* push, const int64_t* owner, const double* opush,
             const int64_t* start)
      : B_(B), W_(W), U_(U), N_(occ_s.numel()), os_(occ_s.data_ptr<int64_t>()),
        ok_(occ_k.data_ptr<int64_t>()), pull_(pull), push_(push), owner_(owner), opush_(opush),
        a_(start, start + B), sptr_(B + 1, 0), kptr_(U + 1, 0), by_key_(N_), pos_key_(N_),
        bptr_(U * (W + 1)), cnt_(U * W, 0),
        nusers_(U, 0), psum_(U, 0.0), qsum_(U, 0.0), f_(U, 0.0), D_(N_ * W, 0.0), M_(B * W, 0.0),
        mark_s_(U, -1), mark_t_(U, -1), pos_s_(U, -1), occ_epoch_(N_, -1), row_(W), pmin_(W * W), lists_(W * W) {
    // sample_ptr (occ_s is sorted), rows' occurrences (counting sort by row)
    for (int64_t o = 0; o < N_; ++o) {
      ++sptr_[os_[o] + 1];
      ++kptr_[ok_[o] + 1];
    }
    for (int64_t s = 0; s < B; ++s) sptr_[s + 1] += sptr_[s];
    for (int64_t k = 0; k < U; ++k) kptr_[k + 1] += kptr_[k];
    for (int64_t o = 0; o < N_; ++o) ++cnt_[ok_[o] * W + a_[os_[o]]];
    // a row's occurrences grouped by their sample's worker (buckets), each in
    // occurrence order at first
    std::vector<int64_t> fill(U * W);
    for (int64_t k = 0; k < U; ++k) {
      int64_t* b = &bptr_[k * (W + 1)];
      b[0] = kptr_[k];
      for (int64_t w = 0; w < W; ++w) {
        fill[k * W + w] = b[w];
        b[w + 1] = b[w] + cnt_[k * W + w];
      }
    }
    for (int64_t o = 0; o < N_; ++o) {
      const int64_t i = fill[ok_[o] * W + a_[os_[o]]]++;
      by_key_[i] = o;
      pos_key_[o] = i;
    }
    for (int64_t k = 0; k < U; ++k) key_state(k);
    // one delta row per (row, worker): its occurrences share it
    for (int64_t k = 0; k < U; ++k)
      for (int64_t w = 0; w < W; ++w) {
        const int64_t i0 = bptr_[k * (W + 1) + w], i1 = bptr_[k * (W + 1) + w + 1];
        if (i0 == i1) continue;
        const double* first = &D_[by_key_[i0] * W];
        delta_row(by_key_[i0], &D_[by_key_[i0] * W]);
        for (int64_t i = i0 + 1; i < i1; ++i) std::copy(first, first + W, &D_[by_key_[i] * W]);
      }
  }

  double total() const {
    double t = 0.0;
    for (int64_t k = 0; k < U_; ++k) t += f_[k];
    return t;
  }

  // Returns the stop code: 0 local optimum, 1 max_rounds, 2 deadline.
  int64_t run(int64_t max_rounds, double budget_s, double tol, int64_t group_size) {
    const auto t0 = Clock::now();
    timed_ = std::isfinite(budget_s);
    deadline_ = t0 + std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(timed_ ? budget_s : 0.0));
    if (past() || (timed_ && budget_s <= 0.0)) return 2;
    sum_moves();
    bool fresh = true;  // M summed afresh since the last change
    while (rounds_ < max_rounds) {
      ++rounds_;
      const int64_t applied = swap_pass(tol);
      if (applied < 0) return 2;
      if (applied > 0) {
        fresh = false;
        continue;
      }
      // M was updated incrementally: a swap local optimum is claimed only
      // after a pass without swaps on freshly summed M
      if (!fresh) {
        sum_moves();
        fresh = true;
        continue;
      }
      const int64_t moved = group_size > 0 ? group_pass(tol, group_size) : 0;
      if (moved < 0) return 2;
      if (moved == 0) return 0;
      fresh = false;
    }
    return 1;
  }

  const std::vector<int64_t>& assignment() const { return a_; }
  const std::vector<int64_t>& swaps() const { return swaps_; }
  int64_t rounds() const { return rounds_; }
  int64_t moves() const { return moves_; }
  int64_t group_tries() const { return group_tries_; }
  int64_t evaluations() const { return evaluations_; }

 private:
  bool past() const { return timed_ && Clock::now() > deadline_; }

  void record(int64_t s, int64_t t) {
    swaps_.push_back(s);
    swaps_.push_back(t);
    swaps_.push_back(moves_);
  }

  // One pass of best-partner swaps: every sample s with a candidate partner
  // (bound below -tol) in the order of its best bound over all target
  // workers y, paired with the partner t on y of the best exact change;
  // returns the number applied, -1 at the deadline.
  int64_t swap_pass(double tol) {
    int64_t applied = 0;
    // per ordered pair (x, y): min over x's samples of M[s, y]
    std::fill(pmin_.begin(), pmin_.end(), INFINITY);
    for (int64_t s = 0; s < B_; ++s) {
      const int64_t x = a_[s];
      for (int64_t v = 0; v < W_; ++v)
        if (v != x) pmin_[x * W_ + v] = std::min(pmin_[x * W_ + v], M_[s * W_ + v]);
    }
    for (auto& l : lists_) l.clear();
    drivers_.clear();
    for (int64_t s = 0; s < B_; ++s) {
      const int64_t x = a_[s];
      for (int64_t v = 0; v < W_; ++v) {
        if (v == x) continue;
        const double m = M_[s * W_ + v];
        const double bound = m + pmin_[v * W_ + x];
        if (bound < -tol) {
          lists_[x * W_ + v].emplace_back(m, s);
          drivers_.push_back({bound, s * W_ + v});
        }
      }
    }
    if (drivers_.empty()) return 0;
    for (auto& l : lists_) std::sort(l.begin(), l.end());
    std::sort(drivers_.begin(), drivers_.end());
    // the best partner of every driver (exact changes), then the swaps
    // best first, each re-evaluated on the state it is applied to
    cands_.clear();
    for (const auto& dv : drivers_) {
      if (past()) return -1;
      const int64_t s = dv.second / W_, y = dv.second % W_, x = a_[s];
      if (best_partner(s, x, y, tol) >= 0) cands_.push_back({last_best_, {s, y}});
    }
    std::sort(cands_.begin(), cands_.end());
    for (const auto& c : cands_) {
      const int64_t s = c.second.first, y = c.second.second, x = a_[s];
      if (x == y) continue;
      const int64_t t = best_partner(s, x, y, tol);
      if (t < 0) continue;
      apply_swap(s, t, x, y);
      record(s, t);
      ++moves_;
      ++applied;
    }
    return applied;
  }

  // the partner t on y (in lists_[y, x]) of the best exact swap change below
  // -tol with s on x (-1: none); leaves s marked
  int64_t best_partner(int64_t s, int64_t x, int64_t y, double tol) {
    const auto& ly = lists_[y * W_ + x];
    const double ms = mark_sample(s, y);
    double best = -tol;
    int64_t bt = -1;
    for (const auto& ct : ly) {
      if (ms + ct.first >= best) break;
      const int64_t t = ct.second;
      if (a_[t] != y || ms + M_[t * W_ + x] >= best) continue;
      const double g = swap_change(ms, t, x, y);
      ++evaluations_;
      if (g < best) {
        best = g;
        bt = t;
      }
    }
    last_best_ = best;
    return bt;
  }

  // cost of row k without worker y among its users
  double cost_without(int64_t k, int64_t y) const {
    const int32_t* c = &cnt_[k * W_];
    const int32_t n = nusers_[k] - 1;
    const double p = psum_[k] - pull_[k * W_ + y], q = qsum_[k] - push_[k * W_ + y];
    const int64_t o = owner_[k];
    const bool dirty = o >= 0 && n > 0 && !(n == 1 && o != y && c[o] > 0);
    return p + (n > 1 ? q : 0.0) + (dirty ? opush_[k] : 0.0);
  }

  bool uses(int64_t s, int64_t k) const {
    for (int64_t o = sptr_[s]; o < sptr_[s + 1]; ++o)
      if (ok_[o] == k) return true;
    return false;
  }

  // Group moves: a row k used on worker y by g <= group_size samples (and on
  // another worker x) stops being used on y when those g samples move to x
  // and g samples of x that do not use k move to y (each the best of the few
  // best single movers x -> y, by exact swap change, taken in sequence).
  // Tried where the estimate (the row's saving plus the single-move changes
  // of the samples) is below -tol; kept when the exact change of the whole
  // move is below -tol, else undone.  Returns the moves kept, -1 at the deadline.
  int64_t group_pass(double tol, int64_t group_size) {
    constexpr int64_t kPartners = 8, kKept = 32;
    // per ordered pair (x, y): x's kKept best samples by M[s, y], sorted,
    // and the best M[s, y] (stale after a move)
    std::vector<std::vector<std::pair<double, int64_t>>> order(W_ * W_);
    std::fill(pmin_.begin(), pmin_.end(), INFINITY);
    for (int64_t s = 0; s < B_; ++s)
      for (int64_t v = 0; v < W_; ++v)
        if (v != a_[s]) {
          order[a_[s] * W_ + v].emplace_back(M_[s * W_ + v], s);
          pmin_[a_[s] * W_ + v] = std::min(pmin_[a_[s] * W_ + v], M_[s * W_ + v]);
        }
    for (auto& l : order) {
      if (static_cast<int64_t>(l.size()) > kKept) {
        std::nth_element(l.begin(), l.begin() + kKept, l.end());
        l.resize(kKept);
      }
      std::sort(l.begin(), l.end());
    }
    std::vector<int64_t> ts, ss;
    int64_t kept = 0;
    if (group_failed_.empty()) group_failed_.assign(U_, 0);
    for (int64_t k = 0; k < U_; ++k) {
      if (nusers_[k] < 2 || group_failed_[k]) continue;
      if ((k & 63) == 0 && past()) return -1;
      const int32_t* c = &cnt_[k * W_];
      int64_t y = -1;
      for (int64_t w = 0; w < W_; ++w)
        if (c[w] > 0 && (y < 0 || c[w] < c[y])) y = w;
      if (c[y] > group_size) continue;
      const double saving = f_[k] - cost_without(k, y);
      if (!(saving > tol)) continue;
      for (int64_t x = 0; x < W_; ++x) {
        if (x == y || c[x] == 0) continue;
        ts.clear();
        double est = -saving;
        // k's occurrences on y (its bucket), in occurrence order
        const int64_t* b = &bptr_[k * (W_ + 1)];
        on_y_.assign(by_key_.begin() + b[y], by_key_.begin() + b[y + 1]);
        std::sort(on_y_.begin(), on_y_.end());
        for (const int64_t o : on_y_) {
          ts.push_back(os_[o]);
          est += M_[os_[o] * W_ + x] - D_[o * W_ + x];
        }
        // (no partner does better than the best single mover)
        if (!(est + static_cast<double>(ts.size()) * pmin_[x * W_ + y] < -tol)) continue;
        // the |ts| best single movers x -> y that do not use k
        ss.clear();
        for (const auto& e : order[x * W_ + y]) {
          if (static_cast<int64_t>(ss.size()) == kPartners) break;
          if (a_[e.second] == x && !uses(e.second, k)) ss.push_back(e.second);
        }
        if (ss.size() < ts.size()) continue;
        for (size_t i = 0; i < ts.size(); ++i) est += M_[ss[i] * W_ + y];
        if (!(est < -tol)) continue;
        ++group_tries_;
        // apply in sequence: every t of y with its best remaining partner
        double change = 0.0;
        const size_t first = swaps_.size();
        for (const int64_t t : ts) {
          double best = INFINITY;
          int64_t bs = -1;
          for (const int64_t s : ss) {
            if (a_[s] != x) continue;
            const double g = swap_change(mark_sample(s, y), t, x, y);
            ++evaluations_;
            if (g < best) {
              best = g;
              bs = s;
            }
          }
          mark_sample(bs, y);
          apply_swap(bs, t, x, y);
          record(bs, t);
          change += best;
        }
        if (change < -tol) {
          ++moves_;
          ++kept;
          break;  // row k is off y
        }
        // undo in reverse order
        for (size_t i = swaps_.size(); i > first; i -= 3) {
          const int64_t s = swaps_[i - 3], t = swaps_[i - 2];
          mark_sample(s, x);
          apply_swap(s, t, y, x);
        }
        swaps_.resize(first);
        group_failed_[k] = 1;  // not tried again in later passes
      }
    }
    return kept;
  }

  // user-set sums and cost f of row k from its counts
  void key_state(int64_t k) {
    const int32_t* c = &cnt_[k * W_];
    int32_t n = 0;
    double p = 0.0, q = 0.0;
    for (int64_t w = 0; w < W_; ++w) {
      if (c[w] > 0) {
        ++n;
        p += pull_[k * W_ + w];
        q += push_[k * W_ + w];
      }
    }
    const int64_t o = owner_[k];
    const bool dirty = o >= 0 && n > 0 && !(n == 1 && c[o] > 0);
    nusers_[k] = n;
    psum_[k] = p;
    qsum_[k] = q;
    f_[k] = p + (n > 1 ? q : 0.0) + (dirty ? opush_[k] : 0.0);
  }

  // out[v]: change of occurrence o's row cost when its sample alone moves to v
  // (DedupCost.occurrence_deltas)
  void delta_row(int64_t o, double* out) const {
    const int64_t k = ok_[o], w = a_[os_[o]];
    const int32_t* c = &cnt_[k * W_];
    const int32_t n = nusers_[k];
    if (c[w] > 1 && n == W_) {  // nobody joins or leaves
      std::fill(out, out + W_, 0.0);
      return;
    }
    const bool drop = c[w] == 1;
    const double* pk = &pull_[k * W_];
    const double* qk = &push_[k * W_];
    const int64_t own = owner_[k];
    const double p0 = psum_[k] - (drop ? pk[w] : 0.0);
    const double q0 = qsum_[k] - (drop ? qk[w] : 0.0);
    for (int64_t v = 0; v < W_; ++v) {
      if (v == w) {
        out[v] = 0.0;
        continue;
      }
      const bool add = c[v] == 0;
      const int32_t n2 = n - (drop ? 1 : 0) + (add ? 1 : 0);
      const double p2 = p0 + (add ? pk[v] : 0.0);
      const double q2 = q0 + (add ? qk[v] : 0.0);
      // with one user left it is v (if w stays, v joins and there are two)
      const bool only_owner = n2 == 1 && v == own;
      const double f2 = p2 + (n2 > 1 ? q2 : 0.0) + (own >= 0 && !only_owner ? opush_[k] : 0.0);
      out[v] = f2 - f_[k];
    }
  }

  void sum_moves() {
    std::fill(M_.begin(), M_.end(), 0.0);
    for (int64_t o = 0; o < N_; ++o) {
      const double* d = &D_[o * W_];
      double* m = &M_[os_[o] * W_];
      for (int64_t v = 0; v < W_; ++v) m[v] += d[v];
    }
  }

  // marks s's rows (mark_s_, pos_s_) and returns the exact M[s, y] (a fresh sum)
  double mark_sample(int64_t s, int64_t y) {
    ++epoch_s_;
    double m = 0.0;
    for (int64_t o = sptr_[s]; o < sptr_[s + 1]; ++o) {
      mark_s_[ok_[o]] = epoch_s_;
      pos_s_[ok_[o]] = o;
      m += D_[o * W_ + y];
    }
    return m;
  }

  // exact change of the swap (s: x -> y, t: y -> x); s marked, ms = M[s, y]
  double swap_change(double ms, int64_t t, int64_t x, int64_t y) const {
    double g = ms;
    for (int64_t o = sptr_[t]; o < sptr_[t + 1]; ++o) {
      const int64_t k = ok_[o];
      if (mark_s_[k] == epoch_s_) g -= D_[pos_s_[k] * W_ + y];  // common row: unchanged
      else g += D_[o * W_ + x];
    }
    return g;
  }

  // moves occurrence o of row k from worker x's bucket to y's (O(|x - y|) swaps)
  void move_occurrence(int64_t o, int64_t k, int64_t x, int64_t y) {
    int64_t* b = &bptr_[k * (W_ + 1)];
    int64_t p = pos_key_[o];
    auto put = [&](int64_t i, int64_t j) {  // swap positions i and j
      std::swap(by_key_[i], by_key_[j]);
      pos_key_[by_key_[i]] = i;
      pos_key_[by_key_[j]] = j;
    };
    for (int64_t j = x; j < y; ++j) {  // to the end of bucket j, then into j + 1
      put(p, b[j + 1] - 1);
      p = --b[j + 1];
    }
    for (int64_t j = x; j > y; --j) {  // to the front of bucket j, then into j - 1
      put(p, b[j]);
      p = b[j]++;
    }
  }

  // refreshes the occurrences of row k on worker w not refreshed yet: they
  // share one delta row (delta_row depends on the row and the worker only)
  void refresh_bucket(int64_t k, int64_t w) {
    const int64_t* b = &bptr_[k * (W_ + 1)];
    bool computed = false;
    for (int64_t i = b[w]; i < b[w + 1]; ++i) {
      const int64_t o = by_key_[i];
      if (occ_epoch_[o] == epoch_occ_) continue;
      occ_epoch_[o] = epoch_occ_;
      if (!computed) {
        delta_row(o, row_.data());
        computed = true;
      }
      double* d = &D_[o * W_];
      double* m = &M_[os_[o] * W_];
      for (int64_t v = 0; v < W_; ++v) {
        m[v] += row_[v] - d[v];
        d[v] = row_[v];
      }
    }
  }

  void refresh(int64_t o) {
    if (occ_epoch_[o] == epoch_occ_) return;
    occ_epoch_[o] = epoch_occ_;
    delta_row(o, row_.data());
    double* d = &D_[o * W_];
    double* m = &M_[os_[o] * W_];
    for (int64_t v = 0; v < W_; ++v) {
      m[v] += row_[v] - d[v];
      d[v] = row_[v];
    }
  }

  // moves the rows of one sample (not shared with the partner) from -> to;
  // records the rows whose user set or only-user flags changed
  void move_rows(int64_t s, int64_t from, int64_t to, const std::vector<int64_t>& other_mark,
                 int64_t other_epoch) {
    for (int64_t o = sptr_[s]; o < sptr_[s + 1]; ++o) {
      const int64_t k = ok_[o];
      if (other_mark[k] == other_epoch) continue;
      int32_t& cf = cnt_[k * W_ + from];
      int32_t& ct = cnt_[k * W_ + to];
      const int32_t f0 = cf--, t0 = ct++;
      const bool used_changed = cf == 0 || t0 == 0;
      if (used_changed) {
        key_state(k);
        changed_.push_back({k, -1});
      } else {
        if (f0 == 1 || cf == 1) changed_.push_back({k, from});
        if (t0 == 1 || ct == 1) changed_.push_back({k, to});
      }
    }
  }

  void apply_swap(int64_t s, int64_t t, int64_t x, int64_t y) {
    // s's rows are marked (mark_s_/epoch_s_); mark t's
    ++epoch_t_;
    for (int64_t o = sptr_[t]; o < sptr_[t + 1]; ++o) mark_t_[ok_[o]] = epoch_t_;
    changed_.clear();
    move_rows(s, x, y, mark_t_, epoch_t_);
    move_rows(t, y, x, mark_s_, epoch_s_);
    for (int64_t o = sptr_[s]; o < sptr_[s + 1]; ++o) move_occurrence(o, ok_[o], x, y);
    for (int64_t o = sptr_[t]; o < sptr_[t + 1]; ++o) move_occurrence(o, ok_[o], y, x);
    a_[s] = y;
    a_[t] = x;
    ++epoch_occ_;
    for (int64_t o = sptr_[s]; o < sptr_[s + 1]; ++o) refresh(o);
    for (int64_t o = sptr_[t]; o < sptr_[t + 1]; ++o) refresh(o);
    // only the occurrences whose delta row can change: all of a row whose
    // user set changed, those on w of a row whose only-user flag on w changed
    for (const auto& kw : changed_) {
      const int64_t k = kw.first, w = kw.second;
      if (w >= 0) {
        refresh_bucket(k, w);
      } else {
        for (int64_t v = 0; v < W_; ++v) refresh_bucket(k, v);
      }
    }
  }

  const int64_t B_, W_, U_, N_;
  const int64_t* os_;
  const int64_t* ok_;
  const double* pull_;
  const double* push_;
  const int64_t* owner_;
  const double* opush_;
  // by_key_[bptr_[k (W + 1) + w] ..< bptr_[k (W + 1) + w + 1]]: the occurrences of
  // row k whose sample is on w; pos_key_[o]: o's position in by_key_
  std::vector<int64_t> a_, sptr_, kptr_, by_key_, pos_key_, bptr_, on_y_;
  std::vector<int32_t> cnt_, nusers_;
  std::vector<double> psum_, qsum_, f_, D_, M_;
  std::vector<int64_t> mark_s_, mark_t_, pos_s_, occ_epoch_;
  int64_t epoch_s_ = 0, epoch_t_ = 0, epoch_occ_ = 0;
  std::vector<std::pair<int64_t, int64_t>> changed_;
  std::vector<double> row_;
  std::vector<int64_t> swaps_;  // (s, t, move) per applied swap
  std::vector<uint8_t> group_failed_;  // rows whose group move was undone
  std::vector<double> pmin_;
  std::vector<std::vector<std::pair<double, int64_t>>> lists_;
  std::vector<std::pair<double, int64_t>> drivers_;
  std::vector<std::pair<double, std::pair<int64_t, int64_t>>> cands_;
  double last_best_ = 0.0;
  bool timed_ = false;
  Clock::time_point deadline_;
  int64_t rounds_ = 0, evaluations_ = 0, moves_ = 0, group_tries_ = 0;
};

at::Tensor to_tensor(const std::vector<int64_t>& v, std::vector<int64_t> shape) {
  auto out = at::empty(shape, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> dedup_refine_cpu(
    const at::Tensor& occ_s, const at::Tensor& occ_k, const at::Tensor& pull,
    const at::Tensor& push, const at::Tensor& owner, const at::Tensor& owner_push,
    const at::Tensor& assignment, int64_t max_rounds, double time_budget_s, int64_t group_size) {
  check_dedup_model(kOp, occ_s, occ_k, pull, push, owner, owner_push);
  check_cpu_tensor(kOp, "assignment", assignment, at::kLong, 1);
  const int64_t N = occ_s.numel(), U = pull.size(0), W = pull.size(1), B = assignment.numel();
  TORCH_CHECK(max_rounds >= 0, "torchrec_esd::", kOp, ": max_rounds must be >= 0, got ",
              max_rounds);
  TORCH_CHECK(group_size >= 0, "torchrec_esd::", kOp, ": group_size must be >= 0, got ",
              group_size);
  TORCH_CHECK(!std::isnan(time_budget_s), "torchrec_esd::", kOp, ": time_budget_s is NaN");
  const int64_t* s = occ_s.data_ptr<int64_t>();
  const int64_t* k = occ_k.data_ptr<int64_t>();
  const int64_t* a = assignment.data_ptr<int64_t>();
  const int64_t* own = owner.data_ptr<int64_t>();
  const double* p = pull.data_ptr<double>();
  const double* q = push.data_ptr<double>();
  const double* op = owner_push.data_ptr<double>();
  check_assignment_workers(kOp, a, B, W);
  // the bound that prunes the pairs needs f monotone in the user set
  for (int64_t i = 0; i < U * W; ++i)
    TORCH_CHECK(std::isfinite(p[i]) && p[i] >= 0.0 && std::isfinite(q[i]) && q[i] >= 0.0,
                "torchrec_esd::", kOp, ": pull and push must be finite and >= 0 (row ", i / W,
                ", worker ", i % W, ")");
  check_owners(kOp, own, U, W);
  for (int64_t i = 0; i < U; ++i)
    TORCH_CHECK(std::isfinite(op[i]) && op[i] >= 0.0, "torchrec_esd::", kOp,
                ": owner_push must be finite and >= 0 (row ", i, ")");
  std::vector<int64_t> seen(U, -1);
  check_occurrences(kOp, s, k, N, B, U, "", [&](int64_t i) {
    TORCH_CHECK(seen[k[i]] != s[i], "torchrec_esd::", kOp, ": (sample ", s[i], ", row ", k[i],
                ") occurs twice; occurrences must be distinct pairs");
    seen[k[i]] = s[i];
  });

  SwapSearch search(B, W, U, occ_s, occ_k, p, q, own, op, a);
  const double start = search.total();
  const double tol = 1e-12 * std::max(std::abs(start), 1e-300);
  const int64_t stop = search.run(max_rounds, time_budget_s, tol, group_size);
  const auto& sw = search.swaps();
  const int64_t n = static_cast<int64_t>(sw.size() / 3);
  auto info = at::empty({7}, at::TensorOptions().dtype(at::kDouble));
  double* in = info.data_ptr<double>();
  in[0] = static_cast<double>(search.rounds());
  in[1] = static_cast<double>(search.moves());
  in[2] = static_cast<double>(n);
  in[3] = start;
  in[4] = search.total();
  in[5] = static_cast<double>(stop);
  in[6] = static_cast<double>(search.evaluations());
  return {to_tensor(search.assignment(), {B}), to_tensor(sw, {n, 3}), info};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("dedup_refine", &dedup_refine_cpu); }

}  // namespace torchrec_esd
