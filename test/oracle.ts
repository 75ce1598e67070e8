/**
 * Float64 oracle of SPEC.md, for tests only. Written straight from the spec with plain arrays
 * and sort-based selection: it is the reference, so it favours obviousness over speed.
 * Nothing here comes from lib/ except types.
 */
import type {
  Activation,
  CacheConfig,
  GateSpec,
  GluGateWeights,
  MlpGateWeights,
  WeightInput,
} from '../lib/types.js';
import { bitsToNumber } from './helpers.js';

// ---------------------------------------------------------------------------------------------
// Scalar math
// ---------------------------------------------------------------------------------------------

/**
 * erf to about 1e-16 relative: the all-positive series
 *   erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n 2^n x^(2n+1) / (1*3*...*(2n+1))
 * has no cancellation; past |x| = 6, erf(x) = +-1 in float64 (erfc(6) ~ 2e-17).
 */
export function erf(x: number): number {
  if (Number.isNaN(x)) return NaN;
  const ax = Math.abs(x);
  if (ax > 6) return Math.sign(x);
  let term = ax;
  let sum = ax;
  const x2 = ax * ax;
  for (let n = 1; n < 500; n++) {
    term *= (2 * x2) / (2 * n + 1);
    sum += term;
    if (term < sum * 1e-17) break;
  }
  const r = (2 / Math.sqrt(Math.PI)) * Math.exp(-x2) * sum;
  return x < 0 ? -r : r;
}

export function activate(act: Activation, u: number): number {
  switch (act) {
    case 'silu':
    case 'swish':
      // u * sigmoid(u), written so that exp never overflows.
      return u >= 0 ? u / (1 + Math.exp(-u)) : (u * Math.exp(u)) / (1 + Math.exp(u));
    case 'gelu':
      return 0.5 * u * (1 + erf(u / Math.SQRT2));
    case 'gelu_new':
    case 'gelu_pytorch_tanh':
      return 0.5 * u * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (u + 0.044715 * u * u * u)));
    case 'relu':
      return u > 0 ? u : 0;
  }
}

/** logsigmoid(z) = min(z, 0) - log1p(exp(-|z|)) (SPEC section 3). */
export function logSigmoid(z: number): number {
  return Math.min(z, 0) - Math.log1p(Math.exp(-Math.abs(z)));
}

// ---------------------------------------------------------------------------------------------
// Gate
// ---------------------------------------------------------------------------------------------

/** A WeightInput as float64 values (fp16 / bf16 bit patterns decoded). */
export function weightValues(w: WeightInput): Float64Array {
  if (w instanceof Float32Array) return Float64Array.from(w);
  if (w.dtype === 'fp32') return Float64Array.from(w.data as Float32Array);
  const bits = w.data as Uint16Array;
  const out = new Float64Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = bitsToNumber(bits[i]!, w.dtype);
  return out;
}

/** y = W x (+ b): W [rows, cols] row-major, x [cols]. */
function matvec(W: Float64Array, rows: number, cols: number, x: Float64Array, b?: Float64Array): Float64Array {
  const y = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = b ? b[r]! : 0;
    for (let c = 0; c < cols; c++) s += W[r * cols + c]! * x[c]!;
    y[r] = s;
  }
  return y;
}

/**
 * lam of SPEC section 3 for `n` rows of `x` ([n, inputSize] row-major). Returns [n, kvHeads].
 * "rg2" is "rg" on the concatenated keys and values: the caller passes that input as `x`.
 */
