#!/usr/bin/env node
// `npm run lint:format`: fails when a C++/CUDA file of csrc/ or bench/kernels/ differs from
// what .clang-format gives (clang-format of the `clang-format` devDependency, so every machine
// checks with the same version). `--fix` formats the files in place instead.
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const clangFormat = createRequire(import.meta.url).resolve('clang-format/index.js');
const sources = /\.(h|cc|cu|cuh)$/;

function walk(dir, out) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) walk(p, out);
    else if (sources.test(e.name)) out.push(relative(root, p));
  }
  return out;
}

const files = ['csrc', 'bench/kernels'].flatMap((d) => walk(join(root, d), [])).sort();
const fix = process.argv.includes('--fix');
const args = fix ? ['-i', ...files] : ['--dry-run', '-Werror', ...files];
const r = spawnSync(process.execPath, [clangFormat, ...args], { cwd: root, stdio: 'inherit' });
if (r.status !== 0 && !fix) console.error('lint:format: run `npm run format` and commit the result');
process.exit(r.status ?? 1);
