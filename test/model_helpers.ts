/**
 * Test helpers for lib/model: tiny config.json objects of each architecture (shaped like the
 * real ones: Qwen3's head_dim larger than hidden / heads, Llama's llama3 rope, Phi-3's MHA
 * without head_dim and longrope factors), and writers of safetensors model directories.
 */
import { expect } from 'vitest';
import { TrimKVError } from '../lib/errors.js';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { encodeSafetensors } from '../lib/checkpoint/index.js';
import type { ModelArchitecture } from '../lib/model/config.js';
import type { DType, WeightArray } from '../lib/types.js';

/** A temp root with numbered fresh subdirectories; `cleanup` removes it all. */
export function tempDirs(prefix: string): { fresh(): string; root: string; cleanup(): void } {
  const root = mkdtempSync(join(tmpdir(), prefix));
  let n = 0;
  return {
    root,
    fresh() {
      const d = join(root, `d${n++}`);
      mkdirSync(d);
      return d;
    },
    cleanup: () => rmSync(root, { recursive: true, force: true }),
  };
}

/** Tiny config.json of each architecture. */
export function tinyConfig(arch: ModelArchitecture): Record<string, unknown> {
  switch (arch) {
    case 'qwen3':
      return {
        architectures: ['Qwen3ForCausalLM'],
        model_type: 'qwen3',
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16, // not hidden / heads = 8, as Qwen3-4B's 128 is not 2560 / 32
        intermediate_size: 48,
        vocab_size: 64,
        max_position_embeddings: 40960,
        rms_norm_eps: 1e-6,
        rope_theta: 1000000,
        rope_scaling: null,
        tie_word_embeddings: true,
        hidden_act: 'silu',
        attention_bias: false,
        use_sliding_window: false,
        torch_dtype: 'bfloat16',
        bos_token_id: 60,
        eos_token_id: 61,
      };
    case 'llama':
      return {
        architectures: ['LlamaForCausalLM'],
        model_type: 'llama',
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 40,
        vocab_size: 64,
        max_position_embeddings: 131072,
        rms_norm_eps: 1e-5,
        rope_theta: 500000,
        rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
        tie_word_embeddings: false,
        hidden_act: 'silu',
        attention_bias: false,
        mlp_bias: false,
        torch_dtype: 'bfloat16',
        bos_token_id: 0,
        eos_token_id: 1,
      };
    case 'phi3':
      return {
        architectures: ['Phi3ForCausalLM'],
        model_type: 'phi3',
        hidden_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        intermediate_size: 32,
        vocab_size: 64,
        max_position_embeddings: 131072,
        original_max_position_embeddings: 4096,
        rms_norm_eps: 1e-5,
        rope_theta: 10000,
        rope_scaling: { type: 'longrope', short_factor: [1, 1.5, 2], long_factor: [1.1, 4, 9] },
        sliding_window: 262144,
        tie_word_embeddings: false,
        hidden_act: 'silu',
        torch_dtype: 'bfloat16',
        bos_token_id: 1,
        eos_token_id: 2,
      };
  }
}

const ITEM: Readonly<Record<DType, number>> = { fp32: 4, fp16: 2, bf16: 2 };

/** A tensor of `shape` whose 16-bit (or 32-bit) words count up from `seed`, so reads can be checked. */
export function patterned(shape: number[], dtype: DType = 'bf16', seed = 1): WeightArray {
  const n = shape.reduce((a, b) => a * b, 1);
  if (dtype === 'fp32') {
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) data[i] = seed + i * 0.5;
    return { dtype, shape, data };
  }
  const data = new Uint16Array(n);
  for (let i = 0; i < n; i++) data[i] = (seed * 7919 + i) & 0xffff;
  return { dtype, shape, data };
}

/** The raw little-endian bytes of a weight. */
export function bytesOf(w: WeightArray): Uint8Array {
  return new Uint8Array(w.data.buffer, w.data.byteOffset, w.data.byteLength);
}

