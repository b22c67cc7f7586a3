// Plain-data parameters of the fused multistep update, shared by the CPU kernel and the CUDA launcher.
// No torch or CUDA headers. Math (design.md section 2), per element i of sample b = i / per_sample, in fp32:
//   out = out + gw d   when a guide d is given (guidance's term; every use of out below sees it)
//   m0 = p x + q out + sum_{j<n_reads} r[j] read_j;  m0 = clamp(m0, -clip, clip) if clip > 0
//   x' = a x + e out + b0 m0 + sum_{j<n_reads} b[j+1] read_j + c z + g s
//   s' = sa x + se out + sb0 m0 + sum_{j<n_reads} sb[j+1] read_j + sc z + sg s   (state_row; written over s)
// s is an optional state tensor of x's shape (UniPC's last sample, Heun's step start, a momentum).
// LML (n_dirs > 0; dirs = a ring of n_dirs past raw directions, each of x's shape):
//   d  = da x + de out + db0 m0 + sum_{j<n_reads} db[j+1] read_j      (m0 after clip / threshold)
//   x' += W[b][0] d + sum_{j<n_dirs} W[b][1+j] dirs[j]                 (W = dir_weights, (B, 1+n_dirs) fp32)
//   dirs[dir_slot] = d                                                   (after every read)
// Indexed steps (tensors.table != NULL; the per-step CUDA-graph capture): the step's coefficients and history
// slots are read on the device from row *step of `table` (DS_ROW_WIDTH doubles, layout DS_ROW_*) and of
// `slots` ([write, read_0, .., read_{DS_MAX_READS-1}]); slot j is history + j n elements. With per_sample_steps
// every sample b has its own row step[b] (a heterogeneous batch: requests at different steps or noise levels),
// applied to its elements [b per_sample, (b + 1) per_sample) of the slots. n_reads, clip, noise and state stay
// fixed over the table (unused reads carry zero weights; steps without a state row keep s); a row's
// writes_state = 0 leaves the state unwritten.
// The LML Gram (ds_lml_gram_*) is, per sample b, the (1+n_dirs)^2 matrix of dot products of
// [g, dirs[0], ..., dirs[n_dirs-1]] over the sample's per_sample elements, in double, row-major.
#pragma once
#include <stdint.h>

#include "error_flags.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DS_MAX_READS 3
#define DS_MAX_DIRS 6

// The step row, one fixed-width float64 layout for every call (its one definition: python/diffsampler/step_row.py;
// exported as diffsampler._C.ROW_LAYOUT): [p, q, a, e, c, b_0..b_3, r_1..r_3, g, sa, se, sc, sg, sb_0..sb_3,
// writes_state, ratio, max_value, hx, hm, guide]. Eager calls pass one row; an indexed table is (steps, DS_ROW_WIDTH).
#define DS_ROW_P 0
#define DS_ROW_Q 1
#define DS_ROW_A 2
#define DS_ROW_E 3
#define DS_ROW_C 4
#define DS_ROW_B 5
#define DS_ROW_R (DS_ROW_B + DS_MAX_READS + 1)
#define DS_ROW_G (DS_ROW_R + DS_MAX_READS)
#define DS_ROW_SA (DS_ROW_G + 1)
#define DS_ROW_SE (DS_ROW_G + 2)
#define DS_ROW_SC (DS_ROW_G + 3)
#define DS_ROW_SG (DS_ROW_G + 4)
#define DS_ROW_SB (DS_ROW_SG + 1)
#define DS_ROW_WRITES_STATE (DS_ROW_SB + DS_MAX_READS + 1)
#define DS_ROW_THR_RATIO (DS_ROW_WRITES_STATE + 1)
#define DS_ROW_THR_MAX (DS_ROW_WRITES_STATE + 2)
#define DS_ROW_THR_HX (DS_ROW_WRITES_STATE + 3)
#define DS_ROW_THR_HM (DS_ROW_WRITES_STATE + 4)
#define DS_ROW_GUIDE (DS_ROW_THR_HM + 1)
#define DS_ROW_WIDTH (DS_ROW_GUIDE + 1)
#define DS_SLOTS_WIDTH (1 + DS_MAX_READS)

#ifdef __CUDACC__
#define DS_HOST_DEVICE __host__ __device__
#else
#define DS_HOST_DEVICE
#endif


typedef enum { DS_FLOAT32 = 0, DS_FLOAT16 = 1, DS_BFLOAT16 = 2 } ds_dtype;

// What one launch does.
//   DS_PHASE_FULL:      convert (+clip), update; write x_next and m0 (when m0 != NULL).
//   DS_PHASE_CONVERT:   first pass of thresholding: convert (+clip) and write m0 only.
//   DS_PHASE_THRESHOLD: second pass: read m0 (the data prediction x0), m0 = hx x + hm clamp(m0, -s_b, s_b) / s_b
//                       with s_b = thr_scale[b] (the history value: x0 itself, or the noise prediction it
//                       implies), write it back, update, write x_next.
typedef enum { DS_PHASE_FULL = 0, DS_PHASE_CONVERT = 1, DS_PHASE_THRESHOLD = 2 } ds_phase;

