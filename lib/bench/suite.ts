/**
 * The benchmark suite of `trimkv bench`: sweeps of the kernels (decode, prefill, gate,
 * selection, a whole-model step, a long generation), the device copy ceiling measured in the
 * same run, and the PyTorch comparisons read from bench/torch_compare.py's JSON.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import {
  benchDecode, benchGate, benchLadder, benchModel, benchPrefill, benchPrefillAttend, benchSelect, benchSelectKernel, benchStream,
  copyBandwidth, DTYPE_BYTES, launchCost,
  type BenchOptions, type DecodeBenchCase, type DecodeBenchResult, type GateBenchResult, type LadderResult,
  type ModelBenchResult, type PrefillAttendResult, type PrefillBenchResult, type SelectBenchResult, type SelectKernelCase,
  type SelectKernelResult, type SelectKeys, type Stats, type StreamResult,
} from '../bench.js';
import { TrimKVError } from '../errors.js';
import { packageRoot } from '../native.js';
import { backends, buildInfo, openRuntime, type Runtime } from '../runtime.js';
import type { BackendName, DType, Scope } from '../types.js';

export const SECTIONS = ['decode', 'prefill', 'gate', 'select', 'model', 'ladder', 'stream'] as const;
export type Section = (typeof SECTIONS)[number];

export const SCHEMA = 'trimkv-bench/1';

export interface Shape { qHeads: number; kvHeads: number; headDim: number; dtype: DType }

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

/** The default sweeps: sized for an H100 (whole suite, torch script included, ~6 min) and the CPU. */
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

export interface Failure { error: string }
export type Row<T> = T | (Failure & Record<string, unknown>);

export interface DecodeRow extends DecodeBenchResult {
  fraction: number | null;
  /** Back-to-back bandwidth over the copy ceiling. */
  burstFraction: number | null;
  /** PyTorch flash SDPA over the same retained tokens (M + 1), ms, and its time / ours. */
  sdpaMs: number | null; sdpaRatio: number | null;
  /** The same, both timed back-to-back. */
  sdpaBurstMs: number | null; sdpaBurstRatio: number | null;
  /** The reference pipeline in PyTorch (cat, SDPA, every B steps score + topk + gather), ms per step, and its time / ours. */
  referenceMs: number | null; referenceRatio: number | null;
}
/** A decode step under a budget scope: per layer call, over whole steps of all layers. */
export interface ScopeRow extends DecodeBenchResult {
  scope: Scope; floor: number;
  /** The scope-'head' row of the same batch, M and B: its mean / this mean (above 1: faster). */
  headRatio: number | null;
}
export interface PrefillRow extends PrefillBenchResult { rooflineMs: number | null; fraction: number | null }
export interface PrefillAttendRow extends PrefillAttendResult {
  /** The steady-state chunk with eviction (cache at M = cached, B = 0: attend, select M of M + C, write); null for cached = 0. */
  evict: { memory: number; time: Stats; tflops: number } | null;
  /** PyTorch SDPA over the same cached + C keys, bottom-right causal: ms, TFLOP/s (same FLOP count) and the backend used. */
  sdpaMs: number | null; sdpaTFLOPs: number | null; sdpaBackend: string | null;
  /** Our TFLOP/s over SDPA's (= SDPA time / ours), without and with eviction. */
  sdpaRatio: number | null; evictRatio: number | null;
}
/** A selection-kernel case that did not run on this backend, with the reason (shown as '-'). */
export type SelectKernelRow = SelectKernelResult | (SelectKernelCase & { skipped: string });
export interface StreamRow extends StreamResult {
  /** PyTorch full-cache chunked prefill of the same prompt: total ms, peak allocation growth, K/V bytes, SDPA backend. */
  torchMs: number | null; torchPeakBytes: number | null; torchBackend: string | null;
}
export interface GateRow extends GateBenchResult { fraction: number | null; burstFraction: number | null }
export interface SelectRow extends SelectBenchResult { decodeB0Ms: number | null }
export interface ModelRow extends ModelBenchResult { fraction: number | null; fullCacheBytes: number; context: number }
export interface FullCacheRow {
  batch: number; context: number; torchMs: number;
  /** memory -> torch full-cache time / TRIM-KV decode time (B = 0) at that M. */
  speedup: Record<string, number>;
  fullBytesPerLayer: number;
}

