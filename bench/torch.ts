/** What bench/torch_compare.py writes (the PyTorch baselines of the same GPU), and its reader. */
import { readFileSync } from 'node:fs';
import type { Shape } from './plan.js';

/** bench/torch_compare.py's output (schema trimkv-torch/1). */
export interface TorchResults {
  schema?: string;
  gpu: string; torch: string; cuda?: string;
  copyGBs: number;
  matmulTFLOPs?: number;
  shape?: Shape;
  /** burstMs: back-to-back runs (one event pair per run of calls), ms per call. */
  sdpa: { batch: number; memory: number; ms?: number; burstMs?: number; bytes?: number; bandwidth?: number; error?: string }[];
  full?: { batch: number; context: number; ms?: number; bytes?: number; bandwidth?: number; error?: string }[];
  reference?: { batch: number; memory: number; buffer: number; msPerStep?: number; error?: string }[];
  /** Causal prefill attention over cached + C keys (bottom-right-aligned mask), per chunk; `backend` names the SDPA path used. */
  prefill?: { cached: number; chunk: number; ms?: number; p10?: number; p90?: number; tflops?: number; backend?: string; maxErr?: number; error?: string }[];
  /** A full-cache chunked prefill of the prompt: K/V of every token preallocated, each chunk attends to all before it. */
  stream?: { prompt: number; chunk: number; ms?: number; peakBytes?: number; kvBytes?: number; backend?: string; error?: string }[];
  /** The SDPA paths tried for the prefill rows on a small probe against a float32 reference (the first that matched is used). */
  prefillPaths?: { path: string; cached: number; chunk: number; ok: boolean; maxErr?: number | null; error?: string }[];
}

/** What the torch JSON carries beside its per-row lists (recorded in the result's `torch`). */
export type TorchMeta = Omit<TorchResults, 'sdpa' | 'full' | 'reference' | 'prefill' | 'stream'>;

/** Reads and checks bench/torch_compare.py's JSON. @throws {Error} when it is not such a file */
export function readTorch(file: string): TorchResults {
  const t = JSON.parse(readFileSync(file, 'utf8')) as TorchResults;
  if (typeof t !== 'object' || t === null || !Array.isArray(t.sdpa) || typeof t.copyGBs !== 'number') {
    throw new Error(`Expected the JSON of bench/torch_compare.py for --torch but received ${file}`);
  }
  return t;
}
