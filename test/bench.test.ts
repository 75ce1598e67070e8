/** The benchmark suite (bench/): stats, the SVG writer, and a tiny CPU run end to end. */
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test, vi } from 'vitest';
import { deviceMemoryUsed, stats, timeMany } from '../bench/timing.js';
import { causalAttentionFlops, type PrefillAttendRow } from '../bench/cases/prefill.js';
import { benchSelectKernel, type SelectKernelRow } from '../bench/cases/select.js';
import type { DecodeRow } from '../bench/cases/decode.js';
import type { GateRow } from '../bench/cases/gate.js';
import type { StreamRow } from '../bench/cases/stream.js';
import { TrimKVError } from '../lib/errors.js';
import { openRuntime } from '../lib/runtime.js';
import { escapeXml, formatTick, linePlot } from '../bench/svg.js';
import { main } from '../lib/cli/index.js';
import { SECTIONS, type BenchPlan } from '../bench/plan.js';
import { runSuite, SCHEMA, type BenchResult } from '../bench/suite.js';
import { readTorch } from '../bench/torch.js';
import { writeReport } from '../bench/report.js';
import { runtimeFor } from './harness.js';

describe('stats', () => {
  test('median, quantiles, mean and spread of an odd count', () => {
    const s = stats([5, 1, 3, 2, 4]);
    expect(s).toMatchObject({ median: 3, n: 5, min: 1, max: 5, mean: 3 });
    expect(s.p10).toBeCloseTo(1.4, 12);
    expect(s.p90).toBeCloseTo(4.6, 12);
    expect(s.spread).toBeCloseTo((4.6 - 1.4) / 3, 12);
  });
  test('median of an even count interpolates between the middle two', () => {
    expect(stats([4, 1, 3, 2]).median).toBe(2.5);
  });
  test('a single sample is every quantile, with zero spread', () => {
    expect(stats(new Float64Array([7]))).toMatchObject({ median: 7, p10: 7, p90: 7, spread: 0, n: 1 });
  });
  test('does not reorder the caller\'s samples', () => {
    const a = [3, 1, 2];
    stats(a);
    expect(a).toEqual([3, 1, 2]);
  });
  test('no samples is a RangeError', () => {
    expect(() => stats([])).toThrow(RangeError);
  });
  test('a NaN sample is a RangeError', () => {
    expect(() => stats([1, Number.NaN])).toThrow(/finite samples/);
  });
});

/** Minimal well-formedness check: balanced tags, one root <svg>, nothing after it. */
function checkXml(svg: string): void {
  expect(svg.startsWith('<svg ')).toBe(true);
  expect(svg.trimEnd().endsWith('</svg>')).toBe(true);
  const stack: string[] = [];
  for (const m of svg.matchAll(/<(\/?)([a-zA-Z][\w:-]*)([^>]*?)(\/?)>/g)) {
    const [, close, name, attrs, self] = m;
    expect(attrs!.split('"').length % 2, `unbalanced quotes in <${name}${attrs}>`).toBe(1);
    if (self) continue;
    if (close) expect(stack.pop()).toBe(name);
    else stack.push(name!);
  }
  expect(stack).toEqual([]);
  expect(svg.replace(/<[^>]*>/g, '')).not.toMatch(/[<>]|&(?!(amp|lt|gt|quot|apos);)/);
}

const countSeries = (svg: string) => (svg.match(/<g class="series"/g) ?? []).length;