export function gateForward(spec: GateSpec, x: ArrayLike<number>, n: number): Float64Array {
  const I = spec.intermediateSize;
  const Din = spec.inputSize;
  const H = spec.kvHeads;
  const lam = new Float64Array(n * H);
  const mlp = spec.weights as MlpGateWeights;
  const glu = spec.weights as GluGateWeights;
  const isGlu = spec.kind === 'rg3';
  const W1 = weightValues(isGlu ? glu.gateProj : mlp.linear1Weight);
  const b1 = isGlu ? undefined : weightValues(mlp.linear1Bias);
  const Wup = isGlu ? weightValues(glu.upProj) : undefined;
  const W2 = weightValues(isGlu ? glu.downProj : mlp.linear2Weight);
  const bias = weightValues(spec.weights.bias);
  for (let i = 0; i < n; i++) {
    const xi = new Float64Array(Din);
    for (let c = 0; c < Din; c++) xi[c] = x[i * Din + c]!;
    const u = matvec(W1, I, Din, xi, b1);
    const a = new Float64Array(I);
    for (let r = 0; r < I; r++) a[r] = activate(spec.activation, u[r]!);
    if (Wup) {
      const up = matvec(Wup, I, Din, xi);
      for (let r = 0; r < I; r++) a[r]! *= up[r]!;
    }
    const z = matvec(W2, H, I, a, bias);
    for (let h = 0; h < H; h++) lam[i * H + h] = logSigmoid(z[h]!);
  }
  return lam;
}

// ---------------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------------

/** One cached token of one (sequence, layer, KV head). */
interface Token {
  p: number;
  k: Float64Array;
  v: Float64Array;
  lam: number;
  /** ||k||_2 of the stored key. */
  knorm: number;
}

/** A token with its score and pool index, for selection. */
interface Ranked {
  tok: Token;
  score: number;
  /** Flat (layer, head) index inside the pool: lower wins full ties. */
  head: number;
}

export interface OracleSnapshot {
  positions: number[];
  scores: number[];
}

/** Full config with defaults filled in. */
export interface OracleConfig {
  layers: number;
  batch: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  memory: number;
  buffer: number;
  strategy: 'alpha' | 'knorm_alpha';
  window: number;
  scope: 'head' | 'layer' | 'global';
  floor: number;
  threshold: number | null;
  scale: number;
}

/** A ranks above b: higher score; equal score -> larger position; then lower head index. */
function ranksAbove(a: Ranked, b: Ranked): boolean {
  if (a.score !== b.score) return a.score > b.score;
  if (a.tok.p !== b.tok.p) return a.tok.p > b.tok.p;
  return a.head < b.head;
}

function byRank(a: Ranked, b: Ranked): number {
  return ranksAbove(a, b) ? -1 : ranksAbove(b, a) ? 1 : 0;
}

export class OracleCache {
  readonly cfg: OracleConfig;
  /** Tokens of (seq, layer, head) in insertion order, at index (seq * layers + layer) * kvHeads + head. */
  private readonly heads: Token[][];
  /** T of each sequence. */
  private readonly T: number[];

  constructor(config: CacheConfig) {
    this.cfg = {
      layers: config.layers,
      batch: config.batch,
      qHeads: config.qHeads,
      kvHeads: config.kvHeads,
      headDim: config.headDim,
      memory: config.memory,
      buffer: config.buffer ?? 0,
      strategy: config.strategy ?? 'alpha',
      window: config.window ?? 0,
      scope: config.scope ?? 'head',
      floor: config.floor ?? 0,
      threshold: config.threshold ?? null,
      scale: config.scale ?? 1 / Math.sqrt(config.headDim),
    };
    this.heads = Array.from({ length: this.cfg.batch * this.cfg.layers * this.cfg.kvHeads }, () => []);
    this.T = new Array<number>(this.cfg.batch).fill(0);
  }

  private index(seq: number, layer: number, head: number): number {
    return (seq * this.cfg.layers + layer) * this.cfg.kvHeads + head;
  }

  private head(seq: number, layer: number, head: number): Token[] {
    return this.heads[this.index(seq, layer, head)]!;
  }

  private setHead(seq: number, layer: number, head: number, toks: Token[]): void {
    this.heads[this.index(seq, layer, head)] = toks;
  }

  /** Score of SPEC section 4 at the sequence's current T. */
  /** The decayed score of SPEC section 4 (what `inspect` reports). */
  decayedScore(tok: Token, T: number): number {
    let s = tok.lam * (T + 1 - tok.p);
    if (this.cfg.strategy === 'knorm_alpha') s += Math.log(Math.max(tok.knorm, 1e-12));
    return s;
  }

