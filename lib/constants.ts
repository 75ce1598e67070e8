/**
 * Supported values, mirrored from the native name parsers (`parse_dtype`, `parse_strategy`,
 * `parse_scope`, `parse_gate_kind`, `parse_activation` in csrc/common/). Each value list is the
 * one statement of its set: the string-literal types (re-exported by types.ts) are derived from
 * it here, so this module imports nothing and every other module of lib/ may import it.
 */

/** Storage dtypes of tensors and of the KV cache. Compute is always float32. */
export const DTYPES = ['fp32', 'fp16', 'bf16'] as const;
export type DType = (typeof DTYPES)[number];
/** Bytes of one element of each dtype: the one table of dtype sizes in lib/. */
export const DTYPE_BYTES: Readonly<Record<DType, number>> = { fp32: 4, fp16: 2, bf16: 2 };

/** Backends the addon can run on. */
export const BACKENDS = ['cpu', 'cuda'] as const;
export type BackendName = (typeof BACKENDS)[number];

/** Decayed score of SPEC section 4. */
export const STRATEGIES = ['alpha', 'knorm_alpha'] as const;
export type Strategy = (typeof STRATEGIES)[number];

/** Budget scope of SPEC section 7. */
export const SCOPES = ['head', 'layer', 'global'] as const;
export type Scope = (typeof SCOPES)[number];

/** Retention-gate variants of SPEC section 3. */
export const GATE_KINDS = ['rg', 'rg2', 'rg3'] as const;
export type GateKind = (typeof GATE_KINDS)[number];

/**
 * Gate activations (Hugging Face `hidden_act` names). Qwen3, Llama and Phi-3 use `silu`.
 * `gelu` is the exact erf form; `gelu_pytorch_tanh` / `gelu_new` the tanh approximation.
 */
export const ACTIVATIONS = ['silu', 'swish', 'gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu'] as const;
export type Activation = (typeof ACTIVATIONS)[number];

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
