/** Stable error codes. Every failure of trimkv carries one of these in `TrimKVError.code`. */
export type ErrorCode =
  | 'ERR_INVALID_ARGUMENT'
  | 'ERR_SHAPE'
  | 'ERR_DTYPE'
  | 'ERR_RANGE'
  | 'ERR_STATE'
  | 'ERR_DISPOSED'
  | 'ERR_BACKEND_UNAVAILABLE'
  | 'ERR_UNSUPPORTED'
  | 'ERR_OUT_OF_MEMORY'
  | 'ERR_NATIVE'
  | 'ERR_ADDON_LOAD'
  | 'ERR_MODEL_MISSING'
  | 'ERR_MODEL_FORMAT'
  | 'ERR_MODEL_CONFIG'
  | 'ERR_MODEL_SHAPE'
  | 'ERR_MODEL_DTYPE'
  | 'ERR_TOKENIZER'
  | `ERR_CHECKPOINT_${string}`;

/** The one error class of trimkv: `code` is stable, `message` says what and where. */
export class TrimKVError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'TrimKVError';
    this.code = code;
  }
}

/** Turns an error thrown by the native addon (an Error with a `code`) into a TrimKVError. */
export function fromNative(e: unknown): TrimKVError {
  if (e instanceof TrimKVError) return e;
  const err = e as { code?: unknown; message?: unknown };
  const code = typeof err?.code === 'string' && err.code.startsWith('ERR_') ? (err.code as ErrorCode) : 'ERR_NATIVE';
  const message = typeof err?.message === 'string' ? err.message : String(e);
  return new TrimKVError(code, message, { cause: e });
}

/** Calls into the addon, rethrowing its failures as TrimKVError. */
export function native<T>(fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw fromNative(e);
  }
}
