/**
 * Section "select": the cost of the eviction's selection inside the decode (evicting steps
 * against appending ones), and the selection kernel alone (CUDA only).
 */
import { native, TrimKVError } from '../../lib/errors.js';
import { BACKEND_INDEX, loadAddon } from '../../lib/native.js';
import type { Runtime } from '../../lib/runtime.js';
import { attempt, isRow, type Case, type CaseContext, type Row } from '../case.js';
import type { SelectKeys } from '../plan.js';
import { setsFor, stats, timeMany, warmUp, type BenchOptions, type Stats } from '../timing.js';
import { slotBytes } from '../inputs.js';
import { decodeRig, type DecodeBenchCase, type DecodeRow } from './decode.js';

export interface SelectBenchResult extends DecodeBenchCase {
  layers: number;
  /** Decode calls that evicted B tokens (one step in B), ms. */
  evicting: Stats;
  /** Decode calls that only appended and attended, ms. */
  appending: Stats;
  /** evicting.median - appending.median: the cost of one selection (score, top-M, compaction), ms. */
  selectMs: number;
  /** selectMs / B: the selection cost per generated token, ms. */
  amortizedMs: number;
}

/**
 * Eviction (selection) cost: decode with buffer B > 0 evicts on one step in B; the difference
 * between the medians of evicting and non-evicting calls is the cost of scoring, selecting the
 * M survivors and compacting the cache, as fused into the decode kernel.
 * @throws {TrimKVError} from the cache
 */
export function benchSelect(rt: Runtime, c: DecodeBenchCase, evictions = 6, o: BenchOptions = {}): SelectBenchResult {
  if (c.buffer < 2) throw new RangeError(`Expected a buffer >= 2 for benchSelect but received ${c.buffer}`);
  const layers = c.layers ?? setsFor(rt, c.batch * c.kvHeads * (c.memory + c.buffer) * slotBytes(c.headDim, c.dtype), o);
  const rig = decodeRig(rt, c, layers);
  try {
    const hostMs = warmUp(layers * c.buffer, rig.call);  // one eviction cycle, ends at a step boundary
    const n = layers * c.buffer * evictions;
    const first = rig.steps();
    // After the prefill a head holds M; decode step k (counted from the prefill) evicts when
    // M + k reaches M + B, i.e. on every step k that is a multiple of B.
    const ms = timeMany(rt, n, rig.call, hostMs);
    const ev: number[] = [], ap: number[] = [];
    for (let i = 0; i < n; i++) {
      const step = first + 1 + Math.floor(i / layers);
      (step % c.buffer === 0 ? ev : ap).push(ms[i]!);
    }
    const evicting = stats(ev), appending = stats(ap);
    const selectMs = evicting.median - appending.median;
    return { ...c, layers, evicting, appending, selectMs, amortizedMs: selectMs / c.buffer };
  } finally {
    rig.dispose();
  }
}

export interface SelectKernelCase {
  /** Independent selections in one launch (batch x KV heads), one block each. */
  rows: number;
  /** Candidates per row (M + B for a decode eviction, M + C for a prefill chunk's). */
  candidates: number;
  /** Survivors per row (M). */
  keep: number;
  keys: SelectKeys;
  /** Threads per block (the prefill eviction uses 1024). */
  threads: number;
}

export interface SelectKernelResult extends SelectKernelCase {
  /** One launch (fill excluded), ms. */
  time: Stats;
  /** rows x candidates / median time. */
  keysPerSecond: number;
}

/**
 * The eviction's top-k selection on its own (csrc/bench/select_bench.cu): rows x candidates
 * 64-bit keys filled on the GPU, one launch in which each block finds the k-th largest key of
 * its row with topk::block_select_kth_largest and marks the keys >= it; CUDA events, after
 * warm-up. The addon checks that every row kept exactly `keep` keys.
 * @throws {TrimKVError} ERR_UNSUPPORTED on the CPU backend or in a CPU-only build; ERR_RANGE for
 *   sizes out of range
 */
export function benchSelectKernel(rt: Runtime, c: SelectKernelCase, iters = 100): SelectKernelResult {
  const r = native(() => loadAddon().selectBench(BACKEND_INDEX[rt.backend], {
    rows: c.rows, n: c.candidates, k: c.keep, threads: c.threads, iters, warmup: 5, keys: c.keys, seed: 1 + Math.floor(Math.random() * 2 ** 30),
  }));
  const time = stats(r.ms);
  return { ...c, time, keysPerSecond: (c.rows * c.candidates) / (time.median * 1e-3) };
}

/** A selection-kernel case that did not run on this backend, with the reason (shown as '-'). */
export type SelectKernelRow = SelectKernelResult | (SelectKernelCase & { skipped: string });
export interface SelectRow extends SelectBenchResult { decodeB0Ms: number | null }

/** The selection cases of a run (rows in run.select and run.selectKernel); reads the decode rows of the same run. */
export function selectCases(cx: CaseContext, run: { readonly decode: readonly Row<DecodeRow>[]; select: Row<SelectRow>[]; selectKernel: Row<SelectKernelRow>[] }): Case[] {
  const { rt, plan, bo } = cx;
  const sh = plan.shape;
  const out: Case[] = [];
  const s = plan.select;
  for (const batch of s.batches) for (const memory of s.memories) {
    const c = { ...sh, batch, memory, buffer: s.buffer };
    out.push({ section: 'select', label: `selection b=${batch} M=${memory} B=${s.buffer}`, run: () => attempt(run.select, { ...c }, () => {
      const r = benchSelect(rt, c, s.evictions, bo);
      const b0 = run.decode.find((x): x is DecodeRow => isRow(x) && x.batch === batch && x.memory === memory && x.buffer === 0 &&
        x.headDim === sh.headDim && x.dtype === sh.dtype);
      return { ...r, decodeB0Ms: b0?.time.median ?? null };
    }) });
  }
  const k = s.kernel;
  for (const keys of k.keys) for (const rows of k.rows) for (const extra of k.extras) {
    const c: SelectKernelCase = { rows, candidates: k.memory + extra, keep: k.memory, keys, threads: k.threads };
    out.push({ section: 'select', label: `selection kernel ${rows} x ${c.candidates} top ${c.keep} (${keys})`, run: () => attempt(run.selectKernel, { ...c }, () => {
      try {
        return benchSelectKernel(rt, c, k.iters);
      } catch (e) {
        // GPU-only: the CPU backend (or a CPU-only build) has no such kernel; the row stays, shown as '-'.
        if (e instanceof TrimKVError && e.code === 'ERR_UNSUPPORTED') return { ...c, skipped: e.message };
        throw e;
      }
    }) });
  }
  return out;
}
