/** backends() and openRuntime(): what is available here and what 'auto' picks. */
import { describe, expect, test } from 'vitest';
import { backends, openRuntime, TrimKVError } from '../lib/index.js';
import { backendsUnderTest, cudaAvailable } from './backends.js';

describe('backends', () => {
  test('cpu is always available with a host device', () => {
    const cpu = backends().find((b) => b.name === 'cpu');
    expect(cpu).toBeDefined();
    expect(cpu!.available).toBe(true);
    expect(cpu!.devices.length).toBeGreaterThanOrEqual(1);
    expect(typeof cpu!.devices[0]!.name).toBe('string');
  });

  test('cuda is listed, with a reason when it is unavailable', () => {
    const cuda = backends().find((b) => b.name === 'cuda');
    expect(cuda).toBeDefined();
    if (cuda!.available) {
      expect(cuda!.devices.length).toBeGreaterThanOrEqual(1);
      expect(cuda!.devices[0]!.computeCapability).toMatch(/^\d+\.\d+$/);
    } else {
      expect(typeof cuda!.reason).toBe('string');
      expect(cuda!.reason!.length).toBeGreaterThan(0);
    }
  });

  test('backendsUnderTest follows backends()', () => {
    expect(backendsUnderTest()).toEqual(cudaAvailable ? ['cpu', 'cuda'] : ['cpu']);
  });
});

describe('openRuntime', () => {
  test.each([[undefined], ['auto' as const]])("%s picks cuda when usable, else cpu", (req) => {
    const rt = req === undefined ? openRuntime() : openRuntime(req);
    expect(rt.backend).toBe(cudaAvailable ? 'cuda' : 'cpu');
    rt.dispose();
  });

  test("'cpu' opens the CPU backend", () => {
    const rt = openRuntime('cpu');
    expect(rt.backend).toBe('cpu');
    rt.dispose();
  });

  test.skipIf(!cudaAvailable)("'cuda' opens the CUDA backend", () => {
    const rt = openRuntime('cuda');
    expect(rt.backend).toBe('cuda');
    rt.dispose();
  });

  test.skipIf(cudaAvailable)("'cuda' without a GPU throws ERR_BACKEND_UNAVAILABLE with the reason", () => {
    const reason = backends().find((b) => b.name === 'cuda')!.reason!;
    let err: unknown;
    try {
      openRuntime('cuda');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(TrimKVError);
    expect((err as TrimKVError).code).toBe('ERR_BACKEND_UNAVAILABLE');
    expect((err as TrimKVError).message).toContain(reason);
  });
});

describe.each(backendsUnderTest())('Runtime on %s', (backend) => {
  test('synchronize resolves', async () => {
    const rt = openRuntime(backend);
    await expect(rt.synchronize()).resolves.toBeUndefined();
    rt.dispose();
  });

  test('fromArray holds the data', () => {
    const rt = openRuntime(backend);
    const t = rt.fromArray(Float32Array.from([1, 2, 3, 4, 5, 6]), [2, 3], 'fp16');
    expect(t.shape).toEqual([2, 3]);
    expect(Array.from(t.readSync())).toEqual([1, 2, 3, 4, 5, 6]);
    rt.dispose();
  });

  test('dispose (and Symbol.dispose) ends the runtime and everything it created', () => {
    const rt = openRuntime(backend);
    const cache = rt.createCache({ layers: 1, batch: 1, qHeads: 1, kvHeads: 1, headDim: 64, memory: 4 });
    rt[Symbol.dispose]();
    expect(cache.disposed).toBe(true);
    let err: unknown;
    try {
      rt.tensor([1], 'fp32');
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(TrimKVError);
    expect((err as TrimKVError).code).toBe('ERR_DISPOSED');
  });
});

describe('ERR_ADDON_LOAD', () => {
  test('a package with no binary for this platform fails with the reason and the fix, not a crash', async () => {
    const { cpSync, mkdtempSync, rmSync, symlinkSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join, dirname } = await import('node:path');
    const { spawnSync } = await import('node:child_process');
    const { fileURLToPath } = await import('node:url');
    const root = join(dirname(fileURLToPath(import.meta.url)), '..');
    const dir = mkdtempSync(join(tmpdir(), 'trimkv-noaddon-'));
    try {
      // The published layout without build/ or prebuilds/.
      cpSync(join(root, 'dist'), join(dir, 'dist'), { recursive: true });
      cpSync(join(root, 'package.json'), join(dir, 'package.json'));
      symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
      const r = spawnSync(process.execPath, ['--input-type=module', '-e', `
        const { backends } = await import(${JSON.stringify(join(dir, 'dist', 'lib', 'index.js'))});
        try { backends(); console.log('loaded'); } catch (e) { console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message })); }
      `], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      const e = JSON.parse(r.stdout);
      expect(e.name).toBe('TrimKVError');
      expect(e.code).toBe('ERR_ADDON_LOAD');
      expect(e.message).toMatch(/could not load the trimkv native addon: .*No native build was found/);
      expect(e.message).toMatch(/run `npm rebuild trimkv`/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
