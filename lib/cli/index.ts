/** `npx trimkv <command>`: info, demo, bench. */
import { parseArgs } from 'node:util';
import { SingleBar, Presets } from 'cli-progress';
import { backends, buildInfo, openRuntime } from '../runtime.js';
import type { BackendRequest, DType } from '../types.js';
import { TrimKVError } from '../errors.js';
import { runDemo, type DemoOptions } from './demo.js';
import { benchCommand, SECTIONS } from '../../bench/cli.js';

const USAGE = `Usage: trimkv <command> [options]

Commands:
  info                 backends, devices, compiled CUDA architectures, versions
  demo [options]       a long decode of a model-shaped workload with a bounded cache
    --backend <b>      auto | cpu | cuda (default auto)
    --layers <n>       layers (default 28)
    --q-heads <n>      query heads (default 32)
    --kv-heads <n>     KV heads (default 8)
    --head-dim <n>     head dim (default 128)
    --batch <n>        sequences decoded together (default 1 on CPU, 8 on CUDA)
    --memory <n>       M, tokens kept per head (default 256 on CPU, 1024 on CUDA)
    --buffer <n>       B (default 0)
    --prompt <n>       prompt tokens prefilled first (default 2 * M)
    --steps <n>        decode steps (default 256 on CPU, 4096 on CUDA)
    --dtype <d>        fp32 | fp16 | bf16 (default bf16)
    --json             print the summary as JSON
  bench [options]      the benchmark suite: decode, prefill, gate, selection, whole-model
                       step, long generation; copy ceiling and roofline fractions; JSON,
                       Markdown and SVG plots
    --quick            small sweeps (about a minute on the GPU)
    --only <list>      sections, comma-separated: ${SECTIONS.join(',')}
    --backend <list>   auto | cpu | cuda, or several comma-separated (e.g. cuda,cpu)
    --out <dir>        where bench.json, bench.md and the SVGs go (default bench-out)
    --torch <file>     JSON from bench/torch_compare.py (same GPU, same run): ratios
    --results <file>   also write this Markdown file (e.g. bench/RESULTS.md), plots in plots/
  help                 this text
`;

function info(): number {
  const b = buildInfo();
  const pkg = { node: process.version, napi: process.versions.napi };
  console.log(`trimkv native addon: ${b.addon.kind} (${b.addon.path})`);
  console.log(`node ${pkg.node}, N-API ${pkg.napi}`);
  console.log(`CUDA compiled in: ${b.cudaCompiled ? `yes, runtime ${b.cudaRuntime}, architectures ${b.cudaArchs}` : 'no'}`);
  console.log(`NVIDIA driver: ${b.cudaDriver ?? 'none found'}`);
  for (const be of backends()) {
    console.log(`backend ${be.name}: ${be.available ? 'available' : `unavailable (${be.reason})`}`);
    for (const d of be.devices) {
      const extra = d.computeCapability
        ? `, sm_${d.computeCapability.replace('.', '')}, ${d.multiprocessors} SMs, ${((d.totalMemory ?? 0) / 2 ** 30).toFixed(1)} GiB`
        : '';
      console.log(`  [${d.index}] ${d.name}${extra}`);
    }
  }
  return 0;
}

function int(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n)) throw new TrimKVError('ERR_INVALID_ARGUMENT', `Expected an integer for --${name} but received ${v}`);
  return n;
}

async function demo(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      backend: { type: 'string' }, layers: { type: 'string' }, 'q-heads': { type: 'string' },
      'kv-heads': { type: 'string' }, 'head-dim': { type: 'string' }, batch: { type: 'string' },
      memory: { type: 'string' }, buffer: { type: 'string' }, prompt: { type: 'string' },
      steps: { type: 'string' }, dtype: { type: 'string' }, json: { type: 'boolean' },
    },
  });
  const rt = openRuntime((values.backend ?? 'auto') as BackendRequest);
  const gpu = rt.backend === 'cuda';
  const memory = int(values.memory, 'memory') ?? (gpu ? 1024 : 256);
  const opts: DemoOptions = {
    layers: int(values.layers, 'layers') ?? 28,
    qHeads: int(values['q-heads'], 'q-heads') ?? 32,
    kvHeads: int(values['kv-heads'], 'kv-heads') ?? 8,
    headDim: int(values['head-dim'], 'head-dim') ?? 128,
    batch: int(values.batch, 'batch') ?? (gpu ? 8 : 1),
    memory,
    buffer: int(values.buffer, 'buffer') ?? 0,
    prompt: int(values.prompt, 'prompt') ?? 2 * memory,
    steps: int(values.steps, 'steps') ?? (gpu ? 4096 : 256),
    dtype: (values.dtype ?? 'bf16') as DType,
  };
  const bar = values.json || !process.stderr.isTTY
    ? undefined
    : new SingleBar({ format: 'decode |{bar}| {value}/{total} steps | {rate} tok/s | cache {mem}', hideCursor: true, stream: process.stderr }, Presets.shades_classic);
  if (!values.json) {
    console.log(`trimkv demo on ${rt.backend}: ${opts.layers} layers, ${opts.qHeads}/${opts.kvHeads} heads, head dim ${opts.headDim}, ` +
      `batch ${opts.batch}, M ${opts.memory}, B ${opts.buffer}, prompt ${opts.prompt}, ${opts.steps} steps, ${opts.dtype}`);
  }
  bar?.start(opts.steps, 0, { rate: '-', mem: '-' });
  let lastPrint = 0;
  const summary = await runDemo(rt, opts, (done, s) => {
    if (bar) bar.update(done, { rate: s.tokensPerSecond.toFixed(1), mem: mib(s.cacheBytes) });
    else if (!values.json && (done - lastPrint >= Math.max(1, Math.floor(opts.steps / 10)) || done === opts.steps)) {
      lastPrint = done;
      console.log(`  ${done}/${opts.steps} steps, ${s.tokensPerSecond.toFixed(1)} tok/s, cache ${mib(s.cacheBytes)}`);
    }
  });
  bar?.stop();
  rt.dispose();
  if (values.json) {
    console.log(JSON.stringify(summary, null, 2));
  } else {
    console.log(`tokens generated: ${summary.tokensGenerated} (${opts.batch} x ${opts.steps}), prompt tokens: ${summary.promptTokens}`);
    console.log(`cache held: ${mib(summary.cacheBytes)} vs full cache ${mib(summary.fullCacheBytes)} ` +
      `(${(100 * summary.cacheBytes / summary.fullCacheBytes).toFixed(1)}%); tokens per head: ${summary.tokensPerHead}`);
    console.log(`throughput: ${summary.tokensPerSecond.toFixed(1)} tokens/s (${summary.msPerStep.toFixed(2)} ms per step of ${opts.layers} layers)`);
  }
  return 0;
}

function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

/** Runs the CLI; resolves to the exit code. */
export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd !== undefined && (rest.includes('--help') || rest.includes('-h'))) {
    console.log(USAGE);
    return 0;
  }
  try {
    switch (cmd) {
      case 'info': return info();
      case 'demo': return await demo(rest);
      case 'bench': return await benchCommand(rest);
      case undefined: case 'help': case '--help': case '-h':
        console.log(USAGE);
        return 0;
      default:
        console.error(`trimkv: unknown command '${cmd}'\n\n${USAGE}`);
        return 2;
    }
  } catch (e) {
    const err = e as { code?: string; message?: string };
    console.error(`trimkv: ${err.code ? `${err.code}: ` : ''}${err.message ?? String(e)}`);
    return 1;
  }
}
