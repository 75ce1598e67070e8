/** The suite's outputs: Markdown tables, SVG plots, and the files they are written to. */
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, relative } from 'node:path';
import { DTYPE_BYTES } from '../lib/constants.js';
import { isRow, type Row } from './case.js';
import type { LadderResult } from './cases/ladder.js';
import type { SelectKernelRow } from './cases/select.js';
import type { BackendRun, BenchResult } from './suite.js';
import { linePlot, type Series } from './svg.js';
import type { TorchResults } from './torch.js';

const f = (x: number | null | undefined, d = 1): string => (x === null || x === undefined || !Number.isFinite(x) ? '-' : x.toFixed(d));
const us = (ms: number | null | undefined, d = 1) => f(ms === null || ms === undefined ? null : ms * 1000, d);
const mib = (b: number) => `${f(b / 2 ** 20, 1)}`;
const rows = <T>(r: Row<T>[]) => r.filter(isRow) as T[];

function table(head: string[], body: string[][]): string {
  return [`| ${head.join(' | ')} |`, `|${head.map(() => '---:').join('|')}|`, ...body.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

function failures(r: BackendRun): string {
  const all = [...r.decode, ...r.prefill, ...r.prefillAttend, ...r.gate, ...r.select, ...r.selectKernel, ...r.model, ...r.ladder, ...r.stream]
    .filter((x) => !isRow(x)) as { error: string }[];
  if (!all.length) return '';
  return `\nCases that failed (${all.length}):\n\n${all.map((x) => `- \`${JSON.stringify({ ...x, error: undefined })}\`: ${x.error}`).join('\n')}\n`;
}

export interface PlotFile { name: string; title: string; svg: string; series: number }

/** The plots of one backend's run (none for sections that did not run). */
export function plots(run: BackendRun, torch: TorchResults | null): PlotFile[] {
  const out: PlotFile[] = [];
  const b = run.backend, sh = run.plan.shape;
  const ladder = rows(run.ladder) as LadderResult[];
  const name = (l: LadderResult) => (l.memory === null ? 'full cache (trimkv kernel, no eviction)' : `TRIM-KV M=${l.memory}`);
  if (ladder.length) {
    const batch = ladder[0]!.batch;
    const series: Series[] = ladder.map((l) => ({ name: name(l), dashed: l.memory === null, points: l.points.map((p) => [p.length, p.time.median * 1000] as const) }));
    const tf = run.backend === 'cuda' ? (torch?.full ?? []).filter((x) => x.batch === batch && x.ms) : [];
    if (tf.length) series.push({ name: 'full cache (PyTorch flash SDPA)', dashed: true, points: tf.map((x) => [x.context, x.ms! * 1000] as const) });
    out.push({ name: `${b}-latency.svg`, title: `Per-token decode latency, one layer (${b}, batch ${batch})`, series: series.length,
      svg: linePlot({ title: `Decode latency per layer vs generated length (${b}, batch ${batch}, ${sh.qHeads}/${sh.kvHeads} heads, D ${sh.headDim}, ${sh.dtype})`,
        xLabel: 'generated length T (tokens per sequence)', yLabel: 'time per token per layer (us)', xLog: true, yLog: true, series }) });
    const L = run.plan.ladder.modelLayers;
    const lengths = [...new Set([...ladder.flatMap((l) => l.points.map((p) => p.length)), ...tf.map((x) => x.context)])].sort((x, y) => x - y);
    const perTok = batch * L * sh.kvHeads * 2 * sh.headDim * DTYPE_BYTES[sh.dtype];
    const mem: Series[] = ladder.filter((l) => l.memory !== null).map((l) => ({ name: name(l), points: l.points.map((p) => [p.length, (p.cacheBytesPerLayer * L) / 2 ** 20] as const) }));
    mem.push({ name: 'full cache (K and V of every token)', dashed: true, points: lengths.map((t) => [t, (t * perTok) / 2 ** 20] as const) });
    out.push({ name: `${b}-memory.svg`, title: 'Cache memory vs generated length', series: mem.length,
      svg: linePlot({ title: `KV-cache memory of a ${L}-layer model vs generated length (batch ${batch})`, xLabel: 'generated length T (tokens per sequence)',
        yLabel: 'cache memory (MiB)', xLog: true, yLog: true, series: mem }) });
  }
  const bw: Series[] = [];
  const dec = rows(run.decode);
  for (const B of [...new Set(dec.map((d) => d.buffer))]) {
    bw.push({ name: `decode B=${B}`, points: dec.filter((d) => d.buffer === B).map((d) => [d.bytes, d.bandwidth] as const).sort((x, y) => x[0] - y[0]) });
  }
  const pre = rows(run.prefill);
  if (pre.length) bw.push({ name: 'prefill chunk', points: pre.map((p) => [p.bytes, p.bandwidth] as const).sort((x, y) => x[0] - y[0]) });
  const gate = rows(run.gate);
  if (gate.length) bw.push({ name: 'gate', points: gate.map((g) => [g.bytes ?? g.weightBytes, g.bandwidth] as const).sort((x, y) => x[0] - y[0]) });
  const model = rows(run.model);
  if (model.length) bw.push({ name: 'whole-model step', points: model.map((m) => [m.bytes, m.bandwidth] as const).sort((x, y) => x[0] - y[0]) });
  if (run.backend === 'cuda' && torch) {
    const s = torch.sdpa.filter((x) => x.ms && x.bytes && x.bandwidth);
    if (s.length) bw.push({ name: 'PyTorch SDPA (same tokens)', dashed: true, points: s.map((x) => [x.bytes!, x.bandwidth!] as const).sort((x, y) => x[0] - y[0]) });
  }
  if (bw.length) {
    out.push({ name: `${b}-bandwidth.svg`, title: 'Achieved bandwidth vs the copy ceiling', series: bw.length,
      svg: linePlot({ title: `Achieved bandwidth vs bytes moved per call (${b}${run.copyGBs ? `, copy ceiling ${f(run.copyGBs, 0)} GB/s` : ', no copy ceiling on the CPU'})`,
        xLabel: 'bytes moved per call', yLabel: 'GB/s', xLog: true, yLog: true, series: bw,
        lines: run.copyGBs ? [{ y: run.copyGBs, label: `device copy ${f(run.copyGBs, 0)} GB/s` }] : [] }) });
  }
  return out;
}

function runMarkdown(r: BackendRun, plotDir: string): string {
  const sh = r.plan.shape;
  const out: string[] = [];
  const dev = `${r.device.name}${r.driver ? `, driver ${r.driver}` : ''}${r.cudaRuntime ? `, CUDA runtime ${r.cudaRuntime}` : ''}`;
  out.push(`## ${r.backend.toUpperCase()} backend: ${dev}\n`);
  out.push(r.copyGBs
    ? `Copy ceiling (device-to-device copy, read + write, measured in this run): **${f(r.copyGBs, 0)} GB/s**. ` +
      `Compute ceiling for prefill: ${r.peakTFLOPs ? `${f(r.peakTFLOPs, 0)} TFLOP/s (${r.peakSource})` : 'unknown'}. ` +
      '"of copy" = achieved bytes/s over the copy ceiling; "of roofline" = max(bytes / copy, FLOPs / peak) over the time.'
    : 'No copy ceiling on the CPU backend: the fraction columns are empty.');
  out.push(` Shape ${sh.qHeads} query / ${sh.kvHeads} KV heads, head dim ${sh.headDim}, ${sh.dtype} unless a column says otherwise. ` +
    `Times are medians of many calls timed inside the addon (${r.backend === 'cuda' ? 'CUDA events' : 'steady clock'}), warm, inputs rotated past the cache; ` +
    `p10-p90 is the spread. Run took ${f(r.seconds, 0)} s.\n`);
  const dec = rows(r.decode);
  if (dec.length) {
    out.push('### Decode step (one layer: append, attend over M + B, evict)\n');
    out.push('Steady state after a prefill to M. B = 0 evicts one token per head every step; B > 0 evicts B tokens every B-th step (the time is the median over steps). ' +
      'Bytes: K, V, position and lam of every cached token, plus q, the new k/v and out. ' +
      '"x SDPA" = PyTorch flash SDPA over the same M + 1 tokens (no eviction) / ours; "x reference" = the authors\' pipeline in PyTorch per step / ours.\n');
    out.push('"per call" brackets every call with its own event pair; "back-to-back" times runs of whole steps (every layer, at least 8 calls) with one event pair per run, ' +
      'as a model\'s layers follow each other (median over runs, per call). SDPA is timed both ways too. "host" is the enqueue cost of one call from TypeScript (median; mean in brackets, ' +
      'which spreads the once-a-step positions upload of layer 0).\n');
    out.push(table(['batch', 'M', 'B', 'D', 'dtype', 'per call (us)', 'p10-p90 (us)', 'GB/s', 'of copy', 'back-to-back (us)', 'of copy', 'SDPA (us)', 'x SDPA',
      'SDPA b2b (us)', 'x SDPA b2b', 'reference (us/step)', 'x reference', 'host (us/call)'],
      dec.map((d) => [String(d.batch), String(d.memory), String(d.buffer), String(d.headDim), d.dtype, us(d.time.median), `${us(d.time.p10)}-${us(d.time.p90)}`,
        f(d.bandwidth, 0), f(d.fraction, 3), us(d.burst?.median), f(d.burstFraction, 3), us(d.sdpaMs), f(d.sdpaRatio, 2), us(d.sdpaBurstMs), f(d.sdpaBurstRatio, 2),
        us(d.referenceMs), f(d.referenceRatio, 2), `${f(d.hostUs, 1)} (${f(d.hostMeanUs, 1)})`])));
    out.push('');
    if (r.launch) {
      out.push(`Host floor on this machine, for scale (the CUDA runtime alone, medians): a kernel launch ${f(r.launch.kernelUs, 1)} us` +
        `${r.launch.clusterUs !== null ? `, a cluster launch (cudaLaunchKernelEx) ${f(r.launch.clusterUs, 1)} us` : ''}, the same launch on a created non-blocking stream ${f(r.launch.streamKernelUs, 1)} us, an event record ${f(r.launch.eventUs, 1)} us, ` +
        `a 512-byte upload from page-locked memory ${f(r.launch.uploadUs, 1)} us.\n`);
    }
  }
  const sco = rows(r.scopes ?? []);
  if (sco.length) {
    out.push('### Decode step by budget scope (one layer call, averaged over whole steps)\n');
    out.push('The same steady-state decode on a cache of L layers under each budget scope. "head" keeps the fixed layout and evicts inside the decode kernel; ' +
      '"layer" and "global" use the pooled layout: decode appends and one pool kernel per layer ("layer") or per step after the last layer ("global") scores, ' +
      'selects and compacts the pool. "mean" is the total time of whole steps over the layer calls (it spreads the once-a-step global eviction); ' +
      '"x head" = the scope-head mean / this mean (below 1: slower than head).\n');
    out.push(table(['batch', 'M', 'B', 'layers', 'scope', 'floor', 'median (us)', 'p10-p90 (us)', 'mean (us)', 'x head', 'host (us/call)'],
      sco.map((d) => [String(d.batch), String(d.memory), String(d.buffer), String(d.layers), d.scope, String(d.floor), us(d.time.median),
        `${us(d.time.p10)}-${us(d.time.p90)}`, us(d.time.mean), f(d.headRatio, 2), f(d.hostUs, 1)])));
    out.push('');
  }
  const pre = rows(r.prefill);
  if (pre.length) {
    out.push('### Prefill chunk (one sequence, one layer: attend over the cache and causally within the chunk, then evict back to M)\n');
    out.push(table(['chunk C', 'M', 'median (us)', 'p10-p90 (us)', 'GB/s', 'TFLOP/s', 'roofline (us)', 'of roofline'],
      pre.map((p) => [String(p.chunk), String(p.memory), us(p.time.median), `${us(p.time.p10)}-${us(p.time.p90)}`, f(p.bandwidth, 0), f(p.tflops, 2), us(p.rooflineMs), f(p.fraction, 3)])));
    out.push('');
  }
  const att = rows(r.prefillAttend);
  if (att.length) {
    const backends = [...new Set(att.map((a) => a.sdpaBackend).filter((b): b is string => !!b))];
    out.push('### Prefill attention vs PyTorch SDPA (one sequence, one layer, causal GQA)\n');
    out.push('A chunk of C queries attends to `cached` earlier tokens and causally within itself: a bottom-right-aligned causal mask over cached + C keys. ' +
      'TFLOP/s for both count the same FLOPs, 4 x Hq x D x (sum over queries of visible keys) = 4 Hq D (C cached + C (C + 1) / 2). ' +
      '"no eviction": a cache with room for every token (M = cached + C, B = 1), each timed call on a slot reset and prefilled to `cached` outside the timed window, ' +
      'so the call attends and appends the chunk without selecting: the same attention as SDPA, plus writing the chunk\'s K/V, position and lam into the cache. ' +
      '"evict to M": the steady-state chunk of the table above at M = cached, B = 0 (attend, select M of M + C, write the survivors); none at cached = 0. ' +
      (backends.length
        ? `SDPA: ${backends.map((b) => `\`${b}\``).join(', ')} on the same shapes (q [1, ${sh.qHeads}, C, ${sh.headDim}], k/v [1, ${sh.kvHeads}, cached + C, ${sh.headDim}], ` +
          `${sh.dtype}), same GPU, same run. `
        : 'SDPA: not measured in this run (it needs --torch, and compares CUDA rows only). ') +
      '"x SDPA" = our TFLOP/s / SDPA\'s (above 1: ours is faster).\n');
    out.push(table(['cached', 'chunk C', 'GFLOP', 'SDPA (us)', 'SDPA TFLOP/s', 'no eviction (us)', 'p10-p90 (us)', 'TFLOP/s', 'x SDPA', 'evict to M (us)', 'TFLOP/s', 'x SDPA'],
      att.map((a) => [String(a.cached), String(a.chunk), f(a.flops / 1e9, 1), us(a.sdpaMs), f(a.sdpaTFLOPs, 2), us(a.time.median), `${us(a.time.p10)}-${us(a.time.p90)}`,
        f(a.tflops, 2), f(a.sdpaRatio, 2), us(a.evict?.time.median), f(a.evict?.tflops, 2), f(a.evictRatio, 2)])));
    out.push('');
  }
  const gate = rows(r.gate);
  if (gate.length) {
    const g0 = gate[0]!;
    out.push(`### Retention gate "rg" (Dm ${g0.inputSize}, I ${g0.intermediateSize}, Hkv ${g0.kvHeads}, bf16 weights)\n`);
    out.push('"per call": an event pair around every call; "back-to-back": runs of 8 calls of different layers\' gates (weights from DRAM), one event pair per run, per call. ' +
      'Bytes: the weights plus x and lam.\n');
    out.push(table(['tokens', 'per call (us)', 'p10-p90 (us)', 'GB/s', 'of copy', 'back-to-back (us)', 'GB/s', 'of copy', 'TFLOP/s (b2b)', 'host (us/call)'],
      gate.map((g) => [String(g.batch), us(g.time.median), `${us(g.time.p10)}-${us(g.time.p90)}`, f(g.bandwidth, 0), f(g.fraction, 3),
        us(g.burst?.median), f(g.burstBandwidth, 0), f(g.burstFraction, 3), f(g.burst ? (g.flops ?? 0) / (g.burst.median * 1e-3) / 1e12 : null, 3), f(g.hostUs, 1)])));
    out.push('');
  }
  const sel = rows(r.select);
  if (sel.length) {
    out.push('### Selection (eviction) cost\n');
    out.push('The API has no separate selection op: scoring, top-M selection and compaction are fused into the decode step. Measured as the difference between ' +
      'the decode calls that evict (every B-th step with buffer B) and those that only append and attend, same cache, same run. ' +
      '"B=0 step" is the decode row with B = 0 (one eviction every step) for reference.\n');
    out.push(table(['batch', 'M', 'B', 'evicting step (us)', 'other steps (us)', 'selection (us)', 'per token (us)', 'B=0 step (us)'],
      sel.map((s) => [String(s.batch), String(s.memory), String(s.buffer), us(s.evicting.median), us(s.appending.median), us(s.selectMs), us(s.amortizedMs, 2), us(s.decodeB0Ms)])));
    out.push('');
  }
  const sk = rows(r.selectKernel) as SelectKernelRow[];
  if (sk.length) {
    const skipped = sk.find((x) => 'skipped' in x) as { skipped: string } | undefined;
    out.push('### Selection kernel alone (top-M radix select, one launch)\n');
    out.push('One launch of a kernel in which every block (one row: a sequence x KV head) finds the M-th largest of its n 64-bit keys with ' +
      '`topk::block_select_kth_largest` (csrc/kernels/common/select_topk.cuh, the select of the decode and prefill evictions) and marks the keys >= it as kept; ' +
      'n = M + B candidates for a decode eviction, M + C for a prefill chunk\'s. Keys in global memory, filled on the GPU: "random" = 32 random high bits ' +
      'over the index; "scores" = keep_key(lam (T + 1 - p), p) with lam uniform in [-0.05, 0), decayed scores whose top bits agree (more radix passes). ' +
      'CUDA events around each launch, after warm-up; the addon checks that every row kept exactly M.' +
      (skipped ? ` Not measured on this backend: ${skipped.skipped}.` : '') + '\n');
    out.push(table(['rows', 'n', 'M (kept)', 'keys', 'threads', 'median (us)', 'p10-p90 (us)', 'Gkeys/s'],
      sk.map((x) => [String(x.rows), String(x.candidates), String(x.keep), x.keys, String(x.threads),
        ...('skipped' in x ? ['-', '-', '-'] : [us(x.time.median), `${us(x.time.p10)}-${us(x.time.p90)}`, f(x.keysPerSecond / 1e9, 2)])])));
    out.push('');
  }
  const model = rows(r.model);
  if (model.length) {
    const m0 = model[0]!;
    out.push(`### Whole-model decode step (${m0.layers} layers of Qwen3-4B shape: gate + decode per layer)\n`);
    out.push(table(['batch', 'M', 'step (ms)', 'p10-p90 (ms)', 'tokens/s', 'GB/s', 'of copy', 'host (ms/step)', 'cache (MiB)', `full cache at ${m0.context} (MiB)`, 'cache / full'],
      model.map((m) => [String(m.batch), String(m.memory), f(m.time.median, 3), `${f(m.time.p10, 3)}-${f(m.time.p90, 3)}`, f(m.tokensPerSecond, 0), f(m.bandwidth, 0), f(m.fraction, 3),
        f(m.hostMs, 3), mib(m.cacheBytes), mib(m.fullCacheBytes), f(m.cacheBytes / m.fullCacheBytes, 3)])));
    out.push('');
  }
  const lad = rows(r.ladder) as LadderResult[];
  if (lad.length) {
    out.push(`### Long generation (batch ${lad[0]!.batch}, from an empty cache, one layer per call)\n`);
    const lengths = [...new Set(lad.flatMap((l) => l.points.map((p) => p.length)))].sort((x, y) => x - y);
    const head = ['T', ...lad.map((l) => (l.memory === null ? 'full cache (us)' : `M=${l.memory} (us)`)), ...lad.filter((l) => l.memory !== null).map((l) => `M=${l.memory} cache/layer (MiB)`), 'full cache/layer (MiB)'];
    out.push(table(head, lengths.map((t) => {
      const at = (l: LadderResult) => l.points.find((p) => p.length === t);
      const full = lad.find((l) => l.memory === null);
      const fullBytes = at(full ?? lad[0]!) && full ? at(full)!.cacheBytesPerLayer : null;
      return [String(t), ...lad.map((l) => us(at(l)?.time.median)), ...lad.filter((l) => l.memory !== null).map((l) => (at(l) ? mib(at(l)!.cacheBytesPerLayer) : '-')),
        fullBytes === null ? '-' : mib(fullBytes)];
    })));
    out.push('');
  }
  const st = rows(r.stream);
  if (st.length) {
    out.push(`### Long prompt streamed in chunks (one layer, batch 1, ${sh.qHeads}/${sh.kvHeads} heads, D ${sh.headDim}, ${sh.dtype})\n`);
    out.push('The prompt goes through one layer in chunks of C into a cache of M (B = 0): each chunk attends to the retained tokens and causally to itself, ' +
      'then the cache is evicted back to M. Time: the sum of the chunks\' device times (queued back to back, after a few warm-up chunks). ' +
      'Memory: "cache" = the reserved slots (K, V, position and lam of M + B tokens per head); "allocated" = the growth of the GPU memory in use ' +
      '(cudaMemGetInfo) from before the cache was made to after the stream, for the slots plus the decode and prefill workspaces: it counts driver pages, ' +
      'and small buffers may land in pages the process already holds, so it can read a little below "cache"; ' +
      '"chunk I/O" = the chunk\'s own q, k, v, lam and out, which every chunked prefill needs and are not counted above. ' +
      'Full cache = K and V of every prompt token. PyTorch: the same prompt into a preallocated full cache (each chunk\'s K/V written, flash SDPA over all ' +
      'tokens so far, bottom-right causal); its memory is the peak allocation growth (K/V cache plus SDPA workspace).\n');
    out.push(table(['prompt', 'chunk C', 'M', 'chunks', 'total (ms)', 'per chunk (us)', 'tokens/s', 'cache (MiB)', 'allocated (MiB)', 'chunk I/O (MiB)',
      'full cache (MiB)', 'full / cache', 'PyTorch full cache (ms)', 'PyTorch peak (MiB)'],
      st.map((x) => [String(x.prompt), String(x.chunk), String(x.memory), String(x.chunks), f(x.totalMs, 2), us(x.chunkTime.median), f(x.prompt / (x.totalMs * 1e-3), 0),
        mib(x.reservedBytes), x.allocatedBytes === null ? '-' : mib(x.allocatedBytes), mib(x.chunkBytes), mib(x.fullCacheBytes),
        f(x.fullCacheBytes / x.reservedBytes, 1), f(x.torchMs, 2), x.torchPeakBytes === null ? '-' : mib(x.torchPeakBytes)])));
    out.push('');
  }
  if (r.fullCache.length) {
    const ms = [...new Set(r.fullCache.flatMap((x) => Object.keys(x.speedup)))].sort((a, b) => Number(a) - Number(b));
    out.push('### Full cache (what users do today) vs TRIM-KV\n');
    out.push('PyTorch: a preallocated cache, the new token written at T, flash SDPA over T + 1 tokens, one layer. TRIM-KV: the decode step at M (B = 0) from the table above. ' +
      'Entries are full-cache time / TRIM-KV time.\n');
    out.push(table(['batch', 'T', 'full cache (us)', 'full K/V per layer (MiB)', ...ms.map((m) => `x vs M=${m}`)],
      r.fullCache.map((x) => [String(x.batch), String(x.context), us(x.torchMs), mib(x.fullBytesPerLayer), ...ms.map((m) => f(x.speedup[m], 1))])));
    out.push('');
  }
  for (const p of plotsOf(r)) out.push(`![${p.title}](${join(plotDir, p.name).replace(/\\/g, '/')})\n`);
  out.push(failures(r));
  return out.join('\n');
}

