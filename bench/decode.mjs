#!/usr/bin/env node
// Kept for old scripts: the benchmarks are now `trimkv bench` (bench/). Same options.
//   node bench/decode.mjs [--quick] [--only decode,...] [--backend b] [--out DIR] [--torch FILE]
import { main } from '../dist/lib/cli/index.js';

process.exit(await main(['bench', ...process.argv.slice(2)]));
