/**
 * The package as users get it: `npm pack`, then an install of the tarball into an empty
 * project with no registry reachable (the tarball and an npm cache only), then
 * `npx trimkv info` and `npx trimkv demo` there. Also checks that the tarball ships exactly
 * what users need.
 *
 * The npm cache the offline install reads is private to this test and filled by the test
 * itself: an install of the same tarball with `--ignore-scripts` while the registry is
 * reachable stores the registry documents and the tarballs of trimkv's runtime dependencies
 * (an `npm ci` of this checkout would not: it fetches locked tarballs, not the documents that
 * resolving the tarball's version ranges asks for). The second install then runs trimkv's own
 * install script with `--offline` and a dead proxy, so it proves that installing trimkv
 * downloads nothing: no binaries, no headers, no toolchains. What the machine's own npm cache
 * holds plays no part.
 */
import { describe, expect, test } from 'vitest';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';

/**
 * Runs a command to its end without blocking the event loop (a minutes-long spawnSync starves
 * vitest's worker channel and fails the run with "Timeout calling onTaskUpdate").
 */
function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}):
  Promise<{ status: number | null; stdout: string; out: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '', out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => { stdout += d; out += d; });
    child.stderr.setEncoding('utf8').on('data', (d: string) => { out += d; });
    child.on('error', reject);
    child.on('close', (status) => resolve({ status, stdout, out }));
  });
}

/** An empty consumer project in `dir`. */
function consumer(dir: string): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
  return dir;
}

describe('npm pack and an offline install', () => {
  test('the tarball installs with no registry and runs `trimkv demo`', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'trimkv-pack-'));
    try {
      const packed = await run(npm, ['pack', '--json', '--pack-destination', dir], root);
      expect(packed.status, packed.out.slice(-3000)).toBe(0);
      // stdout holds the prepack script's output, then the JSON report.
      const json = JSON.parse(packed.stdout.slice(packed.stdout.lastIndexOf('\n[') + 1));
      const files: string[] = json[0].files.map((f: { path: string }) => f.path);
      // What users need, and nothing of the development tree.
      for (const need of ['dist/lib/index.js', 'dist/lib/index.d.ts', 'dist/lib/cli/index.js', 'dist/bench/cli.js', 'dist/bench/suite.js', 'bin/trimkv.js', 'scripts/install.mjs',
        'CMakeLists.txt', 'binding.gyp', 'csrc/ops/cache.h', 'csrc/kernels/attention/decode.cuh', 'package.json', 'README.md']) {
        expect(files, `tarball lacks ${need}`).toContain(need);
      }
      // Sources, tests, the benchmark's results, plots and Python baseline stay in the repository.
      for (const f of files) expect(f, `tarball ships ${f}`).not.toMatch(/^(test|lib|bench|node_modules|build)\/|^\.|harness\//);
      // package.json's entry points name files that the tarball has.
      const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
      for (const entry of [pkg.main, pkg.types, pkg.exports['.'].import, pkg.exports['.'].types, pkg.bin.trimkv]) {
        expect(files, `package.json names ${entry}, which the tarball lacks`).toContain(entry.replace(/^\.\//, ''));
      }
      const tarball = join(dir, readdirSync(dir).find((f) => f.endsWith('.tgz'))!);
      const common = { npm_config_cache: join(dir, 'npm-cache'), npm_config_audit: 'false', npm_config_fund: 'false',
        npm_config_update_notifier: 'false' };

      // 1. Fill the private cache from the registry: the same install, no scripts run.
      const warm = await run(npm, ['install', '--ignore-scripts', '--prefer-online', tarball], consumer(join(dir, 'warm')), common);
      expect(warm.status, `filling the test's npm cache from the registry failed:\n${warm.out.slice(-3000)}`).toBe(0);

      // 2. No registry reachable: --offline, and every request would go through a dead proxy, so
      // only the tarball and the cache filled above can serve the install.
      const offline = { ...common, npm_config_offline: 'true', npm_config_proxy: 'http://127.0.0.1:9/',
        npm_config_https_proxy: 'http://127.0.0.1:9/',
        TRIMKV_CUDA: process.env.TRIMKV_PACK_TEST_CUDA ?? '0' };
      const proj = consumer(join(dir, 'consumer'));
      const installed = await run(npm, ['install', '--foreground-scripts', tarball], proj, offline);
      expect(installed.status, installed.out.slice(-4000)).toBe(0);
      // With prebuilt binaries in the package (after `npm run prebuild`) nothing compiles;
      // without them (a development checkout, as in CI) the install builds from source.
      const prebuilt = files.some((f) => f.startsWith('prebuilds/linux-x64/'));
      expect(installed.out).toMatch(prebuilt ? /trimkv: using the prebuilt binary/ : /trimkv: build finished/);
      const info = await run(npm, ['exec', '--offline', '--', 'trimkv', 'info'], proj, offline);
      expect(info.status, info.out.slice(-3000)).toBe(0);
      expect(info.out).toMatch(/backend cpu: available/);
      expect(info.out).toMatch(prebuilt ? /native addon: prebuilt/ : /native addon: local build/);
      const demo = await run(npm, ['exec', '--offline', '--', 'trimkv', 'demo', '--backend', 'cpu', '--layers', '2', '--q-heads', '4',
        '--kv-heads', '2', '--head-dim', '64', '--memory', '32', '--prompt', '64', '--steps', '40'], proj, offline);
      expect(demo.status, demo.out.slice(-3000)).toBe(0);
      expect(demo.out).toMatch(/tokens generated: 40/);
      expect(demo.out).toMatch(/cache held: .* vs full cache/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 900_000);
});
