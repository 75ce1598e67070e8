/**
 * The tokenizer of a Hugging Face model directory: `tokenizer.json` through
 * `@huggingface/tokenizers`, the chat template of `tokenizer_config.json` (or
 * `chat_template.jinja`) through `@huggingface/jinja`, the special token ids, and a streaming
 * detokenizer that never emits part of a UTF-8 character.
 *
 * Error codes (all `TrimKVError`):
 * - `ERR_MODEL_MISSING`: the directory or tokenizer.json does not exist.
 * - `ERR_TOKENIZER`: a tokenizer file is not valid JSON, too large, or not a tokenizer the
 *   library can build; there is no chat template; the template fails to render.
 * - `ERR_INVALID_ARGUMENT` / `ERR_RANGE`: bad text, options, messages or ids (an id outside
 *   the tokenizer's vocabulary, such as an embedding's padding row).
 */
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { Tokenizer } from '@huggingface/tokenizers';
import { TrimKVError } from '../errors.js';
import { argObject, arrayOf, invalid } from '../validate.js';
import { loadGenerationConfig, type GenerationConfig } from './config.js';
import { renderTemplate, TemplateError } from './template_sandbox.js';
import { isFile, MAX_SMALL_JSON_BYTES, MAX_TOKENIZER_JSON_BYTES, readJsonObject, requireDir } from './files.js';

/** One chat message; fields beyond role and content (tool_calls, reasoning_content) reach the template. */
export interface ChatMessage {
  role: string;
  content: string;
  [field: string]: unknown;
}

export interface ChatTemplateOptions {
  /** End with the assistant header so the model answers (default false, as transformers). */
  addGenerationPrompt?: boolean;
  /**
   * Qwen3: false renders an empty `<think>\n\n</think>\n\n` block after the generation
   * prompt (no reasoning); true or unset lets the model think. Passed to the template only when set.
   */
  enableThinking?: boolean;
  /** Tool (function) descriptions, for templates that render them. */
  tools?: unknown[];
  /** Further template variables. */
  extra?: Record<string, unknown>;
}

export interface EncodeOptions {
  /** Add the tokenizer's special tokens (Llama 3: BOS). Default true, as transformers. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Drop special tokens (BOS, `<|im_end|>`, ...) from the text. Default false. */
  skipSpecialTokens?: boolean;
}

/** Incremental detokenization of generated ids. */
export interface DecodeStream {
  /**
   * Adds generated ids and returns the text they complete: '' while a UTF-8 character is
   * split across tokens (never a U+FFFD for its missing bytes).
   * @throws {TrimKVError} `ERR_INVALID_ARGUMENT` / `ERR_RANGE` for a bad id.
   */
  push(ids: number | readonly number[]): string;
  /** Returns whatever is still held back (a genuinely invalid byte sequence as U+FFFD) and resets. */
  flush(): string;
}

interface TokenizerFiles {
  tokenizer: Record<string, unknown>;
  config: Record<string, unknown>;
  chatTemplate?: string;
  generation?: GenerationConfig;
}

/**
 * Loads the tokenizer of a model directory: `tokenizer.json` (required),
 * `tokenizer_config.json`, `chat_template.jinja` and `generation_config.json` (optional).
 * Nothing is downloaded.
 * @param dir A Hugging Face model directory.
 * @throws {TrimKVError} `ERR_MODEL_MISSING` if the directory or tokenizer.json is absent;
 *   `ERR_TOKENIZER` for files the tokenizer cannot be built from; `ERR_MODEL_CONFIG` for a
 *   bad generation_config.json.
 */
export async function loadTokenizer(dir: string): Promise<ModelTokenizer> {
  await requireDir(dir, 'model');
  const tokenizer = await readJsonObject(join(dir, 'tokenizer.json'), 'tokenizer.json', 'ERR_TOKENIZER', MAX_TOKENIZER_JSON_BYTES);
  const configPath = join(dir, 'tokenizer_config.json');
  const config = (await isFile(configPath)) ? await readJsonObject(configPath, 'tokenizer_config.json', 'ERR_TOKENIZER') : {};
  const files: TokenizerFiles = { tokenizer, config };
  // Recent transformers save the template beside the config, and prefer that file.
  const jinjaPath = join(dir, 'chat_template.jinja');
  if (await isFile(jinjaPath)) {
    const text = await readFile(jinjaPath, 'utf8');
    if (text.length > MAX_SMALL_JSON_BYTES) throw new TrimKVError('ERR_TOKENIZER', `${jinjaPath}: chat template larger than ${MAX_SMALL_JSON_BYTES} bytes`);
    files.chatTemplate = text;
  }
  const generation = await loadGenerationConfig(dir);
  if (generation !== undefined) files.generation = generation;
  return new ModelTokenizer(dir, files);
}

