/**
 * Bounded reads of the small JSON files of a model directory (config.json,
 * generation_config.json, tokenizer files, the safetensors index). The size is checked with
 * `stat` before anything is read, so a hostile or mistaken file (a multi-GB "config.json")
 * is refused without being loaded.
 */
import { readFile, stat } from 'node:fs/promises';
import { TrimKVError, type ErrorCode } from '../errors.js';
import { describe } from '../validate.js';

/** Largest config / generation_config / tokenizer_config / index file accepted. */
export const MAX_SMALL_JSON_BYTES = 16 * 1024 * 1024;
/** Largest tokenizer.json accepted (Qwen3's is 11 MB, Llama 3's 9 MB). */
export const MAX_TOKENIZER_JSON_BYTES = 256 * 1024 * 1024;

/** Whether `path` exists as a regular file (false for a missing path). */
export async function isFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/** Throws `ERR_MODEL_MISSING` unless `dir` is a directory. */
export async function requireDir(dir: string, what: string): Promise<void> {
  let ok = false;
  try {
    ok = (await stat(dir)).isDirectory();
  } catch {
    /* reported below */
  }
  if (!ok) throw new TrimKVError('ERR_MODEL_MISSING', `${dir}: ${what} directory does not exist`);
}

/**
 * Reads and parses a JSON file of at most `maxBytes` bytes.
 * @param code Code for content errors (invalid JSON, not an object, too large).
 * @throws {TrimKVError} `ERR_MODEL_MISSING` when the file is absent or unreadable; `code`
 *   when it is too large, not UTF-8 JSON, or not a JSON object.
 */
export async function readJsonObject(
  path: string,
  what: string,
  code: ErrorCode,
  maxBytes = MAX_SMALL_JSON_BYTES,
): Promise<Record<string, unknown>> {
  let size: number;
  try {
    const st = await stat(path);
    if (!st.isFile()) throw Object.assign(new Error('not a regular file'), { code: 'EISDIR' });
    size = st.size;
  } catch (e) {
    const errno = (e as NodeJS.ErrnoException).code;
    throw new TrimKVError(
      'ERR_MODEL_MISSING',
      errno === 'ENOENT' ? `${path}: ${what} does not exist` : `${path}: cannot read ${what} (${(e as Error).message})`,
    );
  }
  if (size > maxBytes) {
    throw new TrimKVError(code, `${path}: ${what} is ${size} bytes, more than the ${maxBytes} accepted; is it the right file?`);
  }
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new TrimKVError('ERR_MODEL_MISSING', `${path}: cannot read ${what} (${(e as Error).message})`);
  }
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(0, maxBytes)));
  } catch (e) {
    throw new TrimKVError(code, `${path}: ${what} is not valid JSON (${(e as Error).message})`);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new TrimKVError(code, `${path}: ${what} is not a JSON object`);
  }
  return value as Record<string, unknown>;
}

/**
 * A value for messages: `describe` (bounded in depth and length, never throws, Proxies and
 * getters never run), with "nothing" for a missing field.
 */
export function show(value: unknown): string {
  if (value === undefined) return 'nothing (field missing)';
  const s = describe(value);
  return s.length > 80 ? `${s.slice(0, 77)}...` : s;
}
