/**
 * lib/model/weights: safetensors model directories (single file and sharded index), read
 * by positional reads (a sparse 5 GiB shard with a tensor past 4 GiB), the per-architecture
 * tensor check, and corrupt, truncated and hostile files, one test each.
 */
import { closeSync, ftruncateSync, openSync, readFileSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import { parseModelConfig } from '../lib/model/config.js';
import { checkModelTensors, expectedModelTensors, openModelWeights, readSafetensorsHeader } from '../lib/model/weights.js';
import type { DType } from '../lib/types.js';
import { bytesOf, expectedShapes, modelTensors, patterned, rawSafetensors, tempDirs, tinyConfig, writeModelDir, expectError, expectRejects } from './model_helpers.js';

const dirs = tempDirs('trimkv-model-weights-');
afterAll(() => dirs.cleanup());



/** A directory holding only `model.safetensors` with these bytes. */
function singleFile(bytes: Uint8Array): string {
  const d = dirs.fresh();
  writeFileSync(join(d, 'model.safetensors'), bytes);
  return d;
}

const ARCHS = ['qwen3', 'llama', 'phi3'] as const;
const WEIGHT_DTYPES: DType[] = ['bf16', 'fp16', 'fp32'];

describe('openModelWeights', () => {
  test.each(ARCHS.flatMap((a) => [1, 3].map((s) => [a, s] as const)))('%s, %i shard(s): every tensor listed and read back', async (arch, shards) => {
    const config = tinyConfig(arch);
    const tensors = modelTensors(config);
    const d = dirs.fresh();
    writeModelDir(d, config, tensors, shards);
    await using w = await openModelWeights(d);
    expect(w.files).toHaveLength(shards);
    expect(new Set(w.tensors.keys())).toEqual(new Set(tensors.keys()));
    for (const [name, want] of tensors) {
      const t = w.tensors.get(name)!;
      expect(t.shape).toEqual(want.shape);
      expect(t.dtype).toBe('bf16');
      expect(t.bytes).toBe(want.data.byteLength);
      expect(await w.read(name)).toEqual(bytesOf(want));
    }
    if (shards > 1) expect(w.metadata.total_size).toBe([...tensors.values()].reduce((a, t) => a + t.data.byteLength, 0));
  });

  test.each(WEIGHT_DTYPES)('readWeight returns a typed array of the stored dtype (%s)', async (dtype) => {
    const config = tinyConfig('llama');
    const tensors = modelTensors(config, dtype);
    const d = dirs.fresh();
    writeModelDir(d, config, tensors);
    await using w = await openModelWeights(d);
    const got = await w.readWeight('model.norm.weight');
    expect(got.dtype).toBe(dtype);
    expect(got.data).toEqual(tensors.get('model.norm.weight')!.data);
    expect(got.data).toBeInstanceOf(dtype === 'fp32' ? Float32Array : Uint16Array);
  });

  test('read into a caller buffer, and a byte range of a tensor', async () => {
    const config = tinyConfig('qwen3');
    const tensors = modelTensors(config);
    const d = dirs.fresh();
    writeModelDir(d, config, tensors);
    await using w = await openModelWeights(d);
    const want = bytesOf(tensors.get('model.embed_tokens.weight')!);
    const into = new Uint8Array(want.length + 10).fill(0xee);
    const got = await w.read('model.embed_tokens.weight', into);
    expect(got.buffer).toBe(into.buffer);
    expect(got).toEqual(want);
    expect(into[want.length]).toBe(0xee); // nothing written past the tensor
    expect(await w.read('model.embed_tokens.weight', undefined, { start: 100, end: 164 })).toEqual(want.subarray(100, 164));
  });

  test('a single model.safetensors wins over an index, as in transformers', async () => {
    const config = tinyConfig('llama');
    const d = dirs.fresh();
    writeModelDir(d, config, modelTensors(config), 2);
    writeModelDir(d, config, modelTensors(config), 1);
    await using w = await openModelWeights(d);
    expect(w.files).toEqual([join(d, 'model.safetensors')]);
  });

  test('a shard over 4 GiB (sparse) is read positionally past 4 GiB', async () => {
    const d = dirs.fresh();
    const file = join(d, 'model.safetensors');
    const size = 5 * 2 ** 30;
    const tail = patterned([8], 'fp32', 3);
    const headerLen = 256;
    const dataStart = 8 + headerLen;
    const begin = size - dataStart - tail.data.byteLength;
    const header = JSON.stringify({ tail: { dtype: 'F32', shape: [8], data_offsets: [begin, begin + 32] } }).padEnd(headerLen, ' ');
    const fd = openSync(file, 'w');
    try {
      writeSync(fd, rawSafetensors(header));
      ftruncateSync(fd, size); // a hole: no disk
      writeSync(fd, bytesOf(tail), 0, 32, size - 32);
    } finally {
      closeSync(fd);
    }
    try {
      await using w = await openModelWeights(d);
      const t = w.tensors.get('tail')!;
      expect(t.offset).toBe(size - 32);
      expect(t.offset).toBeGreaterThan(2 ** 32);
      expect((await w.readWeight('tail')).data).toEqual(tail.data);
      expect(await w.read('tail', undefined, { start: 16 })).toEqual(bytesOf(tail).subarray(16));
    } finally {
      rmSync(file);
    }
  });

  test('a missing directory is ERR_MODEL_MISSING', async () => {
    await expectRejects(openModelWeights(join(dirs.root, 'absent')), 'ERR_MODEL_MISSING', /absent: model directory does not exist/);
  });

  test('a directory without safetensors weights is ERR_MODEL_MISSING', async () => {
    const d = dirs.fresh();
    writeFileSync(join(d, 'pytorch_model.bin'), 'x');
    await expectRejects(openModelWeights(d), 'ERR_MODEL_MISSING', /no model\.safetensors or model\.safetensors\.index\.json/);
  });

  test('a shard the index names but the directory lacks is ERR_MODEL_MISSING naming it', async () => {
    const config = tinyConfig('qwen3');
    const d = dirs.fresh();
    writeModelDir(d, config, modelTensors(config), 2);
    rmSync(join(d, 'model-00002-of-00002.safetensors'));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_MISSING', /model-00002-of-00002\.safetensors: shard does not exist \(the index puts \d+ tensors in it/);
  });

  test('an index naming a tensor its shard lacks is ERR_MODEL_MISSING', async () => {
    const config = tinyConfig('qwen3');
    const d = dirs.fresh();
    writeModelDir(d, config, modelTensors(config), 2);
    const index = JSON.parse(readFileSync(join(d, 'model.safetensors.index.json'), 'utf8'));
    index.weight_map['model.layers.9.mlp.up_proj.weight'] = 'model-00001-of-00002.safetensors';
    writeFileSync(join(d, 'model.safetensors.index.json'), JSON.stringify(index));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_MISSING', /model-00001-of-00002\.safetensors: tensor 'model\.layers\.9\.mlp\.up_proj\.weight' is missing/);
  });

  test('a shard holding a tensor the index does not list is ERR_MODEL_FORMAT', async () => {
    const config = tinyConfig('qwen3');
    const d = dirs.fresh();
    writeModelDir(d, config, modelTensors(config), 2);
    const path = join(d, 'model.safetensors.index.json');
    const index = JSON.parse(readFileSync(path, 'utf8'));
    delete index.weight_map['model.norm.weight'];
    writeFileSync(path, JSON.stringify(index));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /holds tensor 'model\.norm\.weight', which .* does not list/);
  });

  test('an index that is not JSON is ERR_MODEL_FORMAT', async () => {
    const d = dirs.fresh();
    writeFileSync(join(d, 'model.safetensors.index.json'), '{"weight_map": ');
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /index\.json: the safetensors index is not valid JSON/);
  });

  test('an index without weight_map is ERR_MODEL_FORMAT', async () => {
    const d = dirs.fresh();
    writeFileSync(join(d, 'model.safetensors.index.json'), '{"metadata": {}}');
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /for 'weight_map' but received nothing/);
  });

  test('an index pointing outside the directory is ERR_MODEL_FORMAT', async () => {
    const d = dirs.fresh();
    writeFileSync(join(d, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { a: '../other/model.safetensors' } }));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /tensor 'a' maps to "\.\.\/other\/model\.safetensors", not a \.safetensors file name/);
  });
});