/** The text of a special token as tokenizer_config.json writes it: a string or an AddedToken object. */
function tokenText(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (typeof v === 'object' && v !== null && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return undefined;
}

/** A model's tokenizer. */
export class ModelTokenizer {
  /** One more than the largest id the tokenizer knows (model vocabularies may be larger: padding). */
  readonly vocabSize: number;
  readonly bosToken?: string;
  readonly eosToken?: string;
  readonly padToken?: string;
  /** tokenizer_config's bos_token, else generation_config's bos_token_id. */
  readonly bosTokenId?: number;
  /** The ids that end a generation: generation_config's eos_token_id(s), then tokenizer_config's eos_token. */
  readonly eosTokenIds: readonly number[];
  /** tokenizer_config's pad_token, else generation_config's pad_token_id. */
  readonly padTokenId?: number;
  /** The chat template source, if the model has one. */
  readonly chatTemplate?: string;
  private readonly tokenizer: Tokenizer;
  private readonly cleanup: boolean;
  private readonly specialIds: ReadonlySet<number>;

  /** @internal Use `loadTokenizer`. */
  constructor(
    readonly dir: string,
    files: TokenizerFiles,
  ) {
    const where = join(dir, 'tokenizer.json');
    // transformers (5.x, the reference) ignores clean_up_tokenization_spaces for BPE models: the
    // clean-up is meant for WordPiece and would turn "hello , world" into "hello, world". Llama
    // 3's tokenizer_config.json sets it; the decoded text must still be what transformers gives.
    const model = (files.tokenizer as { model?: { type?: unknown } }).model;
    const bpe = typeof model === 'object' && model !== null && model.type === 'BPE';
    this.cleanup = files.config.clean_up_tokenization_spaces === true && !bpe;
    const config = { ...files.config, clean_up_tokenization_spaces: this.cleanup };
    try {
      this.tokenizer = new Tokenizer(files.tokenizer, config);
    } catch (e) {
      throw new TrimKVError('ERR_TOKENIZER', `${where}: cannot build the tokenizer (${(e as Error).message})`, { cause: e });
    }
    let max = -1;
    for (const id of this.tokenizer.get_vocab(true).values()) if (id > max) max = id;
    if (max < 0) throw new TrimKVError('ERR_TOKENIZER', `${where}: the tokenizer has an empty vocabulary`);
    this.vocabSize = max + 1;
    this.specialIds = new Set([...this.tokenizer.get_added_tokens_decoder()].filter(([, t]) => t.special).map(([id]) => id));

    const cfg = files.config;
    const gen = files.generation;
    const idOf = (field: string): { text?: string; id?: number } => {
      const text = tokenText(cfg[field]);
      if (text === undefined) return {};
      const id = this.tokenizer.token_to_id(text);
      if (id === undefined) throw new TrimKVError('ERR_TOKENIZER', `${join(dir, 'tokenizer_config.json')}: ${field} ${JSON.stringify(text)} is not in the vocabulary`);
      return { text, id };
    };
    const bos = idOf('bos_token');
    const eos = idOf('eos_token');
    const pad = idOf('pad_token');
    if (bos.text !== undefined) this.bosToken = bos.text;
    if (eos.text !== undefined) this.eosToken = eos.text;
    if (pad.text !== undefined) this.padToken = pad.text;
    const bosId = bos.id ?? gen?.bosTokenId;
    if (bosId !== undefined) this.bosTokenId = bosId;
    const padId = pad.id ?? gen?.padTokenId;
    if (padId !== undefined) this.padTokenId = padId;
    this.eosTokenIds = [...new Set([...(gen?.eosTokenIds ?? []), ...(eos.id === undefined ? [] : [eos.id])])];

    let template = files.chatTemplate ?? cfg.chat_template;
    if (Array.isArray(template)) {
      // A list of named templates: the one called "default" is the chat template.
      template = (template as { name?: unknown; template?: unknown }[]).find((t) => t?.name === 'default')?.template;
    }
    if (typeof template === 'string') this.chatTemplate = template;
  }

  /**
   * Encodes text to ids.
   * @throws {TrimKVError} `ERR_INVALID_ARGUMENT` for a non-string; `ERR_TOKENIZER` if the
   *   library fails.
   */
  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== 'string') invalid('a string', 'text', text);
    const add = argObject(options, 'options', 'an EncodeOptions object', ['addSpecialTokens'] as const).addSpecialTokens ?? true;
    if (typeof add !== 'boolean') invalid('a boolean', 'addSpecialTokens', add);
    try {
      return this.tokenizer.encode(text, { add_special_tokens: add }).ids;
    } catch (e) {
      throw new TrimKVError('ERR_TOKENIZER', `${this.dir}: encoding failed (${(e as Error).message})`, { cause: e });
    }
  }

  /**
   * Decodes ids to text.
   * @throws {TrimKVError} `ERR_INVALID_ARGUMENT` for a non-integer id; `ERR_RANGE` for an id
   *   outside [0, vocabSize).
   */
  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    const list = this.checkIds(ids);
    const skip = argObject(options, 'options', 'a DecodeOptions object', ['skipSpecialTokens'] as const).skipSpecialTokens ?? false;
    if (typeof skip !== 'boolean') invalid('a boolean', 'skipSpecialTokens', skip);
    return this.rawDecode(list, skip);
  }

  /** Whether `id` is a special token (skipped by `skipSpecialTokens`). */
  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  /** The id of a token string, if it is in the vocabulary. */
  tokenToId(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  /** The token string of an id, if it is in the vocabulary. */
  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /**
   * Renders messages with the model's chat template, as transformers'
   * `apply_chat_template(..., tokenize=False)`.
   * @throws {TrimKVError} `ERR_TOKENIZER` when the model has no chat template or rendering
   *   fails (including the template's own `raise_exception`); `ERR_INVALID_ARGUMENT` for
   *   malformed messages or options.
   */
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
    // Read once into plain copies (a getter or Proxy trap cannot throw later, inside the template).
    const list = arrayOf(messages, 'messages', 'a non-empty array of messages', (x, name) => {
      const m = argObject(x, name, 'an object { role, content }');
      if (typeof m.role !== 'string') invalid('a string', `${name}.role`, m.role);
      if (typeof m.content !== 'string') invalid('a string', `${name}.content`, m.content);
      return m as unknown as ChatMessage;
    }, { maxLength: 1 << 16 });
    if (list.length === 0) invalid('a non-empty array of messages', 'messages', messages);
    const o = argObject(options, 'options', 'a ChatTemplateOptions object', ['addGenerationPrompt', 'enableThinking', 'tools', 'extra'] as const);
    const { addGenerationPrompt = false, enableThinking, tools, extra = {} } = o as ChatTemplateOptions;
    if (typeof addGenerationPrompt !== 'boolean') invalid('a boolean', 'addGenerationPrompt', addGenerationPrompt);
    if (enableThinking !== undefined && typeof enableThinking !== 'boolean') invalid('a boolean', 'enableThinking', enableThinking);
    if (tools !== undefined && !Array.isArray(tools)) invalid('an array', 'tools', tools);
    if (this.chatTemplate === undefined) {
      throw new TrimKVError('ERR_TOKENIZER', `${this.dir}: the model has no chat template (tokenizer_config.json chat_template or chat_template.jinja)`);
    }
    // transformers passes the special tokens as strings, and kwargs only when given.
    const vars: Record<string, unknown> = {
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
      pad_token: this.padToken ?? '',
      ...argObject(extra, 'options.extra', 'an object of template variables'),
      messages: list,
      add_generation_prompt: addGenerationPrompt,
    };
    if (tools !== undefined) vars.tools = tools;
    if (enableThinking !== undefined) vars.enable_thinking = enableThinking;
    // In a worker with a time and memory budget: the template is code from the model directory.
    try {
      return renderTemplate(this.chatTemplate, vars);
    } catch (e) {
      if (!(e instanceof TemplateError)) throw e;
      if (e.stage === 'input') throw new TrimKVError('ERR_INVALID_ARGUMENT', `Expected plain data for the chat's messages, tools and extra but ${e.message}`, { cause: e });
      const what = e.stage === 'parse' ? 'does not parse' : e.stage === 'render' ? 'failed to render' : 'was stopped';
      throw new TrimKVError('ERR_TOKENIZER', `${this.dir}: the chat template ${what} (${e.message})`, { cause: e });
    }
  }

  /**
   * The ids of the rendered chat: `applyChatTemplate`, then `encode` WITHOUT adding special
   * tokens (the template writes them itself, e.g. Llama 3's BOS).
   * @throws {TrimKVError} as `applyChatTemplate` and `encode`.
   */
  encodeChat(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }

  /**
   * A streaming detokenizer for one sequence: push generated ids, get text as soon as it is
   * complete. The concatenation of everything returned equals `decode(allIds)`.
   * @throws {TrimKVError} `ERR_INVALID_ARGUMENT` for bad options.
   */
  createDecodeStream(options: DecodeOptions = {}): DecodeStream {
    const skip = argObject(options, 'options', 'a DecodeOptions object', ['skipSpecialTokens'] as const).skipSpecialTokens ?? false;
    if (typeof skip !== 'boolean') invalid('a boolean', 'skipSpecialTokens', skip);
    return new IncrementalDecoder(
      (ids) => this.checkIds(ids),
      (ids) => this.rawDecode(ids, skip),
      this.cleanup,
    );
  }

  /** The ids read once, index by index (a Proxy or a getter never runs later), and checked. */
  private checkIds(ids: readonly number[]): number[] {
    return arrayOf(ids, 'ids', 'an array of token ids', (id, name) => {
      if (typeof id !== 'number' || !Number.isSafeInteger(id)) invalid('an integer token id', name, id);
      if (id < 0 || id >= this.vocabSize) invalid(`a token id in [0, ${this.vocabSize}) (the tokenizer's vocabulary)`, name, id, 'ERR_RANGE');
      return id;
    }, { maxLength: 2 ** 24 });
  }

  private rawDecode(ids: number[], skip: boolean): string {
    if (ids.length === 0) return ''; // the library refuses an empty list
    try {
      return this.tokenizer.decode(ids, { skip_special_tokens: skip });
    } catch (e) {
      throw new TrimKVError('ERR_TOKENIZER', `${this.dir}: decoding failed (${(e as Error).message})`, { cause: e });
    }
  }
}

