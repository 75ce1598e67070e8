/**
 * The CPU reference forward (csrc/model/, lib/model/forward.ts) against the model fixtures of
 * test/fixtures/models (transformers 5.17): full-cache teacher-forced logits per step within
 * the fixture README's tolerance, and greedy tokens identical (bf16: up to the first near-tie
 * as the README defines it; fp32: every step).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { loadForwardModel } from '../lib/model/forward.js';
import { readSafetensorsHeader } from '../lib/model/weights.js';
import { expectError, expectRejects } from './model_helpers.js';

const ROOT = join(import.meta.dirname, 'fixtures', 'models');

interface FullCacheSequence {
  prompt: number[];
  generated: number[];
  logits: string;
  margin: number[];
}
interface Expected {
  dtype: string;
  tolerance: { logits_rel: number };
  full_cache: { steps: number; sequences: FullCacheSequence[] };
  full_cache_long?: { steps: number; sequences: FullCacheSequence[] };
}

function expected(model: string): Expected {
  return JSON.parse(readFileSync(join(ROOT, model, 'expected.json'), 'utf8')) as Expected;
}

/** The fp32 rows of each tensor of logits.safetensors. */
async function referenceLogits(model: string): Promise<Map<string, Float32Array[]>> {
  const file = join(ROOT, model, 'logits.safetensors');
  const header = await readSafetensorsHeader(file);
  const bytes = readFileSync(file);
  const out = new Map<string, Float32Array[]>();
  for (const [name, t] of header.tensors) {
    expect(t.dtype).toBe('fp32');
    const [rows, cols] = t.shape as [number, number];
    const all = new Float32Array(bytes.buffer.slice(bytes.byteOffset + t.offset, bytes.byteOffset + t.offset + t.bytes));
    out.set(name, Array.from({ length: rows }, (_, r) => all.subarray(r * cols, (r + 1) * cols)));
  }
  return out;
}

function argmax(a: Float32Array): number {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i]! > a[best]!) best = i;
  return best;
}

function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]!));
  return m;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    m = Number.isNaN(d) ? Infinity : Math.max(m, d);
  }
  return m;
}

/**
 * Teacher-forced logits of every step within `tol` of the reference rows (relative to the
 * largest reference logit), then free-running greedy tokens against `generated`: all of them
 * when `exactGreedy`, else up to a first difference that the README's near-tie rule allows.
 */
async function checkSequence(model: string, seq: FullCacheSequence, ref: Float32Array[], steps: number, tol: number, exactGreedy: boolean): Promise<void> {
  expect(ref).toHaveLength(steps + 1);
  const maxLength = seq.prompt.length + steps + 1;
  using m = await loadForwardModel(join(ROOT, model));

  // Teacher forcing: the prompt in one call, then generated[s - 1] at step s.
  let bound = 0;
  for (const r of ref) bound = Math.max(bound, maxAbs(r));
  bound *= tol;
  const diffs: number[] = [];
  for (let s = 0; s <= steps; s++) {
    const logits = s === 0 ? m.forward(seq.prompt, 0, { maxLength }) : m.forward([seq.generated[s - 1]!], seq.prompt.length + s - 1, { maxLength });
    diffs.push(maxAbsDiff(logits, ref[s]!));
  }
  expect(Math.max(...diffs), `max |runner - ref| over the sequence (bound ${bound})`).toBeLessThanOrEqual(bound);

  // Free-running greedy: prefill, then feed back our own argmax.
  const got: number[] = [argmax(m.forward(seq.prompt, 0, { maxLength }))];
  for (let s = 1; s <= steps; s++) got.push(argmax(m.forward([got[s - 1]!], seq.prompt.length + s - 1, { maxLength })));
  const first = got.findIndex((t, s) => t !== seq.generated[s]);
  if (exactGreedy || first < 0) {
    expect(got).toEqual(seq.generated);
  } else {
    // A near-tie (README): the margin at the first difference within twice our difference there.
    expect(seq.margin[first]!, `first difference at step ${first}`).toBeLessThanOrEqual(2 * diffs[first]!);
    expect(got.slice(0, first)).toEqual(seq.generated.slice(0, first));
  }
}

const CASES = [
  { model: 'qwen3-fp32', exactGreedy: true },
  { model: 'qwen3', exactGreedy: false },
  { model: 'llama', exactGreedy: false },
  { model: 'phi3', exactGreedy: false },
] as const;

describe.each(CASES)('full cache: $model', ({ model, exactGreedy }) => {
  const exp = expected(model);
  const tol = exp.tolerance.logits_rel;

  test('the fixture is the expected kind', async () => {
    using m = await loadForwardModel(join(ROOT, model));
    expect(m.dtype).toBe(exp.dtype === 'float32' ? 'fp32' : 'bf16');
    expect(tol).toBe(exp.dtype === 'float32' ? 1e-4 : 4e-2);
    expect(exp.full_cache.steps).toBe(model === 'phi3' ? 46 : 64);
  });

  test.each(exp.full_cache.sequences.map((s, i) => [i, s] as const))('sequence %i: teacher-forced logits and greedy tokens', async (_i, seq) => {
    const ref = (await referenceLogits(model)).get(seq.logits)!;
    await checkSequence(model, seq, ref, exp.full_cache.steps, tol, exactGreedy);
  });
});

describe('full cache, long factors: phi3', () => {
  const exp = expected('phi3');
  const long = exp.full_cache_long!;

  // Lengths 74 and 135 exceed original_max_position_embeddings 64: long factors from the start.
  test.each(long.sequences.map((s, i) => [i, s] as const))('sequence %i: teacher-forced logits and greedy tokens', async (_i, seq) => {
    expect(seq.prompt.length + long.steps + 1).toBeGreaterThan(64);
    const ref = (await referenceLogits('phi3')).get(seq.logits)!;
    await checkSequence('phi3', seq, ref, long.steps, exp.tolerance.logits_rel, false);
  });
});

describe('forward errors', () => {
  test('cuda backend: ERR_UNSUPPORTED', async () => {
    await expectRejects(loadForwardModel(join(ROOT, 'qwen3'), { backend: 'cuda' }), 'ERR_UNSUPPORTED', /cpu backend only/);
  });

  test('bad tokens and positions', async () => {
    using m = await loadForwardModel(join(ROOT, 'qwen3'));
    expectError(() => m.forward([384], 0), 'ERR_RANGE', /tokens\[0\]/);
    expectError(() => m.forward([1], 1), 'ERR_RANGE', /start position 1 is outside \[0, 0\]/); // nothing held yet
    m.forward([1, 2, 3], 0);
    expect(m.length).toBe(3);
    m.forward([4], 3);
    expect(m.length).toBe(4);
    m.forward([5], 2); // cut back to 2 positions, then one more
    expect(m.length).toBe(3);
    m.dispose();
    expectError(() => m.length, 'ERR_DISPOSED', /disposed/);
  });

  test('longrope factors never switch mid-sequence', async () => {
    using m = await loadForwardModel(join(ROOT, 'phi3'));
    m.forward([1, 2, 3], 0, { maxLength: 10 });
    expectError(() => m.forward([4], 3, { maxLength: 100 }), 'ERR_STATE', /longrope factors to long mid-way/);
    m.forward([1, 2, 3], 0, { maxLength: 100 });
    m.forward([4], 3, { maxLength: 100 });
  });
});