const plotCache = new WeakMap<BackendRun, PlotFile[]>();
function plotsOf(r: BackendRun): PlotFile[] {
  return plotCache.get(r) ?? [];
}

/** The whole report as Markdown; image links point into `plotDir` (relative to the file). */
export function markdown(res: BenchResult, plotDir = '.'): string {
  const head = [`# trimkv benchmark results\n`,
    `Generated by \`trimkv bench\`${res.quick ? ' --quick' : ''} on ${res.date}, commit \`${res.commit ?? 'unknown'}\`, node ${res.node}, ${res.platform}, ` +
    `host CPU ${res.host.cpu} (${res.host.threads} threads).` +
    (res.torch ? ` PyTorch ${res.torch.torch} on ${res.torch.gpu} (its copy ${f(res.torch.copyGBs, 0)} GB/s${res.torch.matmulTFLOPs ? `, bf16 matmul ${f(res.torch.matmulTFLOPs, 0)} TFLOP/s` : ''}), same machine, same run.` : ' No PyTorch comparison in this run.'),
    ''];
  return [...head, ...res.runs.map((r) => runMarkdown(r, plotDir))].join('\n');
}

/** Writes bench.json, bench.md and the SVGs into `outDir`; with `resultsFile`, also that Markdown file with its plots beside it in plots/. */
export function writeReport(res: BenchResult, torch: TorchResults | null, outDir: string, resultsFile?: string): string[] {
  mkdirSync(outDir, { recursive: true });
  const written: string[] = [];
  for (const r of res.runs) {
    const ps = plots(r, torch);
    plotCache.set(r, ps);
    for (const p of ps) { writeFileSync(join(outDir, p.name), p.svg); written.push(join(outDir, p.name)); }
  }
  writeFileSync(join(outDir, 'bench.json'), `${JSON.stringify(res, (_k, v: unknown) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 1)}\n`);
  writeFileSync(join(outDir, 'bench.md'), markdown(res, '.'));
  written.push(join(outDir, 'bench.json'), join(outDir, 'bench.md'));
  if (resultsFile) {
    const dir = dirname(resultsFile), plotDir = join(dir, 'plots');
    mkdirSync(plotDir, { recursive: true });
    for (const r of res.runs) for (const p of plotsOf(r)) copyFileSync(join(outDir, p.name), join(plotDir, basename(p.name)));
    writeFileSync(resultsFile, markdown(res, relative(dir, plotDir) || '.'));
    written.push(resultsFile);
  }
  return written;
}