typedef struct {
  float p, q, a, e, c;
  float b[DS_MAX_READS + 1];  // b[0] multiplies m0, b[j + 1] multiplies reads[j]
  float r[DS_MAX_READS];      // r[j] multiplies reads[j] in m0 (GHVB's momentum, DC-Solver's compensation)
  int n_reads;                // 0 .. DS_MAX_READS
  float clip;                 // <= 0: off
  float hx, hm;               // DS_PHASE_THRESHOLD: the history value hx x + hm x0 of the thresholded x0
  float g;                    // weight of the state s in x' (s read when tensors.state != NULL)
  float gw;                   // weight of the guide in out (read when tensors.guide != NULL)
  int state_row;              // 1: s' (the sa..sg row) is computed and written over s (row's writes_state)
  float sa, se, sc, sg;
  float sb[DS_MAX_READS + 1];
  int n_dirs;                 // LML: past directions in the ring (0: off)
  int dir_slot;               // the ring slot g is written to
  float da, de;               // the direction row
  float db[DS_MAX_READS + 1];
} ds_update_coeffs;

typedef struct {
  const void* x;
  const void* out;
  const void* reads[DS_MAX_READS];  // history slots read, n_reads of them
  const void* noise;                // NULL: no noise term
  const void* guide;                // NULL: no guide term (out + gw guide)
  void* state;                      // NULL: no state term; read, and written over when state_row
  void* m0;                         // history slot written (NULL: not stored; required by the threshold phases)
  void* x_next;                     // unused in DS_PHASE_CONVERT
  const float* thr_scale;           // B bounds (on the tensors' device), DS_PHASE_THRESHOLD only
  void* dirs[DS_MAX_DIRS];          // LML's ring slots, n_dirs of them (read, and dirs[dir_slot] written)
  const float* dir_weights;         // (B, 1 + n_dirs) row-major (zeros when g is only recorded)
  int64_t n;                        // elements
  int64_t per_sample;               // elements per sample (n / B)
  const double* table;              // indexed steps: (steps, DS_ROW_WIDTH); NULL: the coefficients are given
  const int64_t* slots;             // (steps, DS_SLOTS_WIDTH)
  const int64_t* step;              // the step's row, clamped into [0, n_steps); per_sample_steps: B of them
  int per_sample_steps;             // 1: sample b takes row step[b] (its coefficients and history slots)
  int64_t n_steps;                  // rows of the tables
  void* history;                    // contiguous (history_slots, n) ring the slots index
  int64_t history_slots;            // slots of history (the table's slots are clamped into [0, history_slots))
  int* status;                      // error_flags.h bits (DS_ERR_STEP, DS_ERR_SLOT); NULL: not recorded
} ds_update_tensors;

// The one row loader (eager and indexed, CPU and CUDA): fills k's coefficients, hx, hm and state_row from a
// DS_ROW_WIDTH row. n_reads, clip and LML's fields of k are left as they are. (ratio and max_value are read by
// the host, which computes the threshold bounds.)
static inline DS_HOST_DEVICE void ds_load_row(const double* row, ds_update_coeffs* k) {
  k->p = (float)row[DS_ROW_P];
  k->q = (float)row[DS_ROW_Q];
  k->a = (float)row[DS_ROW_A];
  k->e = (float)row[DS_ROW_E];
  k->c = (float)row[DS_ROW_C];
  for (int j = 0; j <= DS_MAX_READS; ++j) {
    k->b[j] = (float)row[DS_ROW_B + j];
    k->sb[j] = (float)row[DS_ROW_SB + j];
  }
  for (int j = 0; j < DS_MAX_READS; ++j) k->r[j] = (float)row[DS_ROW_R + j];
  k->g = (float)row[DS_ROW_G];
  k->sa = (float)row[DS_ROW_SA];
  k->se = (float)row[DS_ROW_SE];
  k->sc = (float)row[DS_ROW_SC];
  k->sg = (float)row[DS_ROW_SG];
  k->state_row = row[DS_ROW_WRITES_STATE] != 0.0;
  k->hx = (float)row[DS_ROW_THR_HX];
  k->hm = (float)row[DS_ROW_THR_HM];
  k->gw = (float)row[DS_ROW_GUIDE];
}

// Indexed steps: loads the row *t->step into k (ds_load_row) and points reads[] and m0 at its history slots
// (elem_size bytes per element; per-sample steps: the caller points t->step at the sample's entry first). A step outside [0, n_steps) or a used slot outside [0, history_slots) is clamped
// into range; returns the error_flags.h bits of what was clamped (0: nothing).
static inline DS_HOST_DEVICE int ds_index_step(ds_update_tensors* t, ds_update_coeffs* k, int64_t elem_size) {
  int err = 0;
  const int64_t i = ds_clamp_index(*t->step, t->n_steps, DS_ERR_STEP, &err);
  const int64_t* slot = t->slots + i * DS_SLOTS_WIDTH;
  ds_load_row(t->table + i * DS_ROW_WIDTH, k);
  char* base = (char*)t->history;
  if (!base) return err;
  const int64_t slot_bytes = t->n * elem_size;
  t->m0 = base + ds_clamp_index(slot[0], t->history_slots, DS_ERR_SLOT, &err) * slot_bytes;
  for (int j = 0; j < k->n_reads; ++j) {
    t->reads[j] = base + ds_clamp_index(slot[1 + j], t->history_slots, DS_ERR_SLOT, &err) * slot_bytes;
  }
  return err;
}

#ifdef __cplusplus
}
#endif
