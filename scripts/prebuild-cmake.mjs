#!/usr/bin/env node
// Stands in for node-gyp when prebuildify runs (`npm run prebuild`): prebuildify calls
// "<node-gyp> rebuild --target=... --release"; the build of record is CMake, so this runs
// cmake-js instead and leaves build/Release/trimkv.node where prebuildify picks it up.
// TRIMKV_CUDA_ARCHS (set by the prebuild script) lists every architecture CUDA 13 supports.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cmakeJs = createRequire(import.meta.url).resolve('cmake-js/bin/cmake-js');
const debug = process.argv.includes('--debug');
console.log(`prebuild: cmake-js rebuild for CUDA architectures ${process.env.TRIMKV_CUDA_ARCHS ?? '(default)'}`);
const r = spawnSync(process.execPath, [cmakeJs, 'rebuild', ...(debug ? ['--debug'] : [])], { cwd: root, stdio: 'inherit' });
process.exit(r.status ?? 1);