export interface BackendRun {
  backend: BackendName;
  device: { name: string; computeCapability?: string; multiprocessors?: number; totalMemory?: number };
  driver: string | null;
  cudaRuntime: string | null;
  /** Device-to-device copy (read + write), GB/s; null on the CPU backend. */
  copyGBs: number | null;
  /** The CUDA runtime's own host cost per enqueue (us); null on the CPU backend. */
  launch: ReturnType<typeof launchCost>;
  /** Compute ceiling for the prefill roofline, TFLOP/s, and where it comes from. */
  peakTFLOPs: number | null;
  peakSource: string | null;
  plan: BenchPlan;
  sections: Section[];
  decode: Row<DecodeRow>[];
  /** The decode step under each budget scope (section decode). */
  scopes: Row<ScopeRow>[];
  prefill: Row<PrefillRow>[];
  gate: Row<GateRow>[];
  select: Row<SelectRow>[];
  model: Row<ModelRow>[];
  ladder: Row<LadderResult>[];
  fullCache: FullCacheRow[];
  /** Prefill chunks against PyTorch SDPA (section prefill). */
  prefillAttend: Row<PrefillAttendRow>[];
  /** The selection kernel alone (section select). */
  selectKernel: Row<SelectKernelRow>[];
  /** A long prompt streamed in chunks (section stream). */
  stream: Row<StreamRow>[];
  seconds: number;
}

export interface BenchResult {
  schema: typeof SCHEMA;
  date: string;
  commit: string | null;
  node: string;
  platform: string;
  host: { cpu: string; threads: number };
  quick: boolean;
  torch: (TorchMeta & { file: string }) | null;
  runs: BackendRun[];
}

export interface SuiteOptions {
  /** Backends to run, in order ('auto' = CUDA when usable, else the CPU). */
  backends?: ('auto' | BackendName)[];
  quick?: boolean;
  only?: Section[];
  /** Path of bench/torch_compare.py's JSON. */
  torch?: string;
  /** Per-backend plan changes (sections replaced field by field). */
  plan?: (backend: BackendName, plan: BenchPlan) => BenchPlan;
  /** Called as cases start and finish. */
  onProgress?: (p: { done: number; total: number; label: string }) => void;
}

/** Dense bf16 tensor-core peaks (datasheets), used for the prefill roofline when no measured matmul peak is given. */
const DATASHEET_TFLOPS: [RegExp, number][] = [
  [/H200/i, 989], [/H100.*PCIe/i, 756], [/H100.*NVL/i, 835], [/H100|H800|GH200/i, 989],
  [/B200/i, 2250], [/A100/i, 312], [/L40S/i, 362], [/A10G?\b/i, 125], [/L4\b/i, 121],
];

