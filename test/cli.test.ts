/**
 * The CLI as users run it (`trimkv info`, `trimkv demo`, bad commands), and the run-time
 * switch that forces the CPU backend.
 */
import { describe, expect, test } from 'vitest';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { main } from '../lib/cli/index.js';
import { backends, FORCE_CPU_ENV, openRuntime } from '../lib/index.js';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/** Runs main() capturing what it prints. */
async function cli(args: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [], err: string[] = [];
  const log = console.log, error = console.error;
  console.log = (...a: unknown[]) => void out.push(a.join(' '));
  console.error = (...a: unknown[]) => void err.push(a.join(' '));
  try {
    const code = await main(args);
    return { code, out: out.join('\n'), err: err.join('\n') };
  } finally {
    console.log = log;
    console.error = error;
  }
}

describe('trimkv info', () => {
  test('names the loaded binary, the CUDA build and every backend', async () => {
    const r = await cli(['info']);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/trimkv native addon: (prebuilt|local build) \(.+\.node\)/);
    expect(r.out).toMatch(/CUDA compiled in: (no|yes, runtime \d+\.\d+, architectures \S+)/);
    expect(r.out).toMatch(/backend cpu: available/);
    const cuda = backends().find((b) => b.name === 'cuda')!;
    expect(r.out).toContain(cuda.available ? 'backend cuda: available' : `backend cuda: unavailable (${cuda.reason})`);
  });
});

describe('trimkv demo', () => {
  test('decodes a small model-shaped workload on the CPU and reports memory and throughput', async () => {
    const r = await cli(['demo', '--backend', 'cpu', '--layers', '2', '--q-heads', '4', '--kv-heads', '2', '--head-dim', '32',
      '--memory', '16', '--prompt', '40', '--steps', '30', '--batch', '2', '--json']);
    expect(r.code, r.err).toBe(0);
    const s = JSON.parse(r.out);
    expect(s.backend).toBe('cpu');
    expect(s.tokensGenerated).toBe(60);
    expect(s.promptTokens).toBe(80);
    expect(s.tokensPerHead).toBe(16); // bounded at M whatever the length
    // Full cache: 2 sequences x 70 tokens x 2 layers x 2 heads x (K + V) x 32 x 2 bytes.
    expect(s.fullCacheBytes).toBe(2 * 70 * 2 * 2 * 2 * 32 * 2);
    expect(s.cacheBytes).toBeLessThan(s.fullCacheBytes);
    expect(s.tokensPerSecond).toBeGreaterThan(0);
  });

  test('rejects a bad option value with the error code', async () => {
    const r = await cli(['demo', '--memory', 'lots']);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/ERR_INVALID_ARGUMENT: Expected an integer for --memory but received lots/);
  });

  test.each(['demo', 'bench'])('`%s --help` prints the usage and exits 0', async (cmd) => {
    const r = await cli([cmd, '--help']);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/Usage: trimkv <command>/);
    expect(r.out).toMatch(/--memory <n>/);
  });

  test('an unknown command prints the usage and exits 2', async () => {
    const r = await cli(['frobnicate']);
    expect(r.code).toBe(2);
    expect(r.err).toMatch(/unknown command 'frobnicate'/);
    expect(r.err).toMatch(/Usage: trimkv <command>/);
  });
});

describe(`${FORCE_CPU_ENV}`, () => {
  test('makes CUDA unavailable with the reason, and auto opens the CPU', () => {
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', `
      const { backends, openRuntime } = await import(${JSON.stringify(join(root, 'dist', 'lib', 'index.js'))});
      const cuda = backends().find((b) => b.name === 'cuda');
      console.log(JSON.stringify({ available: cuda.available, reason: cuda.reason, auto: openRuntime('auto').backend }));
    `], { env: { ...process.env, [FORCE_CPU_ENV]: '1' }, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const o = JSON.parse(r.stdout);
    expect(o.available).toBe(false);
    expect(o.auto).toBe('cpu');
    // Where the binary has no usable CUDA anyway, the build's own reason stays.
    const native = backends().find((b) => b.name === 'cuda')!;
    expect(o.reason).toBe(native.available ? `disabled by ${FORCE_CPU_ENV}=1` : native.reason);
    expect(openRuntime('auto').backend).toBe(native.available ? 'cuda' : 'cpu');
  });
});
