#!/usr/bin/env node
// Install step of trimkv: use a prebuilt binary when one loads here; otherwise build from
// source with CMake (CUDA when nvcc is found, else CPU-only), and with node-gyp (CPU-only)
// where CMake is missing. Says what it did and why. Downloads nothing.
import { execFileSync, spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const log = (msg) => console.log(`trimkv: ${msg}`);

function tryLoad() {
  try {
    const path = require('node-gyp-build').resolve(root);
    require(path);
    return path;
  } catch (e) {
    return { error: e.message.split('\n')[0] };
  }
}

function has(cmd, args = ['--version']) {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function run(cmd, args, env = process.env) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env });
  return r.status === 0;
}

if (process.env.TRIMKV_FORCE_BUILD !== '1') {
  const found = tryLoad();
  if (typeof found === 'string') {
    log(`using ${found.includes('prebuilds') ? 'the prebuilt binary' : 'the existing build'} ${found}`);
    process.exit(0);
  }
  log(`no prebuilt binary loads here (${found.error}); building from source`);
}

if (has('cmake')) {
  const cuda = process.env.TRIMKV_CUDA !== '0' && has('nvcc');
  log(cuda
    ? `CMake and nvcc found: building with the CUDA backend (architectures: ${process.env.TRIMKV_CUDA_ARCHS || 'default 90-real;75-virtual'})`
    : 'CMake found, nvcc not found (or TRIMKV_CUDA=0): building the CPU-only addon');
  const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
  if (run(process.execPath, [cmakeJs, 'compile'])) {
    log('build finished (build/Release/trimkv.node)');
    process.exit(0);
  }
  log('the CMake build failed; trying the CPU-only node-gyp build');
} else {
  log('CMake not found: building the CPU-only addon with node-gyp');
}

const gyp = process.env.npm_config_node_gyp;
const ok = gyp ? run(process.execPath, [gyp, 'rebuild']) : run('npx', ['--no-install', 'node-gyp', 'rebuild']);
if (!ok) {
  log('the build failed. Install CMake (or python3 + make for node-gyp) and a C++17 compiler, then run `npm rebuild trimkv`.');
  process.exit(1);
}
log('build finished (CPU-only, node-gyp)');
