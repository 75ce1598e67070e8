/** What a run of `trimkv bench` measures: the sections, and each backend's default sweeps. */
import type { BackendName, DType, Scope } from '../lib/types.js';

export const SECTIONS = ['decode', 'prefill', 'gate', 'select', 'model', 'ladder', 'stream'] as const;
export type Section = (typeof SECTIONS)[number];

export interface Shape { qHeads: number; kvHeads: number; headDim: number; dtype: DType }

/** Keys of the selection-kernel benchmark: uniformly random, or decayed scores of a cache. */
export type SelectKeys = 'random' | 'scores';

/** What one backend's run measures. Every list may be emptied to skip cases. */
export interface BenchPlan {
  shape: Shape;
  decode: { batches: number[]; memories: number[]; buffers: number[]; calls: number;
    /** Extra rows at (extraBatch, extraMemory, B = 0): other head dims, then other dtypes. */
    headDims: number[]; dtypes: DType[]; extraBatch: number; extraMemory: number;
    /** The budget scopes on a cache of `layers` layers (pooled layout for 'layer' / 'global'). */
    scopes: { batches: number[]; memory: number; buffers: number[]; layers: number; cases: { scope: Scope; floor: number }[] } };
  prefill: { chunks: number[]; memories: number[]; calls: number;
    /** Chunks over `cached` tokens with nothing evicted (and, for cached > 0, evicting to M = cached), against PyTorch SDPA. */
    attend: { cached: number[]; chunks: number[]; calls: number } };
  gate: { batches: number[]; hiddenSize: number; intermediate: number; calls: number };
  select: { batches: number[]; memories: number[]; buffer: number; evictions: number;
    /** The selection kernel alone: rows x (memory + each extra) candidates, top `memory`. */
    kernel: { rows: number[]; memory: number; extras: number[]; keys: SelectKeys[]; threads: number; iters: number } };
  model: { layers: number; batches: number[]; memories: number[]; hiddenSize: number; gateIntermediate: number; steps: number;
    /** The context at which the full-cache memory is quoted. */
    context: number };
  ladder: { batch: number; memories: number[]; full: boolean; samples: number[]; stepsPerSample: number;
    /** Layers of the model the memory plot scales to. */
    modelLayers: number };
  /** A long prompt streamed through one layer (batch 1) in chunks into a cache of M. */
  stream: { prompts: number[]; chunk: number; memory: number; buffer: number };
  rotateBytes?: number;
}

const QWEN3_4B: Shape = { qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'bf16' };
/** Budget scopes compared in the decode section: the fixed layout, then the pooled ones. */
const SCOPE_CASES: { scope: Scope; floor: number }[] = [{ scope: 'head', floor: 0 }, { scope: 'layer', floor: 0 }, { scope: 'global', floor: 0.25 }];
const pow2 = (from: number, to: number) => { const r: number[] = []; for (let x = from; x <= to; x *= 2) r.push(x); return r; };