describe('linePlot', () => {
  test('writes one group per series, a legend entry each, and the reference line', () => {
    const svg = linePlot({
      title: 'a < b & c', xLabel: 'x', yLabel: 'y', xLog: true, yLog: true,
      series: [{ name: 'one', points: [[1, 1], [2, 4], [4, 16]] }, { name: 'two "q"', dashed: true, points: [[1, 2], [4, 3]] }],
      lines: [{ y: 10, label: 'ceiling' }],
    });
    checkXml(svg);
    expect(countSeries(svg)).toBe(2);
    expect(svg).toContain('a &lt; b &amp; c');
    expect(svg).toContain('data-name="two &quot;q&quot;"');
    expect(svg).toContain('class="reference"');
    expect(svg).toContain('stroke-dasharray="6 4"');
  });
  test('skips non-finite and non-positive points on log axes but keeps the series', () => {
    const svg = linePlot({ title: 't', xLabel: 'x', yLabel: 'y', xLog: true, yLog: true,
      series: [{ name: 'a', points: [[0, 1], [1, Number.NaN], [2, 3]] }, { name: 'empty', points: [] }] });
    checkXml(svg);
    expect(countSeries(svg)).toBe(2);
    expect(svg).not.toContain('NaN');
  });
  test('linear axes start at zero and label the ticks', () => {
    const svg = linePlot({ title: 't', xLabel: 'x', yLabel: 'y', series: [{ name: 'a', points: [[10, 1], [20, 7]] }] });
    checkXml(svg);
    expect(svg).toMatch(/>0<\/text>/);
  });
  test('formatTick and escapeXml', () => {
    expect(formatTick(32768)).toBe('32K');
    expect(formatTick(2 ** 20)).toBe('1M');
    expect(formatTick(1500)).toBe('1.5K');
    expect(formatTick(0.25)).toBe('0.25');
    expect(escapeXml(`<&>"'`)).toBe('&lt;&amp;&gt;&quot;&apos;');
  });
});

/** Tiny sizes: the whole suite in a few seconds on a 2-core machine. */
function tiny(_b: string, p: BenchPlan): BenchPlan {
  return {
    shape: { qHeads: 4, kvHeads: 2, headDim: 32, dtype: 'bf16' },
    decode: { batches: [1, 2], memories: [16], buffers: [0, 8], calls: 10, headDims: [64], dtypes: ['fp32'], extraBatch: 1, extraMemory: 16,
      scopes: { batches: [2], memory: 16, buffers: [0, 8], layers: 2, cases: [{ scope: 'head', floor: 0 }, { scope: 'layer', floor: 0 }, { scope: 'global', floor: 0.25 }] } },
    prefill: { chunks: [8], memories: [16], calls: 5, attend: { cached: [0, 8], chunks: [8], calls: 2 } },
    gate: { batches: [1, 4], hiddenSize: 64, intermediate: 32, calls: 5 },
    select: { batches: [1], memories: [16], buffer: 4, evictions: 2,
      kernel: { rows: [4], memory: 16, extras: [4, 8], keys: ['random'], threads: 32, iters: 3 } },
    model: { ...p.model, layers: 2, batches: [1], memories: [16], hiddenSize: 64, gateIntermediate: 32, steps: 3, context: 1024 },
    ladder: { batch: 1, memories: [8, 16], full: true, samples: [4, 16, 32], stepsPerSample: 2, modelLayers: 36 },
    stream: { prompts: [72], chunk: 16, memory: 16, buffer: 0 },
    rotateBytes: 64 * 1024,
  };
}