function gitCommit(): string | null {
  if (process.env.TRIMKV_COMMIT) return process.env.TRIMKV_COMMIT;
  try {
    const head = execFileSync('git', ['rev-parse', 'HEAD'], { cwd: packageRoot, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: packageRoot, stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
    return dirty ? `${head}+dirty` : head;
  } catch {
    return null;
  }
}

/** Reads and checks bench/torch_compare.py's JSON. @throws {Error} when it is not such a file */
export function readTorch(file: string): TorchResults {
  const t = JSON.parse(readFileSync(file, 'utf8')) as TorchResults;
  if (typeof t !== 'object' || t === null || !Array.isArray(t.sdpa) || typeof t.copyGBs !== 'number') {
    throw new Error(`Expected the JSON of bench/torch_compare.py for --torch but received ${file}`);
  }
  return t;
}

const ok = <T>(r: Row<T>): r is T => !(r as Failure).error;
const finite = (x: number | null | undefined): number | null => (x === null || x === undefined || !Number.isFinite(x) ? null : x);

interface Case { section: Section; label: string; run: () => void }

/**
 * Runs the suite on each backend and returns the result (JSON-ready: NaN is never stored).
 * @throws {TrimKVError} ERR_BACKEND_UNAVAILABLE for an unusable backend
 */
export async function runSuite(o: SuiteOptions = {}): Promise<BenchResult> {
  const only = new Set<Section>(o.only?.length ? o.only : SECTIONS);
  const torch = o.torch ? readTorch(o.torch) : null;
  const quick = !!o.quick;
  const rts = (o.backends?.length ? o.backends : ['auto' as const]).map((b) => openRuntime(b));
  const plans = rts.map((rt) => { const p = defaultPlan(rt.backend, quick); return o.plan ? o.plan(rt.backend, p) : p; });
  const info = buildInfo();
  const runs: BackendRun[] = [];
  const all: Case[][] = [];
  for (let i = 0; i < rts.length; i++) {
    const rt = rts[i]!, plan = plans[i]!;
    const dev = backends().find((b) => b.name === rt.backend)!.devices[0] ?? { name: rt.backend };
    const cuda = rt.backend === 'cuda';
    const run: BackendRun = {
      backend: rt.backend,
      device: { ...dev },
      driver: cuda ? info.cudaDriver : null,
      cudaRuntime: cuda ? info.cudaRuntime : null,
      copyGBs: null, launch: null, peakTFLOPs: null, peakSource: null, plan, sections: SECTIONS.filter((s) => only.has(s)),
      decode: [], scopes: [], prefill: [], gate: [], select: [], model: [], ladder: [], fullCache: [], prefillAttend: [], selectKernel: [], stream: [], seconds: 0,
    };
    if (cuda) {
      const ds = DATASHEET_TFLOPS.find(([re]) => re.test(dev.name));
      if (torch?.matmulTFLOPs) { run.peakTFLOPs = torch.matmulTFLOPs; run.peakSource = 'PyTorch bf16 matmul, same run'; }
      else if (ds) { run.peakTFLOPs = ds[1]; run.peakSource = 'datasheet, dense bf16'; }
    }
    runs.push(run);
    all.push(cases(rt, plan, run, only, torch));
  }
  const total = all.reduce((s, c) => s + c.length, 0);
  let done = 0;
  for (let i = 0; i < rts.length; i++) {
    const rt = rts[i]!, run = runs[i]!;
    const t0 = performance.now();
    o.onProgress?.({ done, total, label: `${rt.backend}: copy bandwidth` });
    run.copyGBs = finite(copyBandwidth(rt));
    run.launch = launchCost(rt);
    for (const c of all[i]!) {
      o.onProgress?.({ done, total, label: `${rt.backend} ${c.label}` });
      await new Promise((r) => setImmediate(r));  // let the progress bar draw
      c.run();
      done++;
    }
    o.onProgress?.({ done, total, label: `${rt.backend}: done` });
    compare(run, torch);
    run.seconds = (performance.now() - t0) / 1000;
    rt.dispose();
  }
  const cpu = cpus();
  const { sdpa: _s, full: _f, reference: _r, prefill: _p, stream: _t, ...torchMeta } = torch ?? { sdpa: [] };
  return {
    schema: SCHEMA, date: new Date().toISOString(), commit: gitCommit(), node: process.version,
    platform: `${process.platform}-${process.arch}`, host: { cpu: cpu[0]?.model ?? 'unknown', threads: cpu.length }, quick,
    torch: torch ? { ...(torchMeta as TorchMeta), file: o.torch! } : null,
    runs,
  };
}

function attempt<T>(list: Row<T>[], keys: Record<string, unknown>, fn: () => T): void {
  try {
    list.push(fn());
  } catch (e) {
    list.push({ ...keys, error: (e as Error).message });
  }
}

/** The cases of one backend's run; each pushes its row (or the failure) into `run`. */
function cases(rt: Runtime, plan: BenchPlan, run: BackendRun, only: Set<Section>, torch: TorchResults | null): Case[] {
  const out: Case[] = [];
  const bo: BenchOptions = plan.rotateBytes ? { rotateBytes: plan.rotateBytes } : {};
  const sh = plan.shape;
  const frac = (gbs: number) => (run.copyGBs ? gbs / run.copyGBs : null);
  const torchShape = (s: Shape) => rt.backend === 'cuda' && s.qHeads === 32 && s.kvHeads === 8 && s.headDim === 128 && s.dtype === 'bf16' &&
    (!torch?.shape || (torch.shape.qHeads === s.qHeads && torch.shape.kvHeads === s.kvHeads && torch.shape.headDim === s.headDim));
  if (only.has('decode')) {
    const d = plan.decode;
    const dcs: DecodeBenchCase[] = [];
    for (const batch of d.batches) for (const memory of d.memories) for (const buffer of d.buffers) dcs.push({ ...sh, batch, memory, buffer });
    for (const headDim of d.headDims) dcs.push({ ...sh, headDim, batch: d.extraBatch, memory: d.extraMemory, buffer: 0 });
    for (const dtype of d.dtypes) dcs.push({ ...sh, dtype, batch: d.extraBatch, memory: d.extraMemory, buffer: 0 });
    for (const c of dcs) {
      out.push({ section: 'decode', label: `decode b=${c.batch} M=${c.memory} B=${c.buffer} D=${c.headDim} ${c.dtype}`, run: () => attempt(run.decode, { ...c }, () => {
        const r = benchDecode(rt, c, d.calls, bo);
        const same = torchShape(c);
        const s = same ? torch?.sdpa.find((x) => x.batch === c.batch && x.memory === c.memory && x.ms) : undefined;
        const ref = same ? torch?.reference?.find((x) => x.batch === c.batch && x.memory === c.memory && x.buffer === c.buffer && x.msPerStep) : undefined;
        return {
          ...r, fraction: frac(r.bandwidth), burstFraction: frac(r.burstBandwidth),
          sdpaMs: s?.ms ?? null, sdpaRatio: s?.ms ? s.ms / r.time.median : null,
          sdpaBurstMs: s?.burstMs ?? null, sdpaBurstRatio: s?.burstMs ? s.burstMs / r.burst.median : null,
          referenceMs: ref?.msPerStep ?? null, referenceRatio: ref?.msPerStep ? ref.msPerStep / r.time.median : null,
        };
      }) });
    }
  }
  if (only.has('decode')) {
    const sc = plan.decode.scopes;
    for (const batch of sc.batches) for (const buffer of sc.buffers) for (const { scope, floor } of sc.cases) {
      const c: DecodeBenchCase = { ...sh, batch, memory: sc.memory, buffer, scope, floor, layers: sc.layers };
      out.push({ section: 'decode', label: `decode scope=${scope} floor=${floor} b=${batch} M=${sc.memory} B=${buffer} L=${sc.layers}`,
        run: () => attempt(run.scopes, { ...c }, () => {
          const r = benchDecode(rt, c, Math.max(plan.decode.calls, 4 * sc.layers), bo);
          const head = run.scopes.find((x): x is ScopeRow => ok(x) && x.scope === 'head' && x.batch === batch && x.buffer === buffer);
          return { ...r, scope, floor, headRatio: head && scope !== 'head' ? head.time.mean / r.time.mean : null };
        }) });
    }
  }
  if (only.has('prefill')) {
    for (const chunk of plan.prefill.chunks) for (const memory of plan.prefill.memories) {
      const c = { ...sh, chunk, memory, buffer: 0 };
      out.push({ section: 'prefill', label: `prefill C=${chunk} M=${memory}`, run: () => attempt(run.prefill, { ...c }, () => {
        const r = benchPrefill(rt, c, plan.prefill.calls, bo);
        const rooflineMs = run.copyGBs && run.peakTFLOPs
          ? Math.max(r.bytes / (run.copyGBs * 1e9), r.flops / (run.peakTFLOPs * 1e12)) * 1e3 : null;
        return { ...r, rooflineMs, fraction: rooflineMs === null ? null : rooflineMs / r.time.median };
      }) });
    }
    const a = plan.prefill.attend;
    for (const cached of a.cached) for (const chunk of a.chunks) {
      const c = { ...sh, cached, chunk };
      out.push({ section: 'prefill', label: `prefill vs SDPA cached=${cached} C=${chunk}`, run: () => attempt(run.prefillAttend, { ...c }, () => {
        const r = benchPrefillAttend(rt, c, a.calls, bo);
        let evict: PrefillAttendRow['evict'] = null;
        if (cached > 0) {
          const e = benchPrefill(rt, { ...sh, chunk, memory: cached, buffer: 0 }, a.calls, bo);
          evict = { memory: cached, time: e.time, tflops: r.flops / (e.time.median * 1e-3) / 1e12 };
        }
        const t = torchShape(sh) ? torch?.prefill?.find((x) => x.cached === cached && x.chunk === chunk && x.ms) : undefined;
        const sdpaMs = t?.ms ?? null;
        return {
          ...r, evict, sdpaMs, sdpaTFLOPs: sdpaMs ? r.flops / (sdpaMs * 1e-3) / 1e12 : null, sdpaBackend: t?.backend ?? null,
          sdpaRatio: sdpaMs ? sdpaMs / r.time.median : null, evictRatio: sdpaMs && evict ? sdpaMs / evict.time.median : null,
        };
      }) });
    }
  }
  if (only.has('gate')) {
    const g = plan.gate;
    for (const batch of g.batches) {
      out.push({ section: 'gate', label: `gate b=${batch}`, run: () => attempt(run.gate, { batch }, () => {
        const r = benchGate(rt, batch, g.hiddenSize, g.intermediate, sh.kvHeads, g.calls, bo);
        return { ...r, fraction: frac(r.bandwidth), burstFraction: r.burstBandwidth ? frac(r.burstBandwidth) : null };
      }) });
    }
  }
  if (only.has('select')) {
    const s = plan.select;
    for (const batch of s.batches) for (const memory of s.memories) {
      const c = { ...sh, batch, memory, buffer: s.buffer };
      out.push({ section: 'select', label: `selection b=${batch} M=${memory} B=${s.buffer}`, run: () => attempt(run.select, { ...c }, () => {
        const r = benchSelect(rt, c, s.evictions, bo);
        const b0 = run.decode.find((x): x is DecodeRow => ok(x) && x.batch === batch && x.memory === memory && x.buffer === 0 &&
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
  }
  if (only.has('model')) {
    const m = plan.model;
    for (const batch of m.batches) for (const memory of m.memories) {
      const c = { ...sh, layers: m.layers, batch, memory, buffer: 0, hiddenSize: m.hiddenSize, gateIntermediate: m.gateIntermediate };
      out.push({ section: 'model', label: `model ${m.layers} layers b=${batch} M=${memory}`, run: () => attempt(run.model, { ...c }, () => {
        const r = benchModel(rt, c, m.steps);
        return { ...r, fraction: frac(r.bandwidth), context: m.context, fullCacheBytes: r.fullBytesPerToken * m.context };
      }) });
    }
  }
  if (only.has('ladder')) {
    const l = plan.ladder;
    for (const memory of [...l.memories, ...(l.full ? [null] : [])]) {
      const c = { ...sh, batch: l.batch, memory, buffer: 0, samples: l.samples, stepsPerSample: l.stepsPerSample };
      out.push({ section: 'ladder', label: `generation to ${l.samples.at(-1)} tokens, ${memory === null ? 'full cache' : `M=${memory}`}`,
        run: () => attempt(run.ladder, { ...c }, () => benchLadder(rt, c, undefined, bo)) });
    }
  }
  if (only.has('stream')) {
    const st = plan.stream;
    for (const prompt of st.prompts) {
      const c = { ...sh, prompt, chunk: st.chunk, memory: st.memory, buffer: st.buffer };
      out.push({ section: 'stream', label: `${prompt}-token prompt in chunks of ${st.chunk}, M=${st.memory}`, run: () => attempt(run.stream, { ...c }, () => {
        const r = benchStream(rt, c);
        const t = torchShape(sh) ? torch?.stream?.find((x) => x.prompt === prompt && x.chunk === st.chunk && x.ms) : undefined;
        return { ...r, torchMs: t?.ms ?? null, torchPeakBytes: t?.peakBytes ?? null, torchBackend: t?.backend ?? null };
      }) });
    }
  }
  return out;
}

/** The full-cache comparison: PyTorch decode over T tokens against TRIM-KV decode at each M (same batch). */
function compare(run: BackendRun, torch: TorchResults | null): void {
  if (!torch?.full || run.backend !== 'cuda') return;
  const sh = run.plan.shape;
  for (const f of torch.full) {
    if (!f.ms) continue;
    const speedup: Record<string, number> = {};
    for (const d of run.decode) {
      if (ok(d) && d.batch === f.batch && d.buffer === 0 && d.headDim === 128 && d.dtype === 'bf16' && d.qHeads === 32 && d.kvHeads === 8) {
        speedup[String(d.memory)] = f.ms / d.time.median;
      }
    }
    run.fullCache.push({ batch: f.batch, context: f.context, torchMs: f.ms, speedup,
      fullBytesPerLayer: f.batch * f.context * sh.kvHeads * 2 * sh.headDim * DTYPE_BYTES[sh.dtype] });
  }
}

export { ok as isRow };
