/** Tensors owned by a runtime: host memory on the CPU backend, device memory on CUDA. */
import { fromNative, native, TrimKVError } from './errors.js';
import { BACKEND_INDEX, loadAddon, type NativeTensorHandle } from './native.js';
import { DTYPE_BYTES, DTYPES, type BackendName, type DType } from './constants.js';
import { integerIn, invalid, invalidText, oneOf } from './validate.js';

export class Tensor {
  readonly shape: readonly number[];
  readonly dtype: DType;
  readonly backend: BackendName;
  readonly numel: number;
  readonly byteLength: number;
  #handle: NativeTensorHandle | undefined;

  /** @internal Use `Runtime.tensor` or `Runtime.fromArray`. @throws {TrimKVError} */
  constructor(backend: BackendName, shape: readonly number[], dtype: DType) {
    if (!Array.isArray(shape)) invalid('an array of dimensions', 'shape', shape);
    shape.forEach((d, i) => integerIn(d, `shape[${i}]`, 0, 2 ** 40));
    this.dtype = oneOf(dtype, 'dtype', DTYPES);
    this.shape = Object.freeze([...shape]);
    this.backend = backend;
    this.numel = shape.reduce((a, b) => a * b, 1);
    this.byteLength = this.numel * DTYPE_BYTES[dtype];
    this.#handle = native(() => new (loadAddon().NativeTensor)(BACKEND_INDEX[backend], dtype, [...shape]));
  }

  get disposed(): boolean {
    return this.#handle === undefined;
  }

  /**
   * Whether `x` was made by this class (a brand check: `instanceof` also accepts an object
   * whose prototype merely points here, such as Object.create(Tensor.prototype)).
   */
  static isTensor(x: unknown): x is Tensor {
    return typeof x === 'object' && x !== null && #handle in x;
  }

  /** @internal The native handle; throws ERR_DISPOSED after dispose(). */
  handle(name = 'tensor'): NativeTensorHandle {
    if (!this.#handle) throw new TrimKVError('ERR_DISPOSED', `${name} has been disposed`);
    return this.#handle;
  }

  /**
   * Writes all elements. A Float32Array is converted to the storage dtype (round to nearest
   * even); a Uint16Array holds raw fp16 / bf16 bit patterns.
   * @throws {TrimKVError} ERR_INVALID_ARGUMENT, ERR_SHAPE (wrong length), ERR_DTYPE, ERR_DISPOSED
   */
  write(data: Float32Array | Uint16Array): this {
    const h = this.handle();
    if (!(data instanceof Float32Array) && !(data instanceof Uint16Array)) {
      invalid('a Float32Array or Uint16Array', 'data', data);
    }
    if (data.length !== this.numel) {
      invalid(`${this.numel} values (shape [${this.shape.join(', ')}])`, 'data', data, 'ERR_SHAPE');
    }
    if (data instanceof Uint16Array && this.dtype === 'fp32') {
      invalid('a Float32Array (raw 16-bit data needs an fp16 or bf16 tensor)', 'data', data, 'ERR_DTYPE');
    }
    native(() => h.write(data));
    return this;
  }

  /** Reads all elements as float32, without blocking the event loop. @throws {TrimKVError} */
  async read(): Promise<Float32Array> {
    const h = this.handle();
    return native(() => h.read()).catch((e: unknown) => {
      throw fromNative(e);
    });
  }

  /** Reads all elements as float32, synchronously. @throws {TrimKVError} */
  readSync(): Float32Array {
    const h = this.handle();
    return native(() => h.readSync());
  }

  /** Frees the memory now (idempotent). Pending reads finish first. */
  dispose(): void {
    this.#handle?.dispose();
    this.#handle = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  toString(): string {
    return `Tensor(${this.dtype}[${this.shape.join(', ')}] on ${this.backend})`;
  }
}

/** @internal Checks that `t` is a live Tensor of this backend. */
export function checkTensor(t: unknown, name: string, backend: BackendName): Tensor {
  if (!Tensor.isTensor(t)) {
    if (t instanceof Tensor) invalidText('a Tensor', name, 'an object posing as one (not made by a Runtime)');
    invalid('a Tensor', name, t);
  }
  if (t.disposed) throw new TrimKVError('ERR_DISPOSED', `${name} has been disposed`);
  if (t.backend !== backend) {
    invalidText(`a tensor on the ${backend} backend`, name, `a tensor on the ${t.backend} backend`);
  }
  return t;
}

/** @internal Checks dtype and shape of a tensor argument. */
export function expectTensor(t: unknown, name: string, backend: BackendName, dtype: DType, shape: readonly number[]): Tensor {
  const x = checkTensor(t, name, backend);
  if (x.dtype !== dtype) invalidText(`dtype ${dtype}`, name, x.dtype, 'ERR_DTYPE');
  // A plain loop: this runs five times per decode call, where a closure per check shows up.
  const xs = x.shape;
  let same = xs.length === shape.length;
  for (let i = 0; same && i < xs.length; i++) same = xs[i] === shape[i];
  if (!same) {
    invalidText(`shape [${shape.join(', ')}]`, name, `shape [${x.shape.join(', ')}]`, 'ERR_SHAPE');
  }
  return x;
}
