#!/usr/bin/env node
import('../dist/lib/cli/index.js')
  .then((m) => m.main(process.argv.slice(2)))
  .then((code) => process.exit(code ?? 0))
  .catch((e) => {
    if (e && e.code === 'ERR_MODULE_NOT_FOUND') {
      console.error('trimkv: dist/ is missing; run `npm run build:ts` first');
    } else {
      console.error(`trimkv: ${e && e.code ? `${e.code}: ` : ''}${e && e.message ? e.message : e}`);
    }
    process.exit(1);
  });
