/**
 * The benchmark suite of `trimkv bench`: sweeps of the kernels (decode, prefill, gate,
 * selection, a whole-model step, a long generation; one file per section in bench/cases/), the
 * device copy ceiling measured in the same run, and the PyTorch comparisons read from
 * bench/torch_compare.py's JSON.
 */
import { execFileSync } from 'node:child_process';
import { cpus } from 'node:os';
import { DTYPE_BYTES } from '../lib/constants.js';
import { packageRoot } from '../lib/native.js';
import { backends, buildInfo, openRuntime, type Runtime } from '../lib/runtime.js';
import type { BackendName } from '../lib/types.js';
import { isRow, type Case, type CaseContext, type Row } from './case.js';
import { decodeCases, type DecodeRow, type ScopeRow } from './cases/decode.js';
import { gateCases, type GateRow } from './cases/gate.js';
import { ladderCases, type LadderResult } from './cases/ladder.js';
import { modelCases, type ModelRow } from './cases/model.js';
import { prefillCases, type PrefillAttendRow, type PrefillRow } from './cases/prefill.js';
import { selectCases, type SelectKernelRow, type SelectRow } from './cases/select.js';
import { streamCases, type StreamRow } from './cases/stream.js';
import { defaultPlan, SECTIONS, type BenchPlan, type Section, type Shape } from './plan.js';
import { copyBandwidth, launchCost } from './timing.js';
import { readTorch, type TorchMeta, type TorchResults } from './torch.js';

export const SCHEMA = 'trimkv-bench/1';

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

const finite = (x: number | null | undefined): number | null => (x === null || x === undefined || !Number.isFinite(x) ? null : x);

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

/** The cases of each section, in the order of SECTIONS. */
const SECTION_CASES: { [S in Section]: (cx: CaseContext, run: BackendRun) => Case[] } = {
  decode: decodeCases, prefill: prefillCases, gate: gateCases, select: selectCases, model: modelCases, ladder: ladderCases,
  stream: streamCases,
};

/** The cases of one backend's run; each pushes its row (or the failure) into `run`. */
function cases(rt: Runtime, plan: BenchPlan, run: BackendRun, only: Set<Section>, torch: TorchResults | null): Case[] {
  const cx: CaseContext = {
    rt, plan, torch,
    bo: plan.rotateBytes ? { rotateBytes: plan.rotateBytes } : {},
    frac: (gbs: number) => (run.copyGBs ? gbs / run.copyGBs : null),
    torchShape: (s: Shape) => rt.backend === 'cuda' && s.qHeads === 32 && s.kvHeads === 8 && s.headDim === 128 && s.dtype === 'bf16' &&
      (!torch?.shape || (torch.shape.qHeads === s.qHeads && torch.shape.kvHeads === s.kvHeads && torch.shape.headDim === s.headDim)),
  };
  return SECTIONS.filter((s) => only.has(s)).flatMap((s) => SECTION_CASES[s](cx, run));
}

/** The full-cache comparison: PyTorch decode over T tokens against TRIM-KV decode at each M (same batch). */
function compare(run: BackendRun, torch: TorchResults | null): void {
  if (!torch?.full || run.backend !== 'cuda') return;
  const sh = run.plan.shape;
  for (const f of torch.full) {
    if (!f.ms) continue;
    const speedup: Record<string, number> = {};
    for (const d of run.decode) {
      if (isRow(d) && d.batch === f.batch && d.buffer === 0 && d.headDim === 128 && d.dtype === 'bf16' && d.qHeads === 32 && d.kvHeads === 8) {
        speedup[String(d.memory)] = f.ms / d.time.median;
      }
    }
    run.fullCache.push({ batch: f.batch, context: f.context, torchMs: f.ms, speedup,
      fullBytesPerLayer: f.batch * f.context * sh.kvHeads * 2 * sh.headDim * DTYPE_BYTES[sh.dtype] });
  }
}
