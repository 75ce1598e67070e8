/** The retention gate (SPEC section 3): lam = logsigmoid(gate(x)) for a batch of tokens. */
import { native, TrimKVError } from './errors.js';
import { BACKEND_INDEX, loadAddon, type NativeGateHandle } from './native.js';
import { ACTIVATIONS, DTYPES, GATE_KINDS } from './constants.js';
import { checkTensor, expectTensor, released, type Tensor } from './tensor.js';
import type { BackendName, DType, GateKind, GateSpec, WeightInput } from './types.js';
import { argObject, integerIn, invalid, invalidText, oneOf, shapeOf } from './validate.js';
import { types } from 'node:util';

function weightParts(w: WeightInput, name: string): { dtype: DType; data: Float32Array | Uint16Array; shape?: number[] } {
  // Brand checks, not instanceof: a Proxy around a typed array passes instanceof.
  if (types.isFloat32Array(w)) return { dtype: 'fp32', data: w };
  const o = argObject(w, name, 'a Float32Array or a { dtype, shape, data } weight', ['dtype', 'data', 'shape'] as const);
  const dtype = oneOf(o.dtype, `${name}.dtype`, DTYPES);
  const data: unknown = o.data;
  if (dtype === 'fp32' ? !types.isFloat32Array(data) : !types.isUint16Array(data)) {
    invalid(dtype === 'fp32' ? 'a Float32Array' : 'a Uint16Array of raw bits', `${name}.data`, data, 'ERR_DTYPE');
  }
  const shape = o.shape === undefined ? undefined : shapeOf(o.shape, `${name}.shape`).shape;
  return { dtype, data: data as Float32Array | Uint16Array, shape };
}

/**
 * Why a backend cannot run a gate of this input size, or null when it can.
 * @throws {TrimKVError} ERR_INVALID_ARGUMENT / ERR_RANGE for an unknown backend or a bad size
 */
export function gateSupport(backend: BackendName, inputSize: number): string | null {
  oneOf(backend, 'backend', ['cpu', 'cuda'] as const);
  integerIn(inputSize, 'inputSize', 1, 2 ** 20);
  if (backend === 'cpu') return null;
  const r = native(() => loadAddon().gateSupport(BACKEND_INDEX[backend], inputSize));
  return r.ok ? null : (r.reason ?? 'unsupported');
}

let handleOfGate: (g: RetentionGate) => NativeGateHandle;

/** @internal The native handle of a gate, for the model runner (lib/model/forward.ts). */
export function nativeGateHandle(g: RetentionGate): NativeGateHandle {
  return handleOfGate(g);
}

export class RetentionGate {
  static {
    handleOfGate = (g) => {
      if (!g.#handle) throw new TrimKVError('ERR_DISPOSED', 'the retention gate has been disposed');
      return g.#handle;
    };
  }

  readonly kind: GateKind;
  readonly inputSize: number;
  readonly intermediateSize: number;
  readonly kvHeads: number;
  readonly backend: BackendName;
  /** The dtype the weights are stored in (all weights of one gate share it). */
  readonly weightDtype: DType;
  #handle: NativeGateHandle | undefined;

  /** @internal Use `Runtime.createGate`. @throws {TrimKVError} */
  constructor(backend: BackendName, spec: GateSpec) {
    const s = argObject(spec, 'spec', 'a GateSpec object', ['kind', 'activation', 'inputSize', 'intermediateSize', 'kvHeads', 'weights'] as const);
    this.backend = backend;
    this.kind = oneOf(s.kind, 'spec.kind', GATE_KINDS);
    const activation = oneOf(s.activation, 'spec.activation', ACTIVATIONS);
    this.inputSize = integerIn(s.inputSize, 'spec.inputSize', 1, 2 ** 20);
    this.intermediateSize = integerIn(s.intermediateSize, 'spec.intermediateSize', 1, 2 ** 20);
    this.kvHeads = integerIn(s.kvHeads, 'spec.kvHeads', 1, 1024);
    const I = this.intermediateSize, In = this.inputSize, H = this.kvHeads;
    const glu = this.kind === 'rg3';
    const names = glu
      ? (['gateProj', 'upProj', 'downProj', 'bias'] as const)
      : (['linear1Weight', 'linear1Bias', 'linear2Weight', 'bias'] as const);
    const w: Record<string, unknown> = argObject(s.weights, 'spec.weights', 'a weights object', names);
    const sizes = glu ? [I * In, I * In, H * I, H] : [I * In, I, H * I, H];
    const parts = names.map((n, i) => {
      const value = w[n] as WeightInput | undefined;
      if (value === undefined) invalid('a weight', `spec.weights.${n}`, value);
      const p = weightParts(value, `spec.weights.${n}`);
      if (p.data.length !== sizes[i]) invalid(`${sizes[i]} values`, `spec.weights.${n}`, p.data, 'ERR_SHAPE');
      if (p.shape && shapeOf(p.shape, `spec.weights.${n}.shape`).numel !== sizes[i]) {
        invalid(`a shape of ${sizes[i]} elements`, `spec.weights.${n}.shape`, p.shape, 'ERR_SHAPE');
      }
      return p;
    });
    this.weightDtype = parts[0]!.dtype;
    parts.forEach((p, i) => {
      if (p.dtype !== this.weightDtype) {
        invalidText(`dtype ${this.weightDtype} (all weights of a gate share one dtype)`, `spec.weights.${names[i]}`, p.dtype, 'ERR_DTYPE');
      }
    });
    const unsupported = gateSupport(backend, this.inputSize);
    if (unsupported) throw new TrimKVError('ERR_UNSUPPORTED', unsupported);
    const nativeSpec = { kind: this.kind, activation, inputSize: In, intermediateSize: I, kvHeads: H };
    this.#handle = native(
      () => new (loadAddon().NativeGate)(BACKEND_INDEX[backend], nativeSpec, this.weightDtype,
        parts[0]!.data, parts[1]!.data, parts[2]!.data, parts[3]!.data),
    );
  }

  get disposed(): boolean {
    return this.#handle === undefined;
  }

  /**
   * Computes lam for `n` tokens.
   * @param x [n, inputSize], any float dtype: the layer's hidden states (rg) or the rotated
   *   keys and values of all KV heads, [k_0; v_0; k_1; v_1; ...] (rg2, rg3)
   * @param lam [n, kvHeads] fp32, written
   * @throws {TrimKVError} ERR_SHAPE, ERR_DTYPE, ERR_DISPOSED, ERR_INVALID_ARGUMENT
   */
  run(x: Tensor, lam: Tensor): void {
    if (!this.#handle) throw new TrimKVError('ERR_DISPOSED', 'the retention gate has been disposed');
    const xt = checkTensor(x, 'x', this.backend);
    if (xt.shape.length !== 2 || xt.shape[1] !== this.inputSize) {
      invalidText(`shape [n, ${this.inputSize}]`, 'x', `shape [${xt.shape.join(', ')}]`, 'ERR_SHAPE');
    }
    const lt = expectTensor(lam, 'lam', this.backend, 'fp32', [xt.shape[0]!, this.kvHeads]);
    const h = this.#handle;
    native(() => h.run(xt.handle('x'), lt.handle('lam')));
  }

  dispose(): void {
    this.#handle?.dispose();
    this.#handle = undefined;
    released(this);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