/** Beyond this many held tokens, text is released even if it does not line up (see below). */
const MAX_HELD_TOKENS = 32;
/**
 * Proper prefixes of the patterns `clean_up_tokenization_spaces` rewrites (" .", " ?", " !",
 * " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"): text ending in one may still change.
 */
const CLEANUP_PREFIXES = [' ', " '", ' n', " n'", " 'v", " 'r"];

/**
 * Incremental detokenization by decoding a short window: the tokens emitted last time (the
 * context: decoders strip a leading space or merge across tokens) plus the held ones, and
 * emitting the text beyond the context's once it is complete:
 * - it must not end in U+FFFD, which is what a UTF-8 character whose bytes are still in
 *   later tokens decodes to: the text is then cut at the last token boundary whose text
 *   later tokens can no longer change (truly invalid bytes come out as U+FFFD, as in the
 *   full decode, once the bytes after them are known);
 * - it must extend the context's text (a decoder's clean-up may rewrite across tokens);
 * - with `clean_up_tokenization_spaces`, text ending in the start of a pattern the clean-up
 *   rewrites is held, as the next token may complete it (" ," -> ",", " 's" -> "'s").
 * Each push decodes a few tokens only, so a long generation costs linear time.
 */
class IncrementalDecoder implements DecodeStream {
  /** The window: ids[0, read) is the context (emitted last time), ids[read, n) is held. */
  private ids: number[] = [];
  private read = 0;
  private contextText = '';