/** The tensors (name -> shape) a model of `config` must have, as the MODELS.md table lists them. */
export function expectedShapes(config: Record<string, unknown>): Map<string, number[]> {
  const arch = config.model_type as ModelArchitecture;
  const D = config.hidden_size as number;
  const L = config.num_hidden_layers as number;
  const Hq = config.num_attention_heads as number;
  const Hkv = config.num_key_value_heads as number;
  const hd = (config.head_dim as number | undefined) ?? D / Hq;
  const I = config.intermediate_size as number;
  const V = config.vocab_size as number;
  const m = new Map<string, number[]>();
  m.set('model.embed_tokens.weight', [V, D]);
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`;
    m.set(`${p}input_layernorm.weight`, [D]);
    if (arch === 'phi3') m.set(`${p}self_attn.qkv_proj.weight`, [(Hq + 2 * Hkv) * hd, D]);
    else {
      m.set(`${p}self_attn.q_proj.weight`, [Hq * hd, D]);
      m.set(`${p}self_attn.k_proj.weight`, [Hkv * hd, D]);
      m.set(`${p}self_attn.v_proj.weight`, [Hkv * hd, D]);
    }
    m.set(`${p}self_attn.o_proj.weight`, [D, Hq * hd]);
    if (arch === 'qwen3') {
      m.set(`${p}self_attn.q_norm.weight`, [hd]);
      m.set(`${p}self_attn.k_norm.weight`, [hd]);
    }
    m.set(`${p}post_attention_layernorm.weight`, [D]);
    if (arch === 'phi3') m.set(`${p}mlp.gate_up_proj.weight`, [2 * I, D]);
    else {
      m.set(`${p}mlp.gate_proj.weight`, [I, D]);
      m.set(`${p}mlp.up_proj.weight`, [I, D]);
    }
    m.set(`${p}mlp.down_proj.weight`, [D, I]);
  }
  m.set('model.norm.weight', [D]);
  if (config.tie_word_embeddings !== true) m.set('lm_head.weight', [V, D]);
  return m;
}

/** Every tensor of a model, patterned (distinct seeds). */
export function modelTensors(config: Record<string, unknown>, dtype: DType = 'bf16'): Map<string, WeightArray> {
  const out = new Map<string, WeightArray>();
  let seed = 1;
  for (const [name, shape] of expectedShapes(config)) out.set(name, patterned(shape, dtype, seed++));
  return out;
}

/**
 * Writes a model directory: config.json and the tensors, in one `model.safetensors` or in
 * `shards` shards with a `model.safetensors.index.json`.
 */
export function writeModelDir(
  dir: string,
  config: Record<string, unknown>,
  tensors: Map<string, WeightArray>,
  shards = 1,
): void {
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
  if (shards === 1) {
    writeFileSync(join(dir, 'model.safetensors'), encodeSafetensors(tensors, { format: 'pt' }));
    return;
  }
  const names = [...tensors.keys()];
  const weightMap: Record<string, string> = {};
  let total = 0;
  for (let s = 0; s < shards; s++) {
    // Hugging Face's names, 5-digit counters.
    const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
    const part = new Map(names.filter((_, i) => i % shards === s).map((n) => [n, tensors.get(n)!]));
    for (const [n, w] of part) {
      weightMap[n] = file;
      total += w.data.length * ITEM[w.dtype];
    }
    writeFileSync(join(dir, file), encodeSafetensors(part, { format: 'pt' }));
  }
  writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }));
}

/** A raw safetensors file from a header object and data bytes (for hostile headers). */
export function rawSafetensors(header: unknown, data: Uint8Array = new Uint8Array(0), headerLength?: bigint): Uint8Array {
  const json = new TextEncoder().encode(typeof header === 'string' ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, headerLength ?? BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

/** `fn` must throw a TrimKVError with `code` and a message matching `message`. */
export function expectError(fn: () => unknown, code: string, message: RegExp): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(TrimKVError);
  expect((err as TrimKVError).code).toBe(code);
  expect((err as TrimKVError).message).toMatch(message);
}

/** `p` must reject with a TrimKVError with `code` and a message matching `message`. */
export async function expectRejects(p: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(TrimKVError);
  expect((err as TrimKVError).code).toBe(code);
  expect((err as TrimKVError).message).toMatch(message);
}
