/**
 * What a section of the suite (bench/cases/<section>.ts) gives the runner: cases, each of which
 * pushes its row, or the failure, into the run's list.
 */
import type { Runtime } from '../lib/runtime.js';
import type { BenchPlan, Section, Shape } from './plan.js';
import type { BenchOptions } from './timing.js';
import type { TorchResults } from './torch.js';

export interface Failure { error: string }
export type Row<T> = T | (Failure & Record<string, unknown>);

/** A row that measured (not a failure). */
export const isRow = <T>(r: Row<T>): r is T => !(r as Failure).error;

/** One case of a run: `run` measures and pushes its row. */
export interface Case { section: Section; label: string; run: () => void }

/** What every section's cases share for one backend's run. */
export interface CaseContext {
  rt: Runtime;
  plan: BenchPlan;
  torch: TorchResults | null;
  /** The plan's rotation, as options of the bench* functions. */
  bo: BenchOptions;
  /** A bandwidth over the run's copy ceiling (measured before the cases run), or null without one. */
  frac: (gbs: number) => number | null;
  /** Whether bench/torch_compare.py's rows are of this shape (Qwen3-4B, on CUDA). */
  torchShape: (s: Shape) => boolean;
}

/** Runs fn and pushes its row, or the failure with the case's keys. */
export function attempt<T>(list: Row<T>[], keys: Record<string, unknown>, fn: () => T): void {
  try {
    list.push(fn());
  } catch (e) {
    list.push({ ...keys, error: (e as Error).message });
  }
}
