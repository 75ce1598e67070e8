/**
 * lib/model/config: config.json / generation_config.json of Qwen3, Llama and Phi-3 model
 * directories, the gate-checkpoint agreement check, and the RoPE tables (default, llama3,
 * longrope) against the formulas of MODELS.md evaluated in float64.
 */
import { truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { encodeSafetensors, parseCheckpoint, type Checkpoint } from '../lib/checkpoint/index.js';
import {
  checkGatesAgainstModel,
  loadGenerationConfig,
  loadModelConfig,
  parseGenerationConfig,
  parseModelConfig,
  ropeAttentionScaling,
  ropeCosSin,
  ropeFactorSet,
  ropeInvFreq,
  type ModelConfig,
} from '../lib/model/config.js';
import type { GateKind, WeightArray } from '../lib/types.js';
import { tempDirs, tinyConfig, expectError, expectRejects } from './model_helpers.js';

const dirs = tempDirs('trimkv-model-config-');
afterAll(() => dirs.cleanup());



/** The published shapes of the real models (MODELS.md), with made-up longrope factors. */
const PHI3_MINI_128K = {
  model_type: 'phi3',
  hidden_size: 3072,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 32,
  intermediate_size: 8192,
  vocab_size: 32064,
  max_position_embeddings: 131072,
  original_max_position_embeddings: 4096,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  rope_scaling: {
    type: 'longrope',
    short_factor: Array.from({ length: 48 }, (_, i) => 1 + i / 100),
    long_factor: Array.from({ length: 48 }, (_, i) => 1.07 + i),
  },
  sliding_window: 262144,
  hidden_act: 'silu',
  tie_word_embeddings: false,
};
const R1_LLAMA_8B = {
  model_type: 'llama',
  hidden_size: 4096,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  intermediate_size: 14336,
  vocab_size: 128256,
  max_position_embeddings: 131072,
  rms_norm_eps: 1e-5,
  rope_theta: 500000,
  rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
  hidden_act: 'silu',
  tie_word_embeddings: false,
};
const QWEN3_4B = {
  model_type: 'qwen3',
  hidden_size: 2560,
  num_hidden_layers: 36,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 128,
  intermediate_size: 9728,
  vocab_size: 151936,
  max_position_embeddings: 40960,
  rms_norm_eps: 1e-6,
  rope_theta: 1000000,
  rope_scaling: null,
  hidden_act: 'silu',
  tie_word_embeddings: true,
  use_sliding_window: false,
};

describe('parseModelConfig', () => {
  test('Qwen3-4B: head_dim 128 (not 2560 / 32), tied embeddings, default rope', () => {
    const c = parseModelConfig(QWEN3_4B);
    expect(c).toMatchObject({
      architecture: 'qwen3',
      hiddenSize: 2560,
      layers: 36,
      qHeads: 32,
      kvHeads: 8,
      headDim: 128,
      intermediateSize: 9728,
      vocabSize: 151936,
      maxPositionEmbeddings: 40960,
      rmsNormEps: 1e-6,
      ropeTheta: 1e6,
      rope: { type: 'default' },
      tieWordEmbeddings: true,
      hiddenAct: 'silu',
      slidingWindow: null,
    });
  });

  test('Phi-3-mini-128k: head_dim from hidden / heads (96), MHA, longrope with factor 1.19024', () => {
    const c = parseModelConfig(PHI3_MINI_128K);
    expect(c.headDim).toBe(96);
    expect(c.kvHeads).toBe(32);
    expect(c.slidingWindow).toBe(262144);
    expect(c.rope.type).toBe('longrope');
    if (c.rope.type !== 'longrope') return;
    expect(c.rope.originalMaxPositionEmbeddings).toBe(4096);
    expect(c.rope.shortFactor).toHaveLength(48);
    expect(c.rope.attentionFactor).toBeCloseTo(Math.sqrt(1 + Math.log(131072 / 4096) / Math.log(4096)), 12);
    expect(c.rope.attentionFactor).toBeCloseTo(1.19024, 5);
  });

  test("older Phi-3 configs' rope type 'su' reads as longrope", () => {
    const c = parseModelConfig({ ...PHI3_MINI_128K, rope_scaling: { ...PHI3_MINI_128K.rope_scaling, type: 'su' } });
    expect(c.rope.type).toBe('longrope');
  });

  test('DeepSeek-R1-Distill-Llama-8B: llama3 rope scaling, head_dim 4096 / 32', () => {
    const c = parseModelConfig(R1_LLAMA_8B);
    expect(c.headDim).toBe(128);
    expect(c.rope).toEqual({ type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
  });

  test('Qwen3 without head_dim takes its class default 128; Llama takes hidden / heads', () => {
    const { head_dim: _, ...qwen } = QWEN3_4B;
    expect(parseModelConfig(qwen).headDim).toBe(128);
    expect(parseModelConfig({ ...R1_LLAMA_8B, hidden_size: 2048 }).headDim).toBe(64);
  });

  test('num_key_value_heads defaults to num_attention_heads; torch_dtype and ids are read', () => {
    const { num_key_value_heads: _, ...llama } = R1_LLAMA_8B;
    const c = parseModelConfig({ ...llama, torch_dtype: 'float16', bos_token_id: 128000, eos_token_id: [128001, 128009] });
    expect(c.kvHeads).toBe(32);
    expect(c.dtype).toBe('fp16');
    expect(c.bosTokenId).toBe(128000);
    expect(c.eosTokenIds).toEqual([128001, 128009]);
  });

  test.each(['qwen3', 'llama', 'phi3'] as const)('tiny %s config of the test helpers parses', (arch) => {
    const c = parseModelConfig(tinyConfig(arch));
    expect(c.architecture).toBe(arch);
  });

  test('an unknown model_type is ERR_MODEL_CONFIG naming it', () => {
    expectError(() => parseModelConfig({ ...QWEN3_4B, model_type: 'mistral' }), 'ERR_MODEL_CONFIG', /unsupported architecture.*'model_type'.*"mistral"/);
  });

  test('a missing field is ERR_MODEL_CONFIG naming the field and file', () => {
    const { intermediate_size: _, ...c } = QWEN3_4B;
    expectError(() => parseModelConfig(c, 'dir/config.json'), 'ERR_MODEL_CONFIG', /dir\/config\.json: expected an integer >= 1 for 'intermediate_size' but received nothing/);
  });

  test.each([
    ['hidden_size', 0],
    ['num_hidden_layers', -1],
    ['vocab_size', 1.5],
    ['num_attention_heads', '32'],
    ['max_position_embeddings', null],
  ])('%s = %j is ERR_MODEL_CONFIG', (field, value) => {
    expectError(() => parseModelConfig({ ...QWEN3_4B, [field]: value }), 'ERR_MODEL_CONFIG', new RegExp(`'${field}'`));
  });

  test('rms_norm_eps must be a positive number', () => {
    expectError(() => parseModelConfig({ ...QWEN3_4B, rms_norm_eps: 0 }), 'ERR_MODEL_CONFIG', /a finite number > 0 for 'rms_norm_eps' but received 0/);
  });

  test('num_attention_heads not a multiple of num_key_value_heads is ERR_MODEL_CONFIG', () => {
    expectError(() => parseModelConfig({ ...QWEN3_4B, num_key_value_heads: 6 }), 'ERR_MODEL_CONFIG', /'num_attention_heads' 32 is not a multiple of 'num_key_value_heads' 6/);
  });

  test('hidden_size not divisible by heads without head_dim is ERR_MODEL_CONFIG', () => {
    expectError(() => parseModelConfig({ ...R1_LLAMA_8B, hidden_size: 4001 }), 'ERR_MODEL_CONFIG', /no 'head_dim'.*4001.*32/);
  });

  test('an odd head_dim is ERR_MODEL_CONFIG', () => {
    expectError(() => parseModelConfig({ ...QWEN3_4B, head_dim: 127 }), 'ERR_MODEL_CONFIG', /even head dimension.*'head_dim'/);
  });

  test('an activation other than silu is ERR_MODEL_CONFIG', () => {
    expectError(() => parseModelConfig({ ...QWEN3_4B, hidden_act: 'gelu' }), 'ERR_MODEL_CONFIG', /'silu'.*'hidden_act' but received "gelu"/);
  });

  test('attention biases are ERR_MODEL_CONFIG (not supported)', () => {
    expectError(() => parseModelConfig({ ...QWEN3_4B, attention_bias: true }), 'ERR_MODEL_CONFIG', /'attention_bias'/);
  });

  test('Qwen3 with use_sliding_window is ERR_MODEL_CONFIG', () => {
    expectError(() => parseModelConfig({ ...QWEN3_4B, use_sliding_window: true }), 'ERR_MODEL_CONFIG', /'use_sliding_window'/);
  });

  test('an unsupported rope type is ERR_MODEL_CONFIG naming it', () => {
    expectError(
      () => parseModelConfig({ ...R1_LLAMA_8B, rope_scaling: { rope_type: 'yarn', factor: 4 } }),
      'ERR_MODEL_CONFIG',
      /unsupported rope type.*"yarn"/,
    );
  });

  test('longrope factor lists of the wrong length are ERR_MODEL_CONFIG naming the list', () => {
    const rs = { ...PHI3_MINI_128K.rope_scaling, long_factor: PHI3_MINI_128K.rope_scaling.long_factor.slice(0, 47) };
    expectError(
      () => parseModelConfig({ ...PHI3_MINI_128K, rope_scaling: rs }),
      'ERR_MODEL_CONFIG',
      /list of 48 finite numbers > 0 \(head_dim \/ 2\) for 'rope_scaling.long_factor' but received a list of 47 values/,
    );
  });

  test('a non-positive longrope factor is ERR_MODEL_CONFIG', () => {
    const short = [...PHI3_MINI_128K.rope_scaling.short_factor];
    short[3] = 0;
    expectError(
      () => parseModelConfig({ ...PHI3_MINI_128K, rope_scaling: { ...PHI3_MINI_128K.rope_scaling, short_factor: short } }),
      'ERR_MODEL_CONFIG',
      /'rope_scaling.short_factor'/,
    );
  });

  test('llama3 scaling with high_freq_factor <= low_freq_factor is ERR_MODEL_CONFIG', () => {
    expectError(
      () => parseModelConfig({ ...R1_LLAMA_8B, rope_scaling: { ...R1_LLAMA_8B.rope_scaling, high_freq_factor: 1 } }),
      'ERR_MODEL_CONFIG',
      /'rope_scaling.high_freq_factor'/,
    );
  });

  test('llama3 scaling without factor is ERR_MODEL_CONFIG', () => {
    const { factor: _, ...rs } = R1_LLAMA_8B.rope_scaling;
    expectError(() => parseModelConfig({ ...R1_LLAMA_8B, rope_scaling: rs }), 'ERR_MODEL_CONFIG', /'rope_scaling.factor' but received nothing/);
  });

  test('a non-object is ERR_MODEL_CONFIG', () => {
    expectError(() => parseModelConfig([1, 2]), 'ERR_MODEL_CONFIG', /expected a JSON object/);
  });
});

describe('loadModelConfig', () => {
  test('reads config.json of a directory', async () => {
    const d = dirs.fresh();
    writeFileSync(join(d, 'config.json'), JSON.stringify(tinyConfig('llama')));
    const c = await loadModelConfig(d);
    expect(c.architecture).toBe('llama');
    expect(c.file).toBe(join(d, 'config.json'));
  });

  test('a missing directory is ERR_MODEL_MISSING', async () => {
    await expectRejects(loadModelConfig(join(dirs.root, 'nope')), 'ERR_MODEL_MISSING', /nope: model directory does not exist/);
  });

  test('a directory without config.json is ERR_MODEL_MISSING', async () => {
    await expectRejects(loadModelConfig(dirs.fresh()), 'ERR_MODEL_MISSING', /config\.json: config\.json does not exist/);
  });

  test('invalid JSON is ERR_MODEL_CONFIG', async () => {
    const d = dirs.fresh();
    writeFileSync(join(d, 'config.json'), '{"model_type": "qwen3",');
    await expectRejects(loadModelConfig(d), 'ERR_MODEL_CONFIG', /config\.json: config\.json is not valid JSON/);
  });

  test('a huge config.json is refused by its size without being read', async () => {
    const d = dirs.fresh();
    const f = join(d, 'config.json');
    writeFileSync(f, '{');
    truncateSync(f, 2 ** 31); // sparse: no disk
    const t0 = Date.now();
    await expectRejects(loadModelConfig(d), 'ERR_MODEL_CONFIG', /2147483648 bytes, more than the \d+ accepted/);
    expect(Date.now() - t0).toBeLessThan(1000);
  });
});

describe('parseGenerationConfig / loadGenerationConfig', () => {
  test('DeepSeek-R1-Distill-Llama-8B style: one eos id, sampling defaults', () => {
    const g = parseGenerationConfig({ bos_token_id: 128000, eos_token_id: 128001, do_sample: true, temperature: 0.6, top_p: 0.95 });
    expect(g).toMatchObject({ bosTokenId: 128000, eosTokenIds: [128001], doSample: true, temperature: 0.6, topP: 0.95 });
    expect(g.topK).toBeUndefined();
  });

  test('Qwen3 style: a list of eos ids, pad, top_k', () => {
    const g = parseGenerationConfig({ eos_token_id: [151645, 151643], pad_token_id: 151643, top_k: 20 });
    expect(g.eosTokenIds).toEqual([151645, 151643]);
    expect(g.padTokenId).toBe(151643);
    expect(g.topK).toBe(20);
  });

  test.each([
    ['eos_token_id', [1, 'x'], /'eos_token_id'/],
    ['temperature', -1, /'temperature'/],
    ['top_p', 0, /'top_p'/],
    ['top_p', 1.5, /'top_p'/],
    ['top_k', 2.5, /'top_k'/],
    ['do_sample', 'yes', /'do_sample'/],
    ['bos_token_id', [1, 2], /a single token id for 'bos_token_id'/],
  ])('%s = %j is ERR_MODEL_CONFIG', (field, value, message) => {
    expectError(() => parseGenerationConfig({ [field]: value }), 'ERR_MODEL_CONFIG', message);
  });

  test('an absent file gives undefined; a present one is read', async () => {
    const d = dirs.fresh();
    expect(await loadGenerationConfig(d)).toBeUndefined();
    writeFileSync(join(d, 'generation_config.json'), JSON.stringify({ eos_token_id: 7 }));
    expect((await loadGenerationConfig(d))?.eosTokenIds).toEqual([7]);
  });
});

/** A gate checkpoint of `kind` for a model of these sizes, through parseCheckpoint. */
function gates(kind: GateKind, m: { layers: number; hidden: number; qHeads: number; kvHeads: number; headDim: number }, extra: Record<string, unknown> = {}): Checkpoint {
  const I = 4;
  const input = kind === 'rg' ? m.hidden : m.kvHeads * 2 * m.headDim;
  const t = new Map<string, WeightArray>();
  const w = (shape: number[]): WeightArray => ({ dtype: 'fp32', shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)) });
  for (let l = 0; l < m.layers; l++) {
    const p = `model.layers.${l}.self_attn.retention_gate.`;
    if (kind === 'rg3') {
      t.set(`${p}gate_proj.weight`, w([I, input]));
      t.set(`${p}up_proj.weight`, w([I, input]));
      t.set(`${p}down_proj.weight`, w([m.kvHeads, I]));
    } else {
      t.set(`${p}linear1.weight`, w([I, input]));
      t.set(`${p}linear1.bias`, w([I]));
      t.set(`${p}linear2.weight`, w([m.kvHeads, I]));
    }
    t.set(`${p}bias`, w([m.kvHeads]));
  }
  const config = {
    model_type: 'qwen3',
    base_model: 'Qwen/Qwen3-4B',
    retention_gate: kind,
    hidden_act: 'silu',
    num_hidden_layers: m.layers,
    hidden_size: m.hidden,
    num_attention_heads: m.qHeads,
    num_key_value_heads: m.kvHeads,
    head_dim: m.headDim,
    retention_gate_intermediate_size: I,
    ...extra,
  };
  return parseCheckpoint(config, encodeSafetensors(t), 'safetensors', 'gates/trimkv_weights.safetensors');
}

describe('checkGatesAgainstModel', () => {
  const model: ModelConfig = parseModelConfig(tinyConfig('qwen3'), 'model/config.json');
  const fits = { layers: 2, hidden: 32, qHeads: 4, kvHeads: 2, headDim: 16 };

  test.each(['rg', 'rg2', 'rg3'] as const)('a %s checkpoint of the same shapes passes', (kind) => {
    expect(() => checkGatesAgainstModel(gates(kind, fits), model)).not.toThrow();
  });

  test('another layer count is ERR_MODEL_CONFIG naming base_model and the field', () => {
    expectError(
      () => checkGatesAgainstModel(gates('rg', { ...fits, layers: 3 }), model),
      'ERR_MODEL_CONFIG',
      /gates\/config\.json \(base_model "Qwen\/Qwen3-4B"\) does not fit the model of model\/config\.json: num_hidden_layers: gates 3, model 2/,
    );
  });

  test('another KV head count and head_dim are both reported', () => {
    expectError(
      () => checkGatesAgainstModel(gates('rg2', { ...fits, qHeads: 8, kvHeads: 4, headDim: 8 }), model),
      'ERR_MODEL_CONFIG',
      /num_key_value_heads: gates 4, model 2.*head_dim: gates 8, model 16/,
    );
  });

  test('another hidden size is reported for an rg gate', () => {
    expectError(() => checkGatesAgainstModel(gates('rg', { ...fits, hidden: 64 }), model), 'ERR_MODEL_CONFIG', /hidden_size: gates 64, model 32/);
  });

  test('another model_type is reported', () => {
    expectError(() => checkGatesAgainstModel(gates('rg', fits, { model_type: 'llama' }), model), 'ERR_MODEL_CONFIG', /model_type: gates "llama", model "qwen3"/);
  });
});

// ---------------------------------------------------------------------------------------------
// RoPE against MODELS.md's statement in float64. The tables are fp32, so each value must be
// within a few fp32 ulps of the float64 value.
// ---------------------------------------------------------------------------------------------
const TOL_ROPE = 4e-7; // relative: ~3 fp32 ulps

function expectClose(got: ArrayLike<number>, want: ArrayLike<number>, tol = TOL_ROPE): void {
  expect(got.length).toBe(want.length);
  for (let i = 0; i < want.length; i++) {
    const w = want[i]!;
    expect(Math.abs(got[i]! - w), `index ${i}: ${got[i]} vs ${w}`).toBeLessThanOrEqual(tol * Math.abs(w));
  }
}

describe('ropeInvFreq', () => {
  test('default (Qwen3-4B): theta^(-2i/dim) for i < dim/2', () => {
    const c = parseModelConfig(QWEN3_4B);
    const inv = ropeInvFreq(c);
    expect(inv).toBeInstanceOf(Float32Array);
    expectClose(inv, Array.from({ length: 64 }, (_, i) => Math.pow(1e6, (-2 * i) / 128)));
    expect(inv[0]).toBe(1);
  });

  test('llama3 (R1-Distill-Llama-8B): /8 above wavelen 8192, kept below 2048, blended between', () => {
    const c = parseModelConfig(R1_LLAMA_8B);
    const inv = ropeInvFreq(c);
    const bands = { low: 0, high: 0, mid: 0 };
    const want = Array.from({ length: 64 }, (_, i) => {
      const f = Math.pow(5e5, (-2 * i) / 128);
      const wavelen = (2 * Math.PI) / f;
      if (wavelen > 8192 / 1) return bands.low++, f / 8;
      if (wavelen < 8192 / 4) return bands.high++, f;
      bands.mid++;
      const s = (8192 / wavelen - 1) / (4 - 1);
      return ((1 - s) * f) / 8 + s * f;
    });
    // The real config exercises all three bands.
    expect(bands.low).toBeGreaterThan(0);
    expect(bands.high).toBeGreaterThan(0);
    expect(bands.mid).toBeGreaterThan(0);
    expectClose(inv, want, 2e-6); // the blend adds a few fp32 roundings
  });

  test('longrope (Phi-3-mini-128k): 1 / (ext_i * theta^(2i/96)), short up to 4096 positions, long beyond', () => {
    const c = parseModelConfig(PHI3_MINI_128K);
    const { short_factor: short, long_factor: long } = PHI3_MINI_128K.rope_scaling;
    const want = (ext: number[]) => Array.from({ length: 48 }, (_, i) => 1 / (ext[i]! * Math.pow(1e4, (2 * i) / 96)));
    expectClose(ropeInvFreq(c, 100), want(short));
    // Largest position 4095 (length 4096) still uses the short factors; 4096 is the first long one.
    expectClose(ropeInvFreq(c, 4096), want(short));
    expectClose(ropeInvFreq(c, 4097), want(long));
    expect(ropeFactorSet(c, 4096)).toBe('short');
    expect(ropeFactorSet(c, 4097)).toBe('long');
    expect(ropeFactorSet(parseModelConfig(QWEN3_4B), 4097)).toBeNull();
  });

  test('longrope without maxLength is ERR_INVALID_ARGUMENT', () => {
    expectError(() => ropeInvFreq(parseModelConfig(PHI3_MINI_128K)), 'ERR_INVALID_ARGUMENT', /maximum length.*for maxLength but received undefined/);
  });

  test('maxLength beyond max_position_embeddings is ERR_RANGE', () => {
    expectError(() => ropeInvFreq(parseModelConfig(QWEN3_4B), 40961), 'ERR_RANGE', /\[1, 40960\].*maxLength but received 40961/);
  });
});

describe('ropeAttentionScaling', () => {
  test('1 for default and llama3; 1.19024 for Phi-3 longrope, short and long alike', () => {
    expect(ropeAttentionScaling(parseModelConfig(QWEN3_4B))).toBe(1);
    expect(ropeAttentionScaling(parseModelConfig(R1_LLAMA_8B), 100_000)).toBe(1);
    const phi = parseModelConfig(PHI3_MINI_128K);
    expect(ropeAttentionScaling(phi, 10)).toBeCloseTo(1.19024, 5);
    expect(ropeAttentionScaling(phi, 100_000)).toBe(ropeAttentionScaling(phi, 10));
  });

  test('a config whose max_position_embeddings equals the original is not scaled', () => {
    expect(ropeAttentionScaling(parseModelConfig({ ...PHI3_MINI_128K, max_position_embeddings: 4096 }))).toBe(1);
  });

  test('an explicit attention_factor wins', () => {
    const c = parseModelConfig({ ...PHI3_MINI_128K, rope_scaling: { ...PHI3_MINI_128K.rope_scaling, attention_factor: 1.5 } });
    expect(ropeAttentionScaling(c)).toBe(1.5);
  });
});

describe('ropeCosSin', () => {
  test('cos/sin of pos * invFreq, duplicated to head_dim (rotate_half), scaled for longrope', () => {
    const c = parseModelConfig(PHI3_MINI_128K);
    const positions = [0, 1, 17, 4095, 9000];
    const { cos, sin } = ropeCosSin(c, positions, 10_000);
    const inv = ropeInvFreq(c, 10_000);
    const scale = 1.19024;
    for (const [p, pos] of positions.entries()) {
      for (let i = 0; i < 48; i++) {
        const a = pos * inv[i]!;
        for (const j of [i, i + 48]) {
          // fp32 angles lose ~pos * 6e-8 radians; the tolerance follows.
          const tol = 1e-5 + pos * 1.2e-7;
          expect(Math.abs(cos[p * 96 + j]! - Math.cos(a) * scale)).toBeLessThan(tol);
          expect(Math.abs(sin[p * 96 + j]! - Math.sin(a) * scale)).toBeLessThan(tol);
        }
      }
    }
  });

  test('a position outside [0, maxLength) is ERR_RANGE', () => {
    expectError(() => ropeCosSin(parseModelConfig(QWEN3_4B), [0, 8], 8), 'ERR_RANGE', /positions\[1\] but received 8/);
  });
});
