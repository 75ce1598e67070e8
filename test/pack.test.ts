/**
 * The package as users get it: `npm pack`, then an install of the tarball into an empty
 * project with no registry reachable (the tarball and the npm cache only), then
 * `npx trimkv info` and `npx trimkv demo` there. Also checks that the tarball ships exactly
 * what users need.
 */
import { describe, expect, test } from 'vitest';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';

function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = {}) {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8', env: { ...process.env, ...env }, maxBuffer: 64 << 20 });
  return { status: r.status, stdout: r.stdout ?? '', out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

// The offline install can only be served by an npm cache that already holds the dependencies
// (as on every machine that ran `npm ci` for this checkout); a bare machine has none.
const cacheDir = spawnSync(npm, ['config', 'get', 'cache'], { encoding: 'utf8' }).stdout?.trim() ?? '';
const hasCache = cacheDir !== '' && existsSync(join(cacheDir, '_cacache'));
if (!hasCache) console.warn(`[trimkv tests] pack.test.ts skipped: no npm cache at '${cacheDir}' to install from offline`);

describe.skipIf(!hasCache)('npm pack and an offline install', () => {
  test('the tarball installs with no registry and runs `trimkv demo`', () => {
    const dir = mkdtempSync(join(tmpdir(), 'trimkv-pack-'));
    try {
      const packed = run(npm, ['pack', '--json', '--pack-destination', dir], root);
      expect(packed.status, packed.out.slice(-3000)).toBe(0);
      // stdout holds the prepack script's output, then the JSON report.
      const json = JSON.parse(packed.stdout.slice(packed.stdout.lastIndexOf('\n[') + 1));
      const files: string[] = json[0].files.map((f: { path: string }) => f.path);
      // What users need, and nothing of the development tree.
      for (const need of ['dist/index.js', 'dist/index.d.ts', 'dist/cli.js', 'bin/trimkv.js', 'scripts/install.mjs',
        'CMakeLists.txt', 'binding.gyp', 'csrc/ops/cache.h', 'csrc/kernels/attention/decode.cuh', 'package.json', 'README.md']) {
        expect(files, `tarball lacks ${need}`).toContain(need);
      }
      for (const f of files) expect(f, `tarball ships ${f}`).not.toMatch(/^(test|lib|node_modules|build)\/|^\.|harness\//);
      const tarball = readdirSync(dir).find((f) => f.endsWith('.tgz'))!;
      const proj = join(dir, 'consumer');
      run('mkdir', ['-p', proj], dir);
      writeFileSync(join(proj, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module' }));
      // No registry reachable: --offline, and every request would go through a dead proxy, so
      // only the tarball and the npm cache can serve the install.
      const offline = { npm_config_offline: 'true', npm_config_proxy: 'http://127.0.0.1:9/',
        npm_config_https_proxy: 'http://127.0.0.1:9/', npm_config_audit: 'false',
        npm_config_fund: 'false', TRIMKV_CUDA: process.env.TRIMKV_PACK_TEST_CUDA ?? '0' };
      const installed = run(npm, ['install', '--foreground-scripts', join(dir, tarball)], proj, offline);
      expect(installed.status, installed.out.slice(-4000)).toBe(0);
      // With prebuilt binaries in the package (after `npm run prebuild`) nothing compiles;
      // without them (a development checkout, as in CI) the install builds from source.
      const prebuilt = files.some((f) => f.startsWith('prebuilds/linux-x64/'));
      expect(installed.out).toMatch(prebuilt ? /trimkv: using the prebuilt binary/ : /trimkv: build finished/);
      const info = run(npm, ['exec', '--offline', '--', 'trimkv', 'info'], proj, offline);
      expect(info.status, info.out.slice(-3000)).toBe(0);
      expect(info.out).toMatch(/backend cpu: available/);
      expect(info.out).toMatch(prebuilt ? /native addon: prebuilt/ : /native addon: local build/);
      const demo = run(npm, ['exec', '--offline', '--', 'trimkv', 'demo', '--backend', 'cpu', '--layers', '2', '--q-heads', '4',
        '--kv-heads', '2', '--head-dim', '64', '--memory', '32', '--prompt', '64', '--steps', '40'], proj, offline);
      expect(demo.status, demo.out.slice(-3000)).toBe(0);
      expect(demo.out).toMatch(/tokens generated: 40/);
      expect(demo.out).toMatch(/cache held: .* vs full cache/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 900_000);
});