  constructor(
    private readonly check: (ids: readonly number[]) => number[],
    private readonly decode: (ids: number[]) => string,
    private readonly holdSpace: boolean,
  ) {}

  push(input: number | readonly number[]): string {
    const ids = this.check(typeof input === 'number' ? [input] : input);
    this.ids.push(...ids);
    const n = this.ids.length;
    const full = n - this.read >= MAX_HELD_TOKENS;
    const tail = this.tailUpTo(n);
    if (tail === undefined) return full ? this.release(this.decode(this.ids.slice(this.read)), n) : '';
    if (tail.endsWith('\uFFFD')) return this.releaseBeforePartial(n, tail);
    if (tail === '' || this.mayChange(tail)) return full ? this.release(tail, n) : '';
    return this.release(tail, n);
  }

  flush(): string {
    let out = '';
    if (this.ids.length > this.read) out = this.tailUpTo(this.ids.length) ?? this.decode(this.ids.slice(this.read));
    this.ids = [];
    this.read = 0;
    this.contextText = '';
    return out;
  }

  private mayChange(tail: string): boolean {
    return this.holdSpace && CLEANUP_PREFIXES.some((p) => tail.endsWith(p));
  }

  /** The text of ids[read, k) in context, or undefined when it does not extend the context's. */
  private tailUpTo(k: number): string | undefined {
    const text = this.decode(this.ids.slice(0, k));
    return text.startsWith(this.contextText) ? text.slice(this.contextText.length) : undefined;
  }

  /**
   * The held text ends in U+FFFD: release up to the last cut k whose text is a strict prefix
   * of the whole window's. Its end is final: a character split at k would decode differently
   * once its later bytes are there, and a U+FFFD followed by further bytes that did not
   * complete it stays one (a decoder replaces a maximal invalid subpart).
   */
  private releaseBeforePartial(n: number, tail: string): string {
    for (let k = n - 1; k > this.read; k--) {
      const t = this.tailUpTo(k);
      if (t !== undefined && t !== '' && t.length < tail.length && tail.startsWith(t) && !this.mayChange(t)) return this.release(t, k);
    }
    return n - this.read >= MAX_HELD_TOKENS ? this.release(tail, n) : '';
  }

  /** Marks ids[read, k) emitted as `text`; they become the next window's context. */
  private release(text: string, k: number): string {
    const old = this.read;
    this.ids = this.ids.slice(old); // what no window needs any more is dropped
    this.read = k - old;
    this.contextText = this.decode(this.ids.slice(0, this.read));
    return text;
  }
}
