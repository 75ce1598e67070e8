/**
 * Chat templates come from the model directory, which is as untrusted as its weights, and a
 * Jinja template is a program: `{% for i in range(10**9) %}` or a string doubled in a loop would
 * hold the caller's thread for minutes or take gigabytes. @huggingface/jinja has no limits of
 * its own, so templates are parsed and rendered in a worker thread with a memory cap, and the
 * caller waits for the answer synchronously (Atomics.wait on a shared flag, then
 * receiveMessageOnPort) for at most a time budget. A worker that overruns is terminated and a
 * fresh one started on the next call. Why not in the caller's thread: nothing can interrupt
 * synchronous JavaScript there.
 */
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { MessageChannel, receiveMessageOnPort, Worker, type MessagePort } from 'node:worker_threads';

/** Time budget of one render (parse included). */
export const TEMPLATE_TIME_LIMIT_MS = 2000;
/** The worker's heap cap: far above any real chat, far below what a hostile template could take. */
export const TEMPLATE_HEAP_LIMIT_MB = 256;
/** Longest rendered text accepted (characters). */
export const TEMPLATE_MAX_OUTPUT = 16 * 2 ** 20;

/** The worker: parses (cached per source) and renders, answering on the port it was given. */
const WORKER_SOURCE = `
const { workerData } = require('node:worker_threads');
const { flag, port, jinja, maxOutput } = workerData;
const cells = new Int32Array(flag);
const done = (msg) => { port.postMessage(msg); Atomics.store(cells, 0, 1); Atomics.notify(cells, 0); };
const parsed = new Map();
import(jinja).then(({ Template }) => {
  port.on('message', ({ source, vars }) => {
    let stage = 'parse';
    try {
      let t = parsed.get(source);
      if (t === undefined) {
        t = new Template(source);
        if (parsed.size > 16) parsed.clear();
        parsed.set(source, t);
      }
      stage = 'render';
      const text = t.render(vars);
      if (typeof text !== 'string' || text.length > maxOutput) throw new Error('the rendered text is longer than ' + maxOutput + ' characters');
      done({ ok: true, text });
    } catch (e) {
      done({ ok: false, stage, message: String(e && e.message ? e.message : e) });
    }
  });
  done({ ok: true, ready: true });
}, (e) => done({ ok: false, stage: 'load', message: String(e && e.message) }));
`;

interface Reply { ok: boolean; text?: string; stage?: 'parse' | 'render' | 'load'; message?: string; ready?: boolean }

/** Why a render failed: the template's own error (parse/render), or the sandbox's limits. */
export class TemplateError extends Error {
  constructor(readonly stage: 'parse' | 'render' | 'limit' | 'input', message: string) {
    super(message);
  }
}

let sandbox: { worker: Worker; port: MessagePort; cells: Int32Array } | undefined;

function start(): NonNullable<typeof sandbox> {
  const flag = new SharedArrayBuffer(4);
  const { port1, port2 } = new MessageChannel();
  const jinja = pathToFileURL(createRequire(import.meta.url).resolve('@huggingface/jinja')).href
    .replace(/index\.cjs$/, 'index.js');
  const worker = new Worker(WORKER_SOURCE, {
    eval: true,
    workerData: { flag, port: port2, jinja, maxOutput: TEMPLATE_MAX_OUTPUT },
    transferList: [port2],
    resourceLimits: { maxOldGenerationSizeMb: TEMPLATE_HEAP_LIMIT_MB, maxYoungGenerationSizeMb: 32 },
    stdout: true,
    stderr: true,
  });
  worker.unref();
  port1.unref();
  worker.on('error', () => {}); // a worker past its heap cap dies; the caller's wait times out
  const s = { worker, port: port1, cells: new Int32Array(flag) };
  const ready = wait(s, 10_000);
  if (ready === undefined || !ready.ok) {
    void worker.terminate();
    throw new TemplateError('limit', `the template worker did not start${ready?.message ? ` (${ready.message})` : ''}`);
  }
  return s;
}

/** Waits for the worker's next answer for at most `ms`; undefined on a timeout. */
function wait(s: NonNullable<typeof sandbox>, ms: number): Reply | undefined {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = receiveMessageOnPort(s.port);
    if (got !== undefined) {
      Atomics.store(s.cells, 0, 0);
      return got.message as Reply;
    }
    const left = deadline - Date.now();
    if (left <= 0) return undefined;
    Atomics.wait(s.cells, 0, 0, left);
    // The flag is set after the message is posted: it is readable on the next look.
  }
}

/**
 * Renders a Jinja template in the sandbox.
 * @throws {TemplateError} stage 'parse' / 'render' for the template's own errors, 'limit' when
 *   it ran past TEMPLATE_TIME_LIMIT_MS or its memory cap, 'input' for variables that cannot be
 *   copied to the worker (functions, say).
 */
export function renderTemplate(source: string, vars: Record<string, unknown>, timeLimitMs = TEMPLATE_TIME_LIMIT_MS): string {
  sandbox ??= start();
  const s = sandbox;
  Atomics.store(s.cells, 0, 0);
  try {
    s.port.postMessage({ source, vars });
  } catch (e) {
    throw new TemplateError('input', `the template variables cannot be passed on (${(e as Error).message})`);
  }
  const reply = wait(s, timeLimitMs);
  if (reply === undefined) {
    sandbox = undefined;
    void s.worker.terminate();
    throw new TemplateError('limit', `rendering took longer than ${timeLimitMs} ms or more than ${TEMPLATE_HEAP_LIMIT_MB} MB (a hostile or broken template?)`);
  }
  if (!reply.ok) {
    throw new TemplateError(reply.stage === 'parse' ? 'parse' : reply.stage === 'render' ? 'render' : 'limit', reply.message ?? 'unknown error');
  }
  return reply.text!;
}