describe('readSafetensorsHeader', () => {
  const ok = { w: { dtype: 'BF16', shape: [2, 3], data_offsets: [0, 12] } };

  test('absolute offsets and sizes of every tensor; __metadata__', async () => {
    const d = singleFile(rawSafetensors({ __metadata__: { format: 'pt' }, ...ok, b: { dtype: 'F32', shape: [], data_offsets: [12, 16] } }, new Uint8Array(16)));
    const h = await readSafetensorsHeader(join(d, 'model.safetensors'));
    expect(h.metadata).toEqual({ format: 'pt' });
    expect(h.tensors.get('w')).toMatchObject({ dtype: 'bf16', shape: [2, 3], offset: h.dataStart, bytes: 12 });
    expect(h.tensors.get('b')).toMatchObject({ dtype: 'fp32', shape: [], offset: h.dataStart + 12, bytes: 4 });
  });

  test('a file shorter than 8 bytes is ERR_MODEL_FORMAT', async () => {
    const d = singleFile(new Uint8Array(5));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /5 bytes: too short for a safetensors header/);
  });

  test('a hostile header length (2^40) in a 4 KB file is refused at once', async () => {
    const bytes = rawSafetensors(ok, new Uint8Array(4096), 2n ** 40n);
    const d = singleFile(bytes);
    const t0 = performance.now();
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /header length 1099511627776 does not fit the \d+-byte file/);
    expect(performance.now() - t0).toBeLessThan(1000);
  });

  test('a header length beyond the file (truncated file) is ERR_MODEL_FORMAT', async () => {
    const bytes = rawSafetensors(ok, new Uint8Array(12));
    const d = singleFile(bytes.subarray(0, 20));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /header length \d+ does not fit the 20-byte file/);
  });

  test('a header that is not JSON is ERR_MODEL_FORMAT', async () => {
    await expectRejects(openModelWeights(singleFile(rawSafetensors('{"w": [1, 2'))), 'ERR_MODEL_FORMAT', /header is not valid JSON/);
  });

  test('a header that is not UTF-8 is ERR_MODEL_FORMAT', async () => {
    const bytes = rawSafetensors('{"\u00ff": 1}');
    bytes[10] = 0xff; // a lone byte 0xff is never UTF-8
    await expectRejects(openModelWeights(singleFile(bytes)), 'ERR_MODEL_FORMAT', /header is not valid JSON/);
  });

  test('a JSON header that is not an object is ERR_MODEL_FORMAT', async () => {
    await expectRejects(openModelWeights(singleFile(rawSafetensors('[1, 2, 3]'))), 'ERR_MODEL_FORMAT', /header is not a JSON object/);
  });

  test('a malformed entry (negative dimension) is ERR_MODEL_FORMAT naming the tensor', async () => {
    const d = singleFile(rawSafetensors({ w: { dtype: 'BF16', shape: [2, -3], data_offsets: [0, 12] } }, new Uint8Array(12)));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /header entry of tensor 'w' is malformed/);
  });

  test('a non-float dtype is ERR_MODEL_DTYPE naming the tensor and file', async () => {
    const d = singleFile(rawSafetensors({ q: { dtype: 'I8', shape: [4], data_offsets: [0, 4] } }, new Uint8Array(4)));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_DTYPE', /model\.safetensors: tensor 'q' has dtype "I8"; supported are BF16, F16 and F32/);
  });

  test('data_offsets past the end of the file are ERR_MODEL_FORMAT', async () => {
    const d = singleFile(rawSafetensors({ w: { dtype: 'BF16', shape: [2, 3], data_offsets: [0, 12] } }, new Uint8Array(8)));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /tensor 'w' has data_offsets \[0, 12\] outside the 8 data bytes/);
  });

  test('data_offsets that disagree with shape x dtype are ERR_MODEL_FORMAT', async () => {
    const d = singleFile(rawSafetensors({ w: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 12] } }, new Uint8Array(24)));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /tensor 'w' of shape \[2, 3\] F32 needs 24 bytes but data_offsets \[0, 12\] span 12/);
  });

  test('a shape whose size overflows is ERR_MODEL_FORMAT, not an allocation', async () => {
    const d = singleFile(rawSafetensors({ w: { dtype: 'F32', shape: [2 ** 40, 2 ** 40], data_offsets: [0, 4] } }, new Uint8Array(4)));
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /tensor 'w' of shape .* needs Infinity bytes/);
  });

  test('overlapping tensors are ERR_MODEL_FORMAT', async () => {
    const d = singleFile(
      rawSafetensors(
        { a: { dtype: 'BF16', shape: [4], data_offsets: [0, 8] }, b: { dtype: 'BF16', shape: [4], data_offsets: [6, 14] } },
        new Uint8Array(14),
      ),
    );
    await expectRejects(openModelWeights(d), 'ERR_MODEL_FORMAT', /tensors 'a' and 'b' overlap/);
  });
});

