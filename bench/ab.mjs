#!/usr/bin/env node
// A/B of two trees' benchmark rows: reads the bench.json files of runs of tree A and of tree B
// (alternated in one GPU call by scripts/gpu-ab.sh) and prints, per row, the median time of
// each tree over its runs, B / A, and the noise: the largest ratio between two runs of the same
// tree. A row is "slower beyond noise" when B / A exceeds 1 + that noise (and 2%).
//   node bench/ab.mjs --a a1.json,a2.json --b b1.json,b2.json [--label-a before --label-b after]
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: { a: { type: 'string' }, b: { type: 'string' }, 'label-a': { type: 'string', default: 'A' },
    'label-b': { type: 'string', default: 'B' } },
});
if (!values.a || !values.b) {
  console.error('usage: node bench/ab.mjs --a A1.json[,A2.json...] --b B1.json[,B2.json...]');
  process.exit(2);
}

// The fields that name a row (everything that is not a measurement).
const KEYS = ['batch', 'memory', 'buffer', 'headDim', 'dtype', 'scope', 'floor', 'chunk', 'cached',
  'inputSize', 'intermediateSize', 'kvHeads', 'qHeads', 'kind'];
// The sections compared and their timings: [section, timing field, what it is].
const TIMINGS = [['decode', 'time', 'per call'], ['decode', 'burst', 'back-to-back'], ['scopes', 'time', 'per call'],
  ['prefill', 'time', 'per chunk'], ['prefillAttend', 'time', 'per chunk'], ['gate', 'time', 'per call'],
  ['gate', 'burst', 'back-to-back']];

const load = (list) => list.split(',').map((f) => JSON.parse(readFileSync(f, 'utf8')).runs.find((r) => r.backend === 'cuda')
  ?? JSON.parse(readFileSync(f, 'utf8')).runs[0]);
const runsA = load(values.a), runsB = load(values.b);

const show = (v) => (typeof v === 'object' ? JSON.stringify(v) : String(v));
const rowKey = (row) => KEYS.filter((k) => row[k] !== undefined && row[k] !== null).map((k) => `${k} ${show(row[k])}`).join(', ');
const median = (xs) => {
  const s = [...xs].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/** section/timing -> row key -> the medians of every run. */
function collect(runs, section, field) {
  const out = new Map();
  for (const run of runs) {
    for (const row of run[section] ?? []) {
      const t = row[field]?.median;
      if (typeof t !== 'number') continue;
      const k = rowKey(row);
      if (!out.has(k)) out.set(k, []);
      out.get(k).push(t);
    }
  }
  return out;
}

const spread = (xs) => (xs.length > 1 ? Math.max(...xs) / Math.min(...xs) - 1 : 0);
let slower = 0, rows = 0;
const ratios = [];
for (const [section, field, what] of TIMINGS) {
  const a = collect(runsA, section, field), b = collect(runsB, section, field);
  const keys = [...a.keys()].filter((k) => b.has(k));
  if (!keys.length) continue;
  console.log(`\n### ${section} (${what}, us: median over runs)\n`);
  console.log(`| row | ${values['label-a']} | ${values['label-b']} | ${values['label-b']} / ${values['label-a']} | noise | verdict |`);
  console.log('|---|---:|---:|---:|---:|---|');
  for (const k of keys) {
    const ta = median(a.get(k)), tb = median(b.get(k));
    const noise = Math.max(spread(a.get(k)), spread(b.get(k)));
    const r = tb / ta;
    const bad = r > 1 + Math.max(noise, 0.02);
    rows++;
    ratios.push(r);
    if (bad) slower++;
    const us = (ms) => (ms * 1000).toFixed(1);
    console.log(`| ${k} | ${us(ta)} | ${us(tb)} | ${r.toFixed(3)} | ${(noise * 100).toFixed(1)}% | ${bad ? 'slower' : r < 1 - Math.max(noise, 0.02) ? 'faster' : 'same'} |`);
  }
}
const geo = Math.exp(ratios.reduce((s, r) => s + Math.log(r), 0) / Math.max(ratios.length, 1));
console.log(`\n${rows} rows compared, ${slower} slower beyond noise, geometric mean ${values['label-b']} / ${values['label-a']} ${geo.toFixed(3)}`);
