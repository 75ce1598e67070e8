/**
 * The `trimkv bench` command: parses its options, runs the suite with a progress bar, writes
 * the report and prints it. The one module of bench/ that lib/cli/ imports.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Presets, SingleBar } from 'cli-progress';
import { TrimKVError } from '../lib/errors.js';
import { SECTIONS, type Section } from './plan.js';
import { writeReport } from './report.js';
import { runSuite } from './suite.js';
import { readTorch } from './torch.js';

export { SECTIONS };

/** `trimkv bench [options]` (options in lib/cli/index.ts's usage); resolves to the exit code. @throws {TrimKVError} */
export async function benchCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      quick: { type: 'boolean' }, only: { type: 'string' }, backend: { type: 'string' }, out: { type: 'string' },
      torch: { type: 'string' }, results: { type: 'string' },
    },
  });
  const only = values.only?.split(',').map((x) => x.trim()).filter(Boolean) ?? [];
  for (const s of only) {
    if (!(SECTIONS as readonly string[]).includes(s)) {
      throw new TrimKVError('ERR_INVALID_ARGUMENT', `Expected one of ${SECTIONS.join(', ')} for --only but received ${s}`);
    }
  }
  const list = (values.backend ?? 'auto').split(',').map((x) => x.trim());
  for (const b of list) {
    if (!['auto', 'cpu', 'cuda'].includes(b)) throw new TrimKVError('ERR_INVALID_ARGUMENT', `Expected auto, cpu or cuda for --backend but received ${b}`);
  }
  const torch = values.torch ? readTorch(values.torch) : null;
  const out = values.out ?? 'bench-out';
  const bar = process.stderr.isTTY
    ? new SingleBar({ format: 'bench |{bar}| {value}/{total} cases | {label}', hideCursor: true, stream: process.stderr, etaBuffer: 4 }, Presets.shades_classic)
    : undefined;
  let started = false, last = '';
  const res = await runSuite({
    backends: list as ('auto' | 'cpu' | 'cuda')[], quick: values.quick === true, only: only as Section[], torch: values.torch,
    onProgress: ({ done, total, label }) => {
      if (bar) {
        if (!started) { bar.start(total, done, { label }); started = true; } else bar.update(done, { label });
      } else if (label !== last) {
        last = label;
        console.error(`[${done}/${total}] ${label}`);
      }
    },
  });
  bar?.stop();
  const files = writeReport(res, torch, out, values.results);
  console.log(readFileSync(join(out, 'bench.md'), 'utf8'));
  for (const r of res.runs) {
    const failed = [r.decode, r.scopes, r.prefill, r.gate, r.select, r.model, r.ladder, r.prefillAttend, r.selectKernel, r.stream].flat()
      .filter((x) => 'error' in x).length;
    console.error(`${r.backend}: ${r.device.name}, copy ${r.copyGBs ? `${r.copyGBs.toFixed(0)} GB/s` : 'n/a'}, ${r.seconds.toFixed(0)} s` +
      (failed ? `, ${failed} case(s) failed (see bench.md)` : ''));
  }
  console.error(`wrote ${files.join(', ')}`);
  return 0;
}
