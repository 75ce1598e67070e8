#!/usr/bin/env node
// Decode-step and gate benchmarks (issue 4) on the default backend; writes JSON and prints a
// Markdown table. With --torch FILE (from bench/torch_sdpa.py, same GPU, same run) it adds
// the ratio to PyTorch's flash SDPA over the same tokens.
//   node bench/decode.mjs [--quick] [--out results.json] [--torch torch.json]
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { openRuntime, backends } from '../dist/index.js';
import { benchDecode, benchGate, copyBandwidth } from '../dist/bench.js';

const { values } = parseArgs({ options: { quick: { type: 'boolean' }, out: { type: 'string' }, torch: { type: 'string' }, backend: { type: 'string' } } });
const rt = openRuntime(values.backend ?? 'auto');
const gpu = backends().find((b) => b.name === 'cuda');
const copy = copyBandwidth(rt);
const quick = values.quick === true;
const batches = quick ? [1, 32] : [1, 8, 32, 128];
const memories = quick ? [512, 8192] : [512, 2048, 8192];
const buffers = [0, 64];
const torch = values.torch && existsSync(values.torch) ? JSON.parse(readFileSync(values.torch, 'utf8')) : null;
const rows = [];
console.error(`backend ${rt.backend}${rt.backend === 'cuda' ? ` (${gpu.devices[0]?.name})` : ''}, copy bandwidth ${copy.toFixed(0)} GB/s`);
for (const batch of batches) {
  for (const memory of memories) {
    for (const buffer of buffers) {
      const r = benchDecode(rt, { batch, memory, buffer, qHeads: 32, kvHeads: 8, headDim: 128, dtype: 'bf16' });
      const t = torch?.sdpa.find((s) => s.batch === batch && s.memory === memory && !s.error);
      const row = { ...r, fraction: r.bandwidth / copy, torchMs: t?.ms ?? null, torchFraction: t ? t.bandwidth / copy : null };
      rows.push(row);
      console.error(`decode b=${batch} M=${memory} B=${buffer}: ${(r.time.median * 1000).toFixed(1)} us, ${r.bandwidth.toFixed(0)} GB/s (${row.fraction.toFixed(3)} of copy), host ${r.hostUs.toFixed(1)} us/call`);
    }
  }
}
const gates = [];
for (const batch of [1, 2, 4, 8, 16, 32, 64, 128]) {
  const g = benchGate(rt, batch);
  gates.push({ ...g, fraction: g.bandwidth / copy });
  console.error(`gate b=${batch}: ${(g.time.median * 1000).toFixed(1)} us, ${g.bandwidth.toFixed(0)} GB/s (${(g.bandwidth / copy).toFixed(3)})`);
}
const result = { date: new Date().toISOString(), backend: rt.backend, device: rt.backend === 'cuda' ? gpu.devices[0] : null, copyGBs: copy, decode: rows, gate: gates, torch };
if (values.out) writeFileSync(values.out, JSON.stringify(result, null, 1));

const f = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? '-' : x.toFixed(d));
console.log(`\n### Decode step, bf16, Hq 32, Hkv 8, D 128 (${rt.backend}${result.device ? `, ${result.device.name}` : ''}; copy ${copy.toFixed(0)} GB/s read+write)\n`);
console.log('| batch | M | B | time (us) | p10-p90 (us) | GB/s | of copy | torch SDPA (us) | torch of copy | speed-up vs SDPA | host us/call |');
console.log('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
for (const r of rows) {
  console.log(`| ${r.batch} | ${r.memory} | ${r.buffer} | ${f(r.time.median * 1000, 1)} | ${f(r.time.p10 * 1000, 1)}-${f(r.time.p90 * 1000, 1)} | ${f(r.bandwidth, 0)} | ${f(r.fraction)} | ${f(r.torchMs === null ? null : r.torchMs * 1000, 1)} | ${f(r.torchFraction)} | ${f(r.torchMs === null ? null : r.torchMs / r.time.median, 2)} | ${f(r.hostUs, 1)} |`);
}
console.log('\n### Retention gate "rg", Qwen3-4B sizes (Dm 2560, I 512, Hkv 8), bf16 weights\n');
console.log('| batch | time (us) | weight GB/s | of copy |');
console.log('|---:|---:|---:|---:|');
for (const g of gates) console.log(`| ${g.batch} | ${f(g.time.median * 1000, 1)} | ${f(g.bandwidth, 0)} | ${f(g.fraction)} |`);
rt.dispose();
