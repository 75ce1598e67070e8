/**
 * A realistic long decode on a model-shaped workload with a synthetic retention gate: the
 * workload of `trimkv demo`. Inputs are random (no model weights), so the numbers measure the
 * cache and attention, not a language model.
 */
import type { Runtime } from '../runtime.js';
import type { DType } from '../types.js';

export interface DemoOptions {
  layers: number; qHeads: number; kvHeads: number; headDim: number;
  batch: number; memory: number; buffer: number; prompt: number; steps: number; dtype: DType;
}

export interface DemoProgress { tokensPerSecond: number; cacheBytes: number }

export interface DemoSummary {
  backend: string;
  options: DemoOptions;
  tokensGenerated: number;
  promptTokens: number;
  cacheBytes: number;
  fullCacheBytes: number;
  tokensPerHead: number;
  tokensPerSecond: number;
  msPerStep: number;
}

const GATE_HIDDEN = 256;
const GATE_INTERMEDIATE = 64;

function randomArray(n: number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = (Math.random() * 2 - 1) * scale;
  return a;
}

/** Runs prefill then `steps` decode steps; calls `onProgress` after each step. */
export async function runDemo(rt: Runtime, o: DemoOptions, onProgress: (done: number, p: DemoProgress) => void): Promise<DemoSummary> {
  const cache = rt.createCache({ layers: o.layers, batch: o.batch, qHeads: o.qHeads, kvHeads: o.kvHeads,
    headDim: o.headDim, memory: o.memory, buffer: o.buffer, dtype: o.dtype });
  // A synthetic "rg" gate per model: bias 3 (beta about 0.95) with random weights, so tokens
  // get different retentions, as a trained gate would give them.
  const gate = rt.createGate({
    kind: 'rg', activation: 'silu', inputSize: GATE_HIDDEN, intermediateSize: GATE_INTERMEDIATE, kvHeads: o.kvHeads,
    weights: {
      linear1Weight: randomArray(GATE_INTERMEDIATE * GATE_HIDDEN, 1 / Math.sqrt(GATE_HIDDEN)),
      linear1Bias: randomArray(GATE_INTERMEDIATE, 0.1),
      linear2Weight: randomArray(o.kvHeads * GATE_INTERMEDIATE, 2 / Math.sqrt(GATE_INTERMEDIATE)),
      bias: new Float32Array(o.kvHeads).fill(3),
    },
  });
  const { batch: B, qHeads: Hq, kvHeads: Hkv, headDim: D } = o;
  // Prefill every sequence in chunks of up to 512 tokens.
  const chunk = Math.max(1, Math.min(512, o.prompt));
  for (let s = 0; s < B; s++) {
    for (let start = 0; start < o.prompt; start += chunk) {
      const C = Math.min(chunk, o.prompt - start);
      const x = rt.fromArray(randomArray(C * GATE_HIDDEN), [C, GATE_HIDDEN], 'fp32');
      const lam = rt.tensor([C, Hkv], 'fp32');
      const q = rt.fromArray(randomArray(C * Hq * D), [C, Hq, D], o.dtype);
      const k = rt.fromArray(randomArray(C * Hkv * D), [C, Hkv, D], o.dtype);
      const v = rt.fromArray(randomArray(C * Hkv * D), [C, Hkv, D], o.dtype);
      const out = rt.tensor([C, Hq, D], o.dtype);
      for (let l = 0; l < o.layers; l++) {
        gate.run(x, lam);
        cache.prefill(l, { seq: s, start, q, k, v, lam, out });
      }
      for (const t of [x, lam, q, k, v, out]) t.dispose();
    }
  }
  await rt.synchronize();
  // Decode: fresh inputs every step (a few sets, rotated, so host work stays small).
  const sets = Array.from({ length: 4 }, () => ({
    x: rt.fromArray(randomArray(B * GATE_HIDDEN), [B, GATE_HIDDEN], 'fp32'),
    q: rt.fromArray(randomArray(B * Hq * D), [B, Hq, D], o.dtype),
    k: rt.fromArray(randomArray(B * Hkv * D), [B, Hkv, D], o.dtype),
    v: rt.fromArray(randomArray(B * Hkv * D), [B, Hkv, D], o.dtype),
  }));
  const lam = rt.tensor([B, Hkv], 'fp32');
  const out = rt.tensor([B, Hq, D], o.dtype);
  const positions = new Int32Array(B);
  const t0 = performance.now();
  let lastYield = t0;
  for (let step = 0; step < o.steps; step++) {
    positions.fill(o.prompt + step);
    for (let l = 0; l < o.layers; l++) {
      const s = sets[(step * o.layers + l) % sets.length]!;
      gate.run(s.x, lam);
      cache.decode(l, { q: s.q, k: s.k, v: s.v, lam, out, positions });
    }
    const now = performance.now();
    if (now - lastYield > 100 || step === o.steps - 1) {
      if (rt.backend === 'cuda') await rt.synchronize();
      lastYield = performance.now();
      const elapsed = (lastYield - t0) / 1000;
      onProgress(step + 1, { tokensPerSecond: (B * (step + 1)) / elapsed, cacheBytes: cache.memoryBytes().used });
      await new Promise((r) => setImmediate(r));
    }
  }
  await rt.synchronize();
  const seconds = (performance.now() - t0) / 1000;
  const lengths = cache.lengths();
  const summary: DemoSummary = {
    backend: rt.backend,
    options: o,
    tokensGenerated: B * o.steps,
    promptTokens: B * o.prompt,
    cacheBytes: cache.memoryBytes().used,
    fullCacheBytes: cache.fullCacheBytes(),
    tokensPerHead: Math.max(...lengths),
    tokensPerSecond: (B * o.steps) / seconds,
    msPerStep: (seconds * 1000) / o.steps,
  };
  cache.dispose();
  gate.dispose();
  return summary;
}