  /** The eviction key: the decayed score, or +inf inside the sliding window. */
  score(tok: Token, T: number): number {
    if (tok.p >= T - this.cfg.window) return Infinity;
    return this.decayedScore(tok, T);
  }

  reset(seq: number): void {
    this.T[seq] = 0;
    for (let l = 0; l < this.cfg.layers; l++) for (let h = 0; h < this.cfg.kvHeads; h++) this.setHead(seq, l, h, []);
  }

  seen(seq: number): number {
    return this.T[seq]!;
  }

  length(seq: number, layer: number, head: number): number {
    return this.head(seq, layer, head).length;
  }

  inspect(seq: number, layer: number, head: number): OracleSnapshot {
    const toks = [...this.head(seq, layer, head)].sort((a, b) => a.p - b.p);
    return { positions: toks.map((t) => t.p), scores: toks.map((t) => this.decayedScore(t, this.T[seq]!)) };
  }

  /**
   * One decode pass of one layer. q [batch, Hq, D], k/v [batch, Hkv, D], lam [batch, Hkv],
   * positions[b] = -1 for an inactive slot. Returns out [batch, Hq, D].
   */
  decode(
    layer: number,
    q: ArrayLike<number>,
    k: ArrayLike<number>,
    v: ArrayLike<number>,
    lam: ArrayLike<number>,
    positions: ArrayLike<number>,
  ): Float64Array {
    const { batch, qHeads: Hq, kvHeads: Hkv, headDim: D } = this.cfg;
    const out = new Float64Array(batch * Hq * D);
    for (let b = 0; b < batch; b++) {
      const p = positions[b]!;
      if (p < 0) continue; // inactive: nothing appended, output rows stay zero
      this.T[b] = p + 1;
      this.append(b, layer, p, k, v, lam, b);
      for (let j = 0; j < Hq; j++) {
        const row = this.attend(this.head(b, layer, Math.floor(j / (Hq / Hkv))), q, (b * Hq + j) * D, Infinity);
        out.set(row, (b * Hq + j) * D);
      }
      this.evictAfterLayer(b, layer);
    }
    return out;
  }

  /**
   * One prefill chunk of `C` tokens of sequence `seq` for one layer, positions start..start+C-1.
   * q [C, Hq, D], k/v [C, Hkv, D], lam [C, Hkv]. Returns out [C, Hq, D].
   */
  prefill(
    layer: number,
    seq: number,
    start: number,
    q: ArrayLike<number>,
    k: ArrayLike<number>,
    v: ArrayLike<number>,
    lam: ArrayLike<number>,
    C: number,
  ): Float64Array {
    const { qHeads: Hq, kvHeads: Hkv, headDim: D } = this.cfg;
    this.T[seq]! = start + C;
    for (let c = 0; c < C; c++) this.append(seq, layer, start + c, k, v, lam, c);
    const out = new Float64Array(C * Hq * D);
    for (let c = 0; c < C; c++) {
      for (let j = 0; j < Hq; j++) {
        // Causal: the query at position start + c sees every token at a position <= its own.
        const row = this.attend(this.head(seq, layer, Math.floor(j / (Hq / Hkv))), q, (c * Hq + j) * D, start + c);
        out.set(row, (c * Hq + j) * D);
      }
    }
    this.evictAfterLayer(seq, layer);
    return out;
  }

  /** Appends token row `row` of k/v/lam (as [rows, Hkv, D] / [rows, Hkv]) at position p. */
  private append(
    seq: number,
    layer: number,
    p: number,
    k: ArrayLike<number>,
    v: ArrayLike<number>,
    lam: ArrayLike<number>,
    row: number,
  ): void {
    const { kvHeads: Hkv, headDim: D } = this.cfg;
    for (let h = 0; h < Hkv; h++) {
      const off = (row * Hkv + h) * D;
      const kk = new Float64Array(D);
      const vv = new Float64Array(D);
      let n2 = 0;
      for (let d = 0; d < D; d++) {
        kk[d] = k[off + d]!;
        vv[d] = v[off + d]!;
        n2 += kk[d]! * kk[d]!;
      }
      this.head(seq, layer, h).push({ p, k: kk, v: vv, lam: lam[row * Hkv + h]!, knorm: Math.sqrt(n2) });
    }
  }