describe('runSuite (CPU backend, --quick, tiny sizes)', () => {
  let res: BenchResult;
  let dir: string;
  const progress: number[] = [];
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'trimkv-bench-'));
    res = await runSuite({ backends: ['cpu'], quick: true, plan: tiny, onProgress: (p) => progress.push(p.done) });
    writeReport(res, null, dir, join(dir, 'results', 'RESULTS.md'));
  }, 20_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test('the JSON has the schema, the commit field and one CPU run with every section', () => {
    const j = JSON.parse(readFileSync(join(dir, 'bench.json'), 'utf8')) as BenchResult;
    expect(j.schema).toBe(SCHEMA);
    expect(j).toHaveProperty('commit');
    expect(j.quick).toBe(true);
    expect(j.torch).toBeNull();
    expect(j.runs).toHaveLength(1);
    const r = j.runs[0]!;
    expect(r.backend).toBe('cpu');
    expect(typeof r.device.name).toBe('string');
    expect(r.sections).toEqual([...SECTIONS]);
    expect(r.decode).toHaveLength(2 * 2 + 2);
    // Scope rows: 2 buffers x (head, layer, global), each with a ratio against the head row.
    expect(r.scopes).toHaveLength(6);
    for (const row of r.scopes) {
      expect(row).not.toHaveProperty('error');
      const s = row as { scope: string; headRatio: number | null; time: { mean: number }; layers: number };
      expect(s.layers).toBe(2);
      expect(s.time.mean).toBeGreaterThan(0);
      if (s.scope === 'head') expect(s.headRatio).toBeNull();
      else expect(s.headRatio).toBeGreaterThan(0);
    }
    expect(r.prefill).toHaveLength(1);
    expect(r.gate).toHaveLength(2);
    expect(r.select).toHaveLength(1);
    expect(r.model).toHaveLength(1);
    expect(r.ladder).toHaveLength(3);
    expect(r.prefillAttend).toHaveLength(2);
    expect(r.selectKernel).toHaveLength(2);
    expect(r.stream).toHaveLength(1);
    expect(progress.at(-1)).toBe(6 + 6 + (1 + 2) + 2 + (1 + 2) + 1 + 3 + 1);  // decode, scopes, prefill, gate, select, model, ladder, stream
  });

  test('prefill vs SDPA: same FLOP count, no eviction timed at every cached size, evict-to-M only with cached tokens, no SDPA on the CPU', () => {
    const [c0, c8] = res.runs[0]!.prefillAttend as PrefillAttendRow[];
    for (const a of [c0!, c8!]) {
      expect(a).not.toHaveProperty('error');
      expect(a.time.median).toBeGreaterThan(0);
      expect(a.flops).toBe(causalAttentionFlops(4, 32, a.chunk, a.cached));
      expect(a).toMatchObject({ memory: a.cached + a.chunk, buffer: 1, sdpaMs: null, sdpaRatio: null, evictRatio: null });
    }
    expect(c0!.flops).toBe(4 * 4 * 32 * (8 * 9) / 2);
    expect(c0!.evict).toBeNull();
    expect(c8!.evict).toMatchObject({ memory: 8 });
    expect(c8!.evict!.time.median).toBeGreaterThan(0);
  });

  test('the selection kernel rows stay in the report, marked as not run on the CPU', () => {
    const rows = res.runs[0]!.selectKernel as (SelectKernelRow & { error?: string })[];
    expect(rows.map((x) => [x.rows, x.candidates, x.keep])).toEqual([[4, 20, 16], [4, 24, 16]]);
    for (const x of rows) {
      expect(x.error).toBeUndefined();
      expect((x as { skipped: string }).skipped).toMatch(/CUDA|selectBench/);
    }
  });

  test('the streamed prompt: every chunk timed, the cache bounded by M while the full cache grows with the prompt', () => {
    const st = res.runs[0]!.stream[0] as StreamRow;
    expect(st).not.toHaveProperty('error');
    expect(st.chunks).toBe(5);                       // 72 tokens in chunks of 16: 4 full and one of 8
    expect(st.chunkTime.n).toBe(5);
    expect(st.totalMs).toBeGreaterThan(0);
    expect(st.fullCacheBytes).toBe(72 * 2 * 32 * 2 * 2);
    expect(st.reservedBytes).toBeLessThan(st.fullCacheBytes);
    expect(st.usedBytes).toBeLessThanOrEqual(st.reservedBytes);
    expect(st.allocatedBytes).toBeNull();            // no device memory query on the CPU
    expect(st).toMatchObject({ torchMs: null, torchPeakBytes: null });
  });

  test('every row succeeded with a positive median', () => {
    const r = res.runs[0]!;
    for (const row of [...r.decode, ...r.prefill, ...r.gate, ...r.model]) {
      expect(row).not.toHaveProperty('error');
      expect((row as { time: { median: number } }).time.median).toBeGreaterThan(0);
    }
    for (const s of r.select) {
      expect(s).not.toHaveProperty('error');
      expect((s as { evicting: { median: number } }).evicting.median).toBeGreaterThan(0);
      expect((s as { appending: { median: number } }).appending.median).toBeGreaterThan(0);
    }
    for (const l of r.ladder) {
      expect(l).not.toHaveProperty('error');
      const points = (l as { points: { length: number; time: { median: number } }[] }).points;
      expect(points.map((p) => p.length)).toEqual([4, 16, 32]);
      for (const p of points) expect(p.time.median).toBeGreaterThan(0);
    }
  });

  test('decode and gate rows carry back-to-back times and the host cost; no launch floor on the CPU', () => {
    const r = res.runs[0]!;
    expect(r.launch).toBeNull();
    for (const row of r.decode as DecodeRow[]) {
      // Back-to-back: at least 11 runs of whole steps (>= 8 calls each), so n counts runs.
      expect(row.burst.n).toBeGreaterThanOrEqual(11);
      expect(row.burst.median).toBeGreaterThan(0);
      expect(row.burstBandwidth).toBeCloseTo(row.bytes / (row.burst.median * 1e-3) / 1e9, 6);
      expect(row.hostUs).toBeGreaterThan(0);
      expect(row.hostMeanUs).toBeGreaterThan(0);
      expect(row).toMatchObject({ burstFraction: null, sdpaBurstMs: null, sdpaBurstRatio: null });
    }
    for (const g of r.gate as GateRow[]) {
      expect(g.burst!.n).toBeGreaterThanOrEqual(11);
      expect(g.burst!.median).toBeGreaterThan(0);
      expect(g.hostUs).toBeGreaterThan(0);
      expect(g.burstFraction).toBeNull();
    }
  });

  test('timeMany groups whole runs of calls and refuses a count that is not a multiple of the group', () => {
    const rt = runtimeFor('cpu');
    let calls = 0;
    const ms = timeMany(rt, 24, () => { calls++; }, 0.001, 8);
    expect(ms).toHaveLength(3);
    expect(calls).toBe(24);
    for (const x of ms) expect(x).toBeGreaterThanOrEqual(0);
    expect(() => timeMany(rt, 20, () => {}, 0.001, 8)).toThrow(RangeError);
  });

  test('the fractions of the copy ceiling are null on the CPU', () => {
    const j = JSON.parse(readFileSync(join(dir, 'bench.json'), 'utf8')) as BenchResult;
    const r = j.runs[0]!;
    expect(r.copyGBs).toBeNull();
    for (const row of [...r.decode, ...r.prefill, ...r.gate, ...r.model]) expect((row as { fraction: unknown }).fraction).toBeNull();
  });

  test('the bounded cache stays at M + B slots while the full cache grows', () => {
    const r = res.runs[0]!;
    const [m8, m16, full] = r.ladder as { memory: number | null; points: { length: number; cacheBytesPerLayer: number }[] }[];
    const perToken = full!.points[0]!.cacheBytesPerLayer / (4 * 2);  // 4 tokens in each of 2 heads
    expect(perToken).toBeGreaterThanOrEqual(2 * 32 * 2);
    expect(m8!.points.map((p) => p.cacheBytesPerLayer / perToken)).toEqual([8, 16, 16]);
    expect(m16!.points.map((p) => p.cacheBytesPerLayer / perToken)).toEqual([8, 32, 32]);
    expect(full!.memory).toBeNull();
    expect(full!.points.map((p) => p.cacheBytesPerLayer / perToken)).toEqual([8, 32, 64]);
  });

  test('the SVGs are well-formed with the expected series', () => {
    const files = readdirSync(dir).filter((f) => f.endsWith('.svg')).sort();
    expect(files).toEqual(['cpu-bandwidth.svg', 'cpu-latency.svg', 'cpu-memory.svg']);
    const svg = (f: string) => readFileSync(join(dir, f), 'utf8');
    for (const f of files) checkXml(svg(f));
    expect(countSeries(svg('cpu-latency.svg'))).toBe(3);   // M=8, M=16, full cache
    expect(countSeries(svg('cpu-memory.svg'))).toBe(3);    // M=8, M=16, full-cache line
    expect(countSeries(svg('cpu-bandwidth.svg'))).toBe(5); // decode B=0, B=8, prefill, gate, model
    expect(svg('cpu-bandwidth.svg')).not.toContain('class="reference"');
  });

  test('the Markdown has every table and links the plots; --results copies them beside it', () => {
    const md = readFileSync(join(dir, 'bench.md'), 'utf8');
    for (const h of ['### Decode step', '### Decode step by budget scope', '### Prefill chunk', '### Prefill attention vs PyTorch SDPA', '### Retention gate', '### Selection',
      '### Selection kernel alone', '### Whole-model decode step', '### Long generation', '### Long prompt streamed in chunks']) {
      expect(md).toContain(h);
    }
    expect(md).toContain('SDPA: not measured in this run');  // no --torch in this run
    expect(md).toMatch(/Not measured on this backend: /);
    expect(md).toContain('| 4 | 20 | 16 | random | 32 | - | - | - |');
    expect(md).toMatch(/\| 72 \| 16 \| 16 \| 5 \| [\d.]+ \|/);
    expect(md).toContain('](cpu-latency.svg)');
    const results = readFileSync(join(dir, 'results', 'RESULTS.md'), 'utf8');
    expect(results).toContain('](plots/cpu-memory.svg)');
    expect(readdirSync(join(dir, 'results', 'plots')).sort()).toEqual(['cpu-bandwidth.svg', 'cpu-latency.svg', 'cpu-memory.svg']);
  });
});

