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
