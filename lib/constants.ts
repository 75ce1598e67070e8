/** Supported values, mirrored from csrc/common/config.h. */
import type { Activation, DType, GateKind, Scope, Strategy } from './types.js';

export const DTYPES: readonly DType[] = ['fp32', 'fp16', 'bf16'];
export const STRATEGIES: readonly Strategy[] = ['alpha', 'knorm_alpha'];
export const SCOPES: readonly Scope[] = ['head', 'layer', 'global'];
export const GATE_KINDS: readonly GateKind[] = ['rg', 'rg2', 'rg3'];
export const ACTIVATIONS: readonly Activation[] = ['silu', 'swish', 'gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu'];
/** Head dims with fast CUDA paths; every head dim up to MAX_HEAD_DIM is correct on the CPU. */
export const FAST_HEAD_DIMS: readonly number[] = [64, 128, 256];
export const MAX_HEAD_DIM = 1024;
/** The CUDA kernels take head dims that are multiples of CUDA_HEAD_DIM_MULTIPLE up to CUDA_MAX_HEAD_DIM. */
export const CUDA_MAX_HEAD_DIM = 256;
export const CUDA_HEAD_DIM_MULTIPLE = 8;
/** The CUDA gate reads its input in 16-byte vectors: inputSize must be a multiple of 8. */
export const CUDA_GATE_INPUT_MULTIPLE = 8;
/** Scope "global" on CUDA: at most this many heads (layers x kvHeads) share one pool (kernels/pool.cuh). */
export const CUDA_MAX_POOL_HEADS = 1024;
/** The CUDA decode kernel on tensor cores (fp16/bf16, sm_80+) takes up to this many query heads per KV head. */
export const CUDA_MMA_MAX_GROUP = 8;
