/**
 * Which backends the GPU-capable tests run on: always 'cpu', plus 'cuda' when `backends()`
 * reports it usable. With TRIMKV_REQUIRE_CUDA=1 (npm run test:gpu) a missing CUDA backend
 * is a failure, not a skip.
 */
import { backends } from '../lib/index.js';
import type { BackendName } from '../lib/types.js';

const cudaInfo = backends().find((b) => b.name === 'cuda');

/** True when the CUDA backend can be opened on this machine. */
export const cudaAvailable: boolean = cudaInfo?.available === true;

/** Why CUDA is not under test (empty when it is). */
export const cudaSkipReason: string = cudaAvailable
  ? ''
  : (cudaInfo?.reason ?? (cudaInfo ? 'backends() gave no reason' : 'backends() has no cuda entry'));

if (!cudaAvailable && process.env.TRIMKV_REQUIRE_CUDA === '1') {
  throw new Error(`TRIMKV_REQUIRE_CUDA=1 but the CUDA backend is unavailable: ${cudaSkipReason}`);
}

let announced = false;

/** ['cpu'] or ['cpu', 'cuda']; prints once, visibly, why CUDA is skipped. */
export function backendsUnderTest(): BackendName[] {
  if (!cudaAvailable && !announced) {
    announced = true;
    console.warn(`\n[trimkv tests] CUDA tests skipped: ${cudaSkipReason}\n`);
  }
  return cudaAvailable ? ['cpu', 'cuda'] : ['cpu'];
}
