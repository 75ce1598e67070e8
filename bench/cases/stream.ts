/** Section "stream": a long prompt streamed through one layer in chunks into a cache of M. */
import { DTYPE_BYTES } from '../../lib/constants.js';
import type { Runtime } from '../../lib/runtime.js';
import type { DType } from '../../lib/types.js';
import { attempt, type Case, type CaseContext, type Row } from '../case.js';
import { layerTensors } from '../inputs.js';
import { deviceMemoryUsed, stats, timeMany, warmUp, type Stats } from '../timing.js';

export interface StreamCase {
  /** Prompt tokens, streamed in chunks of `chunk` (the last one may be shorter). */
  prompt: number;
  chunk: number;
  memory: number; buffer: number;
  qHeads: number; kvHeads: number; headDim: number; dtype: DType;
}

export interface StreamResult extends StreamCase {
  chunks: number;
  /** Device time of each chunk (attend + evict), ms. */
  chunkTime: Stats;
  /** Sum of the chunks' device times, ms (queued back to back behind a spin: no launch gaps). */
  totalMs: number;
  /** The cache's slots (K, V, position, lam for M + B tokens per head) and lengths. */
  reservedBytes: number;
  /** Bytes the retained tokens hold after the stream. */
  usedBytes: number;
  /** GPU memory growth from before the cache was made to after the stream (cudaMemGetInfo): slots and workspaces; null off CUDA. */
  allocatedBytes: number | null;
  /** The chunk's own q, k, v, lam and out (the caller's tensors, made before the baseline). */
  chunkBytes: number;
  /** K and V of every prompt token: what a full cache holds after the same prompt. */
  fullCacheBytes: number;
}

/**
 * A long prompt streamed through one layer in chunks of C (batch 1): each chunk attends to the
 * retained tokens and causally to itself, then the cache is evicted back to M. Reports the
 * chunks' device times and the cache's memory against a full cache of the prompt.
 * @throws {TrimKVError} from the cache
 */
export function benchStream(rt: Runtime, c: StreamCase): StreamResult {
  const { prompt: P, chunk: C, qHeads: Hq, kvHeads: Hkv, headDim: D, dtype } = c;
  if (!(P >= C && C >= 1)) throw new RangeError(`Expected 1 <= chunk <= prompt for benchStream but received chunk ${C}, prompt ${P}`);
  const chunks = Math.ceil(P / C), last = P - (chunks - 1) * C;
  const owned: { dispose(): void }[] = [];
  const set = (n: number) => {
    const t = layerTensors(rt, n, c);
    owned.push(...Object.values(t));
    return t;
  };
  try {
    const full = set(C);
    const tail = last === C ? full : set(last);
    const chunkBytes = C * (2 * Hq * D * DTYPE_BYTES[dtype] + 2 * Hkv * D * DTYPE_BYTES[dtype] + 4 * Hkv);
    const before = deviceMemoryUsed(rt);
    const cache = rt.createCache({ layers: 1, batch: 1, qHeads: Hq, kvHeads: Hkv, headDim: D, memory: c.memory, buffer: c.buffer, dtype });
    owned.push(cache);
    const call = (i: number) => cache.prefill(0, { seq: 0, start: i * C, ...(i === chunks - 1 ? tail : full) });
    // Warm-up: a few chunks (kernels loaded, the prefill workspace grown), then start over.
    const hostMs = warmUp(Math.min(chunks, 4), call);
    cache.reset(0);
    const ms = timeMany(rt, chunks, call, hostMs);
    const after = deviceMemoryUsed(rt);
    const { used, reserved } = cache.memoryBytes();
    return {
      ...c, chunks, chunkTime: stats(ms), totalMs: ms.reduce((a, b) => a + b, 0),
      reservedBytes: reserved, usedBytes: used, allocatedBytes: before === null || after === null ? null : after - before,
      chunkBytes, fullCacheBytes: P * Hkv * D * 2 * DTYPE_BYTES[dtype],
    };
  } finally {
    for (const t of owned) t.dispose();
  }
}

export interface StreamRow extends StreamResult {
  /** PyTorch full-cache chunked prefill of the same prompt: total ms, peak allocation growth, K/V bytes, SDPA backend. */
  torchMs: number | null; torchPeakBytes: number | null; torchBackend: string | null;
}

/** The streamed-prompt cases of a run (rows in run.stream). */
export function streamCases(cx: CaseContext, run: { stream: Row<StreamRow>[] }): Case[] {
  const { rt, plan, torch, torchShape } = cx;
  const sh = plan.shape;
  const out: Case[] = [];
  const st = plan.stream;
  for (const prompt of st.prompts) {
    const c = { ...sh, prompt, chunk: st.chunk, memory: st.memory, buffer: st.buffer };
    out.push({ section: 'stream', label: `${prompt}-token prompt in chunks of ${st.chunk}, M=${st.memory}`, run: () => attempt(run.stream, { ...c }, () => {
      const r = benchStream(rt, c);
      const t = torchShape(sh) ? torch?.stream?.find((x) => x.prompt === prompt && x.chunk === st.chunk && x.ms) : undefined;
      return { ...r, torchMs: t?.ms ?? null, torchPeakBytes: t?.peakBytes ?? null, torchBackend: t?.backend ?? null };
    }) });
  }
  return out;
}