describe('ModelWeights.read', () => {
  async function tiny(): Promise<{ d: string; w: Awaited<ReturnType<typeof openModelWeights>> }> {
    const config = tinyConfig('llama');
    const d = dirs.fresh();
    writeModelDir(d, config, modelTensors(config));
    return { d, w: await openModelWeights(d) };
  }

  test('an unknown tensor is ERR_MODEL_MISSING', async () => {
    const { w } = await tiny();
    await expectRejects(w.read('model.layers.7.mlp.up_proj.weight'), 'ERR_MODEL_MISSING', /tensor 'model\.layers\.7\.mlp\.up_proj\.weight' is not in the model's weights/);
    await w.close();
  });

  test('a range outside the tensor is ERR_RANGE', async () => {
    const { w } = await tiny();
    await expectRejects(w.read('model.norm.weight', undefined, { start: 0, end: 65 }), 'ERR_RANGE', /\[0, 64\] for range\.end but received 65/);
    await w.close();
  });

  test('a buffer too small is ERR_RANGE', async () => {
    const { w } = await tiny();
    await expectRejects(w.read('model.norm.weight', new Uint8Array(10)), 'ERR_RANGE', /at least 64 bytes.*for into but received 10 bytes/);
    await w.close();
  });

  test('after close, reads are ERR_DISPOSED', async () => {
    const { w } = await tiny();
    await w.close();
    await expectRejects(w.read('model.norm.weight'), 'ERR_DISPOSED', /closed/);
  });

  test('a file truncated after opening is ERR_MODEL_FORMAT, not a short read', async () => {
    const { d, w } = await tiny();
    truncateSync(join(d, 'model.safetensors'), 300);
    await expectRejects(w.read('lm_head.weight'), 'ERR_MODEL_FORMAT', /model\.safetensors: ends before byte \d+/);
    await w.close();
  });
});

describe('expectedModelTensors', () => {
  test.each(ARCHS)('%s: the names and shapes of the MODELS.md table', (arch) => {
    const config = tinyConfig(arch);
    expect(expectedModelTensors(parseModelConfig(config))).toEqual(expectedShapes(config));
  });

  test('Phi-3-mini-128k: fused qkv_proj [9216, 3072] and gate_up_proj [16384, 3072]', () => {
    const c = parseModelConfig({ ...tinyConfig('phi3'), hidden_size: 3072, num_attention_heads: 32, num_key_value_heads: 32, intermediate_size: 8192, num_hidden_layers: 1, rope_scaling: null });
    const m = expectedModelTensors(c);
    expect(m.get('model.layers.0.self_attn.qkv_proj.weight')).toEqual([9216, 3072]);
    expect(m.get('model.layers.0.mlp.gate_up_proj.weight')).toEqual([16384, 3072]);
  });
});

describe('checkModelTensors', () => {
  async function open(arch: (typeof ARCHS)[number], edit: (t: ReturnType<typeof modelTensors>) => void = () => {}, configEdit: Record<string, unknown> = {}) {
    const config = { ...tinyConfig(arch), ...configEdit };
    const tensors = modelTensors(config);
    edit(tensors);
    const d = dirs.fresh();
    writeModelDir(d, config, tensors, 2);
    return { w: await openModelWeights(d), c: parseModelConfig(config, join(d, 'config.json')) };
  }

  test.each(ARCHS)('a complete %s model passes', async (arch) => {
    const { w, c } = await open(arch);
    const r = checkModelTensors(w, c);
    expect(r.dtype).toBe('bf16');
    expect(r.dtypes).toEqual(['bf16']);
    expect(r.lmHead).toBe(arch === 'qwen3' ? 'model.embed_tokens.weight' : 'lm_head.weight');
    expect(r.ignored).toEqual([]);
    await w.close();
  });

  test('a tied model with an lm_head tensor ignores it; inv_freq buffers are ignored', async () => {
    const { w, c } = await open('qwen3', (t) => {
      t.set('lm_head.weight', patterned([64, 32]));
      t.set('model.layers.0.self_attn.rotary_emb.inv_freq', patterned([8], 'fp32'));
    });
    expect(checkModelTensors(w, c).ignored.sort()).toEqual(['lm_head.weight', 'model.layers.0.self_attn.rotary_emb.inv_freq']);
    await w.close();
  });

  test('a missing k_norm is ERR_MODEL_MISSING naming the tensor', async () => {
    const { w, c } = await open('qwen3', (t) => t.delete('model.layers.1.self_attn.k_norm.weight'));
    expectError(() => checkModelTensors(w, c), 'ERR_MODEL_MISSING', /1 tensors of a qwen3 model are missing: 'model\.layers\.1\.self_attn\.k_norm\.weight'/);
    await w.close();
  });

  test('an untied model without lm_head is ERR_MODEL_MISSING saying tie_word_embeddings is false', async () => {
    const { w, c } = await open('llama', (t) => t.delete('lm_head.weight'));
    expectError(() => checkModelTensors(w, c), 'ERR_MODEL_MISSING', /has tie_word_embeddings false\): 'lm_head\.weight'/);
    await w.close();
  });

  test('a mis-shaped tensor is ERR_MODEL_SHAPE naming the tensor, its file and both shapes', async () => {
    const { w, c } = await open('phi3', (t) => t.set('model.layers.0.self_attn.qkv_proj.weight', patterned([48, 24])));
    expectError(
      () => checkModelTensors(w, c),
      'ERR_MODEL_SHAPE',
      /'model\.layers\.0\.self_attn\.qkv_proj\.weight' in .*model-0000\d-of-00002\.safetensors is \[48, 24\], expected \[72, 24\]/,
    );
    await w.close();
  });

  test('weights of a config with another head_dim are ERR_MODEL_SHAPE', async () => {
    const config = tinyConfig('qwen3');
    const d = dirs.fresh();
    writeModelDir(d, config, modelTensors(config));
    const w = await openModelWeights(d);
    expectError(() => checkModelTensors(w, parseModelConfig({ ...config, head_dim: 8 })), 'ERR_MODEL_SHAPE', /q_proj\.weight' in .* is \[64, 32\], expected \[32, 32\]/);
    await w.close();
  });

  test('tensors the architecture lacks (biases) are ERR_MODEL_SHAPE, unless allowExtra', async () => {
    const { w, c } = await open('llama', (t) => t.set('model.layers.0.self_attn.q_proj.bias', patterned([32])));
    expectError(() => checkModelTensors(w, c), 'ERR_MODEL_SHAPE', /does not have: 'model\.layers\.0\.self_attn\.q_proj\.bias' in .*\.safetensors/);
    expect(checkModelTensors(w, c, { allowExtra: true }).ignored).toEqual(['model.layers.0.self_attn.q_proj.bias']);
    await w.close();
  });
});
