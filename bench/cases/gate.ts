/** Section "gate": the "rg" retention gate at decode batch sizes, bf16 weights cycled past L2. */
import type { Runtime } from '../../lib/runtime.js';
import type { GateSpec } from '../../lib/types.js';
import { attempt, type Case, type CaseContext, type Row } from '../case.js';
import { randomArray, toBf16 } from '../inputs.js';
import { hostCost, setsFor, stats, timeBursts, timeMany, warmUp, type BenchOptions, type Stats } from '../timing.js';

export interface GateBenchResult {
  batch: number; inputSize: number; intermediateSize: number; kvHeads: number;
  time: Stats; weightBytes: number; bandwidth: number;
  /** Back-to-back runs of 8 calls (each a different gate, weights from DRAM), one event pair per run; ms per call. */
  burst?: Stats;
  /** bytes / burst median, GB/s. */
  burstBandwidth?: number;
  /** Host time to enqueue one call, microseconds (median). */
  hostUs?: number;
  /** Weights + input + output bytes of one call. */
  bytes?: number;
  flops?: number;
}

/** An "rg" gate of random bf16 weights. */
export function gateSpec(inputSize: number, intermediateSize: number, kvHeads: number): GateSpec {
  const w = (n: number, shape: number[]) => ({ dtype: 'bf16' as const, shape, data: toBf16(randomArray(n, 0.05)) });
  return {
    kind: 'rg', activation: 'silu', inputSize, intermediateSize, kvHeads,
    weights: {
      linear1Weight: w(intermediateSize * inputSize, [intermediateSize, inputSize]),
      linear1Bias: w(intermediateSize, [intermediateSize]),
      linear2Weight: w(kvHeads * intermediateSize, [kvHeads, intermediateSize]),
      bias: w(kvHeads, [kvHeads]),
    },
  };
}

/** The "rg" gate at decode batch sizes; weights bf16, several gates cycled past L2. */
export function benchGate(rt: Runtime, batch: number, inputSize = 2560, intermediateSize = 512, kvHeads = 8, calls = 200,
  o: BenchOptions = {}): GateBenchResult {
  const weightBytes = 2 * (intermediateSize * inputSize + intermediateSize + kvHeads * intermediateSize + kvHeads);
  const count = setsFor(rt, weightBytes, { maxSets: 128, ...o });
  const gates = Array.from({ length: count }, () => rt.createGate(gateSpec(inputSize, intermediateSize, kvHeads)));
  const x = rt.fromArray(randomArray(batch * inputSize), [batch, inputSize], 'bf16');
  const lam = rt.tensor([batch, kvHeads], 'fp32');
  try {
    const call = (i: number) => gates[i % count]!.run(x, lam);
    const hostMs = warmUp(count, call);
    const time = stats(timeMany(rt, Math.max(calls, count), call, hostMs));
    const burst = timeBursts(rt, call, hostMs, 1, calls);
    const hostUs = hostCost(rt, call, 8).median;
    const bytes = weightBytes + 2 * batch * inputSize + 4 * batch * kvHeads;
    const flops = 2 * batch * (intermediateSize * inputSize + kvHeads * intermediateSize);
    return { batch, inputSize, intermediateSize, kvHeads, time, weightBytes, bandwidth: bytes / (time.median * 1e-3) / 1e9,
      burst, burstBandwidth: bytes / (burst.median * 1e-3) / 1e9, hostUs, bytes, flops };
  } finally {
    for (const g of gates) g.dispose();
    x.dispose();
    lam.dispose();
  }
}

export interface GateRow extends GateBenchResult { fraction: number | null; burstFraction: number | null }

/** The gate cases of a run (rows in run.gate). */
export function gateCases(cx: CaseContext, run: { gate: Row<GateRow>[] }): Case[] {
  const { rt, plan, bo, frac } = cx;
  const sh = plan.shape;
  const out: Case[] = [];
  const g = plan.gate;
  for (const batch of g.batches) {
    out.push({ section: 'gate', label: `gate b=${batch}`, run: () => attempt(run.gate, { batch }, () => {
      const r = benchGate(rt, batch, g.hiddenSize, g.intermediate, sh.kvHeads, g.calls, bo);
      return { ...r, fraction: frac(r.bandwidth), burstFraction: r.burstBandwidth ? frac(r.burstBandwidth) : null };
    }) });
  }
  return out;
}