  /** Softmax attention of q[qOff .. qOff+D) over the tokens with position <= maxPos. */
  private attend(toks: Token[], q: ArrayLike<number>, qOff: number, maxPos: number): Float64Array {
    const D = this.cfg.headDim;
    const vis = toks.filter((t) => t.p <= maxPos);
    const logits = vis.map((t) => {
      let s = 0;
      for (let d = 0; d < D; d++) s += q[qOff + d]! * t.k[d]!;
      return s * this.cfg.scale;
    });
    const m = Math.max(...logits);
    const w = logits.map((x) => Math.exp(x - m));
    const z = w.reduce((a, b) => a + b, 0);
    const out = new Float64Array(D);
    vis.forEach((t, i) => {
      for (let d = 0; d < D; d++) out[d]! += (w[i]! / z) * t.v[d]!;
    });
    return out;
  }

  /** Eviction of SPEC sections 5 and 7 after layer `layer` of sequence `seq` was processed. */
  private evictAfterLayer(seq: number, layer: number): void {
    const { scope, kvHeads: Hkv, layers: L } = this.cfg;
    // threshold: drop tokens with score < ln(tau) after every pass (window-protected stay).
    if (this.cfg.threshold !== null) {
      const cut = Math.log(this.cfg.threshold);
      const T = this.T[seq]!;
      for (let h = 0; h < Hkv; h++) this.setHead(seq, layer, h, this.head(seq, layer, h).filter((t) => !(this.score(t, T) < cut)));
    }
    if (scope === 'head') {
      for (let h = 0; h < Hkv; h++) this.evictPool(seq, [[layer, h]], 1);
    } else if (scope === 'layer') {
      const pool: [number, number][] = [];
      for (let h = 0; h < Hkv; h++) pool.push([layer, h]);
      this.evictPool(seq, pool, Hkv);
    } else if (layer === L - 1) {
      const pool: [number, number][] = [];
      for (let l = 0; l < L; l++) for (let h = 0; h < Hkv; h++) pool.push([l, h]);
      this.evictPool(seq, pool, L * Hkv);
    }
  }

  /**
   * Budget rule over a pool of `nHeads` heads (given in (layer, head) index order): when the pool
   * holds >= nHeads * (M + B) tokens, keep its nHeads * M best; with a floor ratio f, keep the best
   * floor(total * (1 - f)), count per head, add floor(M * f), keep each head's best count.
   */
  private evictPool(seq: number, pool: [number, number][], nHeads: number): void {
    const { memory: M, buffer: B, floor: f } = this.cfg;
    const T = this.T[seq]!;
    const ranked: Ranked[] = [];
    pool.forEach(([l, h], idx) => {
      for (const tok of this.head(seq, l, h)) ranked.push({ tok, score: this.score(tok, T), head: idx });
    });
    if (ranked.length < nHeads * (M + B)) return;
    ranked.sort(byRank);
    const total = nHeads * M;
    if (f === 0 || this.cfg.scope === 'head') {
      const keep = new Set(ranked.slice(0, total).map((r) => r.tok));
      pool.forEach(([l, h]) => {
        this.setHead(seq, l, h, this.head(seq, l, h).filter((t) => keep.has(t)));
      });
      return;
    }
    const counts = new Array<number>(pool.length).fill(0);
    for (const r of ranked.slice(0, Math.floor(total * (1 - f)))) counts[r.head]!++;
    const extra = Math.floor(M * f);
    pool.forEach(([l, h], idx) => {
      const own = ranked.filter((r) => r.head === idx).slice(0, counts[idx]! + extra);
      const keep = new Set(own.map((r) => r.tok));
      this.setHead(seq, l, h, this.head(seq, l, h).filter((t) => keep.has(t)));
    });
  }
}