describe('GPU-only benchmarks on the CPU backend', () => {
  test('benchSelectKernel is ERR_UNSUPPORTED (no selection kernel on the CPU, whatever the build)', () => {
    const rt = openRuntime('cpu');
    try {
      let err: unknown;
      try {
        benchSelectKernel(rt, { rows: 2, candidates: 8, keep: 4, keys: 'random', threads: 32 }, 2);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(TrimKVError);
      expect(err).toMatchObject({ code: 'ERR_UNSUPPORTED' });
      expect(deviceMemoryUsed(rt)).toBeNull();
    } finally {
      rt.dispose();
    }
  });
  test('causalAttentionFlops counts the cached keys for every query and the causal half of the chunk', () => {
    // 3 queries over 2 cached tokens see 3, 4 and 5 keys
    expect(causalAttentionFlops(1, 1, 3, 2)).toBe(4 * (3 + 4 + 5));
    expect(causalAttentionFlops(32, 128, 2048, 0)).toBe(4 * 32 * 128 * 2048 * 2049 / 2);
  });
});

describe('runSuite options', () => {
  test('--torch is read and recorded; CPU rows get no PyTorch ratios (they are GPU timings)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'trimkv-bench-'));
    try {
      const file = join(dir, 'torch.json');
      writeFileSync(file, JSON.stringify({ schema: 'trimkv-torch/1', gpu: 'X', torch: '2.11', copyGBs: 3000, matmulTFLOPs: 700,
        sdpa: [{ batch: 1, memory: 16, ms: 0.01 }], full: [{ batch: 1, context: 1024, ms: 0.02 }], reference: [],
        prefill: [{ cached: 0, chunk: 8, ms: 0.01, backend: 'flash' }], stream: [{ prompt: 72, chunk: 16, ms: 1, peakBytes: 1 }] }));
      const res = await runSuite({ backends: ['cpu'], only: ['decode', 'prefill'], torch: file, plan: tiny });
      expect(res.torch).toMatchObject({ gpu: 'X', copyGBs: 3000, file });
      expect(res.runs[0]!.sections).toEqual(['decode', 'prefill']);
      expect(res.runs[0]!.gate).toEqual([]);
      for (const d of res.runs[0]!.decode) expect(d).toMatchObject({ sdpaMs: null, sdpaRatio: null, referenceRatio: null });
      expect(res.runs[0]!.fullCache).toEqual([]);
      expect(res.runs[0]!.prefillAttend).toHaveLength(2);
      for (const a of res.runs[0]!.prefillAttend) expect(a).toMatchObject({ sdpaMs: null, sdpaTFLOPs: null, sdpaBackend: null, sdpaRatio: null });
      expect(res.runs[0]!.stream).toEqual([]);
      expect(res.torch).not.toHaveProperty('prefill');
      expect(res.torch).not.toHaveProperty('stream');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  test('a file that is not torch_compare.py output is refused', () => {
    const dir = mkdtempSync(join(tmpdir(), 'trimkv-bench-'));
    try {
      writeFileSync(join(dir, 'x.json'), '{"a": 1}');
      expect(() => readTorch(join(dir, 'x.json'))).toThrow(/bench\/torch_compare.py/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  test('trimkv bench --only with an unknown section exits 1 naming it', async () => {
    const err: string[] = [];
    const spy = vi.spyOn(console, 'error').mockImplementation((m: string) => { err.push(m); });
    try {
      expect(await main(['bench', '--only', 'decode,bogus'])).toBe(1);
    } finally {
      spy.mockRestore();
    }
    expect(err.join('\n')).toMatch(/ERR_INVALID_ARGUMENT: Expected one of decode, prefill, gate, select, model, ladder, stream for --only but received bogus/);
  });
});
