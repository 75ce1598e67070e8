/**
 * The node-gyp fallback build (binding.gyp, CPU-only) must compile and load, since it is
 * what a machine without CMake gets. Built in a temporary copy so the main build stays.
 */
import { describe, expect, test } from 'vitest';
import { cpSync, existsSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
// Local Node headers (no download is allowed): the installation's include/node.
const nodedir = join(dirname(process.execPath), '..');
const hasHeaders = existsSync(join(nodedir, 'include', 'node', 'node_api.h'));
const gyp = join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
if (!hasHeaders) console.log(`build.test: skipping the node-gyp build: no Node headers under ${nodedir}/include/node`);

describe.skipIf(!hasHeaders)('binding.gyp (node-gyp, CPU-only fallback)', () => {
  test('builds offline and loads a CPU-only addon that computes', () => {
    const dir = mkdtempSync(join(tmpdir(), 'trimkv-gyp-'));
    try {
      cpSync(join(root, 'binding.gyp'), join(dir, 'binding.gyp'));
      cpSync(join(root, 'csrc'), join(dir, 'csrc'), { recursive: true });
      symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
      const r = spawnSync(process.execPath, [gyp, 'rebuild', `--nodedir=${nodedir}`, '-j', '2'], {
        cwd: dir, encoding: 'utf8', env: { ...process.env, npm_config_offline: 'true' },
      });
      expect(r.status, r.stderr.slice(-3000)).toBe(0);
      const addon = createRequire(import.meta.url)(join(dir, 'build', 'Release', 'trimkv.node'));
      const status = addon.cudaStatus();
      expect(status.compiled).toBe(false);
      expect(status.available).toBe(false);
      expect(status.reason).toMatch(/without nvcc/);
      const t = new addon.NativeTensor(0, 'bf16', [3]);
      t.write(new Float32Array([1, 1.00390625, -2.5]));
      expect(Array.from(t.readSync())).toEqual([1, 1, -2.5]);
      expect(typeof addon.NativeModel).toBe('function'); // csrc/model/ and napi/model.cc are listed
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 600_000);
});