/** The default sweeps: sized for the H200 of the GPU machine (whole suite, torch script included, a few minutes) and the CPU. */
export function defaultPlan(backend: BackendName, quick: boolean): BenchPlan {
  const model = { layers: 36, hiddenSize: 2560, gateIntermediate: 512, context: 32768 };
  if (backend === 'cuda') {
    return quick ? {
      shape: QWEN3_4B,
      decode: { batches: [1, 32], memories: [512, 4096], buffers: [0, 64], calls: 200, headDims: [], dtypes: [], extraBatch: 32, extraMemory: 2048,
        scopes: { batches: [8], memory: 1024, buffers: [0, 64], layers: 8, cases: SCOPE_CASES } },
      prefill: { chunks: [512], memories: [2048], calls: 50, attend: { cached: [0, 1024], chunks: [512, 2048], calls: 10 } },
      gate: { batches: [1, 8, 128], hiddenSize: 2560, intermediate: 512, calls: 100 },
      select: { batches: [8], memories: [2048], buffer: 64, evictions: 4,
        kernel: { rows: [64 * 8], memory: 4096, extras: [64, 2048], keys: ['random'], threads: 1024, iters: 30 } },
      model: { ...model, batches: [8], memories: [1024], steps: 10 },
      ladder: { batch: 8, memories: [512, 4096], full: true, samples: pow2(256, 8192), stepsPerSample: 4, modelLayers: 36 },
      stream: { prompts: [32768], chunk: 2048, memory: 2048, buffer: 0 },
    } : {
      shape: QWEN3_4B,
      decode: { batches: [1, 8, 32, 128], memories: [512, 1024, 2048, 4096, 8192], buffers: [0, 64], calls: 300,
        headDims: [64, 256], dtypes: ['fp16', 'fp32'], extraBatch: 32, extraMemory: 2048,
        scopes: { batches: [8, 32], memory: 2048, buffers: [0, 64], layers: 36, cases: SCOPE_CASES } },
      prefill: { chunks: [128, 512, 2048], memories: [512, 2048, 8192], calls: 100,
        attend: { cached: [0, 1024, 4096], chunks: [512, 2048, 8192], calls: 30 } },
      gate: { batches: [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048], hiddenSize: 2560, intermediate: 512, calls: 200 },
      select: { batches: [8, 32], memories: [512, 2048, 4096], buffer: 64, evictions: 6,
        kernel: { rows: [8 * 8, 64 * 8], memory: 4096, extras: [64, 2048], keys: ['random', 'scores'], threads: 1024, iters: 100 } },
      model: { ...model, batches: [1, 8, 32], memories: [512, 1024, 2048, 4096], steps: 20 },
      ladder: { batch: 8, memories: [512, 1024, 2048, 4096], full: true, samples: pow2(256, 32768), stepsPerSample: 8, modelLayers: 36 },
      stream: { prompts: [131072], chunk: 2048, memory: 2048, buffer: 0 },
    };
  }
  return quick ? {
    shape: QWEN3_4B,
    decode: { batches: [1], memories: [256], buffers: [0, 32], calls: 20, headDims: [], dtypes: [], extraBatch: 1, extraMemory: 256,
      scopes: { batches: [1], memory: 64, buffers: [0, 16], layers: 2, cases: SCOPE_CASES } },
    prefill: { chunks: [64], memories: [256], calls: 5, attend: { cached: [0, 256], chunks: [64], calls: 3 } },
    gate: { batches: [1, 8], hiddenSize: 2560, intermediate: 512, calls: 10 },
    select: { batches: [1], memories: [256], buffer: 16, evictions: 3,
      kernel: { rows: [64 * 8], memory: 4096, extras: [64, 2048], keys: ['random'], threads: 1024, iters: 30 } },
    model: { ...model, batches: [1], memories: [256], steps: 3 },
    ladder: { batch: 1, memories: [64], full: true, samples: [32, 64, 128, 256], stepsPerSample: 2, modelLayers: 36 },
    stream: { prompts: [1024], chunk: 256, memory: 256, buffer: 0 },
  } : {
    shape: QWEN3_4B,
    decode: { batches: [1, 4], memories: [256, 512], buffers: [0, 64], calls: 30, headDims: [64], dtypes: ['fp32'], extraBatch: 1, extraMemory: 512,
      scopes: { batches: [1], memory: 256, buffers: [0, 32], layers: 4, cases: SCOPE_CASES } },
    prefill: { chunks: [64, 256], memories: [256], calls: 8, attend: { cached: [0, 256], chunks: [64, 256], calls: 4 } },
    gate: { batches: [1, 8, 64], hiddenSize: 2560, intermediate: 512, calls: 20 },
    select: { batches: [1], memories: [256], buffer: 32, evictions: 4,
      kernel: { rows: [64 * 8], memory: 4096, extras: [64, 2048], keys: ['random'], threads: 1024, iters: 30 } },
    model: { ...model, batches: [1], memories: [256], steps: 5 },
    ladder: { batch: 1, memories: [64, 256], full: true, samples: pow2(32, 1024), stepsPerSample: 4, modelLayers: 36 },
    stream: { prompts: [4096], chunk: 256, memory: 256, buffer: 0 },
  };
}
